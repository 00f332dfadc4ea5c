"""Train tab: train a saved recipe version's adapters and routers (`mol.train`; the source blocks stay frozen)
on the built-in corpora or uploaded text, with a live loss curve; every run is stored with its version."""

from __future__ import annotations

from typing import Any

import gradio as gr

from mol.router_init import ROUTER_INITS
from mol.training import ADAPTER_INITS
from studio import figures
from studio.controller import BUILTIN_CORPORA, StudioController, train_defaults
from studio.errors import names, record_id, whole
from studio.tabs.common import api_errors, message_html, user_message

TRAINING_COLUMNS = ["Id", "Recipe version", "Status", "Steps", "Final loss", "Started (UTC)"]
DEFAULTS = train_defaults()  # mol.TrainConfig's, for every setting the tab offers


def create_train_tab(ctl: StudioController, recipe: dict[str, Any]) -> dict[str, Any]:
    engine = ctl.engine
    d = DEFAULTS
    gr.Markdown(
        "Train the adapters and routers of a saved recipe version; the source blocks, embeddings and head "
        "stay frozen. Runs are stored with the version and their weights can be used in the Playground "
        "and in Evaluate."
    )
    version = gr.Dropdown(choices=[], label="Recipe version", elem_id="train-version")
    with gr.Row():
        corpora = gr.CheckboxGroup(
            list(BUILTIN_CORPORA),
            value=list(BUILTIN_CORPORA),
            label="Built-in corpora (training split)",
            elem_id="train-corpora",
        )
        uploads = gr.File(
            label="Or upload text files (each is one domain)",
            file_count="multiple",
            file_types=[".txt", ".py", ".md"],
            elem_id="train-files",
        )
    with gr.Row():
        steps = gr.Slider(1, 2000, value=d["steps"], step=1, label="Steps", elem_id="train-steps")
        batch_size = gr.Slider(
            1, 64, value=d["batch_size"], step=1, label="Batch size", elem_id="train-batch"
        )
        seq_len = gr.Slider(
            16, 1024, value=d["seq_len"], step=16, label="Sequence length", elem_id="train-seq-len"
        )
        seed = gr.Number(value=d["seed"], precision=0, label="Seed", elem_id="train-seed")
    with gr.Accordion("More settings", open=False):
        with gr.Row():
            lr = gr.Number(value=d["lr"], label="Adapter learning rate", elem_id="train-lr")
            router_lr = gr.Number(
                value=d["router_lr"], label="Router learning rate", elem_id="train-router-lr"
            )
            aux = gr.Number(
                value=d["aux_loss_weight"], label="Load-balancing loss weight", elem_id="train-aux"
            )
        with gr.Row():
            adapter_init = gr.Radio(
                list(ADAPTER_INITS),
                value=d["adapter_init"],
                label="Adapter start",
                elem_id="train-adapter-init",
            )
            router_init = gr.Radio(
                list(ROUTER_INITS),
                value=d["router_init"],
                label="Router start",
                elem_id="train-router-init",
            )
            max_tokens = gr.Number(
                value=d["max_tokens"],
                precision=0,
                label="Tokens per domain (at most)",
                elem_id="train-max-tokens",
            )
            max_seconds = gr.Number(
                value=d["max_seconds"],
                precision=0,
                label="Time limit, seconds (0: none)",
                elem_id="train-max-seconds",
            )
    start = gr.Button("Train", variant="primary", elem_id="train-start")
    status = gr.HTML(elem_id="train-status")
    curve = gr.Plot(label="Loss", elem_id="loss-curve")
    metrics = gr.JSON(label="Result", elem_id="train-metrics")
    runs = gr.Dataframe(
        headers=TRAINING_COLUMNS,
        value=[],
        interactive=False,
        elem_id="training-runs",
        label="Training runs (newest first)",
        max_height=280,
    )

    def on_train(
        version_id,
        corpora_v,
        files,
        steps_v,
        batch_v,
        seq_v,
        seed_v,
        lr_v,
        router_lr_v,
        aux_v,
        adapter_init_v,
        router_init_v,
        max_tokens_v,
        max_seconds_v,
        progress=gr.Progress(),
    ):
        try:
            settings = {
                "steps": int(steps_v),
                "batch_size": int(batch_v),
                "seq_len": int(seq_v),
                "seed": int(seed_v or 0),
                "lr": float(lr_v),
                "router_lr": float(router_lr_v),
                "aux_loss_weight": float(aux_v),
                "adapter_init": adapter_init_v,
                "router_init": router_init_v,
                "max_tokens": int(max_tokens_v) if max_tokens_v else None,
                "max_seconds": float(max_seconds_v) if max_seconds_v else None,
            }
            progressing = ctl.train(version_id, corpora_v, files, settings)
            yield {status: message_html("Preparing: building the model and reading the data…")}
            for p in progressing:
                progress((p.step, p.steps), desc="training", unit="steps")
                fig = figures.loss_curve(p.curve, title=f"Training run #{p.training_run_id}")
                if p.status == "completed":
                    msg = (
                        f"Training run #{p.training_run_id} finished: {p.step} steps, final loss "
                        f"{p.metrics.get('final_loss')}. Its weights are available in the Playground and Evaluate."
                    )
                    yield {
                        status: message_html(msg),
                        curve: fig,
                        metrics: p.metrics,
                        runs: ctl.training_rows(),
                    }
                else:
                    yield {
                        status: message_html(
                            f"Training run #{p.training_run_id}: step {p.step} of {p.steps}"
                        ),
                        curve: fig,
                    }
        except Exception as exc:
            yield {status: message_html(user_message(exc), ok=False), runs: ctl.training_rows()}

    start.click(
        on_train,
        [
            version,
            corpora,
            uploads,
            steps,
            batch_size,
            seq_len,
            seed,
            lr,
            router_lr,
            aux,
            adapter_init,
            router_init,
            max_tokens,
            max_seconds,
        ],
        [status, curve, metrics, runs],
        api_name="ui_train",
        api_visibility="undocumented",
        concurrency_limit=1,
        concurrency_id="training",
    )

    @api_errors
    def train_recipe(
        version_id: int,
        corpora: list[str],
        steps: int = d["steps"],
        batch_size: int = d["batch_size"],
        seq_len: int = d["seq_len"],
        seed: int = d["seed"],
    ) -> dict:
        """Train a version's adapters and routers on built-in corpora; returns the stored training run."""
        settings = {
            "steps": whole(steps, "steps"),
            "batch_size": whole(batch_size, "batch_size"),
            "seq_len": whole(seq_len, "seq_len"),
            "seed": whole(seed, "seed"),
        }
        version_id = record_id(version_id, "recipe version")
        *_, last = engine.train_version(
            version_id, engine.datasets(names(corpora, "Corpora"), [], "train"), settings
        )
        t = engine.repo.get_training_run(last.training_run_id)
        return {
            "id": t.id,
            "version_id": t.version_id,
            "status": t.status,
            "metrics": t.metrics,
            "loss_curve": t.loss_curve,
        }

    @api_errors
    def list_training_runs(version_id: int = 0) -> list[dict]:
        runs_ = engine.repo.list_training_runs(version_id=record_id(version_id, "recipe version") or None)
        return [
            {
                "id": t.id,
                "version_id": t.version_id,
                "status": t.status,
                "metrics": t.metrics,
                "steps": len(t.loss_curve),
                "error": t.error,
                "created_at": t.created_at.isoformat(),
            }
            for t in runs_
        ]

    gr.api(train_recipe, api_name="train", concurrency_limit=1, concurrency_id="training")
    gr.api(list_training_runs, api_name="list_training_runs")
    return {"version": version, "status": status, "curve": curve, "runs": runs, "version_targets": [version]}
