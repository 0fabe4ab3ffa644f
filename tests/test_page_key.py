"""The page on a server started with an API key: it asks for the key once and then works (headless Chromium).

Skipped when chromium or playwright is missing, unless CI is set (as tests/test_page.py).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LiveServer, make_aligner
from saealign.serve.app import ServerGuard, ServerLimits, create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
KEY = "page-test-key-123"
MISSING = (None if CHROMIUM.exists() and importlib.util.find_spec("playwright") is not None
           else "chromium (Debian) or the playwright package is missing")
if MISSING and not os.environ.get("CI"):
    pytest.skip(MISSING, allow_module_level=True)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("page_key")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        aligner = make_aligner(folder / "index")
    with LiveServer(create_app(aligner, ServerLimits(max_new_tokens=16), ServerGuard(api_key=KEY))) as served:
        yield served


def test_page_asks_for_the_key_once_and_then_scores(url: str) -> None:
    if MISSING:
        pytest.fail(f"{MISSING} (CI is set, so this fails instead of skipping)")
    from playwright.sync_api import sync_playwright

    asked: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(30_000)
            tab.on("pageerror", lambda e: errors.append(str(e)))

            def answer(dialog) -> None:  # noqa: ANN001 - a playwright Dialog
                asked.append(dialog.message)
                dialog.accept(KEY)

            tab.on("dialog", answer)
            tab.goto(url)
            # the examples come from /v1/examples, which needs the key: the page asked, then loaded them
            tab.wait_for_selector("#example-select option[value='medical']", state="attached")
            tab.select_option("#example-select", "medical")
            tab.click("#score-btn")
            tab.wait_for_selector("#latents tr.latent")
        finally:
            browser.close()
    assert asked == ["This server needs an API key:"] and not errors
