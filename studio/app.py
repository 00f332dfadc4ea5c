"""The studio app: assembles the tabs and wires what crosses between them; the tabs hold their own UI, the
controller (over the engine) does the work.

    python app.py                      # http://127.0.0.1:7860, the embedded demo models, offline
    MANGO_DB_URL=sqlite:///my.db python app.py"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the studio makes no calls home

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

from studio.controller import StudioController  # noqa: E402
from studio.engine import StudioConfig, StudioEngine  # noqa: E402
from studio.seed import seed_shipped  # noqa: E402
from studio.tabs.common import palette_models, user_message  # noqa: E402
from studio.tabs.evaluate import create_evaluate_tab  # noqa: E402
from studio.tabs.models import create_models_tab, model_rows  # noqa: E402
from studio.tabs.playground import create_playground_tab  # noqa: E402
from studio.tabs.recipe import create_recipe_tab  # noqa: E402
from studio.tabs.train import create_train_tab  # noqa: E402

STATIC = Path(__file__).resolve().parent / "static"
INTRO = (
    "# MoL Studio\nFuse transformer blocks from different language models: pick **Models**, drag layers into "
    "a **Recipe**, save it, run prompts in the **Playground** with the routing shown, then **Train** and "
    "**Evaluate** its adapters and routers."
)


def build_app(engine: StudioEngine | None = None) -> gr.Blocks:
    ctl = StudioController(engine or StudioEngine())
    # open the database now (its migrations run at start, not on the first click) and seed the shipped examples
    # and trained weights once (idempotent, never raises): a fresh studio has a trained fusion to run
    seed_shipped(ctl.repo)
    with gr.Blocks(title="MoL Studio") as demo:
        gr.Markdown(INTRO)
        workspace = gr.State(ctl.initial_workspace())  # architecture cards only, never models
        with gr.Tabs(selected="recipe"):
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                models = create_models_tab(ctl, workspace)
            with gr.Tab("Recipe", id="recipe", elem_id="tab-recipe") as recipe_tab:
                recipe = create_recipe_tab(ctl, workspace)
            with gr.Tab("Playground", id="playground", elem_id="tab-playground") as play_tab:
                play = create_playground_tab(ctl, workspace)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = create_train_tab(ctl, recipe)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as eval_tab:
                evaluate = create_evaluate_tab(ctl, recipe, train)
        _wire(ctl, demo, workspace, models, recipe, play, train, evaluate)
        for tab, view in ((play_tab, play), (eval_tab, evaluate)):
            _refresh_weights_on_select(ctl, tab, view["version"], view["weights"])
        _export_weights_follow_the_open_version(ctl, recipe_tab, recipe)

        def server_status() -> dict:
            """How busy the server is: generation slots (capacity, running, waiting, and since start how many
            were admitted, had to wait, were refused) and how many built models it holds."""
            return {"generation": ctl.engine.gate.snapshot(), "cached_models": len(ctl.engine.cache.keys())}

        gr.api(server_status, api_name="server_status")
    demo.queue(default_concurrency_limit=4)
    return demo


def _refresh_weights_on_select(
    ctl: StudioController, tab: gr.Tab, version: gr.Dropdown, weights: gr.Dropdown
):
    def fresh_weights(version_id, current):  # a training run may have finished since the tab was shown
        choices = ctl.weight_choices(version_id)
        if current in [c[1] for c in choices]:  # the value as it is: a version change may have just set it
            return {weights: gr.update(choices=choices)}
        return {weights: gr.update(choices=choices, value=ctl.default_weights(version_id))}

    tab.select(fresh_weights, [version, weights], weights, api_visibility="private")


def _export_weights_follow_the_open_version(ctl: StudioController, tab: gr.Tab, recipe: dict) -> None:
    """The Recipe tab's export picker offers the trained results of the version open on the board (by label),
    refreshed when another version is opened or saved and when the tab is shown (a run may have finished)."""
    loaded, weights = recipe["loaded"], recipe["export_weights"]

    def export_weights(loaded_v, current, opened: bool = False):
        version_id = (loaded_v or {}).get("version_id") if isinstance(loaded_v, dict) else None
        try:
            choices = ctl.weight_choices(version_id)
            if not opened and current in [c[1] for c in choices]:  # the tab shown again: the pick stays
                return {weights: gr.update(choices=choices)}
            # another version opened (or saved): its own default, shipped weights for a shipped fusion
            return {weights: gr.update(choices=choices, value=ctl.default_weights(version_id))}
        except Exception:  # the picker stays as it is; exporting says what is wrong
            return {weights: gr.update()}

    loaded.change(
        lambda v, c: export_weights(v, c, opened=True), [loaded, weights], weights, api_visibility="private"
    )
    tab.select(export_weights, [loaded, weights], weights, api_visibility="private")


def _wire(
    ctl: StudioController,
    demo: gr.Blocks,
    workspace: gr.State,
    models: dict,
    recipe: dict,
    play: dict,
    train: dict,
    evaluate: dict,
) -> None:
    """What one tab's action changes in another."""

    def workspace_views(ws, board_v, base_v):
        pm = palette_models(ws)
        aliases = [c["alias"] for c in ws or []]
        return {
            recipe["palette"]: {"models": pm},
            recipe["board"]: {**(board_v or {}), "models": pm},
            recipe["base"]: gr.update(
                choices=aliases, value=base_v if base_v in aliases else (aliases[0] if aliases else None)
            ),
            models["model_list"]: model_rows(ws),
        }

    models["added"].then(
        workspace_views,
        [workspace, recipe["board"], recipe["base"]],
        [recipe["palette"], recipe["board"], recipe["base"], models["model_list"]],
        api_visibility="private",
    )
    restore_fn, restore_inputs, restore_outputs = recipe["restore_board"]
    board_restored = demo.load(restore_fn, restore_inputs, restore_outputs, api_visibility="private")
    for event in [*recipe["recipe_loaded"], board_restored]:  # a recipe may bring models into the workspace
        event.then(
            lambda ws: {models["model_list"]: model_rows(ws)},
            workspace,
            models["model_list"],
            api_visibility="private",
        )

    version_targets = [
        play["version"],
        *train.get("version_targets", []),
        *evaluate.get("version_targets", []),
    ]

    def versions_for_runs(loaded_v) -> dict:
        try:
            choices = ctl.run_versions()
        except Exception as exc:
            gr.Warning(user_message(exc))
            return {play["version"]: gr.update()}  # every target as it is
        ids = [c[1] for c in choices]
        pick = (
            loaded_v.get("version_id")
            if loaded_v and loaded_v.get("version_id") in ids
            else (ids[0] if ids else None)
        )
        # one update per output: Gradio consumes an update dict as it applies it
        return {target: gr.update(choices=choices, value=pick) for target in version_targets}

    for event in [recipe["saved"], *recipe["recipe_loaded"], *recipe["changed_versions"]]:
        event.then(versions_for_runs, recipe["loaded"], version_targets, api_visibility="private")

    def on_load() -> dict:
        try:
            views = {
                **recipe["refresh_versions"](False),
                **play["refresh_runs"](),
                train["runs"]: ctl.training_rows(),
                evaluate["evaluations"]: ctl.evaluation_rows(),
            }
        except Exception as exc:  # a broken database must not blank the page: say what is wrong
            gr.Warning(user_message(exc))
            return {train["runs"]: gr.update()}  # every view as it is
        out = {**views, **versions_for_runs(None)}
        try:  # the Playground opens on the shipped trained fusion, unless the user saved something since
            choices = ctl.run_versions()
            out[play["version"]] = gr.update(choices=choices, value=ctl.starting_version(choices))
        except Exception as exc:
            gr.Warning(user_message(exc))
        return out

    demo.load(
        on_load,
        None,
        [
            *recipe["version_outputs"],
            play["runs"],
            play["run_pick"],
            train["runs"],
            evaluate["evaluations"],
            *version_targets,
        ],
        api_visibility="private",
    )


def theme() -> gr.themes.Base:
    """System fonts only: the default themes fetch web fonts, and the studio must work offline."""
    return gr.themes.Soft(
        primary_hue="orange",
        secondary_hue="blue",
        font=[gr.themes.Font("ui-sans-serif"), gr.themes.Font("system-ui"), "sans-serif"],
        font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("Menlo"), "monospace"],
    )


def launch_settings(config: StudioConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Arguments for `Blocks.launch` (Gradio 6 takes theme and css there, not in `Blocks`), for the studio
    configured as `config` (default: from the environment)."""
    config = config or StudioConfig.from_env()
    settings: dict[str, Any] = {
        "theme": theme(),
        "css": (STATIC / "studio.css").read_text(encoding="utf-8"),
        "show_error": False,
    }
    if config.upload_bytes is not None:
        # Gradio refuses a larger upload before it reaches the studio, which also reads it as text only
        settings["max_file_size"] = config.upload_bytes
    if os.environ.get("SPACE_ID") is None:
        settings["server_name"] = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    settings.update(overrides)
    return settings


def configure_logging() -> None:
    """The server log, with times: where the traceback behind an error id shown to a user is found."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    configure_logging()
    config = StudioConfig.from_env()
    build_app(StudioEngine(config)).launch(**launch_settings(config))


if __name__ == "__main__":
    main()
