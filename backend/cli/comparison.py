"""``hcc annotators`` and ``hcc export-preferences``: annotator quality, consensus and weighted preferences.

    hcc annotators --labels L.csv --consensus C.csv --workers W.csv [--mode categorical|pairwise] [--report-png R.png]
    hcc export-preferences --labels L.csv --out P.jsonl [--min-quality 0.5] [--judge J.csv | --llm-base-url URL]
    hcc export-preferences --project ID [--label-studio-url URL --api-key KEY] --out P.jsonl [...]

Both print warnings as ``warning: ...`` on stderr and a JSON summary as the last line of stdout. This module
imports only the standard library at load time (``hcc --help`` stays fast); the engine is imported when a
command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.labelling.concurrency import DEFAULT_CAP  # standard library only

if TYPE_CHECKING:
    import pandas as pd

MODES = ("auto", "categorical", "pairwise")
CATEGORICAL_MODELS = ("auto", "one_coin", "dawid_skene", "shrunk")  # backend.annotators.crowd.MODELS (a test checks)
STRUCTURED_CHOICES = ("auto", "json_schema", "json_object", "grammar", "choice", "none")  # backend.labelling.llm's
#: Default field names: those of backend.annotators.preferences.ComparisonKeys (a test checks).
FIELD_DEFAULTS = {"item": "item_id", "worker": "worker_id", "choice": "choice", "prompt": "prompt",
                  "response_left": "response_left", "response_right": "response_right",
                  "model_left": "model_left", "model_right": "model_right"}


# -- parsers -------------------------------------------------------------------------------------------------
def _add_field_options(p: argparse.ArgumentParser, *, categorical: bool) -> None:
    g = p.add_argument_group("field names in the labels file")
    g.add_argument("--item-field", default=FIELD_DEFAULTS["item"])
    g.add_argument("--worker-field", default=FIELD_DEFAULTS["worker"])
    if categorical:
        g.add_argument("--label-field", default="label", help="categorical mode: the label column")
    g.add_argument("--choice-field", default=FIELD_DEFAULTS["choice"],
                   help="pairwise mode: left/right (or a model name)")
    for name in ("model_left", "model_right", "prompt", "response_left", "response_right"):
        g.add_argument(f"--{name.replace('_', '-')}-field", default=FIELD_DEFAULTS[name])


def _add_pairwise_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pairwise model (attentiveness EM)")
    g.add_argument("--reference", help="the stronger model A (default: the highest win rate)")
    g.add_argument("--mu", type=float, help="P(A's response is better) when known (default: estimated)")
    g.add_argument("--a", type=float, default=8.0, help="Beta(a, b) prior of attentiveness eta (both modes)")
    g.add_argument("--b", type=float, default=2.0)
    g.add_argument("--position-bias", action="store_true",
                   help="estimate each annotator's left/right bias when inattentive (default: 1/2)")
    g.add_argument("--judge", help="CSV/JSONL with item_id and p_left: a judge's P(left response is better)")


def add_annotators_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotators", help="annotator quality and consensus labels from crowd labels (EM)")
    p.add_argument("--labels", required=True, help="long CSV/JSONL: item_id,worker_id,label "
                                                   "(or choice,model_left,model_right for comparisons)")
    p.add_argument("--consensus", required=True, help="output CSV: item_id,label,confidence")
    p.add_argument("--workers", required=True, help="output CSV: worker_id,n_labels,quality")
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="auto: pairwise when the model columns are present, else categorical")
    p.add_argument("--model", default="auto", choices=CATEGORICAL_MODELS,
                   help="categorical mode: one_coin, dawid_skene, shrunk, or auto (chosen by held-out likelihood)")
    p.add_argument("--report-png", help="write a PNG report: quality histogram and quality vs volume")
    p.add_argument("--min-quality", type=float, default=0.5,
                   help="flag annotators whose quality is below this (the workers file's low_quality column; the "
                        "same rule as HCC_MIN_ANNOTATOR_QUALITY in Label Studio and export-preferences --min-quality)")
    _add_pairwise_options(p)
    _add_field_options(p, categorical=True)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-preferences", help="weighted preference pairs (JSONL) from comparison labels")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="long CSV/JSONL: item_id,worker_id,choice,model_left,"
                                         "model_right,prompt,response_left,response_right")
    source.add_argument("--project", type=int, help="read the <Pairwise> annotations of this Label Studio project "
                                                    "instead (item = task id, annotator = completed_by)")
    studio = p.add_argument_group("Label Studio (with --project)")
    studio.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL", ""),
                        help="default: $LABEL_STUDIO_URL")
    studio.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY", ""),
                        help="legacy token or personal access token (default: $LABEL_STUDIO_API_KEY)")
    p.add_argument("--out", required=True, help="output JSONL: prompt,chosen,rejected,weight,annotator,...")
    p.add_argument("--min-quality", type=float, default=0.5, help="keep annotators with quality >= this")
    p.add_argument("--llm-base-url", help="judge each pair with this OpenAI-compatible LLM (both orders)")
    p.add_argument("--llm-model", default=os.environ.get("HCC_LLM_MODEL", "local"))
    p.add_argument("--llm-timeout", type=float, default=60.0)
    p.add_argument("--llm-concurrency", type=int, default=DEFAULT_CAP, metavar="CAP",
                   help="most judge requests in flight (the limit adapts below it, see `hcc annotate --help`)")
    p.add_argument("--structured", default="auto", choices=STRUCTURED_CHOICES,
                   help="how the judge's answer is constrained (see `hcc annotate`); grammar is fastest on llama.cpp")
    p.add_argument("--judge-out", help="also write the judge's verdicts here (CSV, usable as --judge)")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_pairwise_options(p)
    _add_field_options(p, categorical=False)


# -- shared --------------------------------------------------------------------------------------------------
def _keys(args: argparse.Namespace):
    from backend.annotators.preferences import ComparisonKeys

    return ComparisonKeys(item=args.item_field, worker=args.worker_field, choice=args.choice_field,
                          prompt=args.prompt_field, response_left=args.response_left_field,
                          response_right=args.response_right_field, model_left=args.model_left_field,
                          model_right=args.model_right_field)


def _read(path: str) -> pd.DataFrame:
    from backend.annotators.preferences import TableError, read_table

    frame, problems = read_table(path)
    for problem in problems:
        _warn(problem)
    if frame.empty:
        raise TableError(f"{path}: no rows")
    return frame


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _quiet_engine_logs() -> None:
    """The commands print the engine's problems themselves (``warning: ...``); its log would repeat them."""
    import logging

    for name in ("backend.annotators.attentiveness", "backend.annotators.crowd", "backend.annotators.preferences"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _read_judge(path: str) -> dict[str, float]:
    import numpy as np
    import pandas as pd

    from backend.annotators.preferences import TableError

    frame = _read(path)
    column = next((c for c in ("p_left", "judge_p_left") if c in frame.columns), None)
    if "item_id" not in frame.columns or column is None:
        raise TableError(f"{path}: a judge file needs the columns item_id and p_left; found {list(frame.columns)}")
    values = frame[column].replace("", np.nan)
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna()
    if bad.any():
        raise TableError(f"{path} row {bad.idxmax()}, field {column!r}: {values[bad.idxmax()]!r} is not a number")
    keep = numbers.notna()
    return dict(zip(frame["item_id"][keep].astype(str).str.strip(), numbers[keep].astype(float), strict=True))


def _pairwise_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"reference": args.reference, "mu": args.mu, "a": args.a, "b": args.b,
            "estimate_position_bias": args.position_bias}


def _report(summary: dict[str, Any], caught: list[warnings.WarningMessage]) -> None:
    """Print the engine's data problems and warnings on stderr and keep them in the summary."""
    summary["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
    for message in [*summary["problems"], *summary["warnings"]]:
        _warn(message)


# -- hcc annotators ------------------------------------------------------------------------------------------
def cmd_annotators(args: argparse.Namespace) -> int:
    from backend.annotators.preferences import comparisons_frame, has_models

    _quiet_engine_logs()
    if not 0.0 <= args.min_quality <= 1.0:
        raise ValueError(f"--min-quality must be in [0, 1], got {args.min_quality}")
    raw = _read(args.labels)
    keys = _keys(args)
    models_present = args.model_left_field in raw.columns and args.model_right_field in raw.columns
    mode = args.mode if args.mode != "auto" else ("pairwise" if models_present else "categorical")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "pairwise":
            frame = comparisons_frame(raw, keys)
            if not has_models(frame):
                _warn(f"no {args.model_left_field}/{args.model_right_field} columns: every item gets the prior 1/2 "
                      "(no reference model)")
            judge = _read_judge(args.judge) if args.judge else None
            consensus, workers, summary = _pairwise(frame, judge, args)
        else:
            consensus, workers, summary = _categorical(raw, args)
    _report(summary, caught)
    _write_csv(consensus, args.consensus)
    _write_csv(workers, args.workers)
    if args.report_png:
        quality_report(workers, args.report_png, title=f"{Path(args.labels).name}: {summary['model']}",
                       min_quality=args.min_quality)
        summary["report_png"] = args.report_png
    summary.update(consensus_file=args.consensus, workers_file=args.workers)
    print(json.dumps(summary))
    return 0


def _pairwise(frame: pd.DataFrame, judge: dict[str, float] | None,
              args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    import numpy as np
    import pandas as pd

    from backend.annotators.attentiveness import PairwiseAttentiveness

    est = PairwiseAttentiveness(**_pairwise_options(args)).fit(frame, judge=judge)
    posterior = est.posteriors_
    label = est.labels_.astype(str)
    winner_side = np.where(label == "left", est.items_["model_left"].astype(str), est.items_["model_right"].astype(str))
    consensus = pd.DataFrame({
        "item_id": posterior.index, "label": label.to_numpy(), "confidence": posterior.max(axis=1).round(6).to_numpy(),
        "winner": winner_side, "p_left": posterior["left"].round(6).to_numpy(),
    })
    workers = pd.DataFrame({
        "worker_id": est.eta_.index, "n_labels": est.n_labels_.to_numpy(), "quality": est.eta_.round(6).to_numpy(),
        "quality_sd": est.eta_sd_.round(6).to_numpy(), "quality_map": est.eta_map_.round(6).to_numpy(),
        "position_bias": est.position_bias_.round(6).to_numpy(),
    })
    summary = {
        "mode": "pairwise", "model": "attentiveness EM", "items": len(consensus), "workers": len(workers),
        "labels": int(est.n_labels_.sum()), "reference": est.reference_, "mu": round(est.mu_, 6),
        "mu_fixed": args.mu is not None, "judged_items": len(judge or {}), "identifiability": est.identifiability_,
        "iterations": est.n_iter_, "converged": est.converged_, **_flag(workers, args.min_quality),
        "problems": est.problems_,
    }
    return consensus, workers, summary


def _categorical(raw: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    import numpy as np
    import pandas as pd

    from backend.annotators.crowd import CategoricalAttentiveness
    from backend.annotators.preferences import TableError

    renames = {args.item_field: "item_id", args.worker_field: "worker_id", args.label_field: "label"}
    missing = [name for name in renames if name not in raw.columns]
    if missing:
        raise TableError(f"{args.labels}: categorical labels need the columns {list(renames)}; missing {missing}, "
                         f"found {list(raw.columns)}")
    frame = raw.drop(columns=[t for s, t in renames.items() if s != t and t in raw.columns]).rename(columns=renames)
    est = CategoricalAttentiveness(model=args.model, a=args.a, b=args.b).fit(frame)
    posterior = est.posteriors_
    consensus = pd.DataFrame({"item_id": posterior.index, "label": est.labels_.to_numpy(),
                              "confidence": posterior.max(axis=1).round(6).to_numpy()})
    workers = pd.DataFrame({"worker_id": est.eta_.index, "n_labels": est.n_labels_.to_numpy(),
                            "quality": est.eta_.round(6).to_numpy(), "accuracy": est.accuracy_.round(6).to_numpy()})
    summary = {
        "mode": "categorical", "model": est.model_, "shrinkage": None if np.isinf(est.shrinkage_) else est.shrinkage_,
        "selection": {("inf" if np.isinf(k) else str(k)): round(v, 6) for k, v in est.selection_.items()},
        "selection_se": {("inf" if np.isinf(k) else str(k)): round(v, 6) for k, v in est.selection_se_.items()},
        "items": len(consensus), "workers": len(workers), "labels": int(est.n_labels_.sum()),
        "classes": [str(c) for c in est.classes_], "iterations": est.n_iter_, "converged": est.converged_,
        **_flag(workers, args.min_quality), "problems": est.problems_,
    }
    return consensus, workers, summary


def _flag(workers: pd.DataFrame, min_quality: float) -> dict[str, Any]:
    """Add the ``low_quality`` column (quality below ``min_quality``) to ``workers``; the summary's counts."""
    workers["low_quality"] = workers["quality"] < min_quality
    return {"mean_quality": round(float(workers["quality"].mean()), 6), "min_quality": min_quality,
            "low_quality_workers": int(workers["low_quality"].sum()),
            "workers_below_0_5": int((workers["quality"] < 0.5).sum())}


def _write_csv(frame: pd.DataFrame, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def quality_report(workers: pd.DataFrame, path: str | Path, *, title: str = "annotator quality",
                   min_quality: float = 0.5) -> None:
    """PNG with the quality histogram and quality against the number of labels."""
    import matplotlib
    import matplotlib.ticker
    import numpy as np

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.hist(workers["quality"], bins=np.linspace(0, 1, 21), color="#4477aa", edgecolor="white")
    left.set(xlabel="quality (eta)", ylabel="annotators", title="quality")
    right.scatter(workers["n_labels"], workers["quality"], s=12, alpha=0.6, color="#4477aa")
    right.set(xscale="log" if workers["n_labels"].max() > 20 else "linear", xlabel="labels per annotator",
              ylabel="quality (eta)", ylim=(0, 1.02), title="quality vs volume")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log axes label minor ticks too
    right.axhline(min_quality, color="#cc6677", lw=1, ls="--")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- hcc export-preferences ----------------------------------------------------------------------------------
def cmd_export_preferences(args: argparse.Namespace) -> int:
    from backend.annotators.preferences import comparisons_frame, export_preferences, write_jsonl

    _quiet_engine_logs()
    if args.project is not None:
        frame = comparisons_frame(_project_records(args))
    else:
        frame = comparisons_frame(_read(args.labels), _keys(args))
    if args.judge and args.llm_base_url:
        raise ValueError("give --judge or --llm-base-url, not both")
    judge: dict[str, Any] | None = _read_judge(args.judge) if args.judge else None
    if args.llm_base_url:
        judge = _run_judge(frame, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export = export_preferences(frame, judge=judge, min_quality=args.min_quality, **_pairwise_options(args))
    report = export.report
    _report(report, caught)
    report["out"] = args.out
    write_jsonl(export.records, args.out)
    print(json.dumps(report))
    return 0


def _project_records(args: argparse.Namespace) -> pd.DataFrame:
    """The comparisons of a Label Studio ``<Pairwise>`` project, one row per submitted choice.

    The responses come from the config's ``<Text>`` objects; the prompt and the models from the task data
    keys ``HCC_PAIRWISE_PROMPT_KEY`` / ``HCC_PAIRWISE_MODEL_LEFT_KEY`` / ``HCC_PAIRWISE_MODEL_RIGHT_KEY``
    (default prompt, model_left, model_right), or ``--prompt-field`` / ``--model-*-field`` when given.
    """
    import pandas as pd

    from backend.studio.client import StudioClient, StudioError
    from backend.studio.pairwise import PairwiseKeys, comparison_records, require_pairwise_target

    if not args.label_studio_url or not args.api_key:
        raise ValueError("--project needs --label-studio-url and --api-key (or LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY)")
    env = PairwiseKeys.from_env()
    keys = PairwiseKeys(
        prompt=args.prompt_field if args.prompt_field != FIELD_DEFAULTS["prompt"] else env.prompt,
        model_left=args.model_left_field if args.model_left_field != FIELD_DEFAULTS["model_left"] else env.model_left,
        model_right=(args.model_right_field if args.model_right_field != FIELD_DEFAULTS["model_right"]
                     else env.model_right))
    problems: list[str] = []
    try:
        client = StudioClient(args.label_studio_url, args.api_key)
        target = require_pairwise_target(client.project(args.project)["label_config"], args.project)
        records = comparison_records(client.tasks(args.project), target, keys, problems)
    except StudioError as exc:
        raise ValueError(str(exc)) from None
    for problem in problems:
        _warn(problem)
    if not records:
        raise ValueError(f"project {args.project} has no submitted <Pairwise name={target.from_name!r}> "
                         "annotation with a left/right choice")
    return pd.DataFrame(records).drop(columns="annotation_id")


def _run_judge(frame: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    from backend.annotators.judge import PairwiseJudge
    from backend.annotators.preferences import judge_items
    from backend.config import cache_dir

    judge = PairwiseJudge(base_url=args.llm_base_url, model=args.llm_model, timeout=args.llm_timeout,
                          concurrency=args.llm_concurrency, structured=args.structured,
                          api_key=os.environ.get("OPENAI_API_KEY"), cache_dir=args.cache_dir or cache_dir())
    judge.check()
    verdicts = judge_items(judge, frame)
    failed = [item for item, v in verdicts.items() if v.p_left is None]
    if failed:
        _warn(f"the judge gave no verdict on {len(failed)} items (no prior from it there): "
              f"{', '.join(map(str, failed[:5]))}{', ...' if len(failed) > 5 else ''}")
    if args.judge_out:
        rows = [{"item_id": item, **verdict.as_dict()} for item, verdict in verdicts.items()]
        for row in rows:
            row["errors"] = "; ".join(row["errors"])
        _write_csv(pd.DataFrame(rows), args.judge_out)
    return verdicts
