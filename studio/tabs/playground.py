"""Playground tab: run a prompt through a saved recipe version with streamed output, see the routing (router
heatmap and expert load, redrawn every few tokens as the output streams; the output's tokens under it, each
hover showing its column), run the same prompt through source models alone, and reopen any earlier run. A fresh
studio opens on the shipped trained fusion with its weights (studio.seed), so the first Run routes for real."""

from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from mol.errors import RecipeError
from studio.controller import StudioController
from studio.engine import StudioEngine, clamp_settings, gpu_task, load_text
from studio.errors import record_id, whole
from studio.errors import text as text_arg
from studio.tabs.common import (
    api_errors,
    api_errors_stream,
    figures_for,
    fmt_time,
    message_html,
    trace_colors,
    user_message,
)

RUN_COLUMNS = ["Id", "Time (UTC)", "Recipe", "Version", "Prompt", "Output"]
STATIC = Path(__file__).resolve().parents[1] / "static"
# What the example list offers (label, prompt); the mixed one is the prompt a fresh Playground starts with, text
# where the shipped fusion's routers send prose to one expert and code to the other.
EXAMPLE_PROMPTS = (
    ("prose", "ROMEO:\nBut soft, what light through yonder window breaks?"),
    ("code", "def main(argv):\n    "),
    (
        "prose and code",
        "To be, or not to be, that is the question:\ndef main(argv):\n    return sorted(argv)",
    ),
)
DEFAULT_PROMPT = EXAMPLE_PROMPTS[2][1]
REDRAW_S = 0.4  # the least time between two redraws of the routing figures while tokens stream


def live_trace_every(max_new_tokens: int) -> int:
    """How often (in tokens) the trace so far comes with a streamed update: every 4 tokens, at most about 24 times a
    run. The figures are redrawn from it at most every REDRAW_S seconds (building them takes a while: a redraw
    per token would hold the text back)."""
    return max(4, math.ceil(max_new_tokens / 24))


def prompt_length(tokens: list[str], prompt: str | None, output: str | None) -> int:
    """How many of a stored trace's tokens are the prompt's (the live run knows; a stored run does not): the
    first tokens that spell the prompt, else the first position from which the tokens spell the output's start."""
    if prompt:
        joined = ""
        for k, t in enumerate(tokens):
            joined += t
            if joined == prompt:
                return k + 1
            if not prompt.startswith(joined):
                break
    for k in range(len(tokens) + 1):
        if (output or "").startswith("".join(tokens[k:])):
            return k
    return 0


def token_view(
    trace: dict | None,
    prompt_tokens: int | None = None,
    tail: str | None = None,
    prompt: str | None = None,
    output: str | None = None,
) -> dict:
    """What the token strip (static/tokens.js) draws: the trace's tokens (position = heatmap column), how many
    are the prompt's, and the last generated token, which the model never read (no column)."""
    tokens = [str(t) for t in (trace or {}).get("tokens") or []]
    if prompt_tokens is None:
        prompt_tokens = prompt_length(tokens, prompt, output)
    if tail is None:
        read = "".join(tokens[prompt_tokens:])
        tail = (output or "")[len(read) :] if (output or "").startswith(read) else ""
    return {"tokens": tokens, "prompt": max(0, min(prompt_tokens, len(tokens))), "tail": tail}


def source_outputs_html(outputs: dict[str, str], colors: dict[str, str]) -> str:
    cards = "".join(
        f'<div class="source-output" style="--chip:{colors.get(a.split(" ")[0], "#868e96")}" data-source="{html.escape(a)}">'
        f"<strong>{html.escape(a)}</strong><pre>{html.escape(t)}</pre></div>"
        for a, t in outputs.items()
    )
    return f'<div class="source-outputs">{cards}</div>'


def create_playground_tab(ctl: StudioController, workspace: gr.State) -> dict[str, Any]:
    engine = ctl.engine
    limit = engine.config.max_new_tokens
    with gr.Row():
        version = gr.Dropdown(
            choices=[],
            label="Recipe version",
            elem_id="run-version",
            scale=2,
            min_width=200,
            info="the shipped examples, and every recipe you save in the Recipe tab",
        )
        weights = gr.Dropdown(
            choices=ctl.weight_choices(None),
            value=0,
            label="Weights",
            elem_id="run-weights",
            scale=1,
            min_width=200,
            info="as built, shipped trained weights, or a run of the Train tab",
        )
    prompt = gr.Textbox(
        value=DEFAULT_PROMPT, label="Prompt", lines=3, elem_id="prompt", placeholder="To be, or not to be"
    )
    gr.Examples(
        [[text] for _, text in EXAMPLE_PROMPTS],
        [prompt],
        label="Example prompts",
        example_labels=[label for label, _ in EXAMPLE_PROMPTS],
        elem_id="prompt-examples",
        api_visibility="private",
    )
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            max_new = gr.Slider(
                1, limit, value=min(48, limit), step=1, label="New tokens", elem_id="max-new-tokens"
            )
            do_sample = gr.Checkbox(value=False, label="Sample (off: greedy)", elem_id="do-sample")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        with gr.Row():
            # greedy decoding reads none of these: they are enabled with "Sample"
            temperature = gr.Slider(
                0.05,
                2.0,
                value=0.8,
                step=0.05,
                label="Temperature",
                elem_id="temperature",
                interactive=False,
            )
            top_k = gr.Slider(
                0, 200, value=0, step=1, label="Top-k (0: off)", elem_id="top-k", interactive=False
            )
            top_p = gr.Slider(
                0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top-p", interactive=False
            )
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id="run-prompt")
        stop = gr.Button("Stop", elem_id="stop-run")
    run_status = gr.HTML(elem_id="run-status")
    output = gr.Textbox(label="Output", lines=6, elem_id="output-text", interactive=False)
    tokens_view = gr.HTML(
        value=token_view(None),
        html_template='<div class="mango-tokens"></div>',
        js_on_load=(STATIC / "tokens.js").read_text(encoding="utf-8"),
        elem_id="output-tokens",
        label="Tokens",
    )
    # the figure's own title says how to read it (a shown label covers the figure on a phone, and Gradio then
    # gives a titled figure a 100 px top margin)
    heatmap = gr.Plot(label="Router heatmap", show_label=False, elem_id="router-heatmap")
    load = gr.Plot(label="Expert load", elem_id="expert-load")
    with gr.Accordion("Side by side: the same prompt through source models alone", open=False):
        sources = gr.CheckboxGroup(choices=[], label="Source models", elem_id="compare-sources")
        run_sources = gr.Button("Run on the chosen sources", elem_id="run-sources")
        source_view = gr.HTML(elem_id="source-outputs")
    with gr.Accordion("Runs", open=True):
        runs = gr.Dataframe(
            headers=RUN_COLUMNS,
            value=[],
            interactive=False,
            elem_id="runs-list",
            label="Saved runs (newest first)",
            max_height=320,
        )
        with gr.Row():
            run_pick = gr.Dropdown(choices=[], label="Run", elem_id="run-pick", scale=3)
            open_run = gr.Button("Open run", size="sm", elem_id="open-run", scale=1, min_width=120)

    sampling = [max_new, do_sample, temperature, top_k, top_p, seed]

    def settings_of(max_new_v, do_sample_v, temperature_v, top_k_v, top_p_v, seed_v) -> dict:
        return clamp_settings(
            {
                "max_new_tokens": max_new_v,
                "do_sample": do_sample_v,
                "temperature": temperature_v,
                "top_k": top_k_v,
                "top_p": top_p_v,
                "seed": seed_v,
            },
            limit,
        )

    def refresh_runs(keep: int | None = None) -> dict:
        rows = ctl.run_rows()
        ids = [r[0] for r in rows]
        return {
            runs: rows,
            run_pick: gr.update(
                choices=ctl.run_choices(rows), value=keep if keep in ids else (ids[0] if ids else None)
            ),
        }

    # The running generation's stop flag, per browser session. Stop sets it and the generation ends after its
    # current token: a cooperative stop, where cancelling the Gradio job could land late, on the next job.
    stops: dict[str | None, threading.Event] = {}

    @gpu_task
    def on_run(
        version_id,
        weights_id,
        prompt_v,
        max_new_v,
        do_sample_v,
        temperature_v,
        top_k_v,
        top_p_v,
        seed_v,
        ws,
        request: gr.Request = None,
    ):
        sampling_v = (max_new_v, do_sample_v, temperature_v, top_k_v, top_p_v, seed_v)
        stop_event = threading.Event()
        session = getattr(request, "session_hash", None)
        stops[session] = stop_event
        try:
            if version_id is None:
                raise RecipeError("Pick a saved recipe version first (save one in the Recipe tab).")
            gate = engine.gate.snapshot()
            busy = gate["running"] >= gate["capacity"]
            yield {
                output: "",
                run_status: message_html(
                    f"Waiting for a turn: {load_text(gate['running'], gate['waiting'])}…"
                    if busy
                    else "Loading the model…"
                ),
            }
            n, finished, drawn_at = 0, False, -math.inf
            settings = settings_of(*sampling_v)
            every = live_trace_every(settings["max_new_tokens"])
            for update in engine.run_prompt(
                version_id, prompt_v, settings, stop_event, weights_id or None, every
            ):
                if not update.done:
                    n += 1
                    view = {output: update.text, run_status: message_html(f"Generating… {n} tokens")}
                    if update.trace is not None and time.monotonic() - drawn_at >= REDRAW_S:
                        # the routing so far, on the run's whole x range
                        hm, ld = figures_for(
                            update.trace, trace_colors(ws, update.trace), update.expected_tokens
                        )
                        view |= {
                            heatmap: hm,
                            load: ld,
                            tokens_view: token_view(update.trace, update.prompt_tokens, ""),
                        }
                        drawn_at = time.monotonic()
                    yield view
                    continue
                finished = True
                colors = trace_colors(ws, update.trace)
                hm, ld = figures_for(update.trace, colors)
                tokens_v = token_view(update.trace, update.prompt_tokens, update.tail)
                if update.run_id is None:  # stopped: shown, not stored
                    yield {
                        output: update.text,
                        heatmap: hm,
                        load: ld,
                        tokens_view: tokens_v,
                        run_status: message_html(f"Stopped after {n} tokens; not saved."),
                    }
                    continue
                routed = len((update.trace or {}).get("slots") or [])
                msg = (
                    f"Saved as run #{update.run_id}: {len((update.trace or {}).get('tokens') or [])} tokens, "
                    f"{routed} routed slot{'s' if routed != 1 else ''}."
                )
                yield {
                    output: update.text,
                    heatmap: hm,
                    load: ld,
                    tokens_view: tokens_v,
                    run_status: message_html(msg),
                    **refresh_runs(update.run_id),
                }
            if not finished:  # stopped while it waited for its turn
                yield {run_status: message_html("Stopped before it started; nothing saved.")}
        except Exception as exc:
            yield {run_status: message_html(user_message(exc), ok=False)}
        finally:
            stop_event.set()
            if stops.get(session) is stop_event:
                del stops[session]

    def on_stop(request: gr.Request = None):
        event = stops.get(getattr(request, "session_hash", None))
        if event is not None:
            event.set()

    # Generations pass Gradio's queue unhindered (concurrency_limit=None) and wait in the engine's gate instead,
    # which runs `generation_concurrency` at once, lets a bounded number wait, and tells the rest "busy".
    run.click(
        on_run,
        [version, weights, prompt, *sampling, workspace],
        [output, heatmap, load, run_status, runs, run_pick, tokens_view],
        api_name="ui_run_prompt",
        api_visibility="undocumented",
        concurrency_limit=None,
        concurrency_id="generation",
    )
    prompt.submit(
        on_run,
        [version, weights, prompt, *sampling, workspace],
        [output, heatmap, load, run_status, runs, run_pick, tokens_view],
        api_visibility="private",
        concurrency_limit=None,
        concurrency_id="generation",
    )
    stop.click(on_stop, None, None, api_name="ui_stop_run", api_visibility="private", queue=False)

    def on_version(version_id, current):
        """A version's sources and weights: trained weights picked for it stay (an opened run's), else its
        shipped trained weights when it has them (a shipped fusion runs trained), else as built."""
        try:
            aliases = list(ctl.recipe_sources(version_id))
            trained = ctl.weight_choices(version_id)
            pick = (
                current if current and current in [c[1] for c in trained] else ctl.default_weights(version_id)
            )
        except Exception:
            aliases, trained, pick = [], ctl.weight_choices(None), 0
        return {
            sources: gr.update(choices=aliases, value=aliases[:2]),
            weights: gr.update(choices=trained, value=pick),
        }

    version.change(on_version, [version, weights], [sources, weights], api_visibility="private")

    def on_sampling(do_sample_v):
        return {c: gr.update(interactive=bool(do_sample_v)) for c in (temperature, top_k, top_p)}

    do_sample.change(on_sampling, do_sample, [temperature, top_k, top_p], api_visibility="private")

    @gpu_task
    def on_sources(version_id, chosen, prompt_v, *rest):
        *sampling_v, ws = rest
        try:
            outputs = ctl.run_sources(version_id, chosen, prompt_v, settings_of(*sampling_v))
        except Exception as exc:
            return {source_view: message_html(user_message(exc), ok=False)}
        return {source_view: source_outputs_html(outputs, trace_colors(ws, None))}

    run_sources.click(
        on_sources,
        [version, sources, prompt, *sampling, workspace],
        source_view,
        api_name="ui_run_sources",
        api_visibility="undocumented",
        concurrency_limit=None,
        concurrency_id="generation",
    )

    def on_open_run(run_id, ws):
        try:
            r = ctl.get_run(run_id)
        except Exception as exc:
            return {run_status: message_html(user_message(exc), ok=False)}
        s = clamp_settings(r.settings, limit)
        hm, ld = figures_for(r.trace, trace_colors(ws, r.trace))
        return {
            version: gr.update(value=r.version_id),
            weights: gr.update(
                choices=ctl.weight_choices(r.version_id), value=r.settings.get("training_run_id") or 0
            ),
            prompt: r.prompt,
            max_new: s["max_new_tokens"],
            do_sample: s["do_sample"],
            temperature: s["temperature"],
            top_k: s["top_k"],
            top_p: s["top_p"],
            seed: s["seed"],
            output: r.output_text,
            heatmap: gr.update(value=hm),
            load: gr.update(value=ld),
            tokens_view: token_view(r.trace, prompt=r.prompt, output=r.output_text),
            run_status: message_html(
                f"Run #{r.id} of {r.recipe_name} v{r.version_number}, {fmt_time(r.created_at)} UTC."
            ),
        }

    open_run.click(
        on_open_run,
        [run_pick, workspace],
        [version, weights, prompt, *sampling, output, heatmap, load, run_status, tokens_view],
        api_name="ui_open_run",
        api_visibility="undocumented",
    )

    def on_select_run(evt: gr.SelectData, rows):
        try:
            return {run_pick: gr.update(value=int(rows.iloc[evt.index[0]]["Id"]))}
        except Exception:  # not a row of runs: the pick stays
            return {run_pick: gr.update()}

    runs.select(on_select_run, runs, run_pick, api_visibility="private")
    _register_api(ctl)
    return {
        "version": version,
        "weights": weights,
        "prompt": prompt,
        "run": run,
        "stop": stop,
        "output": output,
        "heatmap": heatmap,
        "load": load,
        "tokens": tokens_view,
        "run_status": run_status,
        "sources": sources,
        "source_view": source_view,
        "runs": runs,
        "run_pick": run_pick,
        "refresh_runs": refresh_runs,
    }


def _register_api(ctl: StudioController) -> None:
    engine: StudioEngine = ctl.engine
    limit = engine.config.max_new_tokens

    @api_errors
    @gpu_task
    def generate(
        version_id: int,
        prompt: str,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        training_run_id: int = 0,
    ) -> dict:
        """Run a prompt through a saved recipe version (with a training run's weights, if given); the run is
        stored. Returns {text, run_id, trace}."""
        settings = clamp_settings(
            {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "seed": seed,
            },
            limit,
        )
        training_run_id = record_id(training_run_id, "training run") if training_run_id else None
        # the final update carries the stored run
        *_, last = engine.run_prompt(version_id, prompt, settings, None, training_run_id or None)
        return {"text": last.text, "run_id": last.run_id, "trace": last.trace}

    @api_errors_stream
    @gpu_task
    def generate_stream(
        version_id: int,
        prompt: str,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        training_run_id: int = 0,
    ) -> Iterator[dict]:
        """`generate`, streamed: {text, done: false} after each new token, then {text, done: true, run_id,
        trace}. Cancelling the job stops the generation (its worker ends and its slot is freed)."""
        settings = clamp_settings(
            {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "seed": seed,
            },
            limit,
        )
        training_run_id = record_id(training_run_id, "training run") if training_run_id else None
        stop = threading.Event()
        try:
            for update in engine.run_prompt(version_id, prompt, settings, stop, training_run_id or None):
                if update.done:
                    yield {"text": update.text, "done": True, "run_id": update.run_id, "trace": update.trace}
                else:
                    yield {"text": update.text, "done": False}
        finally:
            stop.set()

    @api_errors
    @gpu_task
    def generate_source(version_id: int, alias: str, prompt: str, max_new_tokens: int = 32) -> str:
        """The same prompt through one source model of a recipe version, alone (greedy)."""
        refs = ctl.recipe_sources(version_id)
        alias = text_arg(alias, "The model alias", 200)
        if alias not in refs:
            raise RecipeError(f"The recipe has no model '{alias}'; it has: {', '.join(refs)}.")
        return engine.run_source(alias, refs[alias], prompt, {"max_new_tokens": max_new_tokens})

    @api_errors
    def list_runs(limit: int = 50) -> list[dict]:
        return [
            {
                "id": r.id,
                "version_id": r.version_id,
                "recipe": r.recipe_name,
                "version": r.version_number,
                "prompt": r.prompt,
                "output": r.output_text,
                "settings": r.settings,
                "created_at": r.created_at.isoformat(),
            }
            for r in engine.repo.list_runs(limit=max(1, min(whole(limit, "limit"), 1000)))
        ]

    @api_errors
    def get_run(run_id: int) -> dict:
        r = engine.repo.get_run(record_id(run_id, "run"))
        return {
            "id": r.id,
            "version_id": r.version_id,
            "recipe": r.recipe_name,
            "version": r.version_number,
            "prompt": r.prompt,
            "output": r.output_text,
            "settings": r.settings,
            "trace": r.trace,
            "created_at": r.created_at.isoformat(),
        }

    gr.api(generate, api_name="generate", concurrency_limit=None, concurrency_id="generation")
    gr.api(generate_stream, api_name="generate_stream", concurrency_limit=None, concurrency_id="generation")
    gr.api(generate_source, api_name="generate_source", concurrency_limit=None, concurrency_id="generation")
    gr.api(list_runs, api_name="list_runs")
    gr.api(get_run, api_name="get_run")
