"""Plotly figures of routing traces and training loss."""

from __future__ import annotations

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio.figures import (
    PALETTE,
    expert_colors,
    expert_load,
    format_prob,
    loss_curve,
    model_colors,
    routing_heatmap,
    shade_by_intensity,
    visible_token,
)

TRACE = {
    "tokens": ["The", " cat", " the", "\n", " the", "<s>"],
    "token_ids": [10, 11, 12, 13, 12, 1],
    "slots": [
        {
            "slot": 1,
            "router": "token",
            "experts": ["bard:1", "coder:1"],
            "probs": [[0.7, 0.3], [0.2, 0.8], [0.55, 0.45], [0.1, 0.9], [0.61, 0.39], [0.5, 0.5]],
            "chosen": [[0], [1], [0], [1], [0], [1]],
            "load": [0.5, 0.5],
        },
        {
            "slot": 4,
            "router": "pooled",
            "experts": ["bard:4", "coder:4", "coder:7"],
            "probs": [[0.2, 0.3, 0.5]] * 6,
            "chosen": [[2]] * 6,
            "load": [0.0, 0.0, 1.0],
        },
        {
            "slot": 6,
            "router": "token",
            "experts": ["coder:6", "bard:6"],
            "probs": [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4]],
            "chosen": [[0, 1], [0, 1], [1, 0], [1, 0], [1, 0], [0, 1]],
            "load": [0.5, 0.5],
        },
    ],
}


def _heat(fig: go.Figure) -> go.Heatmap:
    [trace] = [t for t in fig.data if isinstance(t, go.Heatmap)]
    return trace


def _key(slot: dict, expert: str) -> str:
    """The colour key of an expert in a routing heatmap row: its model, unless that model has several experts in
    the slot (then the expert itself)."""
    alias = expert.split(":")[0]
    return alias if sum(e.split(":")[0] == alias for e in slot["experts"]) == 1 else expert


def test_heatmap_shape_is_slots_by_tokens():
    h = _heat(routing_heatmap(TRACE))
    assert np.array(h.z, dtype=float).shape == (3, 6)
    assert list(h.x) == list(range(6)) and list(h.y) == [0, 1, 2]


def test_heatmap_cells_are_the_top1_expert():
    fig = routing_heatmap(TRACE)
    h = _heat(fig)
    legend = [t for t in fig.data if isinstance(t, go.Scatter)]
    names = [t.name for t in legend]
    assert names == ["bard", "coder", "coder:4", "coder:7"]  # one key per model, per expert where shared
    for row, slot in zip(h.z, TRACE["slots"], strict=True):
        assert [names[math.floor(c)] for c in row] == [
            _key(slot, slot["experts"][pick[0]]) for pick in slot["chosen"]
        ]
    assert (h.zmin, h.zmax) == (0, 4)
    scale = [c for _, c in h.colorscale]
    assert [t.marker.color for t in legend] == scale[1::2]  # each key's full colour is its band's top
    assert list(fig.layout.yaxis.ticktext) == ["slot 1", "slot 4 (pooled)", "slot 6"]


def test_heatmap_hover_holds_every_gate_probability():
    h = _heat(routing_heatmap(TRACE))
    custom = h.customdata
    for s, slot in enumerate(TRACE["slots"]):
        for t, probs in enumerate(slot["probs"]):
            text = custom[s][t]
            head, route, *lines = text.split("<br>")
            assert f"slot {slot['slot']}" in route
            assert (
                head.startswith(f"<b>{visible_token(TRACE['tokens'][t], 40)}</b>") and f"position {t}" in head
            )
            assert text.count(visible_token(TRACE["tokens"][t], 40)) >= 1 and len(lines) == len(probs)
            for i, (line, name, p) in enumerate(zip(lines, slot["experts"], probs, strict=True)):
                assert line.endswith(f"{name}  {format_prob(p)}")
                assert line.startswith("▶") == (i in slot["chosen"][t])
            assert lines[slot["chosen"][t][0]].startswith("▶")  # the chosen expert is marked
    assert "%{customdata}" in h.hovertemplate
    marked = [line.split()[1] for line in custom[2][0].split("<br>")[2:] if line.startswith("▶")]
    assert marked == ["coder:6", "bard:6"]  # top-2 slot: both chosen experts marked


def test_repeated_tokens_stay_separate_columns():
    fig = routing_heatmap(TRACE)
    xa = fig.layout.xaxis
    assert list(xa.tickvals) == list(range(6))
    assert list(xa.ticktext) == ["The", "·cat", "·the", "⏎", "·the", "&lt;s&gt;"]
    h = _heat(fig)
    assert len(set(h.x)) == 6  # positions, not categories: " the" twice is two columns
    assert h.z[0][2] != h.z[0][3]


def test_colours_follow_the_model_alias():
    fig = routing_heatmap(TRACE, colors={"bard": "#111111", "coder": "#eeeeee"})
    h = _heat(fig)
    scale = [(round(stop, 6), c) for stop, c in h.colorscale]
    n = h.zmax - h.zmin
    assert scale[1] == (round(1 / n, 6), "#111111")  # bard's band (key 0) ends in bard's own colour
    assert scale[0] == (0.0, shade_by_intensity("#111111", 0.0))  # and starts at its tie shade
    legend = {t.name: t.marker.color for t in fig.data if isinstance(t, go.Scatter)}
    assert legend["bard"] == "#111111" and legend["coder"] == "#eeeeee"
    colors = expert_colors(["bard:1", "bard:4", "coder:1"])
    base = model_colors(["bard", "coder"])
    assert colors["bard:1"] == base["bard"] and colors["coder:1"] == base["coder"]
    assert colors["bard:4"] != colors["bard:1"] and colors["bard:4"] != base["coder"]
    assert len(set(expert_colors([f"m:{i}" for i in range(8)]).values())) == 8


def test_model_colors_are_stable_and_distinct():
    aliases = [f"model{i}" for i in range(25)]
    colors = model_colors(aliases)
    assert list(colors) == aliases and len(set(colors.values())) == 25
    assert list(colors.values())[:10] == list(PALETTE)
    assert model_colors(aliases) == colors and model_colors(["a", "a", "b"]) == {
        "a": PALETTE[0],
        "b": PALETTE[1],
    }
    assert all(len(c) == 7 and c.startswith("#") for c in colors.values())


def test_empty_traces_give_a_message_not_an_error():
    for empty in ({"tokens": ["a", "b"], "token_ids": [1, 2], "slots": []}, {}, {"slots": None}):
        fig = routing_heatmap(empty)
        assert not fig.data and "No routed slots" in fig.layout.annotations[0].text
        json.loads(fig.to_json())
        assert "No routed slots" in expert_load(empty).layout.annotations[0].text
    no_tokens = routing_heatmap(
        {
            "tokens": [],
            "slots": [
                {"slot": 0, "router": "token", "experts": ["a:0"], "probs": [], "chosen": [], "load": [0.0]}
            ],
        }
    )
    assert "No tokens" in no_tokens.layout.annotations[0].text


def test_long_and_odd_tokens():
    tokens = ["word"] * 150 + ["a very long token that goes on", "\t", "", " \n "]
    n = len(tokens)
    trace = {
        "tokens": tokens,
        "token_ids": list(range(n)),
        "slots": [
            {
                "slot": 2,
                "router": "token",
                "experts": ["x:2", "y:2"],
                "probs": [[0.25, 0.75]] * n,
                "chosen": [[1]] * n,
                "load": [0.0, 1.0],
            }
        ],
    }
    fig = routing_heatmap(trace)
    assert np.array(_heat(fig).z, dtype=float).shape == (1, n)
    xa = fig.layout.xaxis
    assert len(xa.tickvals) <= 20 and len(xa.tickvals) == len(xa.ticktext)  # thinned, still aligned
    assert visible_token("a very long token that goes on", 12) == "a·very·long…"
    assert [visible_token(t) for t in ["\t", "", " \n "]] == ["⇥", "∅", "·⏎·"]
    json.loads(fig.to_json())


def test_trace_shorter_than_tokens_is_right_aligned():
    trace = {
        "tokens": ["a", "b", "c"],
        "slots": [
            {
                "slot": 0,
                "router": "token",
                "experts": ["m:0", "n:0"],
                "probs": [[0.9, 0.1], [0.2, 0.8]],
                "chosen": [[0], [1]],
            }
        ],
    }
    h = _heat(routing_heatmap(trace))
    assert h.z[0][0] is None and [math.floor(z) for z in h.z[0][1:]] == [0, 1]
    assert "m:0  –" in h.customdata[0][0] and "n:0  –" in h.customdata[0][0]


def test_expert_load_bars():
    fig = expert_load(TRACE)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 3
    assert [list(b.x) for b in bars] == [s["experts"] for s in TRACE["slots"]]
    assert [list(b.y) for b in bars] == [s["load"] for s in TRACE["slots"]]
    colors = expert_colors([e for s in TRACE["slots"] for e in s["experts"]])
    assert list(bars[1].marker.color) == [colors[e] for e in TRACE["slots"][1]["experts"]]
    assert [a.text for a in fig.layout.annotations] == ["slot 1", "slot 4 (pooled)", "slot 6"]
    json.loads(fig.to_json())
    # a trace without "load" is counted from "chosen"
    no_load = {"slots": [{**TRACE["slots"][0], "load": []}]}
    assert list(expert_load(no_load).data[0].y) == [0.5, 0.5]


def test_loss_curve():
    points = [
        {"step": 3, "loss": 2.0, "lr": 1e-3},
        {"step": 1, "loss": 3.0, "lr": 1e-3},
        {"step": 2, "loss": float("nan"), "lr": 5e-4},
    ]
    fig = loss_curve(points)
    loss, lr = fig.data
    assert list(loss.x) == [1, 2, 3] and list(loss.y) == [3.0, None, 2.0]  # sorted; NaN is a gap
    assert lr.yaxis == "y2" and list(lr.y) == [1e-3, 5e-4, 1e-3]
    assert fig.layout.title.text == "Training loss"
    json.loads(fig.to_json())
    assert len(loss_curve([{"step": 1, "loss": 1.0}]).data) == 1
    assert "No training steps" in loss_curve([]).layout.annotations[0].text


def test_no_deprecated_layout_properties():
    for fig in (
        routing_heatmap(TRACE),
        expert_load(TRACE),
        loss_curve([{"step": 1, "loss": 1.0, "lr": 0.1}]),
    ):
        text = fig.to_json()
        assert "titlefont" not in text and "titleside" not in text and '"heatmapgl"' not in text
        assert isinstance(json.loads(text)["layout"]["title"], dict)


probability_rows = st.integers(2, 4).flatmap(
    lambda n: st.tuples(
        st.just(n), st.lists(st.lists(st.floats(0, 1), min_size=n, max_size=n), min_size=1, max_size=30)
    )
)


@settings(max_examples=25, deadline=None)
@given(data=probability_rows, n_slots=st.integers(1, 4), tokens=st.lists(st.text(max_size=6), max_size=30))
def test_any_trace_renders(data, n_slots, tokens):
    n_exp, probs = data
    t = len(probs)
    tokens = (tokens + ["x"] * t)[:t]
    trace = {
        "tokens": tokens,
        "token_ids": list(range(t)),
        "slots": [
            {
                "slot": s,
                "router": "token",
                "experts": [f"m{e % 2}:{s}{e}" for e in range(n_exp)],
                "probs": probs,
                "chosen": [[int(np.argmax(row))] for row in probs],
                "load": [1 / n_exp] * n_exp,
            }
            for s in range(n_slots)
        ],
    }
    fig = routing_heatmap(trace)
    assert np.array(_heat(fig).z, dtype=float).shape == (n_slots, t)
    json.loads(fig.to_json())
    json.loads(expert_load(trace).to_json())


@pytest.mark.parametrize("p,text", [(0.5, "0.5000"), (1e-6, "0.0000"), (None, "–")])
def test_format_prob(p, text):
    assert format_prob(p) == text
