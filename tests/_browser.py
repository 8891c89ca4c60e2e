"""Load a page in headless Chromium (Debian's ``chromium``) and report what it did.

``render(path)`` opens a local HTML file, lets its scripts run, and returns the DOM after they
ran, every console message the page logged (uncaught errors among them) and, if asked, a PNG
screenshot. Chromium runs with a fresh profile and no network access of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
_CONSOLE = re.compile(r':CONSOLE(?:\(\d+\))?:?\d*\] "(.*)", source: (.*)')


def chromium() -> str:
    """The Chromium executable; skipped only where no browser is installed and
    ``CIRCUITKIT_REQUIRE_BROWSER`` is unset (CI sets it, so there a missing browser fails)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CIRCUITKIT_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (CIRCUITKIT_REQUIRE_BROWSER is set) but not found")
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    return path


@dataclass
class Rendered:
    dom: str
    console: list[str]
    screenshot: Path | None


def render(page: Path, *, screenshot: Path | None = None, budget_ms: int = 15000) -> Rendered:
    """Open ``page`` in headless Chromium; the DOM after its scripts ran, and its console."""
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *_FLAGS, f"--user-data-dir={profile}"]
        common.append(f"--virtual-time-budget={budget_ms}")
        done = subprocess.run(
            [*common, "--dump-dom", page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        if screenshot is not None:
            subprocess.run(
                [
                    *common,
                    "--window-size=1280,2000",
                    f"--screenshot={screenshot}",
                    page.resolve().as_uri(),
                ],
                capture_output=True,
                timeout=180,
                check=True,
            )
    console = [m.group(1) for m in map(_CONSOLE.search, done.stderr.splitlines()) if m]
    return Rendered(done.stdout, console, screenshot)


def figures_rendered(dom: str) -> list[int]:
    """For each plotly figure on the page, the number of drawn SVG elements inside it."""
    counts = []
    for block in dom.split('class="ck-figure"')[1:]:
        figure = block.split("</figure>")[0]
        counts.append(len(re.findall(r"<(?:path|rect|image|text)\b", figure)))
    return counts
