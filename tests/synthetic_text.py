"""Synthetic texts with a known truth, for tests of training and of the Label Studio training loop.

:func:`misleading_set` misleads a frozen sentence encoder: every text is one of three long boiler-plate
paragraphs (which dominate a mean-pooled embedding) followed by a one-word subject that alone decides the
label, and each label prefers one paragraph (70%). Frozen class centroids partly classify by paragraph; an
encoder trained on such anchors learns to read the subject.
"""

from __future__ import annotations

import random

PARAGRAPHS = [
    "Thank you for contacting customer support. Our team reads every message carefully and we usually answer "
    "within two working days, including public holidays and weekends.",
    "I have been a loyal member of your loyalty scheme for many years now and I have always recommended your "
    "shop to my friends, neighbours and colleagues at work.",
    "Please note that this message was written on my phone while travelling on a crowded train, so I apologise "
    "in advance for any typing mistakes or missing words.",
]
SUBJECTS = ("refund", "delivery", "password", "invoice")


def misleading_set(per_label: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i, subject in enumerate(SUBJECTS):
        for n in range(per_label):
            paragraph = i % 3 if rng.random() < 0.7 else rng.randrange(3)
            texts.append(f"{PARAGRAPHS[paragraph]} Ticket {seed}-{i}-{n}. Subject: {subject}.")
            labels.append(subject)
    return texts, labels
