"""Reading CSV/JSONL rows, label sets and anchors, with row- and field-level problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.data import (
    MAX_TEXT_CHARS,
    DataError,
    Problem,
    read_label_set,
    read_table,
    row_ids,
    select_anchors,
)


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(path: Path, *rows: dict | str) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write(path, "\n".join(lines) + "\n")


def kinds(table) -> list[tuple[int, str, str]]:
    return [(p.row, p.field, p.kind) for p in table.problems]


# -- read_table: columns -----------------------------------------------------------------------------


def test_csv_default_columns(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "id,text,label\n1,hello,greet\n2,bye,leave\n"))
    assert table.text_field == "text" and table.label_field == "label"
    assert table.texts() == ["hello", "bye"]
    assert table.labels() == ["greet", "leave"]
    assert table.problems == []
    assert table.source == str(tmp_path / "a.csv")


def test_csv_alternative_column_names(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "input,category\nhello,greet\n"))
    assert (table.text_field, table.label_field) == ("input", "category")
    assert table.texts() == ["hello"] and table.labels() == ["greet"]


def test_text_is_preferred_over_input(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "input,text\nfrom input,from text\n"))
    assert table.text_field == "text" and table.texts() == ["from text"]


def test_jsonl_autodetects_columns_and_has_no_label(tmp_path):
    table = read_table(jsonl(tmp_path / "a.jsonl", {"input": "one"}, {"input": "two", "extra": 1}))
    assert table.text_field == "input" and table.label_field is None
    assert table.texts() == ["one", "two"]
    assert table.labels() == [None, None]


def test_explicit_fields_override_autodetection(tmp_path):
    path = write(tmp_path / "a.csv", "text,label,body,gold\nT,L,B,G\n")
    table = read_table(path, text_field="body", label_field="gold")
    assert table.texts() == ["B"] and table.labels() == ["G"]


@pytest.mark.parametrize("kwargs", [{"text_field": "body"}, {"label_field": "gold", "require_label": True}])
def test_missing_named_column_is_a_data_error_naming_file_and_columns(tmp_path, kwargs):
    path = write(tmp_path / "a.csv", "text,label\nT,L\n")
    wanted = next(iter(kwargs.values()))
    with pytest.raises(DataError) as err:
        read_table(path, **kwargs)
    message = str(err.value)
    assert str(path) in message
    assert repr(wanted) in message
    assert "'text'" in message and "'label'" in message  # the columns that do exist


def test_named_label_column_is_optional_in_a_file_to_annotate(tmp_path):
    # The same --label-field serves the anchors (labelled) and the items to annotate (often not).
    path = write(tmp_path / "a.csv", "text\nT\n")
    table = read_table(path, label_field="gold")
    assert table.label_field is None and table.labels() == [None]


def test_no_text_column_is_a_data_error(tmp_path):
    path = write(tmp_path / "a.csv", "body,label\nT,L\n")
    with pytest.raises(DataError, match=r"a\.csv: no text column .*'body'"):
        read_table(path)


def test_required_label_column_missing(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"text": "x"})
    with pytest.raises(DataError, match="no label column"):
        read_table(path, require_label=True)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "nope.csv")


def test_empty_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no text column"):
        read_table(write(tmp_path / "a.jsonl", ""))


# -- read_table: row problems ------------------------------------------------------------------------


def test_empty_and_whitespace_text_are_problems_with_row_and_field(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\nfine,a\n,b\n"   ",c\nalso fine,d\n')
    table = read_table(path)
    assert len(table.rows) == 4  # rows are kept
    assert kinds(table) == [(2, "text", "empty_text"), (3, "text", "empty_text")]


def test_empty_text_in_jsonl_counts_data_rows_not_blank_lines(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a"}\n\n{"text": ""}\n{"text": null}\n')
    table = read_table(path)
    assert kinds(table) == [(2, "text", "empty_text"), (3, "text", "empty_text")]


def test_non_utf8_csv_is_kept_with_replacement_character(tmp_path):
    path = write(tmp_path / "a.csv", b"text,label\nplain,a\ncaf\xe9 au lait,b\n")
    table = read_table(path)
    assert table.texts() == ["plain", "caf\ufffd au lait"]
    assert kinds(table) == [(2, "text", "bad_encoding")]


def test_non_utf8_jsonl_line_is_kept_with_replacement_character(tmp_path):
    path = write(tmp_path / "a.jsonl", b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    table = read_table(path)
    assert table.texts() == ["ok", "na\ufffdve"]
    assert kinds(table) == [(2, "text", "bad_encoding")]


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "\ufefftext,label\nhello,a\n".encode()))
    assert table.text_field == "text" and table.problems == []


def test_malformed_jsonl_line_is_a_problem_and_other_rows_are_kept(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"text": "one"}, '{"text": "two"', {"text": "three"}, "[1, 2]")
    table = read_table(path)
    assert table.texts() == ["one", "", "three", ""]
    bad = [p for p in table.problems if p.kind == "bad_json"]
    assert [(p.row, p.field) for p in bad] == [(2, "(row)"), (4, "(row)")]
    assert "line 2" in bad[0].message
    assert "line 4 is not a JSON object" in bad[1].message
    # The emptied rows are also reported as empty text, so they are skipped downstream.
    assert [p.row for p in table.problems if p.kind == "empty_text"] == [2, 4]


def test_long_text_is_a_problem_but_kept_whole(tmp_path):
    long_text = "x" * (MAX_TEXT_CHARS + 1)
    path = jsonl(tmp_path / "a.jsonl", {"text": "x" * MAX_TEXT_CHARS}, {"text": long_text})
    table = read_table(path)
    assert kinds(table) == [(2, "text", "long_text")]
    assert table.texts()[1] == long_text
    assert str(MAX_TEXT_CHARS + 1) in table.problems[0].message


def test_csv_quoted_newlines_and_commas(tmp_path):
    content = 'text,label\r\n"first line\nsecond line, with a comma",a\r\n"say ""hi""",b\r\n'
    table = read_table(write(tmp_path / "a.csv", content))
    assert table.texts() == ["first line\nsecond line, with a comma", 'say "hi"']
    assert table.labels() == ["a", "b"]
    assert table.problems == []


def test_labels_are_stripped_and_blank_is_none(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"text": "a", "label": "  x "}, {"text": "b", "label": " "})
    table = read_table(path)
    assert table.labels() == ["x", None]


def test_problem_str_names_file_row_and_field():
    problem = Problem("data/in.csv", 7, "text", "empty_text", "empty or whitespace text")
    assert str(problem) == "data/in.csv row 7, field 'text': empty or whitespace text (empty_text)"


# -- row_ids -----------------------------------------------------------------------------------------


def test_row_ids_without_id_column_are_row_numbers(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "text\na\nb\nc\n"))
    assert row_ids(table) == ["1", "2", "3"]


def test_row_ids_renames_duplicates_and_records_a_problem(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "id,text\nx,a\ny,b\nx,c\n,d\n"))
    assert row_ids(table) == ["x", "y", "x#row3", "4"]
    assert kinds(table) == [(3, "id", "duplicate_id")]
    assert "'x'" in table.problems[0].message
    row_ids(table)  # a second call must not report the duplicate twice
    assert len(table.problems) == 1


def test_row_ids_item_id_column_and_zero_id(tmp_path):
    table = read_table(jsonl(tmp_path / "a.jsonl", {"item_id": 0, "text": "a"}, {"item_id": 7, "text": "b"}))
    assert row_ids(table) == ["0", "7"]


def test_row_ids_found_when_the_first_jsonl_line_is_broken(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", "{broken", {"id": "q1", "text": "a"}, {"id": "q2", "text": "b"})
    table = read_table(path)
    assert row_ids(table) == ["1", "q1", "q2"]


# -- read_label_set ----------------------------------------------------------------------------------


def test_label_set_from_json(tmp_path):
    assert read_label_set(write(tmp_path / "l.json", '["b", "a", " c ", "a", ""]')) == ["b", "a", "c"]


def test_label_set_from_txt(tmp_path):
    assert read_label_set(write(tmp_path / "l.txt", "refund\n\n  card lost \nrefund\r\nbalance\n")) == [
        "refund",
        "card lost",
        "balance",
    ]


@pytest.mark.parametrize("column", ["label", "category"])
def test_label_set_from_csv(tmp_path, column):
    path = write(tmp_path / "l.csv", f"text,{column}\nt1,b\nt2,a\nt3,b\nt4,\n")
    assert read_label_set(path) == ["b", "a"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("l.json", '{"labels": ["a"]}', "expected a JSON list"),
        ("l.json", '["a", 3]', "expected a JSON list"),
        ("l.json", '["a", "b"', "not valid JSON"),
        ("l.txt", "\n  \n", "no labels found"),
        ("l.csv", "text,other\nt,x\n", "no labels found"),
    ],
)
def test_label_set_errors_name_the_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as err:
        read_label_set(path)
    assert str(path) in str(err.value)


def test_label_set_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such label file"):
        read_label_set(tmp_path / "nope.txt")


# -- select_anchors ----------------------------------------------------------------------------------


@pytest.fixture()
def anchor_table(tmp_path):
    path = jsonl(
        tmp_path / "anchors.jsonl",
        {"id": "a1", "text": "hello", "category": "a"},
        {"id": "a2", "text": "   ", "category": "a"},
        {"id": "a3", "text": "no label", "category": ""},
        {"id": "a4", "text": "odd label", "category": "zzz"},
        {"id": "a1", "text": "same id again", "category": "b"},
        {"id": "a6", "text": "y" * (MAX_TEXT_CHARS + 50), "category": "b"},
        {"id": "a7", "text": "no label key"},
    )
    return read_table(path)


def test_select_anchors_drops_bad_rows_with_problems(anchor_table):
    picked, label_set = select_anchors(anchor_table, ["a", "b"])
    assert label_set == ["a", "b"]
    assert picked.ids == ["a1", "a6"]
    assert picked.labels == ["a", "b"]
    assert picked.texts[0] == "hello"
    assert len(picked.texts[1]) == MAX_TEXT_CHARS  # cut for the LLM
    assert kinds(anchor_table) == [
        (2, "text", "empty_text"),
        (6, "text", "long_text"),
        (5, "id", "duplicate_id"),
        (3, "category", "missing_label"),
        (4, "category", "unknown_label"),
        (7, "category", "missing_label"),
    ]
    unknown = next(p for p in anchor_table.problems if p.kind == "unknown_label")
    assert "'zzz'" in unknown.message
    assert str(unknown).startswith(f"{anchor_table.source} row 4, field 'category':")


def test_select_anchors_infers_a_sorted_label_set(tmp_path):
    table = read_table(
        jsonl(tmp_path / "a.jsonl", {"text": "x", "label": "b"}, {"text": "y", "label": "a"}, {"text": "z"})
    )
    picked, label_set = select_anchors(table, None)
    assert label_set == ["a", "b"]
    assert picked.ids == ["1", "2"] and picked.labels == ["b", "a"]
    assert kinds(table) == [(3, "label", "missing_label")]


def test_select_anchors_duplicate_id_keeps_the_first_row(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "id,text,label\nk,first,a\nk,second,b\n"))
    picked, _ = select_anchors(table, ["a", "b"])
    assert picked.ids == ["k"] and picked.texts == ["first"] and picked.labels == ["a"]


def test_select_anchors_skips_bad_json_rows_without_a_missing_label_problem(tmp_path):
    table = read_table(jsonl(tmp_path / "a.jsonl", {"text": "x", "label": "a"}, "nope"))
    picked, _ = select_anchors(table, ["a"])
    assert picked.ids == ["1"]
    assert [p.kind for p in table.problems] == ["bad_json", "empty_text"]


def test_label_file_descriptions_from_json_object_and_csv(tmp_path):
    from backend.data import read_label_file

    as_json = write(tmp_path / "l.json", '{"refund": "money back", "balance": null}')
    assert read_label_file(as_json) == {"refund": "money back", "balance": None}
    assert read_label_set(as_json) == ["refund", "balance"]
    as_csv = write(tmp_path / "l.csv", "label,description\nrefund,money back\nbalance,\n")
    assert read_label_file(as_csv) == {"refund": "money back", "balance": None}


def test_clean_text_replaces_lone_surrogates_only() -> None:
    from backend.data import clean_text

    assert clean_text("plain") == "plain" and clean_text("héllo wörld ✓") == "héllo wörld ✓"
    assert clean_text("bad \ud800 here") == "bad \ufffd here"
    assert clean_text("\udfff").encode("utf-8")  # encodable now


def test_a_jsonl_surrogate_escape_is_read_as_a_replacement_character(tmp_path: Path) -> None:
    from backend.data import read_table

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "lone \\ud800 surrogate", "label": "x"}\n', encoding="utf-8")
    assert read_table(path).texts() == ["lone \ufffd surrogate"]
