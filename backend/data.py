"""Reading labelled and unlabelled rows from CSV or JSONL, with row- and field-level problem reports.

Nothing here aborts a run for one bad row: each problem is recorded with the file, row number and field,
and the row is flagged (kept, marked) or skipped as :data:`PROBLEM_POLICY` documents.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "input")
LABEL_FIELDS = ("label", "category")
ID_FIELDS = ("id", "item_id")
MAX_TEXT_CHARS = 4000

#: What happens to a row with each kind of problem.
PROBLEM_POLICY = {
    "empty_text": "kept in the output with label null and stage 'skipped'; an anchor is dropped",
    "missing_label": "an anchor without a label is dropped",
    "unknown_label": "an anchor whose label is not in the label set is dropped",
    "duplicate_id": "the first row with an id is used; later ones are dropped (anchors) or kept but renamed",
    "bad_encoding": "bytes that are not UTF-8 are replaced by U+FFFD and the row is kept",
    "long_text": f"texts over {MAX_TEXT_CHARS} characters are cut to that length for the LLM and kept",
    "bad_json": "a JSONL line that is not a JSON object is kept as an empty row (stage 'skipped')",
}


class DataError(ValueError):
    """The file as a whole cannot be used (missing, unreadable, no usable column)."""


@dataclass
class Problem:
    source: str
    row: int  # 1-based data row (the header is row 0 in CSV)
    field: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.source} row {self.row}, field {self.field!r}: {self.message} ({self.kind})"


@dataclass
class Table:
    """Rows of one file, with the resolved column names and every problem found."""

    source: str
    rows: list[dict[str, Any]]
    text_field: str
    label_field: str | None
    problems: list[Problem] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [_as_text(r.get(self.text_field)) for r in self.rows]

    def labels(self) -> list[str | None]:
        if not self.label_field:
            return [None] * len(self.rows)
        return [_as_label(r.get(self.label_field)) for r in self.rows]


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left here stands alone


def clean_text(text: str) -> str:
    """``text`` as every tokenizer, JSON encoder and HTTP client takes it: lone surrogate code points (which a
    JSON ``"\\ud800"`` escape or a Label Studio task can carry) become U+FFFD; anything else is unchanged."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def _as_text(value: Any) -> str:
    return "" if value is None else clean_text(str(value))


def _as_label(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="replace"), True


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[int], list[tuple[int, str]]]:
    """Rows, the rows whose bytes were not UTF-8, and JSONL lines that failed to parse."""
    raw = path.read_bytes()
    bad_rows: list[int] = []
    bad_json: list[tuple[int, str]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            text, replaced = _decode(line)
            if replaced:
                bad_rows.append(len(rows) + 1)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                obj, detail = {}, f"line {number}: {exc.msg}"
                bad_json.append((len(rows) + 1, detail))
            if not isinstance(obj, dict):
                bad_json.append((len(rows) + 1, f"line {number} is not a JSON object"))
                obj = {}
            rows.append(obj)
        return rows, bad_rows, bad_json
    text, replaced = _decode(raw)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if replaced:
        bad_rows = [i for i, r in enumerate(rows, start=1) if any("\ufffd" in str(v) for v in r.values())]
    return rows, bad_rows, bad_json


def _pick(columns: Iterable[str], wanted: str | None, candidates: Sequence[str], what: str, source: str):
    columns = list(columns)
    if wanted:
        if wanted not in columns:
            raise DataError(f"{source}: no {what} column {wanted!r}; columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    return None


def read_table(
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    require_label: bool = False,
) -> Table:
    """Read a CSV or JSONL file and resolve its text and label columns.

    The text column is ``text`` or ``input`` and the label column ``label`` or ``category`` unless
    named explicitly. A missing text column (or, with ``require_label``, label column) is a
    :class:`DataError`; problems in single rows are collected in ``Table.problems``.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    rows, bad_rows, bad_json = _read_rows(path)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(k for k in row if k is not None))
    text_col = _pick(columns, text_field, TEXT_FIELDS, "text", source)
    if text_col is None:
        raise DataError(f"{source}: no text column (looked for {', '.join(TEXT_FIELDS)}; found {list(columns)})")
    # A named label column is optional in a file that need not be labelled (the items to annotate).
    wanted_label = label_field if require_label or label_field in columns else None
    label_col = _pick(columns, wanted_label, LABEL_FIELDS, "label", source)
    if require_label and label_col is None:
        raise DataError(
            f"{source}: no label column (looked for {', '.join(LABEL_FIELDS)}; found {list(columns)})"
        )
    table = Table(source=source, rows=rows, text_field=text_col, label_field=label_col)
    for row_number in bad_rows:
        table.problems.append(Problem(source, row_number, text_col, "bad_encoding", "bytes that are not UTF-8"))
    for row_number, detail in bad_json:
        table.problems.append(Problem(source, row_number, "(row)", "bad_json", detail))
    for number, text in enumerate(table.texts(), start=1):
        if not text.strip():
            table.problems.append(Problem(source, number, text_col, "empty_text", "empty or whitespace text"))
        elif len(text) > MAX_TEXT_CHARS:
            table.problems.append(
                Problem(source, number, text_col, "long_text", f"{len(text)} characters, cut to {MAX_TEXT_CHARS}")
            )
    return table


def row_ids(table: Table) -> list[str]:
    """An id per row: the ``id``/``item_id`` column when present (duplicates renamed), else the row number."""
    # Columns of every row, not just the first: a first JSONL line that failed to parse is an empty row.
    columns = dict.fromkeys(k for row in table.rows for k in row if k is not None)
    id_col = _pick(columns, None, ID_FIELDS, "id", table.source)
    if id_col is None:
        return [str(i) for i in range(1, len(table.rows) + 1)]
    seen: set[str] = set()
    ids = []
    for number, row in enumerate(table.rows, start=1):
        raw = row.get(id_col)
        # Only a missing or blank id falls back to the row number; 0 is a valid id.
        value = str(number) if raw is None or not str(raw).strip() else str(raw)
        if value in seen:
            problem = Problem(table.source, number, id_col, "duplicate_id", f"id {value!r} seen before")
            if problem not in table.problems:  # row_ids may be called more than once on a table
                table.problems.append(problem)
            value = f"{value}#row{number}"
        seen.add(value)
        ids.append(value)
    return ids


def read_label_set(path: str | Path) -> list[str]:
    """A label list from JSON (a list, or an object label -> description), a text file (one label per
    line) or a CSV with a ``label`` (or ``category``) column."""
    return list(read_label_file(path))


def read_label_file(path: str | Path) -> dict[str, str | None]:
    """Labels in file order, each with its description when the file gives one.

    Descriptions come from a JSON object (``{"card_arrival": "the customer waits for a card"}``) or a
    ``description`` column in a CSV; the LLM sees them next to the labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such label file")
    text, _ = _decode(path.read_bytes())
    pairs: list[tuple[str | None, str | None]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and all(isinstance(v, str | None) for v in data.values()):
            pairs = list(data.items())
        elif isinstance(data, list) and all(isinstance(x, str) for x in data):
            pairs = [(x, None) for x in data]
        else:
            raise DataError(f"{path}: expected a JSON list of label names or an object label -> description")
    elif path.suffix.lower() == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        pairs = [(_as_label(r.get("label") or r.get("category")), _as_label(r.get("description"))) for r in rows]
    else:
        pairs = [(line, None) for line in text.splitlines()]
    labels: dict[str, str | None] = {}
    for label, description in pairs:
        if label and label.strip() and label.strip() not in labels:
            labels[label.strip()] = description.strip() if description else None
    if not labels:
        raise DataError(f"{path}: no labels found")
    return labels


@dataclass
class Anchors:
    ids: list[str]
    texts: list[str]
    labels: list[str]


def select_anchors(table: Table, label_set: Sequence[str] | None) -> tuple[Anchors, list[str]]:
    """Usable anchors of a labelled table, and the label set (given, or the anchors' labels sorted)."""
    labels = table.labels()
    texts = table.texts()
    ids = row_ids(table)
    empty = {p.row for p in table.problems if p.kind in ("empty_text", "bad_json")}
    duplicate = {p.row for p in table.problems if p.kind == "duplicate_id"}
    if label_set is None:
        label_set = sorted({lab for lab in labels if lab is not None})
    known = set(label_set)
    keep = Anchors([], [], [])
    for number, (anchor_id, text, label) in enumerate(zip(ids, texts, labels, strict=True), start=1):
        if number in empty:
            continue
        if label is None:
            table.problems.append(Problem(table.source, number, table.label_field or "label",
                                          "missing_label", "no label; anchor dropped"))
            continue
        if label not in known:
            table.problems.append(Problem(table.source, number, table.label_field or "label",
                                          "unknown_label", f"label {label!r} is not in the label set; anchor dropped"))
            continue
        if number in duplicate:
            continue  # duplicate id: the first row wins (the problem is already recorded)
        keep.ids.append(anchor_id)
        keep.texts.append(text[:MAX_TEXT_CHARS])
        keep.labels.append(label)
    return keep, list(label_set)
