"""The Playground in headless Chromium on a fresh database: the first Run, with no setup, routes with the shipped
trained weights; the heatmap is redrawn while tokens stream and its cells are shaded by the gate probabilities;
hovering an output token outlines its column; weights are chosen by label; at a phone's 390 px nothing
overflows the page and the heatmap is shown."""

from __future__ import annotations

import math
import re

import pytest

from studio.figures import gate_intensity, slot_keys
from tests.browser.test_studio_browser import expect, open_tab, pick, textbox

pytestmark = pytest.mark.browser

HEATMAP = "#router-heatmap .js-plotly-plot"


def options_of(page, elem_id: str) -> list[str]:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    listbox = page.locator(f"#{box.get_attribute('aria-controls')}")
    expect(listbox.get_by_role("option").first).to_be_visible()
    names = [o.replace("✓", "").strip() for o in listbox.get_by_role("option").all_inner_texts()]
    box.press("Escape")
    return names


def open_tab_narrow(page, name: str) -> None:
    """Open a tab on a narrow screen, where Gradio moves the tabs that do not fit into its "More tabs" menu."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.is_visible():
        tab.click()
        return
    page.click('button[aria-label="More tabs"]')
    page.locator(".overflow-dropdown button", has_text=name).click()


def watch_heatmap(page) -> None:
    """Record, in the page, every distinct state of the drawn heatmap (columns, x range) while it streams."""
    page.evaluate("""() => {
        window.__heat = [];
        window.__heatTimer = setInterval(() => {
            const gd = document.querySelector('#router-heatmap .js-plotly-plot');
            if (!gd || !gd.data || !gd.data[0] || !gd.data[0].z) return;
            const s = {cols: gd.data[0].z[0].length, range: (gd.layout.xaxis.range || []).slice()};
            const last = window.__heat[window.__heat.length - 1];
            if (!last || last.cols !== s.cols) window.__heat.push(s);
        }, 50);
    }""")


def test_the_first_run_of_a_fresh_studio_routes_with_the_shipped_weights(page, studio, monkeypatch):
    import time

    import mol.fused

    open_tab(page, "Playground")
    # it opens on the best shipped trained fusion (the lanes of the three demo models), its weights chosen by
    # name, and a prompt ready to run
    expect(textbox(page, "run-version")).to_have_value(re.compile(r"^lanes-trio v1"))
    expect(textbox(page, "run-weights")).to_have_value("lanes-trio v1 · shipped")
    expect(textbox(page, "prompt")).not_to_have_value("")
    expect(page.locator("#prompt-examples")).to_contain_text("prose and code")
    # the routed single-stream fusion, whose per-slot routing this test reads
    pick(page, "run-version", re.compile(r"^fused-token v1"))
    expect(textbox(page, "run-weights")).to_have_value("fused-token v1 · shipped")

    forward = mol.fused.FusedModel.forward

    def slow(self, *args, **kwargs):  # slow enough to watch the heatmap grow
        time.sleep(0.12)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mol.fused.FusedModel, "forward", slow)
    page.wait_for_selector("#run-prompt")
    watch_heatmap(page)
    page.click("#run-prompt")
    expect(page.locator("#run-status")).to_contain_text("Saved as run #", timeout=120_000)
    monkeypatch.undo()
    page.evaluate("clearInterval(window.__heatTimer)")

    run = studio.engine.repo.list_runs(limit=1)[0]
    trace = studio.engine.repo.get_run(run.id).trace
    assert run.settings["training_run_id"] and run.settings["max_new_tokens"] == 48
    n = len(trace["tokens"])
    # redrawn while streaming: several widths before the last, every one on the run's whole x range
    states = page.evaluate("window.__heat")
    growing = [s for s in states if s["cols"] < n]
    assert len(growing) >= 2, states
    assert all(s["range"] == growing[0]["range"] for s in growing)
    assert growing[0]["range"][1] >= n - 1.5

    drawn = page.evaluate("""() => { const gd = document.querySelector('#router-heatmap .js-plotly-plot');
        return {z: gd.data[0].z, legend: gd.data.slice(1).map(t => t.name)}; }""")
    keys, key_of = slot_keys(trace["slots"])
    assert drawn["legend"] == [label for label, _ in keys]
    assert len(drawn["z"]) == len(trace["slots"]) and all(len(row) == n for row in drawn["z"])
    # each cell: the chosen expert's hue, its gate probability's strength
    for s, slot in enumerate(trace["slots"]):
        for t, (probs, pick_) in enumerate(zip(slot["probs"], slot["chosen"], strict=True)):
            z = drawn["z"][s][t]
            assert math.floor(z) == key_of[s][slot["experts"][pick_[0]]]
            assert z - math.floor(z) == pytest.approx(
                min(gate_intensity(probs[pick_[0]], len(probs)), 0.999), abs=1e-6
            )
    # the shipped routers send tokens to more than one expert (as the drawn load bars say too)
    bars = page.evaluate("""() => Array.from(document.querySelector('#expert-load .js-plotly-plot').data,
        t => ({x: t.x, y: t.y}))""")
    assert any(sum(y > 0 for y in b["y"]) > 1 for b in bars), bars
    assert len({e for s in trace["slots"] for c in s["chosen"] for e in [s["experts"][c[0]]]}) > len(
        trace["slots"]
    )

    # hover an output token: its column of the heatmap is outlined
    prompt_n = page.locator("#output-tokens .tok.prompt[data-pos]").count()
    assert 0 < prompt_n < n
    pos = prompt_n + 3
    page.locator(f'#output-tokens .tok[data-pos="{pos}"]').hover()
    box = page.locator("#router-heatmap .mango-col-highlight")
    expect(box).to_be_visible()
    expect(page.locator("#router-heatmap")).to_have_attribute("data-highlight", str(pos))
    where = page.evaluate(f"""() => {{
        const gd = document.querySelector('{HEATMAP}'), xa = gd._fullLayout.xaxis;
        const b = document.querySelector('#router-heatmap .mango-col-highlight');
        return {{centre: b.offsetLeft + b.offsetWidth / 2, column: xa._offset + xa.l2p({pos}),
                 width: b.offsetWidth, cell: xa.l2p(1) - xa.l2p(0)}}; }}""")
    assert abs(where["centre"] - where["column"]) < 1.5 and abs(where["width"] - where["cell"]) < 1.5
    page.locator("#run-status").hover()  # leaving the strip removes the outline
    expect(box).to_have_count(0)

    # greedy: the sampling settings are off; ticking "Sample" turns them on
    page.get_by_text("Sampling").click()
    expect(page.locator("#temperature input[type=range]")).to_be_disabled()
    expect(page.locator("#top-p input[type=range]")).to_be_disabled()
    page.locator("#do-sample").get_by_label("Sample (off: greedy)").check()
    expect(page.locator("#temperature input[type=range]")).to_be_enabled()
    expect(page.locator("#top-k input[type=range]")).to_be_enabled()


def test_weights_are_chosen_by_label_everywhere(page):
    open_tab(page, "Playground")
    expect(textbox(page, "run-version")).to_have_value(re.compile(r"^lanes-trio v1"))
    names = options_of(page, "run-weights")
    assert names == ["as built (untrained adapters and routers)", "lanes-trio v1 · shipped"]
    expect(textbox(page, "run-weights")).to_have_value("lanes-trio v1 · shipped")
    pick(page, "run-version", re.compile(r"^fused-token v1"))
    names = options_of(page, "run-weights")
    assert names == ["as built (untrained adapters and routers)", "fused-token v1 · shipped"]
    expect(textbox(page, "run-weights")).to_have_value("fused-token v1 · shipped")
    pick(page, "run-version", re.compile(r"^fused-pooled v1"))
    expect(textbox(page, "run-weights")).to_have_value("fused-pooled v1 · shipped")

    open_tab(page, "Evaluate")
    pick(page, "eval-version", re.compile(r"^fused-token v1"))
    names = options_of(page, "eval-weights")
    assert "fused-token v1 · shipped" in names
    assert not any(re.fullmatch(r"#?\d+", n) for n in names)

    open_tab(page, "Recipe")
    pick(page, "version-pick", re.compile(r"^fused-token v1"))
    page.click("#open-version")
    expect(page.locator("#versions-status")).to_contain_text("Opened 'fused-token' version 1")
    page.get_by_text("Export the model").click()
    expect(textbox(page, "export-training-run")).to_have_value("fused-token v1 · shipped")
    names = options_of(page, "export-training-run")
    assert names == ["as built (untrained adapters and routers)", "fused-token v1 · shipped"]


def test_the_playground_fits_a_phone(browser, studio):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        pg.set_default_timeout(30_000)
        pg.goto(studio.url)
        pg.wait_for_selector("#layer-palette .layer-chip")
        open_tab_narrow(pg, "Playground")
        expect(textbox(pg, "run-weights")).to_have_value("lanes-trio v1 · shipped")
        pg.click("#run-prompt")
        expect(pg.locator("#run-status")).to_contain_text("Saved as run #", timeout=120_000)
        pg.wait_for_selector(HEATMAP)
        pg.locator("#output-tokens .tok[data-pos]").first.wait_for()
        overflow = pg.evaluate("""() => ({scroll: document.scrollingElement.scrollWidth, inner: innerWidth,
            wide: Array.from(document.querySelectorAll('#tab-playground *')).filter(e => {
                const r = e.getBoundingClientRect(); return r.width > 0 && r.right > innerWidth + 1; })
                .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)})""")
        assert overflow["scroll"] <= overflow["inner"], overflow
        heat = pg.locator(HEATMAP)
        heat.scroll_into_view_if_needed()
        expect(heat).to_be_visible()
        box = heat.bounding_box()
        assert box["width"] > 300 and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 1
        assert pg.locator("#router-heatmap svg .hm, #router-heatmap canvas").count() > 0  # really drawn
        # a tap on a token outlines its column on a touch screen too
        pg.locator("#output-tokens .tok[data-pos]").nth(2).dispatch_event("pointerover")
        expect(pg.locator("#router-heatmap .mango-col-highlight")).to_be_visible()
    finally:
        context.close()
    assert not problems, problems
