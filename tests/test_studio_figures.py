"""The studio's readable figures: routing heatmap shaded by gate probability, evaluation results, smoothed loss."""

from __future__ import annotations

import json
import math
import random
import statistics

import plotly.graph_objects as go
import pytest

from studio.figures import (
    ROW_PX,
    gate_intensity,
    loss_curve,
    model_colors,
    perplexity_bars,
    routing_cells,
    routing_heatmap,
    routing_results,
    short_name,
    slot_keys,
    smooth_ema,
)


def _slot(slot, experts, probs, router="token"):
    chosen = [[max(range(len(p)), key=p.__getitem__)] for p in probs]
    return {"slot": slot, "router": router, "experts": experts, "probs": probs, "chosen": chosen}


TRACE = {
    "tokens": ["The", " the", " the", "\n", " the"],
    "slots": [
        {
            "slot": 1,
            "router": "token",
            "experts": ["bard:1", "coder:1"],
            "probs": [[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]],
            "chosen": [[0], [1], [0], [1], [0]],
        },
        _slot(4, ["bard:4", "coder:4"], [[0.3, 0.7]] * 5, router="pooled"),
    ],
}


def _heat(fig: go.Figure) -> go.Heatmap:
    [h] = [t for t in fig.data if isinstance(t, go.Heatmap)]
    return h


def _frac(z: float) -> float:
    return z - math.floor(z)


def test_a_tie_looks_like_a_tie_and_differs_from_a_sure_choice():
    h = _heat(routing_heatmap(TRACE))
    row = h.z[0]
    # tokens 0 and 1: 0.50/0.50 ties, won by different experts: equal intensity, different hue band
    assert _frac(row[0]) == pytest.approx(_frac(row[1])) == pytest.approx(0.0)
    assert math.floor(row[0]) != math.floor(row[1])
    # token 2 (0.9/0.1) is much stronger than the tie, and token 3 (0.1/0.9) as strong for the other expert
    assert _frac(row[2]) == pytest.approx(0.8) and _frac(row[3]) == pytest.approx(0.8)
    assert _frac(row[2]) > _frac(row[4]) > _frac(row[0])
    # the drawn colours: the two tie cells are as pale as each other, the 0.9 cell darker
    scale = [(stop, c) for stop, c in h.colorscale]
    n = h.zmax - h.zmin

    def lightness(z):
        band = math.floor(z)
        lo, hi = scale[2 * band][1], scale[2 * band + 1][1]
        t = _frac(z)
        return sum((1 - t) * int(lo[i : i + 2], 16) + t * int(hi[i : i + 2], 16) for i in (1, 3, 5))

    assert n == len(scale) // 2
    assert lightness(row[0]) > lightness(row[2])
    ties = [lightness(row[0]), lightness(row[1])]
    assert abs(ties[0] - ties[1]) < 0.2 * (ties[0] - lightness(row[2]))


def test_gate_intensity_scale():
    assert gate_intensity(0.5, 2) == 0 and gate_intensity(1.0, 2) == 1
    assert gate_intensity(1 / 3, 3) == pytest.approx(0) and gate_intensity(0.9, 2) == pytest.approx(0.8)
    assert gate_intensity(None, 2) == 1 and gate_intensity(float("nan"), 3) == 1
    cells = routing_cells(TRACE)
    assert cells["intensity"][0][:3] == pytest.approx([0.0, 0.0, 0.8])
    assert cells["prob"][1] == pytest.approx([0.7] * 5)  # pooled: the sequence's decision on every token


def test_repeated_tokens_keep_their_own_positions():
    fig = routing_heatmap(TRACE)
    h = _heat(fig)
    assert list(h.x) == [0, 1, 2, 3, 4] and len(set(h.x)) == 5
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3, 4]
    assert list(fig.layout.xaxis.ticktext) == ["The", "·the", "·the", "⏎", "·the"]
    assert fig.layout.xaxis.tickmode == "array" and fig.layout.xaxis.type != "category"


def test_hover_names_the_token_once_and_every_probability_once():
    h = _heat(routing_heatmap(TRACE))
    assert h.hovertemplate == "%{customdata}<extra></extra>"
    text = h.customdata[0][2]
    assert text.count("·the") == 1 and "position 2" in text and "slot 1" in text and "top-1" in text
    assert text.count("bard:1") == 1 and text.count("coder:1") == 1
    assert "▶ bard:1  0.9000" in text and "coder:1  0.1000" in text and "▶ coder:1" not in text
    assert "pooled" in h.customdata[1][0]


def test_rows_stay_tall_and_the_figure_grows_with_slots():
    def trace(n_slots):
        return {
            "tokens": ["a"] * 4,
            "slots": [_slot(i, ["m:1", "n:1"], [[0.6, 0.4]] * 4) for i in range(n_slots)],
        }

    heights = []
    for n in (1, 4, 16):
        fig = routing_heatmap(trace(n))
        m = fig.layout.margin
        assert fig.layout.height - m.t - m.b >= ROW_PX * n
        assert fig.layout.autosize and fig.layout.width is None  # fits a 390 px phone: no fixed width
        assert m.l <= 10 and m.r <= 10
        heights.append(fig.layout.height)
    assert heights[0] < heights[1] < heights[2]
    assert heights[2] - heights[1] >= ROW_PX * 12


def test_legend_is_horizontal_below_with_short_names_once():
    long = "mango-coder-instruct-v2"
    trace = {
        "tokens": ["x"] * 3,
        "slots": [
            _slot(1, ["bard:1", f"{long}:1"], [[0.6, 0.4]] * 3),
            _slot(2, ["bard:2", f"{long}:2"], [[0.2, 0.8]] * 3),
            _slot(3, ["bard:3", "bard:7"], [[0.2, 0.8]] * 3),  # one model twice: its experts keyed apart
        ],
    }
    fig = routing_heatmap(trace)
    legend = fig.layout.legend
    assert legend.orientation == "h" and legend.yanchor == "bottom" and legend.y == 0
    names = [t.name for t in fig.data if t.showlegend]
    assert names == ["bard", short_name(long, 12), "bard:3", "bard:7"]
    assert all(len(n) <= 12 for n in names)
    assert short_name(f"{long}:12", 12) == "mango-co…:12"
    keys, key_of = slot_keys(trace["slots"])
    assert key_of[0]["bard:1"] == key_of[1]["bard:2"]  # same model, same colour in every row
    assert keys[key_of[2]["bard:3"]][1] != keys[key_of[2]["bard:7"]][1]
    # the legend's rows are reserved in the bottom margin
    assert fig.layout.margin.b >= 22 * math.ceil(len(names) / 4)


def test_long_outputs_thin_the_tick_labels():
    n = 500
    trace = {"tokens": [f"t{i}" for i in range(n)], "slots": [_slot(0, ["a:0", "b:0"], [[0.7, 0.3]] * n)]}
    fig = routing_heatmap(trace)
    xa = fig.layout.xaxis
    assert len(xa.tickvals) <= 20 and len(xa.tickvals) == len(xa.ticktext) and xa.tickvals[0] == 0
    assert [xa.ticktext[i] for i in range(3)] == [f"t{v}" for v in xa.tickvals[:3]]
    assert len(_heat(fig).x) == n
    json.loads(fig.to_json())


def test_partial_traces_while_streaming():
    full = [[0.8, 0.2], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]]
    tokens = ["To", " be", ",", " or"]
    previous = None
    for t in range(1, 5):
        partial = {"tokens": tokens[:t], "slots": [_slot(2, ["bard:2", "coder:2"], full[:t])]}
        fig = routing_heatmap(partial, expected_tokens=48)
        h = _heat(fig)
        assert len(h.z[0]) == t and list(fig.layout.xaxis.range) == [-0.5, 47.5]
        assert fig.layout.uirevision == "routing"  # the user's zoom survives the next update
        if previous is not None:
            assert list(h.z[0][: t - 1]) == previous  # earlier cells do not change as tokens arrive
        previous = list(h.z[0])
    # tokens ahead of the trace (the prompt is not routed yet): rows right-aligned, no error
    ahead = routing_heatmap({"tokens": ["a", "b", "c"], "slots": [_slot(0, ["m:0", "n:0"], [[0.6, 0.4]])]})
    assert list(_heat(ahead).z[0][:2]) == [None, None]
    # probabilities ahead of the decoded text: columns kept, text pending
    behind = routing_heatmap({"tokens": ["a"], "slots": [_slot(0, ["m:0", "n:0"], [[0.6, 0.4]] * 3)]})
    assert len(_heat(behind).z[0]) == 3
    assert (
        "No tokens"
        in routing_heatmap({"tokens": [], "slots": [_slot(0, ["m:0"], [])]}).layout.annotations[0].text
    )
    assert "No routed slots" in routing_heatmap({"tokens": ["a"], "slots": []}).layout.annotations[0].text


def test_hostile_names_are_escaped_in_the_heatmap():
    trace = {"tokens": ["<img src=x>"], "slots": [_slot(0, ["<b>x:0", "y:0"], [[0.6, 0.4]])]}
    fig = routing_heatmap(trace)
    text = fig.to_json()
    assert "<b>x" not in text and "<img" not in text
    assert "&lt;b&gt;x" in text


RESULTS = {
    "recipe": "fused",
    "rows": [
        {
            "name": "prose-code",
            "kind": "fused",
            "trainable_parameters": 10,
            "domains": {
                "prose": {
                    "perplexity": 12.0,
                    "agreement": {"6": 0.8},
                    "load": {"6": {"bard:6": 0.75, "coder:6": 0.25}, "8": {"bard:8": 0.5, "coder:8": 0.5}},
                },
                "code": {
                    "perplexity": 5.0,
                    "agreement": {"6": 0.9},
                    "load": {"6": {"bard:6": 0.1, "coder:6": 0.9}, "8": {"bard:8": 0.4, "coder:8": 0.6}},
                },
            },
        },
        {
            "name": "bard alone",
            "kind": "source",
            "trainable_parameters": 0,
            "domains": {"prose": {"perplexity": 10.0}, "code": {"perplexity": 90.0}},
        },
        {
            "name": "coder alone",
            "kind": "source",
            "trainable_parameters": 0,
            "domains": {"prose": {"perplexity": 200.0}, "code": {"perplexity": float("nan")}},
        },
    ],
}


def test_perplexity_bars_group_fused_beside_each_source_on_a_log_axis():
    colors = model_colors(["bard", "coder"])
    fig = perplexity_bars(RESULTS, colors=colors)
    assert fig.layout.yaxis.type == "log" and fig.layout.barmode == "group"
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.name for b in bars] == ["prose-code (fused)", "bard alone", "coder alone"]
    assert all(list(b.x) == [0, 1] for b in bars) and list(fig.layout.xaxis.ticktext) == ["prose", "code"]
    assert list(bars[0].y) == [12.0, 5.0] and list(bars[1].y) == [10.0, 90.0]
    assert list(bars[2].y) == [200.0, None]  # NaN: no bar, not a broken log axis
    assert bars[1].marker.color == colors["bard"] and bars[2].marker.color == colors["coder"]
    assert bars[0].marker.color not in (colors["bard"], colors["coder"])
    json.loads(fig.to_json())
    assert "No evaluation results" in perplexity_bars({}).layout.annotations[0].text


def test_routing_results_are_small_multiples_per_slot():
    fig = routing_results(RESULTS)
    assert [a.text for a in fig.layout.annotations] == ["slot 6", "slot 8"]
    load = [t for t in fig.data if isinstance(t, go.Bar)]
    agree = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert fig.layout.barmode == "stack" and len(load) == 4 and len(agree) == 1  # slot 8 had no labels
    assert list(load[0].y) == [0.75, 0.1] and load[0].xaxis == "x" and load[2].xaxis == "x2"
    assert list(agree[0].y) == [0.8, 0.9] and list(agree[0].text) == ["80%", "90%"]
    assert [t.name for t in fig.data if t.showlegend] == ["bard", "coder", "agreement with labels"]
    json.loads(fig.to_json())
    no_routing = {"rows": [{"name": "x", "kind": "fused", "domains": {"prose": {"perplexity": 3.0}}}]}
    assert "No routed slots" in routing_results(no_routing).layout.annotations[0].text


def test_smoothed_loss_has_lower_variance_and_the_raw_steps_stay_faint():
    rng = random.Random(0)
    points = [{"step": i, "loss": 3.0 + rng.gauss(0, 0.5)} for i in range(1, 201)]
    fig = loss_curve(points, smoothing=0.9)
    raw, smooth = fig.data
    assert raw.name == "loss (raw)" and smooth.name == "loss (smoothed)"
    assert raw.opacity < 0.5 and smooth.line.width > raw.line.width
    assert statistics.pvariance(smooth.y) < 0.25 * statistics.pvariance(raw.y)
    assert statistics.mean(smooth.y[50:]) == pytest.approx(3.0, abs=0.2)
    # without smoothing: the curve as before
    assert [t.name for t in loss_curve(points).data] == ["loss"]


def test_smooth_ema():
    assert smooth_ema([1.0, 1.0, 1.0], 0.9) == pytest.approx(
        [1.0, 1.0, 1.0]
    )  # bias-corrected: no ramp from 0
    assert smooth_ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    out = smooth_ema([2.0, None, float("inf"), 2.0], 0.5)
    assert out[1] is None and out[2] is None and out[3] == pytest.approx(2.0)
