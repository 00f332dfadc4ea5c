"""The Recipe tab's guardrails and board in headless Chromium, on a studio of its own (a fresh database): a real
mouse drag onto the last zone, a recipe whose plan fails is neither saved nor offered to run, a save under a
taken name asks first, the header says what is edited and whether it has unsaved changes, the board survives a
reload, the drawn model follows the board, versions compare older to newer, board edits that change
nothing (or something else than asked) say so, and a lane renamed on the board takes its stitches along (a refused
name loses nothing; a lanes recipe shows no adapter setting)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.tiny_models import make_model, make_tokenizer

pytestmark = pytest.mark.browser

LAST_GAP = "#recipe-board .slot-gap.last"


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=20_000)
    return pw_expect(locator)


def board_slots(page) -> list[list[str]]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('#recipe-board .slot')).map(
        s => Array.from(s.querySelectorAll('.expert-chip')).map(c => c.dataset.expert))""")


def chip(expert: str) -> str:
    return f'#layer-palette .layer-chip[data-expert="{expert}"]'


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def reload(page) -> None:
    page.reload()
    page.wait_for_selector("#layer-palette .layer-chip")


def add(page, *experts: str) -> None:
    """Append slots by the keyboard path (a chip's click)."""
    for e in experts:
        n = len(board_slots(page))
        page.click(chip(e))
        page.wait_for_function(f"document.querySelectorAll('#recipe-board .slot').length === {n + 1}")


def mouse_drag(page, source: str, target: str, rest_ms: int = 300) -> None:
    """A person's drag: press on the source, move in steps onto the target, rest there, release."""
    page.locator(source).wait_for()
    page.locator(target).wait_for()
    a = page.locator(source).bounding_box()
    b = page.locator(target).bounding_box()
    page.mouse.move(a["x"] + a["width"] / 2, a["y"] + a["height"] / 2)
    page.mouse.down()
    page.mouse.move(a["x"] + a["width"] / 2 + 5, a["y"] + a["height"] / 2 + 5, steps=2)
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2, steps=12)
    page.wait_for_timeout(rest_ms)
    page.mouse.up()


def dropdown_options(page, elem_id: str) -> list[str]:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    options = page.locator(f"#{box.get_attribute('aria-controls')}").get_by_role("option")
    expect(options.first).to_be_visible()
    texts = options.all_inner_texts()
    page.keyboard.press("Escape")
    return [t.replace("✓", "").strip() for t in texts]  # the picked option carries a check mark


def pick(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill("")  # the list shows only what matches the box's text
    options = page.locator(f"#{box.get_attribute('aria-controls')}")
    options.get_by_role("option", name=option, exact=True).click()


def recipe_text(models: dict, name: str, slots: list, aliases=("bard",)) -> str:
    return yaml.safe_dump(
        {"name": name, "base": aliases[0], "models": {a: models[a] for a in aliases}, "slots": slots}
    )


def test_a_real_mouse_drag_that_rests_on_the_last_zone_lands(page):
    mouse_drag(page, chip("bard:0"), LAST_GAP)
    expect(page.locator("#recipe-board .slot")).to_have_count(1)
    mouse_drag(page, chip("coder:1"), LAST_GAP)  # the zone below a slot, rested on as long
    expect(page.locator("#recipe-board .slot")).to_have_count(2)
    assert board_slots(page) == [["bard:0"], ["coder:1"]]
    height = page.evaluate(f"document.querySelector('{LAST_GAP}').getBoundingClientRect().height")
    page.evaluate(f"document.querySelector('{LAST_GAP}').classList.add('drop-over')")  # as while dragged over
    over = page.evaluate(f"document.querySelector('{LAST_GAP}').getBoundingClientRect().height")
    assert over == height  # its hit area stays under the pointer


def test_a_recipe_whose_plan_fails_is_not_saved_nor_offered_to_run(page, studio, tmp_path):
    other = make_model(tmp_path / "other", "llama", 32, 2, make_tokenizer(tmp_path / "tok", vocab_size=300))
    repo, models = studio.engine.repo, studio.engine.embedded_models()
    bad = recipe_text({**models, "odd": str(other)}, "two-tokenizers", ["bard:0", "odd:1"], ("bard", "odd"))
    repo.create_recipe("two-tokenizers", bad)  # saved past the board (an API client, an older studio)
    repo.create_recipe("runnable", recipe_text(models, "runnable", ["bard:0"]))
    reload(page)

    open_tab(page, "Models")
    textbox(page, "model-ref").fill(str(other))
    textbox(page, "model-alias").fill("odd")
    page.click("#add-model")
    expect(page.locator("#model-status")).to_contain_text("Added 'odd'")
    open_tab(page, "Recipe")
    odd = page.locator('#layer-palette .palette-model[data-alias="odd"]')
    expect(odd).to_have_class(re.compile("blocked"))
    expect(odd.locator(".palette-blocked")).to_contain_text("cannot join this recipe: Tokenizers differ")
    expect(page.locator('#layer-palette .palette-model[data-alias="coder"]')).not_to_have_class(
        re.compile("blocked")
    )

    add(page, "bard:0", "odd:1")
    expect(page.locator("#plan-status .plan.error")).to_contain_text("Tokenizers differ")
    textbox(page, "recipe-name").fill("not-runnable")
    page.click("#save-recipe")
    status = page.locator("#save-status [role=alert]")
    expect(status).to_contain_text("Not saved: Tokenizers differ")
    expect(status).to_contain_text("cannot be saved to run")
    assert repo.find_recipe("not-runnable") is None

    open_tab(page, "Playground")
    options = dropdown_options(page, "run-version")
    assert any("runnable v1" in o for o in options), options
    assert not any("two-tokenizers" in o for o in options), options


def test_a_save_under_a_taken_name_asks_first(page, studio):
    repo, models = studio.engine.repo, studio.engine.embedded_models()
    repo.create_recipe("taken", recipe_text(models, "taken", ["bard:0"]))
    reload(page)
    add(page, "bard:1", "bard:2")
    textbox(page, "recipe-name").fill("taken")
    expect(page.locator("#plan-status")).to_contain_text("Valid: 2 slots")
    page.click("#save-recipe")
    expect(page.locator("#save-status")).to_contain_text("A recipe named 'taken' already exists")
    expect(page.locator("#save-status")).to_contain_text("Saving adds version 2 to it")
    assert repo.find_recipe("taken").latest_version == 1  # nothing added yet

    page.click("#cancel-save")
    expect(page.locator("#save-status")).to_contain_text("Not saved: cancelled")
    expect(page.locator("#confirm-save")).to_be_hidden()
    assert repo.find_recipe("taken").latest_version == 1

    page.click("#save-recipe")
    page.click("#confirm-save")
    expect(page.locator("#save-status")).to_contain_text("Saved 'taken' as version 2.")
    assert repo.find_recipe("taken").latest_version == 2
    # now the board edits 'taken' itself: saving again asks nothing
    add(page, "bard:3")
    page.click("#save-recipe")
    expect(page.locator("#save-status")).to_contain_text("Saved 'taken' as version 3.")


def test_the_header_says_unsaved_changes_until_saved(page):
    header = page.locator("#recipe-editing")
    expect(header).not_to_contain_text("unsaved changes")
    add(page, "bard:0")
    textbox(page, "recipe-name").fill("header-test")
    expect(header).to_contain_text("header-test")
    expect(header).to_contain_text("unsaved changes")
    expect(page.locator("#plan-status")).to_contain_text("Valid")
    page.click("#save-recipe")
    expect(page.locator("#save-status")).to_contain_text("Saved 'header-test' as version 1.")
    expect(header).to_have_text("editing header-test v1")
    add(page, "bard:1")
    expect(header).to_have_text("editing header-test v1 · unsaved changes")
    page.click('#recipe-board button[aria-label="Remove slot 1"]')  # back to what is saved: clean again
    expect(header).to_have_text("editing header-test v1")
    page.get_by_text("YAML: import and export").click()
    page.click("#export-yaml")
    expect(page.locator("#import-status")).to_contain_text(
        "Exported the saved version 'header-test' v1 as Mango recipe YAML"
    )


def test_the_board_survives_a_reload(page):
    add(page, "bard:0", "bard:1")
    page.select_option('#recipe-board .slot[data-slot="1"] select[data-action="add-expert"]', "coder:1")
    textbox(page, "recipe-name").fill("kept-in-the-browser")
    expect(page.locator("#recipe-editing")).to_contain_text("kept-in-the-browser")
    page.wait_for_timeout(500)  # the kept copy is written after the board's validation
    reload(page)
    page.wait_for_function("document.querySelectorAll('#recipe-board .slot').length === 2")
    assert board_slots(page) == [["bard:0"], ["bard:1", "coder:1"]]
    expect(textbox(page, "recipe-name")).to_have_value("kept-in-the-browser")
    expect(page.locator("#recipe-editing")).to_contain_text("unsaved changes")
    expect(page.locator("#plan-status")).to_contain_text("Valid: 2 slots (1 routed)")


def test_the_drawn_model_follows_the_board(page):
    diagram = page.locator("#recipe-diagram")
    expect(diagram.locator("svg")).to_have_count(0)
    add(page, "bard:0")
    expect(diagram.locator("svg")).to_have_count(1)
    expect(diagram.locator("svg")).to_contain_text("bard:0")
    expect(diagram.locator("svg")).not_to_contain_text("coder:2")
    add(page, "coder:2")
    expect(diagram.locator("svg")).to_contain_text("coder:2")


def test_compare_reads_older_to_newer_whichever_way_picked(page, studio):
    repo, models = studio.engine.repo, studio.engine.embedded_models()
    v1 = repo.create_recipe("cmp", recipe_text(models, "cmp", ["bard:0", "bard:1"]), note="two")
    repo.save_version(v1.recipe_id, recipe_text(models, "cmp", ["bard:0", "bard:1", "bard:2"]), note="three")
    reload(page)
    pick(page, "version-pick", "cmp v2 — three")  # the newer one first
    pick(page, "compare-with", "cmp v1 — two")
    page.click("#compare-versions")
    diff = page.locator("#version-diff")
    expect(diff).to_contain_text("cmp v1 → cmp v2")
    expect(diff).to_contain_text("slot 2 added: [bard:2]")
    expect(diff).not_to_contain_text("removed")


def test_edits_that_change_nothing_say_why(page):
    add(page, "bard:0")
    page.select_option('#recipe-board .slot[data-slot="0"] select[data-action="add-expert"]', "coder:0")
    page.select_option('#recipe-board .slot[data-slot="0"] select[data-action="add-expert"]', "bard:1")
    page.drag_and_drop(chip("bard:0"), '#recipe-board .slot[data-slot="0"]')  # already a candidate there
    note = page.locator("#recipe-board .board-note")
    expect(note).to_contain_text("bard:0 is already a candidate of slot 0: not added again")
    assert board_slots(page) == [["bard:0", "coder:0", "bard:1"]]
    topk = page.locator('#recipe-board .slot[data-slot="0"] input[data-action="top-k"]')
    topk.fill("9")
    topk.dispatch_event("change")
    expect(note).to_contain_text("top-k 9 set to 3: slot 0 has 3 candidates")
    expect(topk).to_have_value("3")


def test_rank_only_for_a_bottleneck_and_full_example_names(page):
    rank = page.locator("#recipe-rank input[type=number]").first
    expect(rank).to_be_disabled()
    page.locator("#recipe-adapter").get_by_label("bottleneck").check()
    expect(rank).to_be_enabled()
    page.locator("#recipe-adapter").get_by_label("linear").check()
    expect(rank).to_be_disabled()

    page.get_by_text("YAML: import and export").click()
    names = dropdown_options(page, "recipe-examples")
    longest = max(names, key=len)
    pick(page, "recipe-examples", longest)
    box = textbox(page, "recipe-examples")
    expect(box).to_have_value(longest)
    fits = box.evaluate("el => el.scrollWidth <= el.clientWidth")
    assert fits, f"'{longest}' is cut off in the example list"


def test_a_mergekit_import_reuses_the_loaded_alias(page, studio):
    ref = studio.engine.embedded_models()["bard"]
    page.get_by_text("YAML: import and export").click()
    page.locator("#recipe-yaml .cm-content").fill(
        f"slices:\n  - sources: [{{model: {ref}, layer_range: [0, 2]}}]\nmerge_method: passthrough\n"
    )
    page.click("#import-yaml")
    expect(page.locator("#import-status")).to_contain_text("keeps that alias")
    page.wait_for_function("document.querySelectorAll('#recipe-board .slot').length === 2")
    assert board_slots(page) == [["bard:0"], ["bard:1"]]
    assert page.locator("#layer-palette .palette-model").count() == 3  # no second alias for bard


def board_lanes(page) -> list[str]:
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('#recipe-board .lane[data-lane]')).map(l => l.dataset.lane)"
    )


def test_a_lane_is_renamed_on_the_board_its_stitches_follow_and_a_bad_name_loses_nothing(page, studio):
    page.get_by_text("YAML: import and export").click()
    pick(page, "recipe-examples", "lanes-trio.yaml")
    expect(page.locator("#recipe-board .lane[data-lane]")).to_have_count(3)
    # lanes need no adapter: the setting is hidden and a note says why
    expect(page.locator("#recipe-adapter")).to_be_hidden()
    expect(page.locator("#recipe-adapter-note")).to_contain_text("No adapter for lanes")
    page.click("#recipe-board button[data-action=add-stitch]")  # from coder into bard
    expect(page.locator("#recipe-board select[data-action=stitch-from]")).to_have_value("coder")

    note = page.locator("#recipe-board .board-note")
    for bad, why in [
        ("", "a lane needs a name"),
        ("bard", "there is a lane 'bard' already"),
        ("two words", "'two words' is not a lane name"),
    ]:
        name = page.locator('#recipe-board .lane[data-lane="coder"] input[data-action=lane-name]')
        name.fill(bad)
        name.press("Enter")
        expect(note).to_contain_text(f"Lane 'coder' is not renamed: {why}")
        expect(name).to_have_value("coder")  # nothing lost: the lane, its stitch and the plan as they were
        assert board_lanes(page) == ["bard", "coder", "base"]
        expect(page.locator("#recipe-board select[data-action=stitch-from]")).to_have_value("coder")
    expect(page.locator("#plan-status")).to_contain_text("Valid: 3 lanes side by side")

    name = page.locator('#recipe-board .lane[data-lane="coder"] input[data-action=lane-name]')
    name.fill("python")
    name.press("Enter")
    renamed = page.locator('#recipe-board .lane[data-lane="python"]')
    expect(renamed).to_have_attribute("data-base", "coder")
    assert board_lanes(page) == ["bard", "python", "base"]
    expect(note).to_have_text("")
    expect(page.locator("#recipe-board select[data-action=stitch-from]")).to_have_value("python")
    expect(page.locator("#plan-status")).to_contain_text("python: coder")
    expect(page.locator('#recipe-diagram svg .lane[data-lane="python"]')).to_have_count(1)
    textbox(page, "recipe-name").fill("renamed-lanes")
    textbox(page, "recipe-name").press("Tab")
    page.click("#save-recipe")
    expect(page.locator("#save-status")).to_contain_text("Saved 'renamed-lanes' as version 1")
    repo = studio.engine.repo
    saved = yaml.safe_load(repo.get_version(repo.find_recipe("renamed-lanes").id, 1).yaml_text)
    assert list(saved["lanes"]) == ["bard", "python", "base"] and saved["lanes"]["python"] == {
        "base": "coder"
    }
    assert saved["stitches"] == [{"from": "python", "to": "bard", "after": [0, 0], "type": "linear"}]
    assert saved["mixture"] == {"type": "evidence"}

    # one stream again: the adapter setting is back, the note gone
    page.click("#recipe-board button[data-action=to-single]")
    expect(page.locator("#recipe-adapter")).to_be_visible()
    expect(page.locator("#recipe-adapter-note")).to_be_hidden()
