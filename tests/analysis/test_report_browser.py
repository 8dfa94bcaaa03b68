"""report.html in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it) opens the
page, which must log nothing to the console and load every plot image; a screenshot is kept under
out/browser/ as a CI artifact. Skipped, with the reason, only where chromium is absent outside CI."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from analysis_builders import build_sweep
from rich.console import Console

from llmwatts.analysis import ingest, report

REPO = Path(__file__).resolve().parents[2]
SWEEP = [(700, 1, 4.0, 50.0), (700, 8, 1.0, 120.0), (300, 8, 0.8, 200.0), (300, 1, 3.0, 60.0)]
CONSOLE = re.compile(r":CONSOLE[^\]]*\] (.*)")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") or os.environ.get("LLMWATTS_CI"):
            pytest.fail("chromium is missing in CI: .ci/run must install Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return path


def _run(chromium: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra, page.as_uri()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return CONSOLE.findall(stderr)


def test_the_console_check_catches_a_script_error(tmp_path):
    """The check below can fail: a page with a script error is caught."""
    chromium = _chromium()
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>missing_function();</script></body></html>")
    out = _run(chromium, page, tmp_path / "profile", "--dump-dom")
    assert any("missing_function" in m for m in console_messages(out.stderr)), out.stderr[-2000:]


def test_report_renders_in_chromium_without_console_errors(tmp_path):
    chromium = _chromium()
    built = build_sweep(tmp_path, SWEEP, simulated=True)
    study = tmp_path / "study.db"
    ingest.ingest(study, [built.server_db], [built.client_db])
    result = report.build_report(study, tmp_path / "out", sla_p95_ms=250,
                                 console=Console(file=open(os.devnull, "w")))
    page = result.report_html
    html = page.read_text()
    assert "http://" not in html and "https://" not in html.replace("https://arxiv", "")  # self-contained

    dom = _run(chromium, page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    images = dom.stdout.count("<img ")
    assert images >= 4
    assert f'data-images-ok="{images}/{images}"' in dom.stdout  # every plot decoded (naturalWidth > 0)

    shots = REPO / "out" / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    shot = _run(chromium, page, tmp_path / "profile2", "--window-size=1400,4000",
                f"--screenshot={shots / 'report.png'}")
    assert shot.returncode == 0 and (shots / "report.png").stat().st_size > 10000
