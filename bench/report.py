"""Print the markdown tables of docs/benchmarks.md from the JSON results in bench/results/.

    .venv/bin/python bench/report.py bench/results/banking77.json [more results ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def machine() -> str:
    """This machine as a results file records it: CPU model, cores, memory (read, not assumed: the
    development machine has changed under the project more than once)."""
    model, mem_gb = "unknown CPU", None
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20)
                break
    except OSError:
        pass
    memory = f", {mem_gb} GB" if mem_gb else ""
    return f"{os.cpu_count()} vCPU {model}{memory}, no GPU"


def save(results: dict, out: Path | None, *, shown: dict | None = None) -> None:
    """Print ``shown`` (else ``results``) as JSON, and write ``results`` to ``out`` when given."""
    print(json.dumps(results if shown is None else shown, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def stage(row: dict, name: str) -> str:
    n = row.get(f"{name}_n", 0)
    return f"{n} / {pct(row.get(f'{name}_acc'))}" if n else "0 / -"


def _ratio(row: dict) -> str:
    """Settled by DCCA / unresolved (results written before it had its own name keep it as ``cai_after``)."""
    value = row.get("resolved_ratio", row.get("cai_after"))
    if value is None or value >= 1e5:  # nothing unresolved (old results stored 1/eps)
        return "-"
    return f"{value:.3f}"


def encoder_table(result: dict) -> list[str]:
    lines = [f"Encoder `{result['encoder']}`, {result['anchors']} anchors, all {result['test_items']} test items:", "",
             "| classifier | accuracy |", "|---|---|"]
    lines += [f"| {name} | {pct(acc)} |" for name, acc in result["encoder_full_test"].items()]
    speed = result["speed"]
    rates = ", ".join(f"{v} ({k.removeprefix('encoder_sentences_per_s').strip('_') or 'float32'})"
                      for k, v in speed.items() if k.startswith("encoder_sent"))
    lines += ["", f"Speed: encoder {rates} sentences/s (no cache); "
              f"class scores + 2 DCCA rounds over 10,000 items: {speed['as_dcca_10k_items_s']} s.", ""]
    return lines


def ablation_table(result: dict) -> list[str]:
    rows = result.get("ablation") or {}
    if not rows:
        return []
    lines = [f"LLM `{result.get('llm_model')}`, {result['llm_items']} test items (seed {result['seed']}); "
             "stage cells are items / accuracy %:", "",
             "| configuration | encoder | LLM zero-shot | LLM hinted | LLM few-shot | hint copied | consistent C "
             "| CAI | round 1 | round 2 | unresolved | settled / unresolved | **HCC final** |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {pct(row.get('encoder_label'))} | {pct(row.get('llm_zero_shot'))} "
            f"| {pct(row.get('llm_hinted'))} | {pct(row.get('llm_few_shot'))} | {pct(row.get('hint_copied'))} "
            f"| {stage(row, 'consistent')} | {row.get('cai', row.get('cai_before', 0.0)):.3f} | {stage(row, 'round1')} "
            f"| {stage(row, 'round2')} | {stage(row, 'unresolved')} | {_ratio(row)} "
            f"| **{pct(row['final'])}** |")
    return lines + [""]


def main() -> int:
    for path in sys.argv[1:]:
        result = json.loads(Path(path).read_text())
        print(f"### {path}\n")
        print("\n".join(encoder_table(result) + ablation_table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
