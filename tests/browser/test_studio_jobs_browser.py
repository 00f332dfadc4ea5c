"""Long jobs and their results in headless Chromium: Stop keeps a training's partial run (listed as stopped, its
weights offered as a trained result), a reload re-attaches to the running training, Evaluate draws perplexity as
grouped bars on a log axis, and a Models row opens its card."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from tests.browser.conftest import REPO
from tests.browser.test_studio_browser import expect, open_tab, pick, set_number, textbox

pytestmark = pytest.mark.browser


def small_corpus(tmp_path):
    from tests.tiny_models import CORPUS

    prose, code = tmp_path / "prose.txt", tmp_path / "code.txt"
    prose.write_text(CORPUS.split("def main")[0] * 3)
    code.write_text(("def main" + CORPUS.split("def main")[1]) * 3)
    return prose, code


def saved_recipe(studio, name: str) -> None:
    models = studio.engine.embedded_models()
    studio.engine.repo.create_recipe(
        name,
        yaml.safe_dump(
            {
                "name": name,
                "base": "bard",
                "models": {a: models[a] for a in ("bard", "coder")},
                "slots": ["bard:0", {"experts": ["bard:1", "coder:1"]}, "bard:3"],
            }
        ),
    )


def shown_step(page) -> int:
    match = re.search(r"step (\d+) of 2000", page.locator("#train-status").inner_text())
    return int(match.group(1)) if match else -1


def test_stop_keeps_a_partial_run_and_a_reload_re_attaches(page, studio, tmp_path):
    prose, code = small_corpus(tmp_path)
    saved_recipe(studio, "long-train")
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    open_tab(page, "Train")
    pick(page, "train-version", re.compile("long-train v1"))
    for corpus in ("prose", "code"):
        page.locator("#train-corpora").get_by_label(corpus).uncheck()
    page.locator("#train-files input[type=file]").set_input_files([str(prose), str(code)])
    set_number(page, "train-steps", 2000)
    set_number(page, "train-batch", 2)
    set_number(page, "train-seq-len", 32)
    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"step \d+ of 2000"), timeout=120_000)

    page.reload()  # the page forgets the job; the studio does not
    page.wait_for_selector("#layer-palette .layer-chip")
    open_tab(page, "Train")
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"step \d+ of 2000"), timeout=30_000)
    first = shown_step(page)
    page.wait_for_function(
        "n => { const m = document.querySelector('#train-status').innerText.match(/step (\\d+) of 2000/);"
        " return m && Number(m[1]) > n; }",
        arg=first,
    )  # progress keeps coming after the reload
    page.wait_for_selector("#loss-curve .js-plotly-plot")
    assert page.locator("#train-status progress.job-progress").count() == 1

    page.click("#train-stop")
    expect(page.locator("#train-status")).to_contain_text(
        re.compile(r"stopped at step \d+ of 2000"), timeout=60_000
    )
    run = studio.engine.repo.list_training_runs()[0]
    steps = run.metrics["stopped_at"]
    assert run.status == "completed" and steps == len(run.loss_curve) and 0 < steps < 2000
    expect(page.locator("#train-status")).to_contain_text("final loss")
    expect(page.locator("#train-status")).to_contain_text("smoothed")
    expect(page.locator("#training-runs")).to_contain_text(f"stopped at step {steps} of 2000")
    names = page.evaluate("document.querySelector('#loss-curve .js-plotly-plot').data.map(t => t.name)")
    assert names[:2] == ["loss (raw)", "loss (smoothed)"]

    open_tab(page, "Evaluate")
    expect(textbox(page, "eval-version")).to_have_value(re.compile("long-train v1"))
    # offered as a trained result, labelled with how far it got
    pick(page, "eval-weights", re.compile(rf"run {run.id}\b.*stopped at step {steps} of 2000"))


def test_evaluate_draws_grouped_bars_on_a_log_axis(page, studio, tmp_path):
    prose, code = small_corpus(tmp_path)
    saved_recipe(studio, "to-score")
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    open_tab(page, "Evaluate")
    pick(page, "eval-version", re.compile("to-score v1"))
    for corpus in ("prose", "code", "mixed"):
        page.locator("#eval-corpora").get_by_label(corpus).uncheck()
    page.locator("#eval-files input[type=file]").set_input_files([str(prose), str(code)])
    set_number(page, "eval-seq-len", 32)
    page.click("#eval-start")
    expect(page.locator("#eval-status")).to_contain_text("stored with to-score v1", timeout=120_000)
    page.wait_for_selector("#eval-perplexity .js-plotly-plot")
    fig = page.evaluate(
        "(() => { const p = document.querySelector('#eval-perplexity .js-plotly-plot');"
        " return {types: p.data.map(t => t.type), names: p.data.map(t => t.name),"
        " axis: p.layout.yaxis.type, mode: p.layout.barmode}; })()"
    )
    assert fig["axis"] == "log" and fig["mode"] == "group" and set(fig["types"]) == {"bar"}
    assert fig["names"][0].endswith("(fused)") and "bard alone" in fig["names"]
    page.wait_for_selector("#eval-routing .js-plotly-plot")
    expect(page.locator("#eval-results")).to_contain_text("prose perplexity")  # the numbers, as a table
    # one progress bar at most while it ran: the status line's own (Gradio's is hidden on the timer)
    assert page.locator("#eval-status progress").count() == 0


def test_a_models_row_opens_its_card(page, studio):
    bard = studio.engine.config.models_dir / "mango-bard"
    for name in ("training.json", "README.md"):  # the demo model's own record, on its test-size stand-in
        shutil.copy(REPO / "assets" / "models" / "mango-bard" / name, bard / name)
    open_tab(page, "Models")
    expect(page.locator("#model-list")).to_contain_text("shared with:")
    page.locator("#model-list").get_by_text("llama", exact=True).first.click()  # bard's row
    card = page.locator("#model-card")
    expect(card).to_contain_text("Llama-family prose specialist (Shakespeare only)")
    expect(card).to_contain_text("Trained on")
    expect(card).to_contain_text("Validation perplexity")
    expect(card).to_contain_text(re.compile(r"shared with: (coder, base|base, coder)"))
    expect(card).to_contain_text("Width")
    assert textbox(page, "model-ref").count() == 1
