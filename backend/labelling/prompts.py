"""Prompt texts for the LLM annotator.

The fixed part (instructions, label list, optional descriptions) is the system message and comes first;
everything that varies per item comes last, so servers that cache prompt prefixes reuse the fixed part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ANSWER_FORMAT = 'Reply with a JSON object of the form {"label": "<label>"} and nothing else.'
LABEL_ONLY_FORMAT = "Reply with the label alone, exactly as written in the list, and nothing else."


def system_prompt(
    labels: Sequence[str], descriptions: Mapping[str, str] | None = None, *, json_answer: bool = True
) -> str:
    lines = [
        "You classify short texts for a labelling team.",
        "Pick the single label from the list below that best describes the text.",
        "Use a label exactly as it is written in the list; never invent a new one.",
        ANSWER_FORMAT if json_answer else LABEL_ONLY_FORMAT,
        "",
        "Labels:",
    ]
    for label in labels:
        note = (descriptions or {}).get(label)
        lines.append(f"- {label}: {note}" if note else f"- {label}")
    return "\n".join(lines)


def zero_shot_message(text: str) -> str:
    return f"Text: {text}"


def hinted_message(text: str, hint: str) -> str:
    return (
        f'A search over texts this team has already labelled suggests "{hint}". '
        "Keep that label if it describes the text; otherwise choose a better one from the list.\n\n"
        f"Text: {text}"
    )


def few_shot_message(
    text: str, examples: Sequence[tuple[str, str]], candidates: Sequence[str] | None = None
) -> str:
    parts = []
    if examples:
        parts.append("Texts this team has labelled that look similar:")
        parts.extend(f"Text: {ex_text}\nLabel: {ex_label}" for ex_text, ex_label in examples)
        parts.append("")
    if candidates:
        parts.append("The answer is most likely one of: " + ", ".join(candidates) + ".")
        parts.append("")
    parts.append(f"Text: {text}")
    return "\n".join(parts)


def choice_system_prompt(*, json_answer: bool = True) -> str:
    """The fixed part of the choice view: the same for every item, so a server caches it once."""
    return "\n".join([
        "You classify short texts for a labelling team.",
        "Each text comes with a short list of candidate labels.",
        "Pick the candidate that best describes the text.",
        "Use a label exactly as it is written in the list.",
        ANSWER_FORMAT if json_answer else LABEL_ONLY_FORMAT,
    ])


def choice_message(text: str, candidates: Sequence[str], descriptions: Mapping[str, str] | None = None,
                   examples: Mapping[str, str] | None = None) -> str:
    """The candidates in the order given (the caller keeps it independent of any ranking); a label's
    description follows its name when the team gave one, and ``examples`` (label -> a text the team gave
    that label) show how the team uses it."""
    lines = ["Candidates:"]
    for label in candidates:
        note = (descriptions or {}).get(label)
        lines.append(f"- {label}: {note}" if note else f"- {label}")
        example = (examples or {}).get(label)
        if example:
            lines.append(f'  labelled example: "{_one_line(example)}"')
    lines += ["", f"Text: {text}"]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    """An example as one short line: a long post would crowd out the candidates in a small model's context."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."
