"""The Playground's first run and its live routing view: a fresh studio seeds the shipped examples and opens on the
shipped trained fusion with its weights; weight pickers name trained results by label; the heatmap and the load
bars are redrawn while tokens stream (on the run's whole x range), shaded by the chosen expert's gate probability;
the token strip lines up with the heatmap's columns."""

from __future__ import annotations

import math
import re

import plotly.graph_objects as go
import pytest
import yaml

from studio.figures import gate_intensity, slot_keys
from studio.seed import SHIPPED_FUSION_PREFERENCE, best_shipped_fusion
from studio.tabs.playground import DEFAULT_PROMPT, live_trace_every, prompt_length, token_view


@pytest.fixture
def demo(engine):
    from studio.app import build_app

    return build_app(engine)


def component(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def block_fn(demo, api_name: str):
    return next(f for f in demo.fns.values() if f.api_name == api_name)


def heat(fig: go.Figure) -> go.Heatmap:
    [h] = [t for t in fig.data if isinstance(t, go.Heatmap)]
    return h


def test_a_fresh_studio_is_seeded_and_the_playground_starts_on_the_shipped_fusion(demo, engine):
    from studio.controller import StudioController

    ctl = StudioController(engine)
    best = best_shipped_fusion(engine.repo)
    assert best is not None and best.version.recipe_name in SHIPPED_FUSION_PREFERENCE
    assert ctl.starting_version() == best.version.id
    assert ctl.default_weights(best.version.id) == best.result.id  # its trained weights, not "as built"
    # the Playground's prompt is ready to run: prose and code, where the routers disagree
    assert component(demo, "prompt").value == DEFAULT_PROMPT
    # greedy by default: the sampling settings are off until "Sample" is ticked
    assert all(component(demo, e).interactive is False for e in ("temperature", "top-k", "top-p"))

    # once the user saves a recipe, a reload opens on that instead
    models = engine.embedded_models()
    text = yaml.safe_dump(
        {"name": "mine", "base": "bard", "models": {"bard": models["bard"]}, "slots": ["bard:0"]}
    )
    mine = engine.repo.create_recipe("mine", text)
    assert ctl.starting_version() == mine.id
    assert ctl.default_weights(mine.id) == 0


def test_weight_pickers_offer_trained_results_by_label(demo, engine):
    from studio.controller import StudioController

    ctl = StudioController(engine)
    best = best_shipped_fusion(engine.repo)
    choices = ctl.weight_choices(best.version.id)
    assert choices[0][1] == 0 and choices[1] == (f"{best.version.recipe_name} v1 · shipped", best.result.id)
    for label, value in choices:
        assert not re.fullmatch(r"\s*#?\d+\s*", label) and str(value) != label
    assert ctl.weight_choices(None) == [ctl.AS_BUILT]
    # the Recipe tab's export picker is a choice of labels too, no longer a number box
    export = component(demo, "export-training-run")
    assert isinstance(export, __import__("gradio").Dropdown) and export.value == 0


def test_the_first_run_routes_with_the_shipped_weights_live(demo, engine, monkeypatch):
    """Run (no setup) on a fresh studio: the heatmap is redrawn while the tokens stream, its x range that of the
    whole run from the first redraw; the shipped routers send tokens to more than one expert, and each cell's
    strength is its chosen expert's gate probability."""
    import studio.tabs.playground as playground

    monkeypatch.setattr(playground, "REDRAW_S", 0.0)  # every trace so far drawn (on a fast machine, a few)
    ctl_run = block_fn(demo, "ui_run_prompt")
    outputs = ctl_run.outputs
    best = best_shipped_fusion(engine.repo)
    max_new = 24
    results = list(
        ctl_run.fn(best.version.id, best.result.id, DEFAULT_PROMPT, max_new, False, 1.0, 0, 1.0, 0, [])
    )
    heatmap, load, status, tokens = (
        component(demo, "router-heatmap"),
        component(demo, "expert-load"),
        component(demo, "run-status"),
        component(demo, "output-tokens"),
    )
    assert all(set(r) <= set(outputs) for r in results)
    assert "Saved as run #" in results[-1][status]
    streamed = [r for r in results[:-1] if heatmap in r]
    assert len(streamed) >= max_new // live_trace_every(max_new) - 1  # redrawn every few tokens, not once
    assert all(load in r and tokens in r for r in streamed)
    run = engine.repo.list_runs(limit=1)[0]
    assert run.settings["training_run_id"] == best.result.id
    n_prompt = len(
        engine.fused_for_version(best.version.id, best.result.id)[0].tokenizer(DEFAULT_PROMPT).input_ids
    )
    expected = n_prompt + max_new - 1
    widths = []
    for r in streamed:
        fig = r[heatmap]
        assert list(fig.layout.xaxis.range) == [-0.5, expected - 0.5]  # the x range stays put
        widths.append(len(heat(fig).z[0]))
    assert widths == sorted(widths) and widths[0] < widths[-1]  # growing as tokens come

    trace = engine.repo.get_run(run.id).trace
    final = results[-1][heatmap]
    h = heat(final)
    assert len(h.z[0]) == len(trace["tokens"])
    keys, key_of = slot_keys(trace["slots"])
    chosen_experts = set()
    for s, slot in enumerate(trace["slots"]):
        for t, (probs, pick) in enumerate(zip(slot["probs"], slot["chosen"], strict=True)):
            top = pick[0]
            z = h.z[s][t]
            assert math.floor(z) == key_of[s][slot["experts"][top]]  # hue: the chosen expert
            assert z - math.floor(z) == pytest.approx(
                min(gate_intensity(probs[top], len(probs)), 0.999), abs=1e-6
            )  # strength: its gate probability
            chosen_experts.add(slot["experts"][top])
    assert len(chosen_experts) > len(trace["slots"])  # more than one expert chosen: real routing
    bars = [t for t in results[-1][load].data if isinstance(t, go.Bar)]
    assert any(sum(y > 0 for y in b.y) > 1 for b in bars)

    view = results[-1][tokens]
    assert view["tokens"] == trace["tokens"] and view["prompt"] == n_prompt
    assert "".join(view["tokens"][n_prompt:]) + view["tail"] == run.output_text


def test_redraws_are_spaced_in_time(demo, engine, monkeypatch):
    """Building the figures takes a while: while tokens stream they are redrawn at most every REDRAW_S seconds
    (the first trace so far at once), whatever the number of tokens."""
    import studio.tabs.playground as playground

    monkeypatch.setattr(playground, "REDRAW_S", 3600.0)
    best = best_shipped_fusion(engine.repo)
    results = list(
        block_fn(demo, "ui_run_prompt").fn(
            best.version.id, best.result.id, "def main(argv):", 24, False, 1.0, 0, 1.0, 0, []
        )
    )
    heatmap = component(demo, "router-heatmap")
    assert [heatmap in r for r in results[:-1]].count(True) == 1 and heatmap in results[-1]
    assert len(results) >= 24  # the text still streams token by token


def test_reopening_a_run_shows_its_tokens_and_weights(demo, engine):
    best = best_shipped_fusion(engine.repo)
    run_fn = block_fn(demo, "ui_run_prompt").fn
    list(run_fn(best.version.id, best.result.id, "def main(argv):", 8, False, 1.0, 0, 1.0, 0, []))
    run = engine.repo.get_run(engine.repo.list_runs(limit=1)[0].id)
    opened = block_fn(demo, "ui_open_run").fn(run.id, [])
    view = opened[component(demo, "output-tokens")]
    assert view["tokens"] == run.trace["tokens"]
    assert "".join(view["tokens"][view["prompt"] :]) + view["tail"] == run.output_text
    weights = opened[component(demo, "run-weights")]
    assert weights["value"] == best.result.id and (
        f"{best.version.recipe_name} v1 · shipped",
        best.result.id,
    ) in [tuple(c) for c in weights["choices"]]


def test_the_live_trace_is_the_final_trace_at_the_end_and_leaves_no_hook(engine):
    from studio.seed import seed_shipped

    seed_shipped(engine.repo)
    best = best_shipped_fusion(engine.repo)
    updates = list(
        engine.run_prompt(
            best.version.id, "To be\ndef f(x):", {"max_new_tokens": 10}, None, best.result.id, 1
        )
    )
    partial = [u for u in updates if not u.done]
    assert len(partial) == 10 and all(u.trace is not None for u in partial)
    assert [len(u.trace["tokens"]) for u in partial] == list(
        range(partial[0].prompt_tokens, 10 + partial[0].prompt_tokens)
    )
    assert partial[-1].trace == updates[-1].trace  # the last token's trace so far is the whole trace
    model, _ = engine.fused_for_version(best.version.id, best.result.id)
    assert all(not slot._forward_hooks for slot in model.routed_slots)
    # without live_trace_every, streamed updates carry no trace (the API's generate_stream)
    plain = list(engine.run_prompt(best.version.id, "To be", {"max_new_tokens": 4}, None, best.result.id))
    assert all(u.trace is None for u in plain if not u.done)


def test_prompt_length_and_tail_of_a_stored_run():
    tokens = ["To", " be", "\n", "def", " f"]
    assert prompt_length(tokens, "To be", "\ndef f(x)") == 2
    assert prompt_length(["<s>", "a", "b"], "", "ab!") == 1  # an empty prompt: the start token is the prompt
    view = token_view({"tokens": tokens}, prompt="To be", output="\ndef f(x)")
    assert view == {"tokens": tokens, "prompt": 2, "tail": "(x)"}
    assert token_view(None) == {"tokens": [], "prompt": 0, "tail": ""}
