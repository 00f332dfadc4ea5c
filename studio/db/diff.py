"""Structured difference of two recipe YAML texts: which keys changed, which slots changed, and a unified diff."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

ChangeKind = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class KeyChange:
    """One leaf that differs. `path` is dotted with list indices, e.g. `models.bard.path` or `train.lrs[1]`."""

    path: str
    kind: ChangeKind
    old: Any = None
    new: Any = None


@dataclass(frozen=True)
class SlotChange:
    """One entry of the top-level `slots` list that was added, removed or changed. Slots are aligned as
    sequences, so inserting one slot reports one `added` rather than every later slot as changed.
    `fields` lists what changed inside a changed slot (paths relative to the slot)."""

    kind: ChangeKind
    old_index: int | None
    new_index: int | None
    old: Any = None
    new: Any = None
    fields: tuple[KeyChange, ...] = ()


@dataclass(frozen=True)
class YamlDiff:
    changes: tuple[KeyChange, ...] = ()  # everything outside `slots`
    slots: tuple[SlotChange, ...] = ()
    text_diff: str = ""
    parse_error: str | None = None  # set when either side is not valid YAML (only `text_diff` is then filled)
    changed_keys: tuple[str, ...] = field(default=())  # top-level keys that differ, `slots` included

    @property
    def identical(self) -> bool:
        return not self.text_diff


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def key_changes(old: Any, new: Any, prefix: str = "") -> list[KeyChange]:
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, prefix, a)
    _flatten(new, prefix, b)
    changes = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            changes.append(KeyChange(path, "removed", a[path], None))
        elif path not in a:
            changes.append(KeyChange(path, "added", None, b[path]))
        elif a[path] != b[path] or type(a[path]) is not type(b[path]):
            changes.append(KeyChange(path, "changed", a[path], b[path]))
    return changes


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def slot_changes(old: list[Any], new: list[Any]) -> list[SlotChange]:
    out: list[SlotChange] = []
    matcher = difflib.SequenceMatcher(a=[_canon(s) for s in old], b=[_canon(s) for s in new], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for d in range(paired):
            i, j = i1 + d, j1 + d
            out.append(SlotChange("changed", i, j, old[i], new[j], tuple(key_changes(old[i], new[j]))))
        for i in range(i1 + paired, i2):
            out.append(SlotChange("removed", i, None, old[i], None))
        for j in range(j1 + paired, j2):
            out.append(SlotChange("added", None, j, None, new[j]))
    return out


def diff_yaml(old_text: str, new_text: str, old_label: str = "old", new_label: str = "new") -> YamlDiff:
    text_diff = "".join(difflib.unified_diff(
        old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
        fromfile=old_label, tofile=new_label,
    ))
    if text_diff and not text_diff.endswith("\n"):
        text_diff += "\n"
    try:
        old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    except yaml.YAMLError as e:
        return YamlDiff(text_diff=text_diff, parse_error=f"Not valid YAML: {e}")

    old_slots = old.get("slots") if isinstance(old, dict) else None
    new_slots = new.get("slots") if isinstance(new, dict) else None
    slots: list[SlotChange] = []
    if isinstance(old_slots, list) and isinstance(new_slots, list):
        slots = slot_changes(old_slots, new_slots)
        old = {k: v for k, v in old.items() if k != "slots"}
        new = {k: v for k, v in new.items() if k != "slots"}
    changes = key_changes(old, new)
    top = {c.path.split(".")[0].split("[")[0] for c in changes}
    if slots:
        top.add("slots")
    return YamlDiff(changes=tuple(changes), slots=tuple(slots), text_diff=text_diff, changed_keys=tuple(sorted(top)))
