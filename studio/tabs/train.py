"""Train tab: train a recipe version's adapters and routers (wired once `mol.train` lands)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.engine import StudioEngine


def create_train_tab(engine: StudioEngine, recipe: dict[str, Any]) -> dict[str, Any]:
    gr.Markdown("Training is not available in this build yet.")
    return {"version_targets": []}
