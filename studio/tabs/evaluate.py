"""Evaluate tab: perplexity per domain, router agreement and expert load of a saved recipe version (as built or
with a training run's weights), side by side with every source model alone (`mol.evaluate`); stored with the
version."""

from __future__ import annotations

from typing import Any

import gradio as gr

from mol.evaluation import report_table
from studio import figures
from studio.controller import BUILTIN_CORPORA, StudioController
from studio.errors import flag, names, record_id, whole
from studio.tabs.common import (
    BUSY_TICK_S,
    IDLE_TICK_S,
    api_errors,
    job_html,
    message_html,
    stop_job_callback,
    user_message,
)

EVALUATION_COLUMNS = ["Id", "Name", "Time (UTC)", "Fused perplexity"]


def create_evaluate_tab(
    ctl: StudioController, recipe: dict[str, Any], train: dict[str, Any]
) -> dict[str, Any]:
    engine = ctl.engine
    gr.Markdown(
        "Score a saved recipe version on held-out text: perplexity per domain, how often each router "
        "agrees with the domain labels, and each expert's load, next to every source model alone."
    )
    with gr.Row():
        version = gr.Dropdown(choices=[], label="Recipe version", elem_id="eval-version")
        weights = gr.Dropdown(
            choices=ctl.weight_choices(None), value=0, label="Weights", elem_id="eval-weights"
        )
    with gr.Row():
        corpora = gr.CheckboxGroup(
            [*BUILTIN_CORPORA, "mixed"],
            value=[*BUILTIN_CORPORA, "mixed"],
            label="Built-in test sets",
            elem_id="eval-corpora",
        )
        uploads = gr.File(
            label="Or upload text files (each is one domain)",
            file_count="multiple",
            file_types=[".txt", ".py", ".md"],
            elem_id="eval-files",
        )
    with gr.Row():
        seq_len = gr.Slider(32, 1024, value=256, step=32, label="Window (tokens)", elem_id="eval-seq-len")
        max_tokens = gr.Number(
            value=20_000, precision=0, label="Tokens per domain (at most)", elem_id="eval-max-tokens"
        )
        sources = gr.Checkbox(value=True, label="Also every source model alone", elem_id="eval-sources")
    with gr.Row():
        start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        stop = gr.Button("Stop", variant="stop", elem_id="eval-stop")
    status = gr.HTML(elem_id="eval-status")
    with gr.Row():
        bars = gr.Plot(label="Perplexity per domain", elem_id="eval-perplexity")
        routing = gr.Plot(label="Routing per slot", elem_id="eval-routing")
    with gr.Accordion("The numbers", open=True):
        table = gr.Markdown(elem_id="eval-results")
    evaluations = gr.Dataframe(
        headers=EVALUATION_COLUMNS,
        value=[],
        interactive=False,
        elem_id="evaluations",
        label="Evaluations (newest first; click one to show it)",
        max_height=280,
    )
    job_id = gr.State(None)  # the job lives on the server; a reload finds it again on the timer's first tick
    shown = gr.State(None)
    timer = gr.Timer(IDLE_TICK_S)

    def on_version(version_id):
        return {weights: gr.update(choices=ctl.weight_choices(version_id), value=0)}

    version.change(on_version, version, weights, api_visibility="private")

    def results_views(results: dict) -> dict:
        return {
            bars: figures.perplexity_bars(results),
            routing: figures.routing_results(results),
            table: report_table(results),
        }

    def on_evaluate(version_id, weights_id, corpora_v, files, seq_v, max_tokens_v, sources_v):
        try:
            job = ctl.start_evaluation(
                version_id, weights_id, corpora_v, files, seq_v, max_tokens_v, sources_v
            )
        except Exception as exc:
            return {status: message_html(user_message(exc), ok=False), evaluations: ctl.evaluation_rows()}
        return {job_id: job.id, shown: None, status: job_html(ctl, job), timer: gr.Timer(BUSY_TICK_S)}

    def on_tick(job_id_v, shown_v):
        job = ctl.shown_job("evaluate", job_id_v)
        if job is None:
            return {shown: shown_v} if shown_v == "idle" else {shown: "idle", timer: gr.Timer(IDLE_TICK_S)}
        key = [job.id, job.state, job.step, job.ahead, job.stop_requested()]
        if key == shown_v:
            return {shown: shown_v}  # nothing new
        out: dict = {job_id: job.id, shown: key, status: job_html(ctl, job)}
        if not isinstance(shown_v, list) or shown_v[1] != job.state:
            out[timer] = gr.Timer(BUSY_TICK_S if job.active else IDLE_TICK_S)
        if not job.active:
            if job.result is not None:
                info = job.result
                out.update(results_views(info.results))
                out[status] = message_html(f"Evaluation #{info.id} stored with {info.name}.")
            elif job.state == "stopped":
                out[status] = message_html(
                    f"Evaluation of {job.label} stopped after {job.step} of {job.steps} scores; nothing was "
                    "stored (an evaluation is stored whole, once every model has scored every domain)."
                )
            out[evaluations] = ctl.evaluation_rows()
            out[job_id], out[shown] = None, "idle"
        return out

    def on_pick(rows, evt: gr.SelectData):
        try:
            row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
            evaluation_id = rows.iloc[row, 0] if hasattr(rows, "iloc") else rows[row][0]
            info = ctl.repo.get_evaluation(int(evaluation_id))
        except Exception as exc:
            return {status: message_html(user_message(exc), ok=False)}
        return {**results_views(info.results), status: message_html(f"Evaluation #{info.id}: {info.name}.")}

    start.click(
        on_evaluate,
        [version, weights, corpora, uploads, seq_len, max_tokens, sources],
        [job_id, shown, status, evaluations, timer],
        api_name="ui_evaluate",
        api_visibility="undocumented",
    )
    timer.tick(
        on_tick,
        [job_id, shown],
        [job_id, shown, status, bars, routing, table, evaluations, timer],
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=None,  # a quick read of the job's state: never waits behind long requests
    )
    stop.click(
        stop_job_callback(ctl, "evaluate", "evaluation", status, timer),
        job_id,
        [status, timer],
        api_visibility="private",
        concurrency_limit=None,
    )
    evaluations.select(on_pick, evaluations, [bars, routing, table, status], api_visibility="private")

    @api_errors
    def evaluate_recipe(
        version_id: int,
        corpora: list[str],
        training_run_id: int = 0,
        seq_len: int = 256,
        max_tokens: int = 20000,
        sources: bool = True,
    ) -> dict:
        """Evaluate a version (optionally with a training run's weights) on built-in test sets; stored."""
        job = engine.start_evaluation(
            record_id(version_id, "recipe version"),
            engine.datasets(names(corpora, "Corpora"), [], "test"),
            record_id(training_run_id, "training run") or None,
            flag(sources, "sources"),
            whole(seq_len, "seq_len"),
            whole(max_tokens, "max_tokens"),
        )
        job = engine.jobs.wait(job.id)  # in the job queue, as the tab's evaluations are
        if job.result is None:
            raise gr.Error(job.error or "The evaluation was stopped.", print_exception=False)
        info = job.result
        return {"id": info.id, "name": info.name, "results": info.results}

    gr.api(evaluate_recipe, api_name="evaluate")
    return {
        "version": version,
        "weights": weights,
        "status": status,
        "table": table,
        "bars": bars,
        "routing": routing,
        "stop": stop,
        "timer": timer,
        "evaluations": evaluations,
        "version_targets": [version],
    }
