"""Evaluate tab: perplexity per domain, router agreement and expert load of a saved recipe version (as built or
with a training run's weights), side by side with every source model alone (`mol.evaluate`); stored with the
version."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.controller import BUILTIN_CORPORA, StudioController
from studio.errors import flag, names, record_id, whole
from studio.tabs.common import api_errors, message_html, user_message

EVALUATION_COLUMNS = ["Id", "Name", "Time (UTC)", "Fused perplexity"]


def report_markdown(results: dict) -> str:
    """Perplexity per domain (rows: models), then each routed slot's agreement with the labels and its load."""
    rows = results.get("rows") or []
    if not rows:
        return ""
    domains = list(rows[0]["domains"])
    lines = [
        "| model | " + " | ".join(f"{d} perplexity" for d in domains) + " | trainable parameters |",
        "|---|" + "---:|" * len(domains) + "---:|",
    ]
    for r in rows:
        cells = [f"{r['domains'][d]['perplexity']:.2f}" for d in domains]
        lines.append(
            f"| {r['name']} ({r['kind']}) | " + " | ".join(cells) + f" | {r['trainable_parameters']:,} |"
        )
    notes = []
    for r in rows:
        for d in domains:
            res = r["domains"][d]
            for slot, shares in (res.get("load") or {}).items():
                agree = (res.get("agreement") or {}).get(slot)
                load = ", ".join(f"{e} {s:.0%}" for e, s in shares.items())
                notes.append(
                    f"- {r['name']} on {d}, slot {slot}: "
                    + (f"agreement with labels {agree:.0%}; " if agree is not None else "")
                    + f"load {load}"
                )
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


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
    start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    status = gr.HTML(elem_id="eval-status")
    table = gr.Markdown(elem_id="eval-results")
    evaluations = gr.Dataframe(
        headers=EVALUATION_COLUMNS,
        value=[],
        interactive=False,
        elem_id="evaluations",
        label="Evaluations (newest first)",
        max_height=280,
    )

    def on_version(version_id):
        return {weights: gr.update(choices=ctl.weight_choices(version_id), value=0)}

    version.change(on_version, version, weights, api_visibility="private")

    def on_evaluate(
        version_id, weights_id, corpora_v, files, seq_v, max_tokens_v, sources_v, progress=gr.Progress()
    ):
        try:
            progress(0.0, desc="evaluating")
            info = ctl.evaluate(
                version_id,
                weights_id,
                corpora_v,
                files,
                seq_v,
                max_tokens_v,
                sources_v,
                on_progress=lambda done, total, what: progress((done, total), desc=what),
            )
        except Exception as exc:
            return {status: message_html(user_message(exc), ok=False), evaluations: ctl.evaluation_rows()}
        return {
            status: message_html(f"Evaluation #{info.id} stored with {info.name}."),
            table: report_markdown(info.results),
            evaluations: ctl.evaluation_rows(),
        }

    start.click(
        on_evaluate,
        [version, weights, corpora, uploads, seq_len, max_tokens, sources],
        [status, table, evaluations],
        api_name="ui_evaluate",
        api_visibility="undocumented",
        concurrency_limit=1,
        concurrency_id="training",
    )

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
        info = engine.evaluate_version(
            record_id(version_id, "recipe version"),
            engine.datasets(names(corpora, "Corpora"), [], "test"),
            record_id(training_run_id, "training run") or None,
            flag(sources, "sources"),
            whole(seq_len, "seq_len"),
            whole(max_tokens, "max_tokens"),
        )
        return {"id": info.id, "name": info.name, "results": info.results}

    gr.api(evaluate_recipe, api_name="evaluate", concurrency_limit=1, concurrency_id="training")
    return {
        "version": version,
        "weights": weights,
        "status": status,
        "table": table,
        "evaluations": evaluations,
        "version_targets": [version],
    }
