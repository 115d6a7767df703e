"""Each report kind rendered by a real browser (Debian's ``chromium-headless-shell``, run
from its command line: no debugging port, host names resolve nowhere, so the page can
fetch nothing): the page fits 1280 pixels without horizontal scrolling (with its folded
figures opened too), every image decodes and the summary is there. Screenshots are saved
under ``test-artifacts/report/``."""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from modelguard.services.pruning_orchestrator.report import build_report
from modelguard.store.local import LocalStore
from tests.requirements import require_binary
from tests.unit.services.pruning_orchestrator import report_cases

WIDTH = 1280
ARTIFACTS = Path(__file__).resolve().parents[4] / "test-artifacts" / "report"
BROWSER_SECONDS = 60

#: Run in the page once it has loaded: measures it with its folded figures closed, then
#: opened, and writes the findings into an attribute that ``--dump-dom`` prints.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const overflow = () => root.scrollWidth - root.clientWidth;
  const closed = overflow();
  document.querySelectorAll("details").forEach((d) => { d.open = true; });
  const opened = overflow();
  const images = [...document.images].map((i) => ({
    alt: i.alt, decoded: i.complete && i.naturalWidth > 0, width: i.getBoundingClientRect().width,
  }));
  const summary = document.getElementById("summary");
  document.body.setAttribute("data-check", JSON.stringify({
    width: root.clientWidth, closed, opened, images,
    summary: summary ? summary.innerText : null,
    badges: summary ? summary.querySelectorAll(".badge").length : 0,
  }));
});
</script></body>"""


class Chromium:
    """Runs ``chromium-headless-shell`` once per call in its own process group, which is
    killed if it outlives the call (the browser's helper processes with it)."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary = binary
        self.profile = profile

    def run(self, page: Path, *arguments: str) -> str:
        command = [
            self.binary,
            "--no-sandbox",  # tests may run as root (containers), where the sandbox refuses
            "--disable-gpu",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: a report fetches nothing
            f"--user-data-dir={self.profile}",
            f"--window-size={WIDTH},1000",
            "--virtual-time-budget=5000",
            *arguments,
            page.as_uri(),
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = process.communicate(timeout=BROWSER_SECONDS)
        finally:
            with contextlib.suppress(ProcessLookupError):  # already gone: nothing to stop
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.returncode != 0:
            raise AssertionError(f"{self.binary} exited with {process.returncode}")
        return out


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = require_binary("chromium-headless-shell", "Chromium (Debian chromium-headless-shell)")
    yield Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))


def _check(chromium: Chromium, page: str, path: Path) -> dict[str, Any]:
    path.write_text(page.replace("</body>", CHECK_SCRIPT, 1))
    dom = chromium.run(path, "--dump-dom")
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, "the check script did not run"
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return result


@pytest.mark.parametrize("case", list(report_cases.CASES))
def test_report_renders_in_a_browser(chromium: Chromium, tmp_path: Path, case: str) -> None:
    store = LocalStore(tmp_path / "store")
    _, report_html = build_report(report_cases.CASES[case](store), store, finished_at=1.0)
    page = report_html.decode()

    check = _check(chromium, page, tmp_path / "checked.html")
    assert check["closed"] <= 0 and check["opened"] <= 0, f"horizontal overflow: {check}"
    assert check["width"] <= WIDTH
    assert check["images"], "no image rendered"
    undecoded = [image["alt"] for image in check["images"] if not image["decoded"]]
    assert not undecoded, f"images not decoded: {undecoded}"
    assert check["summary"] and "What to do next" in check["summary"]
    assert check["badges"] == len(report_cases.CASES[case](store).stages)  # one per stage

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shown = tmp_path / "report.html"
    shown.write_text(page)
    screenshot = ARTIFACTS / f"{case}.png"
    screenshot.unlink(missing_ok=True)
    chromium.run(shown, "--hide-scrollbars", f"--screenshot={screenshot}")
    with Image.open(screenshot) as image:
        assert image.size[0] == WIDTH
    print(f"screenshot: {screenshot}")


def test_the_check_sees_overflow_and_broken_images(chromium: Chromium, tmp_path: Path) -> None:
    """The assertions above can fail: a too-wide page and an undecodable image are seen."""
    page = (
        '<!doctype html><html><body><div style="width:2000px">wide</div>'
        '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>'
    )
    check = _check(chromium, page, tmp_path / "bad.html")
    assert check["closed"] > 0
    assert check["images"] == [
        {"alt": "broken", "decoded": False, "width": check["images"][0]["width"]}
    ]
    assert check["summary"] is None
