"""The backend's settings, read from the environment variables Label Studio ML backend users know.

| variable | meaning | default |
|---|---|---|
| ``LABEL_STUDIO_URL`` | where Label Studio answers (predictions are written there) | the ``hostname`` /setup sends |
| ``LABEL_STUDIO_API_KEY`` | legacy token or personal access token | the token /setup sends |
| ``MODEL_DIR`` | per-project state, embedding and LLM caches | ``./model_dir`` |
| ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` | protect the backend's endpoints | off |
| ``LOG_LEVEL`` | logging level | ``INFO`` |
| ``HCC_LLM_BASE_URL`` | OpenAI-compatible endpoint; empty = encoder only | empty |
| ``HCC_LLM_MODEL`` / ``HCC_LLM_API_KEY`` | model name and key for that endpoint | ``local`` / none |
| ``HCC_LLM_STRUCTURED`` | how answers are held to the label set (see ``hcc annotate --help``) | ``auto`` |
| ``HCC_LLM_CONCURRENCY`` | cap on LLM requests in flight per process and endpoint (adapts below it) | ``64`` |
| ``HCC_LLM_LOGPROBS`` | ``1``: every view asks for logprobs; ``0``: none; unset: the views that use them | unset |
| ``HCC_ENCODER`` | sentence-transformers directory or name | the packaged all-MiniLM-L6-v2 |
| ``HCC_SECOND_ENCODER`` | a second encoder whose opinion sharpens the score (e.g. ``all-mpnet-base-v2``) | none |
| ``HCC_ENCODER_PRECISION`` | ``auto`` (bfloat16 on CPUs with native bfloat16), ``float32``, ``bfloat16`` | ``auto`` |
| ``HCC_CLASSIFIER`` | ``auto`` (the one the anchors prove), ``centroid``, ``ensemble``, ``topk_mean`` | ``auto`` |
| ``HCC_COMBINE`` | ``pool`` (views weighed by the anchors' evidence), ``dcca`` (the paper's DCCA) | ``pool`` |
| ``HCC_ANCHOR_LLM_CAP`` | anchors the LLM is asked about to weigh the views (>= 20; ``0``: never ask) | ``100`` |
| ``HCC_TRANSDUCTIVE`` | refine the class centroids on the project's tasks where the anchors show it helps | ``1`` |
| ``HCC_FROM_NAME`` | which ``<Choices>`` to predict when the config has several | the only one |
| ``HCC_CALIBRATION`` | score = calibrated P(label is right); ``0``: the agreement score | ``1`` |
| ``HCC_TARGET_PRECISION`` | precision the unflagged items must have (sets the flag threshold) | ``0.95`` |
| ``HCC_REVIEW_THRESHOLD`` | flag threshold when calibration is off | ``0.5`` |
| ``HCC_PRELABEL_ON_IMPORT`` | run the pipeline when tasks are imported | ``1`` |
| ``HCC_TASK_META`` | tasks given the backend's meta keys: ``flagged``, ``all`` or ``off`` | ``flagged`` |
| ``HCC_PRELABEL_CHUNK`` | tasks a pre-label labels and writes at a time at most (chunks grow to it) | ``20000`` |
| ``HCC_TRAIN`` | *Start training* fits the encoder to the anchors, then re-labels (``0``: re-labels only) | ``1`` |
| ``HCC_TRAIN_EVERY`` | new annotations since the last training that queue one (``0``: *Start training*) | ``100`` |
| ``HCC_TRAIN_MAX_STEPS`` | optimiser steps of one training at most (bounds its time) | ``400`` |
| ``HCC_MAX_REQUEST_MB`` | larger request bodies are refused with 413 | ``100`` |
| ``HCC_MAX_PROJECTS_IN_MEMORY`` | projects whose model a worker keeps loaded (least recently used go first) | ``32`` |
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend import __version__
from backend.labelling.anchors import AUTO, CLASSIFIERS
from backend.labelling.concurrency import DEFAULT_CAP
from backend.labelling.encoder import DEFAULT_ENCODER, resolve_precision
from backend.labelling.pipeline import COMBINERS, HCCConfig, check_anchor_llm_cap
from backend.labelling.training import TrainingConfig


def _flag(name: str, default: bool | None) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


TASK_META_POLICIES = ("flagged", "all", "off")


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (os.environ.get(name, "") or default).strip().lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _int(name: str, default: int, *, minimum: int) -> int:
    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}")
    return number


def _number(name: str, default: float, *, minimum: float) -> float:
    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not number >= minimum:  # also refuses nan
        raise ValueError(f"{name} must be at least {minimum:g}, got {value}")
    return number


@dataclass
class Settings:
    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    model_dir: Path = Path("model_dir")
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    llm_base_url: str = ""
    llm_model: str = "local"
    llm_api_key: str = field(default="", repr=False)
    llm_structured: str = "auto"
    llm_concurrency: int = DEFAULT_CAP  # the cap; the limit in flight adapts below it
    llm_logprobs: bool | None = None  # None: each view asks where it uses them
    encoder: str = DEFAULT_ENCODER
    encoder_precision: str = "float32"  # resolved: float32 or bfloat16
    second_encoder: str = ""  # empty: none
    from_name: str = ""
    review_threshold: float = 0.5
    calibration: bool = True
    target_precision: float = 0.95
    prelabel_on_import: bool = True
    task_meta: str = "flagged"  # flagged | all | off
    prelabel_chunk: int = 20000  # the largest chunk a pre-label labels and writes before the next
    train: bool = True
    train_every: int = 100
    training: TrainingConfig = field(default_factory=TrainingConfig)
    max_request_mb: int = 100
    max_projects_in_memory: int = 32  # each holds a pipeline, its anchor vectors and maybe a trained encoder
    predict_seconds: float = 60.0  # /predict answers within this; Label Studio gives up after 100 s
    job_retries: int = 5  # a job that cannot reach Label Studio runs again this many times...
    job_retry_seconds: float = 10.0  # ...after this long, doubling up to 5 min
    hcc: HCCConfig = field(default_factory=HCCConfig)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            label_studio_url=env("LABEL_STUDIO_URL", "") or env("LABEL_STUDIO_HOST", ""),
            label_studio_api_key=env("LABEL_STUDIO_API_KEY", ""),
            model_dir=Path(env("MODEL_DIR", "") or "model_dir"),
            basic_auth_user=env("BASIC_AUTH_USER", ""),
            basic_auth_pass=env("BASIC_AUTH_PASS", ""),
            llm_base_url=env("HCC_LLM_BASE_URL", ""),
            llm_model=env("HCC_LLM_MODEL", "") or "local",
            llm_api_key=env("HCC_LLM_API_KEY", "") or env("OPENAI_API_KEY", ""),
            llm_structured=env("HCC_LLM_STRUCTURED", "") or "auto",
            llm_concurrency=_int("HCC_LLM_CONCURRENCY", DEFAULT_CAP, minimum=1),
            llm_logprobs=_flag("HCC_LLM_LOGPROBS", None),
            encoder=env("HCC_ENCODER", "") or DEFAULT_ENCODER,
            second_encoder=(env("HCC_SECOND_ENCODER", "") or "").strip(),
            encoder_precision=resolve_precision(env("HCC_ENCODER_PRECISION", "") or "auto"),
            from_name=env("HCC_FROM_NAME", ""),
            review_threshold=float(env("HCC_REVIEW_THRESHOLD", "") or 0.5),
            calibration=_flag("HCC_CALIBRATION", True),
            target_precision=float(env("HCC_TARGET_PRECISION", "") or 0.95),
            prelabel_on_import=_flag("HCC_PRELABEL_ON_IMPORT", True),
            prelabel_chunk=_int("HCC_PRELABEL_CHUNK", 20000, minimum=1),
            task_meta=_choice("HCC_TASK_META", "flagged", TASK_META_POLICIES),
            train=_flag("HCC_TRAIN", True),
            train_every=_int("HCC_TRAIN_EVERY", 100, minimum=0),
            training=TrainingConfig(max_steps=_int("HCC_TRAIN_MAX_STEPS", TrainingConfig.max_steps, minimum=1),
                                    refit=_flag("HCC_TRAIN_REFIT", TrainingConfig.refit)),
            max_request_mb=_int("HCC_MAX_REQUEST_MB", 100, minimum=1),
            max_projects_in_memory=_int("HCC_MAX_PROJECTS_IN_MEMORY", 32, minimum=1),
            predict_seconds=_number("HCC_PREDICT_SECONDS", 60.0, minimum=1.0),
            job_retries=_int("HCC_JOB_RETRIES", 5, minimum=0),
            job_retry_seconds=_number("HCC_JOB_RETRY_SECONDS", 10.0, minimum=0.0),
            hcc=_hcc_config(env("HCC_CLASSIFIER", "") or HCCConfig.classifier, env("HCC_COMBINE", "") or "pool",
                            transductive=_flag("HCC_TRANSDUCTIVE", True),
                            anchor_llm_cap=_anchor_llm_cap()),
        )

    @property
    def model_version(self) -> str:
        """Stable for one configuration, so Label Studio's score column keeps matching after updates."""
        identity = {"encoder": self.encoder, "precision": self.encoder_precision,
                    **({"second_encoder": self.second_encoder} if self.second_encoder else {}),
                    "llm": self.llm_model if self.llm_base_url else None, "structured": self.llm_structured,
                    "hcc": asdict(self.hcc)}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"hcc-{__version__}-{digest}"

    def project_dir(self, project_id: int) -> Path:
        return self.model_dir / "projects" / str(int(project_id))

    @property
    def cache_dir(self) -> Path:
        return self.model_dir / "cache"


def _anchor_llm_cap() -> int:
    cap = _int("HCC_ANCHOR_LLM_CAP", HCCConfig.anchor_llm_cap, minimum=0)
    check_anchor_llm_cap(cap, "HCC_ANCHOR_LLM_CAP")
    return cap


def _hcc_config(classifier: str, combine: str = "pool", *, transductive: bool = True,
                anchor_llm_cap: int = HCCConfig.anchor_llm_cap) -> HCCConfig:
    combine = combine.strip().lower()
    if combine not in COMBINERS:
        raise ValueError(f"HCC_COMBINE must be one of {', '.join(COMBINERS)}, got {combine!r}")
    # dcca: the paper's two views (zero-shot and hinted) with the ablation's DCCA settings
    views = ("zero_shot", "hinted") if combine == "dcca" else HCCConfig.llm_views
    config = HCCConfig(classifier=classifier.strip().lower(), combine=combine, llm_views=views,
                       transductive=transductive, anchor_llm_cap=anchor_llm_cap)
    if config.classifier not in (AUTO, *CLASSIFIERS):
        raise ValueError(f"HCC_CLASSIFIER must be one of {AUTO}, {', '.join(CLASSIFIERS)}, got {classifier!r}")
    return config
