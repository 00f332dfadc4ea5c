"""Evaluate tab: perplexity and routing quality of a recipe version (wired once `mol.evaluate` lands)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.engine import StudioEngine


def create_evaluate_tab(engine: StudioEngine, recipe: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    gr.Markdown("Evaluation is not available in this build yet.")
    return {"version_targets": []}
