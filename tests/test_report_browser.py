"""The report in a real headless Chromium, when one is installed (`chromium`, `chromium-browser` or
`google-chrome` on PATH; skipped with the reason otherwise): screenshots at 1400 and 420 px are
written and are not blank, and at 420 px the page is no wider than the screen (a wide table
scrolls inside its own box, not the page).

SELFALIGN_REPORT_SCREENSHOTS=DIR keeps the screenshots there (report_1400.png, report_420.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import make_run

from selfalign.run.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
HEIGHT = 2000
pytestmark = pytest.mark.slow  # three Chromium launches


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> str:
    path = _browser()
    if path is None:
        pytest.skip(
            f"no headless Chromium on PATH ({', '.join(BROWSERS)}); apt-get install chromium"
        )
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(make_run(tmp_path_factory.mktemp("browser") / "run"))


def chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to run as root without it (containers, CI)
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def assert_not_blank(path: Path, width: int) -> None:
    """A screenshot of a page, not of an empty or single-colour window."""
    try:
        from PIL import Image, ImageStat
    except ImportError:  # without PIL: a blank PNG compresses to a few kB
        assert path.stat().st_size > 30_000, f"{path}: {path.stat().st_size} bytes, blank?"
        return
    with Image.open(path) as image:
        assert image.size == (width, HEIGHT)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, f"{path}: {len(colours)} colours, blank?"
        assert max(ImageStat.Stat(rgb.convert("L")).stddev) > 10, f"{path}: flat, blank?"


@pytest.mark.parametrize("width", [1400, 420])
def test_screenshot_is_not_blank(browser, report, tmp_path, width):
    shot = tmp_path / f"report_{width}.png"
    done = chromium(browser, f"--screenshot={shot}", f"--window-size={width},{HEIGHT}",
                    report.as_uri())  # fmt: skip
    assert shot.exists(), done.stderr[-2000:]
    assert_not_blank(shot, width)
    if keep := os.environ.get("SELFALIGN_REPORT_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


# Measures the page once laid out: its width and how wide its content is, and what sticks out
# (an element past the right edge that no scrolling box holds), posted to the frame around it.
PROBE = """<script>addEventListener("load", function () {
  var root = document.documentElement, width = root.clientWidth, out = [];
  function held(e) {
    for (var p = e.parentElement; p && p !== document.body; p = p.parentElement) {
      if (getComputedStyle(p).overflowX !== "visible" || (p.tagName === "DETAILS" && !p.open))
        return true;
    }
    return false;
  }
  document.querySelectorAll("body *").forEach(function (e) {
    if (e.getBoundingClientRect().right > width + 1 && !held(e))
      out.push(e.tagName + "." + e.className + ": " + (e.textContent || "").slice(0, 60));
  });
  parent.postMessage(JSON.stringify({width: width, content: root.scrollWidth, out: out}), "*");
});</script>"""
FRAME = """<!doctype html><html><body style="margin:0">
<iframe src="probe.html" width="{width}" height="1200" style="border:0"></iframe>
<pre id="result">none</pre><script>addEventListener("message", function (e) {{
  document.getElementById("result").textContent = e.data; }});</script></body></html>"""


def test_nothing_runs_off_a_420_px_screen(browser, report, tmp_path):
    """Laid out 420 px wide (in a frame: a headless window is at least 500 px wide), the page's
    content is no wider than the page."""
    page = report.read_text(encoding="utf-8")
    (tmp_path / "probe.html").write_text(page.replace("</body>", PROBE + "</body>"))
    (tmp_path / "frame.html").write_text(FRAME.format(width=420))
    done = chromium(browser, "--virtual-time-budget=10000", "--window-size=800,1400",
                    "--dump-dom", (tmp_path / "frame.html").as_uri())  # fmt: skip
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found and found[1] != "none", done.stderr[-2000:]
    result = json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))
    assert result["width"] <= 420
    assert result["content"] <= result["width"], result["out"]
