"""End to end in headless Chromium: build a recipe by dragging chips, save it, find it after a reload; the
keyboard path; run a prompt and check the routing plots against the stored trace; inline errors, no
tracebacks. With MANGO_SCREENSHOTS=1 the tests also write the README's screenshots to docs/."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.browser.conftest import REPO, screenshots_wanted
from tests.tiny_models import make_model, make_tokenizer

pytestmark = pytest.mark.browser


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=20_000)  # a busy 2-core CI machine answers in seconds, not milliseconds
    return pw_expect(locator)


def board_slots(page) -> list[list[str]]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('#recipe-board .slot')).map(
        s => Array.from(s.querySelectorAll('.expert-chip')).map(c => c.dataset.expert))""")


def drag(page, source: str, target: str) -> None:
    """A drag, then a wait until the studio has drawn the edited recipe beside the board: the next drag then
    starts from a settled page (a redraw arriving under the pointer would move the drop target)."""
    page.drag_and_drop(source, target)
    experts = sum(len(s) for s in board_slots(page))
    expect(page.locator("#recipe-diagram .expert")).to_have_count(experts)


def chip(expert: str) -> str:
    return f'#layer-palette .layer-chip[data-expert="{expert}"]'


LAST_GAP = "#recipe-board .slot-gap.last"


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, name: str) -> None:
    if screenshots_wanted():
        page.wait_for_timeout(500)  # let plots finish their transitions
        page.screenshot(path=str(REPO / "docs" / f"studio-{name}.png"), full_page=True)


def test_build_by_dragging_save_reload_and_find_it_again(page, studio):
    open_tab(page, "Models")
    expect(page.locator("#model-list")).to_contain_text("gpt_neox")
    open_tab(page, "Recipe")

    drag(page, chip("bard:0"), LAST_GAP)
    drag(page, chip("bard:1"), LAST_GAP)
    drag(page, chip("coder:1"), '#recipe-board .slot[data-slot="1"]')  # onto a slot: a second candidate
    drag(page, chip("bard:3"), LAST_GAP)
    drag(page, chip("base:1"), '#recipe-board .slot-gap[data-gap="0"]')  # into the gap before slot 0
    assert board_slots(page) == [["base:1"], ["bard:0"], ["bard:1", "coder:1"], ["bard:3"]]
    drag(page, '#recipe-board .slot[data-slot="0"] .slot-handle', LAST_GAP)  # reorder: first slot to the end
    assert board_slots(page) == [["bard:0"], ["bard:1", "coder:1"], ["bard:3"], ["base:1"]]
    expect(page.locator("#plan-status")).to_contain_text("Valid: 4 slots (1 routed), base bard")
    expect(page.locator("#plan-status")).to_contain_text("Memory estimate")

    textbox(page, "recipe-name").fill("drag-built")
    textbox(page, "recipe-note").fill("first try")
    expect(page.locator("#plan-status")).to_contain_text("Valid")
    shot(page, "recipe")
    page.click("#save-recipe")
    expect(page.locator("#save-status")).to_contain_text("Saved 'drag-built' as version 1.")

    saved = studio.engine.repo.find_recipe("drag-built")
    stored = yaml.safe_load(studio.engine.repo.get_version(saved.id).yaml_text)
    assert [s["experts"] for s in stored["slots"]] == [
        ["bard:0"],
        ["bard:1", "coder:1"],
        ["bard:3"],
        ["base:1"],
    ]
    assert stored["slots"][1]["router"] == {"type": "token", "top_k": 1}

    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    assert board_slots(page) == []
    versions = page.locator("#recipe-versions")
    expect(versions).to_contain_text("drag-built")
    expect(versions).to_contain_text("first try")
    versions.get_by_text("drag-built").filter(
        visible=True
    ).first.click()  # selecting the row picks the version
    expect(textbox(page, "version-pick")).to_have_value(re.compile("drag-built v1"))
    page.click("#open-version")
    expect(page.locator("#versions-status")).to_contain_text("Opened 'drag-built' version 1")
    page.wait_for_function("document.querySelectorAll('#recipe-board .slot').length === 4")
    assert board_slots(page) == [["bard:0"], ["bard:1", "coder:1"], ["bard:3"], ["base:1"]]
    expect(textbox(page, "recipe-name")).to_have_value("drag-built")
    # drawn last: a capture taken before the drags would have moved the page under them
    open_tab(page, "Models")
    expect(page.locator("#model-list")).to_contain_text("gpt_neox")
    shot(page, "models")


def test_every_drag_has_a_keyboard_path(page):
    page.focus(chip("bard:2"))
    page.keyboard.press("Enter")  # a chip's button: appends a slot
    page.focus(chip("bard:0"))
    page.keyboard.press("Enter")
    assert board_slots(page) == [["bard:2"], ["bard:0"]]

    page.select_option('#recipe-board .slot[data-slot="1"] select[data-action="add-expert"]', "coder:2")
    assert board_slots(page) == [["bard:2"], ["bard:0", "coder:2"]]
    expect(page.locator('#recipe-board .slot[data-slot="1"] .slot-kind')).to_have_text("token-routed")
    page.select_option('#recipe-board .slot[data-slot="1"] select[data-action="router-type"]', "pooled")
    expect(page.locator('#recipe-board .slot[data-slot="1"] .slot-kind')).to_have_text("pooled-routed")
    expect(page.locator("#plan-status")).to_contain_text("Valid: 2 slots (1 routed)")
    page.get_by_text("YAML: import and export").click()
    expect(page.locator("#recipe-yaml")).to_contain_text("type: pooled")

    page.focus('#recipe-board button[aria-label="Move slot 1 up"]')
    page.keyboard.press("Enter")
    assert board_slots(page) == [["bard:0", "coder:2"], ["bard:2"]]
    # focus follows the moved slot (at the top, onto its other move button), so Enter moves it back down
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Move slot 0 down"
    page.keyboard.press("Enter")
    assert board_slots(page) == [["bard:2"], ["bard:0", "coder:2"]]

    page.click('#recipe-board button[aria-label="Remove coder:2 from slot 1"]')
    assert board_slots(page) == [["bard:2"], ["bard:0"]]
    expect(page.locator('#recipe-board .slot[data-slot="1"] .slot-kind')).to_have_text("plain")
    page.click('#recipe-board button[aria-label="Remove slot 0"]')
    assert board_slots(page) == [["bard:0"]]
    expect(page.locator("#plan-status")).to_contain_text("Valid: 1 slot (0 routed)")


def test_run_a_prompt_and_see_the_routing(page, studio):
    repo = studio.engine.repo
    models = studio.engine.embedded_models()
    text = yaml.safe_dump(
        {
            "name": "routed-run",
            "base": "bard",
            "models": {a: models[a] for a in ("bard", "coder", "base")},
            "slots": [
                {"experts": ["bard:0"]},
                {"experts": ["bard:1", "coder:1"], "router": {"type": "token", "top_k": 1}},
                {"experts": ["bard:2", "coder:2", "base:1"], "router": {"type": "token", "top_k": 2}},
                {"experts": ["bard:3"]},
            ],
        }
    )
    version = repo.create_recipe("routed-run", text)
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    open_tab(page, "Playground")
    expect(textbox(page, "run-version")).to_have_value(re.compile("routed-run v1"))
    textbox(page, "prompt").fill("To be, or not to be")
    page.click("#run-prompt")
    expect(page.locator("#run-status")).to_contain_text("Saved as run #", timeout=120_000)

    run = repo.list_runs(version_id=version.id)[0]
    trace = repo.get_run(run.id).trace
    expect(textbox(page, "output-text")).to_have_value(run.output_text)
    page.wait_for_selector("#router-heatmap .js-plotly-plot")
    page.wait_for_selector("#expert-load .js-plotly-plot")
    # the heatmap is redrawn while tokens stream: wait until the browser shows the final one (it can lag)
    page.wait_for_function(
        """n => { const gd = document.querySelector('#router-heatmap .js-plotly-plot');
            return gd && gd.data && gd.data[0] && gd.data[0].z[0].length === n; }""",
        arg=len(trace["tokens"]),
    )
    heat = page.evaluate("""() => { const gd = document.querySelector('#router-heatmap .js-plotly-plot');
        return {rows: gd.data[0].z.length, cols: gd.data[0].z[0].length, ticks: gd.layout.xaxis.ticktext.length,
                keys: gd.data.slice(1).map(t => t.name), z: gd.data[0].z}; }""")
    n_tokens = len(trace["tokens"])
    assert n_tokens > 5
    assert heat["rows"] == 2 and heat["cols"] == n_tokens
    # the colour keys (legend): one per model, each of these slots holding one expert of each model
    assert heat["keys"] == ["bard", "coder", "base"]
    for row, slot in zip(heat["z"], trace["slots"], strict=True):  # each cell's hue: its top-1 expert's model
        assert [heat["keys"][int(z // 1)] for z in row] == [
            slot["experts"][pick[0]].split(":")[0] for pick in slot["chosen"]
        ]
    bars = page.evaluate("""() => Array.from(document.querySelector('#expert-load .js-plotly-plot').data,
        t => ({x: t.x, y: t.y}))""")
    assert [b["x"] for b in bars] == [["bard:1", "coder:1"], ["bard:2", "coder:2", "base:1"]]
    assert [round(sum(b["y"]), 6) for b in bars] == [1.0, 1.0]
    assert page.locator("#router-heatmap svg .hm, #router-heatmap canvas").count() > 0  # really drawn
    expect(page.locator("#runs-list")).to_contain_text("routed-run")

    page.get_by_text("Side by side: the same prompt through source models alone").click()
    page.click("#run-sources")
    expect(page.locator("#source-outputs .source-output")).to_have_count(2, timeout=120_000)

    # a second run with another prompt, then reopen the first one from the list: prompt and output come back
    textbox(page, "prompt").fill("def main(argv):")
    page.click("#run-prompt")
    expect(page.locator("#run-status")).to_contain_text(f"Saved as run #{run.id + 1}", timeout=120_000)
    page.locator("#runs-list").get_by_text("To be, or not to be").filter(visible=True).first.click()
    page.click("#open-run")
    expect(page.locator("#run-status")).to_contain_text(f"Run #{run.id} of routed-run v1")
    expect(textbox(page, "prompt")).to_have_value("To be, or not to be")
    expect(textbox(page, "output-text")).to_have_value(run.output_text)

    # a newcomer opens the lanes example: the three models side by side, a stitch added on the board, saved, run
    open_tab(page, "Recipe")
    page.get_by_text("YAML: import and export").click()
    pick(page, "recipe-examples", "lanes-trio.yaml")
    expect(page.locator("#import-status")).to_contain_text("Loaded the example 'lanes-trio'")
    lanes = page.locator("#recipe-board .lane[data-lane]")
    expect(lanes).to_have_count(3)
    assert [lanes.nth(i).get_attribute("data-base") for i in range(3)] == ["bard", "coder", "base"]
    # each lane shows its base model's layers (all of them: the default)
    example = studio.engine.recipe_from_file(studio.engine.config.recipes_dir / "lanes-trio.yaml")
    layers = {a: studio.engine.model_card(a, ref)["layers"] for a, ref in example.models.items()}
    for i, base in enumerate(["bard", "coder", "base"]):
        expect(lanes.nth(i).locator(".lane-layer")).to_have_count(layers[base])
    expect(page.locator("#recipe-board select[data-action=mixture]")).to_have_value("evidence")
    expect(page.locator("#plan-status")).to_contain_text("Valid: 3 lanes side by side")
    expect(page.locator("#recipe-diagram svg .lane")).to_have_count(3)
    expect(page.locator("#recipe-diagram svg .mixture")).to_have_attribute("data-mixture", "evidence")
    page.click("#recipe-board button[data-action=add-stitch]")
    expect(page.locator("#recipe-board .stitch")).to_have_count(1)
    expect(page.locator("#plan-status")).to_contain_text("1 stitch")
    expect(page.locator("#recipe-diagram svg .stitch")).to_have_attribute("data-after", "0,0")
    shot(page, "lanes")
    textbox(page, "recipe-name").fill("my-lanes")
    textbox(page, "recipe-name").press("Tab")
    page.click("#save-recipe")
    expect(page.locator("#save-status")).to_contain_text("Saved 'my-lanes' as version 1")
    saved = yaml.safe_load(repo.get_version(repo.find_recipe("my-lanes").id, 1).yaml_text)
    assert list(saved["lanes"]) == ["bard", "coder", "base"] and saved["mixture"] == {"type": "evidence"}
    assert saved["stitches"] == [{"from": "coder", "to": "bard", "after": [0, 0], "type": "linear"}]

    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    open_tab(page, "Playground")
    pick(page, "run-version", re.compile(r"^my-lanes v1"))
    textbox(page, "prompt").fill("def main(argv):")
    page.click("#run-prompt")
    expect(page.locator("#run-status")).to_contain_text("Saved as run #", timeout=120_000)
    lanes_run = repo.list_runs(recipe_id=repo.find_recipe("my-lanes").id, limit=1)[0]
    trace = repo.get_run(lanes_run.id).trace
    assert [s["slot"] for s in trace["slots"]] == [-1] and trace["slots"][0]["experts"] == [
        "bard",
        "coder",
        "base",
    ]
    page.wait_for_function(
        """n => { const gd = document.querySelector('#router-heatmap .js-plotly-plot');
            return gd && gd.data && gd.data[0] && gd.data[0].z && gd.data[0].z[0].length === n; }""",
        arg=len(trace["tokens"]),
    )
    rows = page.evaluate(
        """() => document.querySelector('#router-heatmap .js-plotly-plot').layout.yaxis.ticktext"""
    )
    assert rows == ["lane mixture"]  # which lane the gate picks, per token
    expect(page.locator("#expert-load")).to_contain_text("lane mixture")
    shot(page, "lanes-playground")


def test_invalid_recipes_show_inline_errors_not_tracebacks(page, tmp_path):
    # a model with its own tokenizer: valid on its own, not fusable with the demo family
    other = make_model(tmp_path / "other", "llama", 32, 2, make_tokenizer(tmp_path / "tok", vocab_size=300))
    open_tab(page, "Models")
    textbox(page, "model-ref").fill(str(other))
    textbox(page, "model-alias").fill("odd")
    page.click("#add-model")
    expect(page.locator("#model-status")).to_contain_text("Added 'odd'")
    expect(page.locator("#model-list")).to_contain_text("no: its tokenizer differs")
    page.click("#add-model")  # the same model again
    expect(page.locator("#model-status [role=alert]")).to_contain_text("already in the list as 'odd'")
    textbox(page, "model-alias").fill("")
    textbox(page, "model-ref").fill(str(tmp_path / "missing"))
    page.click("#add-model")
    expect(page.locator("#model-status [role=alert]")).to_contain_text("does not exist")

    open_tab(page, "Recipe")
    drag(page, chip("bard:0"), LAST_GAP)
    drag(page, chip("odd:1"), LAST_GAP)
    alert = page.locator("#plan-status .plan.error[role=alert]")
    expect(alert).to_contain_text("Tokenizers differ")

    textbox(page, "recipe-name").fill("")
    page.click("#save-recipe")
    expect(page.locator("#save-status [role=alert]")).to_contain_text("Not saved")

    page.get_by_text("YAML: import and export").click()
    page.locator("#recipe-yaml .cm-content").fill("name: broken\nslots: [bard:0\n")
    page.click("#import-yaml")
    expect(page.locator("#import-status [role=alert]")).to_contain_text("not valid YAML at line")
    assert "Traceback" not in page.content()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.click()
    box.press("Control+A")
    # Keystrokes, as a person types: each reaches the component (a filled-in value can be rendered over by the
    # component's own, still the default, when it next updates).
    box.press_sequentially(str(value))
    box.press("Enter")
    box.press("Tab")
    slider = page.locator(f"#{elem_id} input[type=range]")
    if slider.count():
        expect(slider.first).to_have_value(str(value))


def pick(page, elem_id: str, option) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    options = page.locator(f"#{box.get_attribute('aria-controls')}")  # this dropdown's own list
    options.get_by_role("option", name=option, exact=isinstance(option, str)).click()


def test_train_then_evaluate_with_the_trained_weights(page, studio, tmp_path):
    from tests.tiny_models import CORPUS

    prose, code = tmp_path / "prose.txt", tmp_path / "code.txt"
    prose.write_text(CORPUS.split("def main")[0] * 4)
    code.write_text(("def main" + CORPUS.split("def main")[1]) * 4)
    models = studio.engine.embedded_models()
    studio.engine.repo.create_recipe(
        "to-train",
        yaml.safe_dump(
            {
                "name": "to-train",
                "base": "bard",
                "models": {a: models[a] for a in ("bard", "coder")},
                "slots": [
                    "bard:0",
                    {"experts": ["bard:1", "coder:1"]},
                    {"experts": ["bard:2", "coder:2"]},
                    "bard:3",
                ],
            }
        ),
    )
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")

    open_tab(page, "Train")
    expect(textbox(page, "train-version")).to_have_value(re.compile("to-train v1"))
    for corpus in ("prose", "code"):  # our own small files instead of the built-in corpora
        page.locator("#train-corpora").get_by_label(corpus).uncheck()
    page.locator("#train-files input[type=file]").set_input_files([str(prose), str(code)])
    set_number(page, "train-steps", 5)
    set_number(page, "train-batch", 2)
    set_number(page, "train-seq-len", 32)
    page.get_by_text("More settings").click()
    page.locator("#train-router-init").get_by_label(
        "ridge"
    ).check()  # routers fitted to the domain labels first
    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text("finished: 5 steps", timeout=120_000)
    page.wait_for_selector("#loss-curve .js-plotly-plot")
    steps = page.evaluate("document.querySelector('#loss-curve .js-plotly-plot').data[0].x")
    assert steps == [1, 2, 3, 4, 5]
    run = studio.engine.repo.list_training_runs()[0]
    assert run.status == "completed" and len(run.loss_curve) == 5
    expect(page.locator("#training-runs")).to_contain_text("completed")
    shot(page, "train")

    open_tab(page, "Evaluate")
    expect(textbox(page, "eval-version")).to_have_value(re.compile("to-train v1"))
    pick(page, "eval-weights", re.compile(f"^to-train v1 · run {run.id} · "))  # a label, not an id
    for corpus in ("prose", "code", "mixed"):
        page.locator("#eval-corpora").get_by_label(corpus).uncheck()
    page.locator("#eval-files input[type=file]").set_input_files([str(prose), str(code)])
    set_number(page, "eval-seq-len", 32)
    page.click("#eval-start")
    expect(page.locator("#eval-status")).to_contain_text(
        "stored with to-train v1 + training run", timeout=120_000
    )
    results = page.locator("#eval-results")
    expect(results).to_contain_text("prose perplexity")
    expect(results).to_contain_text("bard alone")
    expect(results).to_contain_text("coder alone")
    evaluation = studio.engine.repo.list_evaluations()[0]
    assert evaluation.training_run_id == run.id
    expect(page.locator("#evaluations")).to_contain_text("to-train v1")
    shot(page, "evaluate")

    # the trained routers in the Playground: prose and code in one prompt
    open_tab(page, "Playground")
    pick(page, "run-version", "to-train v1")
    pick(page, "run-weights", re.compile(f"^to-train v1 · run {run.id} · "))
    textbox(page, "prompt").fill(
        "To be, or not to be, that is the question.\ndef main(argv):\n    return sorted(argv)"
    )
    page.click("#run-prompt")
    expect(page.locator("#run-status")).to_contain_text("Saved as run #", timeout=120_000)
    stored = studio.engine.repo.list_runs()[0]
    assert stored.settings["training_run_id"] == run.id
    page.get_by_text("Side by side: the same prompt through source models alone").click()
    page.click("#run-sources")
    expect(page.locator("#source-outputs .source-output")).to_have_count(2, timeout=120_000)
    shot(page, "playground")


def test_compare_duplicate_delete_and_restore_versions(page, studio):
    repo = studio.engine.repo
    models = studio.engine.embedded_models()

    def text(slots):
        return yaml.safe_dump(
            {"name": "versioned", "base": "bard", "models": {"bard": models["bard"]}, "slots": slots}
        )

    v1 = repo.create_recipe("versioned", text(["bard:0", "bard:1"]), note="two")
    repo.save_version(v1.recipe_id, text(["bard:0", "bard:1", "bard:2"]), note="three")
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    pick(page, "version-pick", "versioned v1 — two")
    pick(page, "compare-with", "versioned v2 — three")
    page.click("#compare-versions")
    expect(page.locator("#version-diff")).to_contain_text("versioned v1 → versioned v2")
    expect(page.locator("#version-diff")).to_contain_text("slot 2 added: [bard:2]")

    page.click("#duplicate-version")
    expect(page.locator("#versions-status")).to_contain_text("Duplicated as 'versioned (copy)'")
    assert board_slots(page) == [["bard:0"], ["bard:1"]]
    assert repo.find_recipe("versioned (copy)") is not None

    pick(page, "version-pick", "versioned v2 — three")
    noted_three = page.locator("#recipe-versions").get_by_role("gridcell", name="three", exact=True)
    expect(noted_three).to_have_count(1)
    page.click("#delete-recipe")
    expect(page.locator("#versions-status")).to_contain_text("Deleted 'versioned'")
    # its version noted "three" is no longer listed (a cell of its own: the shipped examples' notes are longer
    # texts that may contain the word)
    expect(noted_three).to_have_count(0)
    assert repo.find_recipe("versioned") is None
    page.locator("#show-deleted").get_by_label("Show deleted recipes").check()
    expect(page.locator("#recipe-versions")).to_contain_text("deleted")
    pick(page, "version-pick", "versioned v2 — three (deleted)")
    page.click("#restore-recipe")
    expect(page.locator("#versions-status")).to_contain_text("Restored 'versioned'")
    assert repo.find_recipe("versioned").latest_version == 2


def test_stop_ends_the_generation_and_frees_its_slot(page, studio, monkeypatch):
    import threading
    import time

    import mol.fused

    steps = []
    forward = mol.fused.FusedModel.forward

    def slow(self, *args, **kwargs):  # long enough a generation to stop it halfway
        steps.append(1)
        time.sleep(0.03)
        return forward(self, *args, **kwargs)

    models = studio.engine.embedded_models()
    studio.engine.repo.create_recipe(
        "to-stop",
        yaml.safe_dump(
            {"name": "to-stop", "base": "bard", "models": {"bard": models["bard"]}, "slots": ["bard:0-1"]}
        ),
    )
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")
    open_tab(page, "Playground")
    pick(page, "run-version", "to-stop v1")
    page.get_by_text("Sampling").click()
    set_number(page, "max-new-tokens", 200)
    textbox(page, "prompt").fill("To be, or not to be")
    monkeypatch.setattr(mol.fused.FusedModel, "forward", slow)
    page.click("#run-prompt")
    expect(page.locator("#run-status")).to_contain_text(re.compile(r"Generating… \d+ tokens"))
    page.click("#stop-run")

    def idle() -> bool:
        gate = studio.engine.gate.snapshot()
        return gate["running"] == 0 and not any(t.name == "mango-generate" for t in threading.enumerate())

    deadline = time.monotonic() + 30
    while not idle():  # the worker ends and gives its slot back
        assert time.monotonic() < deadline, "the stopped generation's worker is still running"
        time.sleep(0.05)
    assert len(steps) < 150  # stopped well before its 200 tokens
    expect(page.locator("#run-status")).to_contain_text(re.compile(r"Stopped after \d+ tokens; not saved"))
    assert (
        studio.engine.repo.list_runs(version_id=studio.engine.repo.find_recipe("to-stop").latest_version_id)
        == []
    )
    monkeypatch.undo()
    page.click(
        "#run-prompt"
    )  # at once: the stop belonged to the previous generation only  # the next generation runs; not stopped, this prompt runs its 200 tokens
    expect(page.locator("#run-status")).to_contain_text("Saved as run #", timeout=120_000)
    run = studio.engine.repo.list_runs(limit=1)[0]
    assert run.settings["max_new_tokens"] == 200  # the setting reached the server
    # Not stopped, the run reads exactly what an uninterrupted greedy generation reads (up to 200 new tokens,
    # fewer if the model ends its text).
    model, _ = studio.engine.fused_for_version(run.version_id)
    ids = model.tokenizer("To be, or not to be", return_tensors="pt").input_ids
    trace = model.generate(ids, max_new_tokens=200, return_trace=True).trace
    assert len(studio.engine.repo.get_run(run.id).trace["tokens"]) == trace.token_ids.shape[1]
