"""Headless Chromium (Debian's package, never a downloaded browser) driving a studio served in this process.
Without Chromium the browser tests skip, unless MANGO_REQUIRE_BROWSER=1 (set in CI), where they fail."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.studio_server import make_models_dir, start_studio

REPO = Path(__file__).resolve().parents[2]
DEMO_MODELS = REPO / "assets" / "models"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    for candidate in (
        os.environ.get("MANGO_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _unavailable(reason: str):
    if os.environ.get("MANGO_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (MANGO_REQUIRE_BROWSER=1 makes this a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    path = _chromium()
    if path is None:
        _unavailable("Chromium is not installed: `apt-get install chromium` to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


def screenshots_wanted() -> bool:
    return os.environ.get("MANGO_SCREENSHOTS") == "1"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny):
    """The studio on test-size copies of the demo family; with MANGO_SCREENSHOTS=1 on the shipped demo models
    (when present), so the committed screenshots show the real thing."""
    if screenshots_wanted() and any((d / "config.json").is_file() for d in DEMO_MODELS.glob("*")):
        models = DEMO_MODELS
    else:
        models = make_models_dir(tmp_path_factory.mktemp("browser-models"), tiny)
    running = start_studio(models, tmp_path_factory.mktemp("browser-db") / "studio.db")
    yield running
    running.close()


@pytest.fixture
def page(browser, studio):
    # The shipped demo family (screenshots) has more models than the test copies: a taller window keeps the
    # palette and the board in view together, as HTML drag and drop needs.
    context = browser.new_context(viewport={"width": 1440, "height": 1800 if screenshots_wanted() else 1000})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    local = ("http://127.0.0.1", "data:", "blob:")
    pg.on(
        "request",
        lambda r: None if r.url.startswith(local) else problems.append(f"external request: {r.url}"),
    )
    pg.set_default_timeout(30_000)
    pg.goto(studio.url)
    pg.wait_for_selector("#layer-palette .layer-chip")
    yield pg
    context.close()
    assert not problems, problems  # no script errors, and nothing fetched from outside (no CDN, no fonts)
