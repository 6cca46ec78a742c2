"""Listing a whole project from a real Label Studio 1.23.2: every task, with its annotations, in two passes.

The first pass asks for every column but the annotations (the costly ones); the second reads in full only the
tasks whose count of annotations is not zero. These tests hold the two-pass listing to what one listing with
every column returns, and check that a Label Studio leaving the count out costs time, never an anchor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.studio.client import StudioClient
from tests.studio.studio_proxy import StudioProxy

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text">'
          '<Choice value="a"/><Choice value="b"/></Choices></View>')
LISTING = r"^/api/tasks/?\?"


def _choice(label: str) -> list[dict]:
    return [{"from_name": "intent", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


@pytest.fixture(scope="module")
def proxy(label_studio) -> Iterator[StudioProxy]:
    with StudioProxy(label_studio["url"]) as p:
        yield p


@pytest.fixture(scope="module")
def project(label_studio) -> int:
    """Two annotated tasks (one of them also skipped once), one only skipped, one predicted with meta, four
    bare ones."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])
    p = ls.projects.create(title="hcc listing", label_config=CONFIG)
    skipped = {"result": [], "was_cancelled": True}
    ls.projects.import_tasks(id=p.id, request=[
        {"data": {"text": "first anchor"}, "annotations": [{"result": _choice("a")}]},
        {"data": {"text": "second anchor"}, "annotations": [{"result": _choice("b")}, skipped]},
        {"data": {"text": "skipped only"}, "annotations": [skipped]},
        {"data": {"text": "predicted"}, "meta": {"note": "kept"},
         "predictions": [{"result": _choice("a"), "score": 0.7, "model_version": "v1"}]},
        *({"data": {"text": f"bare {i}"}} for i in range(4))])
    return p.id


def _one_listing(client: StudioClient, project_id: int):
    """The listing with every column, as the backend read a project before the two passes."""
    return list(client._listed(project_id, None, None))


def test_two_passes_list_what_one_full_listing_does_and_read_only_annotated_tasks_in_full(
        label_studio, proxy, project):
    client = StudioClient(proxy.url, label_studio["token"])
    expected = _one_listing(client, project)
    proxy.clear()
    listed = list(client.tasks(project))
    assert listed == expected
    assert [t.data["text"] for t in listed if t.annotations] == ["first anchor", "second anchor"]
    assert all(not a.get("was_cancelled") for t in listed for a in t.annotations)
    in_full = {t.id for t in listed if t.data["text"] in ("first anchor", "second anchor")}
    assert set(_selected_ids(proxy)) == in_full


def test_a_listing_without_the_count_of_annotations_reads_every_task_in_full(label_studio, proxy, project):
    def without_count(body: bytes) -> bytes:
        page = json.loads(body)
        for task in page.get("tasks", []):
            task.pop("total_annotations", None)
        return json.dumps(page).encode()

    client = StudioClient(proxy.url, label_studio["token"])
    expected = _one_listing(client, project)
    proxy.clear()
    proxy.rewrite("GET", LISTING, without_count)
    listed = list(client.tasks(project))
    assert listed == expected
    assert set(_selected_ids(proxy)) == {t.id for t in expected}


def _selected_ids(proxy: StudioProxy) -> list[int]:
    """The task ids the client asked for by id (the second pass), over every listing request it made."""
    ids: list[int] = []
    for method, path in proxy.seen:
        query = parse_qs(urlsplit(path).query).get("query")
        if method == "GET" and query:
            ids += json.loads(query[0]).get("selectedItems", {}).get("included", [])
    return ids
