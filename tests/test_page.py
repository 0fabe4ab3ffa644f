"""The page at ``/`` in a real headless Chromium (Debian's ``chromium`` driven by Playwright for Python).

The server is the real one (uvicorn on a free loopback port) holding a tiny Aligner; what the page
shows is checked against the API's answer and a second, identical Aligner called directly.
Skipped when chromium or playwright is missing, unless CI is set: CI installs both (``.ci/run``).
"""

from __future__ import annotations

import colorsys
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LiveServer, make_aligner
from saealign.defaults import TOPICS_DIR
from saealign.serve.app import ServerLimits, create_app
from saealign.steering.spec import DEFAULT_METHOD, GenerationSpec

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXAMPLE = "medical"
PROMPT = "the cat sat on the"
TOKENS = 8
TIMEOUT_MS = 30_000


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium chromium-driver"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed: pip install 'playwright>=1.40' (no `playwright install`)"
    return None


MISSING = _missing()
if MISSING and not os.environ.get("CI"):
    pytest.skip(MISSING, allow_module_level=True)


@dataclass
class Site:
    url: str
    reference: Any
    """An Aligner identical to the served one, with its own model, for expected answers."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("page")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        served, reference = make_aligner(folder / "index"), make_aligner(folder / "index")
    limits = ServerLimits(max_new_tokens=64, max_streams=2)
    with LiveServer(create_app(served, limits)) as url:
        yield Site(url, reference)


@pytest.fixture(scope="module")
def page(site: Site) -> Iterator[Any]:
    """A Playwright page of a fresh headless Chromium; fails the test on any JavaScript error."""
    if MISSING:
        pytest.fail(f"{MISSING} (CI is set, so this fails instead of skipping)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.set_default_timeout(TIMEOUT_MS)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            yield tab
        finally:
            browser.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def rgb(css: str) -> tuple[int, ...]:
    """``(r, g, b)`` of a computed ``rgb(...)``/``rgba(...)`` colour."""
    return tuple(int(float(v)) for v in re.findall(r"[\d.]+", css)[:3])


def expected_rgb(contamination: float) -> tuple[int, ...]:
    """The colour app.js gives a token: hsl(120 (1 - c), 70%, 82%), green at 0 to red at 1."""
    hue = round(120 * (1 - contamination))
    return tuple(round(255 * v) for v in colorsys.hls_to_rgb(hue / 360, 0.82, 0.70))


def test_pick_a_topic_generate_and_see_coloured_tokens(page: Any, site: Site, tmp_path: Path) -> None:
    page.goto(site.url + "/")
    # the example list and model line come from /v1/examples and /health once the page has loaded
    page.wait_for_selector(f"#example-select option[value='{EXAMPLE}']", state="attached")
    assert "tiny-llama" in page.inner_text("#model-info")
    page.select_option("#example-select", EXAMPLE)
    texts = [t for t in (TOPICS_DIR / f"{EXAMPLE}.txt").read_text().splitlines() if t.strip()]
    assert page.input_value("#topic-texts").splitlines() == texts

    page.click("#score-btn")
    page.wait_for_selector("#latents tr.latent")
    page.wait_for_function("document.getElementById('topic-status').textContent.startsWith('topic ')")
    shown = page.eval_on_selector_all("#latents tr.latent", """rows => rows.map(r => ({
        latent: Number(r.dataset.latent), examples: [...r.querySelectorAll('li')].map(li => li.textContent)}))""")
    api = httpx.post(f"{site.url}/v1/topics", json={"texts": texts, "top": 10, "examples": 2}, timeout=30).json()
    assert api["id"] in page.inner_text("#topic-status")
    assert shown == [{"latent": r["latent"], "examples": r["examples"]} for r in api["top_latents"]]
    assert shown and all(len(row["examples"]) == 2 and all(row["examples"]) for row in shown)

    page.fill("#prompt", PROMPT)
    page.fill("#max-new-tokens", str(TOKENS))
    page.click("#generate-btn")
    page.wait_for_selector("#plain-output[data-done='true']", state="attached")
    page.wait_for_selector("#steered-output[data-done='true']", state="attached")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")

    plain, steered = page.inner_text("#plain-output"), page.inner_text("#steered-output")
    assert plain.strip() and steered.strip()
    tokens = page.eval_on_selector_all("#steered-output span.token", """spans => spans.map(s => ({
        text: s.textContent, c: s.dataset.contamination, bg: getComputedStyle(s).backgroundColor}))""")
    # the page shows exactly what the library streams for these options (the page's defaults: the default method,
    # error, the method's default strength, seed 0)
    default = GenerationSpec(DEFAULT_METHOD, "error", max_new_tokens=TOKENS)
    *want, _ = site.reference.stream(PROMPT, texts, default, seed=0)
    assert [t["text"] for t in tokens] == [w.text for w in want]
    for token, event in zip(tokens, want, strict=True):
        c = float(token["c"])
        assert 0.0 <= c <= 1.0 and c == pytest.approx(event.contamination, abs=1e-4)
        assert token["bg"] not in ("rgba(0, 0, 0, 0)", "transparent")
        assert all(abs(a - b) <= 2 for a, b in zip(rgb(token["bg"]), expected_rgb(c), strict=True)), token
    assert f"({len(want)} tokens" in page.inner_text("#steered-summary")
    assert f"strength {default.strength:g}" in page.inner_text("#steered-summary")  # the default resolved, shown
    *plain_want, _ = site.reference.stream(PROMPT, texts, GenerationSpec("none", max_new_tokens=TOKENS), seed=0)
    assert page.eval_on_selector_all("#plain-output span.token", "s => s.map(x => x.textContent)") == [
        w.text for w in plain_want]

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
