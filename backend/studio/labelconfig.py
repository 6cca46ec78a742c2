"""Read what the backend needs from a Label Studio labelling config (XML).

Classification projects use ``<Choices>`` over ``<Text>``: the backend needs the control's name (the
prediction's ``from_name``), the object's name (``to_name``), the task data key the text comes from
(``value="$text"`` -> ``text``) and the label set. Comparison projects use ``<Pairwise>`` over two
``<Text>`` objects.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


class LabelConfigError(ValueError):
    """The project's labelling config is not one this backend can predict for."""


@dataclass(frozen=True)
class ChoicesTarget:
    """One single-choice ``<Choices>`` control over a ``<Text>`` object."""

    from_name: str
    to_name: str
    value_key: str  # the task data key holding the text
    labels: tuple[str, ...]
    descriptions: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PairwiseTarget:
    """A ``<Pairwise>`` control over two ``<Text>`` objects (comparison mode)."""

    from_name: str
    left: str  # object names
    right: str
    left_key: str  # task data keys
    right_key: str


def _texts(root: ET.Element) -> dict[str, str]:
    """``<Text>`` (and ``<HyperText>``) object names -> task data key."""
    objects = {}
    for tag in ("Text", "HyperText"):
        for el in root.iter(tag):
            name, value = el.get("name"), el.get("value", "")
            if name and value.startswith("$"):
                objects[name] = value[1:]
    return objects


def _choices(el: ET.Element) -> tuple[tuple[str, ...], dict[str, str]]:
    labels, descriptions = [], {}
    for choice in el.iter("Choice"):
        value = choice.get("value") or choice.get("alias")
        if value is None:
            continue
        labels.append(value)
        hint = choice.get("hint")
        if hint:
            descriptions[value] = hint
    return tuple(labels), descriptions


def parse_label_config(xml: str) -> list[ChoicesTarget | PairwiseTarget]:
    """Every target the backend can predict for, in config order; raises ``LabelConfigError`` when none."""
    if not xml or not xml.strip():
        raise LabelConfigError("the project has no labelling config")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the labelling config is not valid XML: {exc}") from exc
    texts = _texts(root)
    targets: list[ChoicesTarget | PairwiseTarget] = []
    problems: list[str] = []
    for el in root.iter():
        if el.tag == "Choices":
            target = _choices_target(el, texts, problems)
            if target:
                targets.append(target)
        elif el.tag == "Pairwise":
            target = _pairwise_target(el, texts, problems)
            if target:
                targets.append(target)
    if not targets:
        why = "; ".join(problems) or "it has no <Choices> over a <Text> and no <Pairwise>"
        raise LabelConfigError(f"this backend cannot predict for the labelling config: {why}")
    return targets


def _choices_target(el: ET.Element, texts: dict[str, str], problems: list[str]) -> ChoicesTarget | None:
    name, to_name = el.get("name"), el.get("toName", "")
    if not name:
        problems.append("a <Choices> has no name")
        return None
    if el.get("choice", "single") != "single":
        problems.append(f"<Choices name={name!r}> allows several choices; only single choice is supported")
        return None
    if to_name not in texts:
        problems.append(f"<Choices name={name!r}> points to {to_name!r}, which is not a <Text value=\"$...\">")
        return None
    labels, descriptions = _choices(el)
    if len(labels) < 2:
        problems.append(f"<Choices name={name!r}> has fewer than two <Choice> values")
        return None
    return ChoicesTarget(name, to_name, texts[to_name], labels, descriptions)


def _pairwise_target(el: ET.Element, texts: dict[str, str], problems: list[str]) -> PairwiseTarget | None:
    name = el.get("name")
    objects = [t.strip() for t in el.get("toName", "").split(",") if t.strip()]
    if not name or len(objects) != 2 or any(o not in texts for o in objects):
        problems.append(f"<Pairwise name={name!r}> must name two <Text> objects in toName")
        return None
    return PairwiseTarget(name, objects[0], objects[1], texts[objects[0]], texts[objects[1]])


def classification_target(xml: str, *, from_name: str | None = None) -> ChoicesTarget:
    """The single ``<Choices>`` target to predict; several need ``from_name`` (env ``HCC_FROM_NAME``)."""
    targets = [t for t in parse_label_config(xml) if isinstance(t, ChoicesTarget)]
    if not targets:
        raise LabelConfigError("the labelling config has no single-choice <Choices> over a <Text>")
    if from_name:
        chosen = [t for t in targets if t.from_name == from_name]
        if not chosen:
            names = ", ".join(t.from_name for t in targets)
            raise LabelConfigError(f"HCC_FROM_NAME={from_name!r} is not a <Choices> of the config (it has: {names})")
        return chosen[0]
    if len(targets) > 1:
        names = ", ".join(t.from_name for t in targets)
        raise LabelConfigError(
            f"the labelling config has {len(targets)} <Choices> controls ({names}); set HCC_FROM_NAME to the one "
            "this backend should predict"
        )
    return targets[0]
