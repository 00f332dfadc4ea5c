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


_GAP = 0.4  # cost of an added or removed slot; pairing two slots costs 1 - similarity


def _align(a: list[str], b: list[str]) -> list[tuple[int | None, int | None]]:
    """Least-cost alignment of two short runs of differing slots (edit distance with similarity-weighted
    substitution), so a changed slot pairs with its edited self rather than with whatever sits at its index."""
    if len(a) * len(b) > 40_000:  # huge rewrites: pair by position
        n = min(len(a), len(b))
        return (
            [(i, i) for i in range(n)]
            + [(i, None) for i in range(n, len(a))]
            + [(None, j) for j in range(n, len(b))]
        )
    inf = float("inf")
    cost = [[inf] * (len(b) + 1) for _ in range(len(a) + 1)]
    step: list[list[tuple[int, int]]] = [[(0, 0)] * (len(b) + 1) for _ in range(len(a) + 1)]
    cost[0][0] = 0.0
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            if i and cost[i - 1][j] + _GAP < cost[i][j]:
                cost[i][j], step[i][j] = cost[i - 1][j] + _GAP, (1, 0)
            if j and cost[i][j - 1] + _GAP < cost[i][j]:
                cost[i][j], step[i][j] = cost[i][j - 1] + _GAP, (0, 1)
            if i and j:
                c = cost[i - 1][j - 1] + 1.0 - difflib.SequenceMatcher(None, a[i - 1], b[j - 1]).ratio()
                if c < cost[i][j]:
                    cost[i][j], step[i][j] = c, (1, 1)
    pairs: list[tuple[int | None, int | None]] = []
    i, j = len(a), len(b)
    while i or j:
        di, dj = step[i][j]
        pairs.append((i - 1 if di else None, j - 1 if dj else None))
        i, j = i - di, j - dj
    return pairs[::-1]


def slot_changes(old: list[Any], new: list[Any]) -> list[SlotChange]:
    out: list[SlotChange] = []
    ca, cb = [_canon(s) for s in old], [_canon(s) for s in new]
    matcher = difflib.SequenceMatcher(a=ca, b=cb, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for di, dj in _align(ca[i1:i2], cb[j1:j2]):
            i = None if di is None else i1 + di
            j = None if dj is None else j1 + dj
            if i is not None and j is not None:
                out.append(SlotChange("changed", i, j, old[i], new[j], tuple(key_changes(old[i], new[j]))))
            elif i is not None:
                out.append(SlotChange("removed", i, None, old[i], None))
            else:
                assert j is not None
                out.append(SlotChange("added", None, j, None, new[j]))
    return out


def diff_yaml(old_text: str, new_text: str, old_label: str = "old", new_label: str = "new") -> YamlDiff:
    text_diff = "".join(
        difflib.unified_diff(
            old_text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            fromfile=old_label,
            tofile=new_label,
        )
    )
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
    return YamlDiff(
        changes=tuple(changes), slots=tuple(slots), text_diff=text_diff, changed_keys=tuple(sorted(top))
    )
