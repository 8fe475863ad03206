"""The report page in a real headless Chromium: it loads without console errors and every plot shows.

Slow (starts a browser): ``make test-all``, or ``.venv/bin/python -m pytest -m slow tests/e2e/test_report_browser.py``.
Needs Debian's ``chromium``; without it the test fails with the install command. The screenshot is
kept under ``$EVERGREEN_ARTIFACTS`` (else the test's tmp_path) and its path printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from evergreen.report import render_report
from tests.e2e.browser import INSTALL, Chromium, PageResult, chromium_binary
from tests.unit.telemetry.report_runs import make_run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def require_chromium() -> None:
    if chromium_binary() is None:  # fail, not skip: a skipped browser check would hide a broken page
        pytest.fail(f"chromium is not installed; the report's browser test needs it:  {INSTALL}")


def experiment(root: Path) -> list[Path]:
    """Three groups (two with several seeds), task switches, evaluations and continual.json: every plot."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = []
    for interventions, seeds in (("", (0, 1, 2)), ("redo", (0, 1)), ("layer_norm", (0,))):
        for seed in seeds:
            dirs.append(make_run(root, f"{interventions or 'base'}-s{seed}", interventions=interventions, seed=seed,
                                 offset=2.0 * seed + (3.0 if interventions else 0.0), evaluations=True,
                                 continual={"average_performance": 10.0 + seed, "forgetting": {"Pong": 1.0 + seed}}))
    return dirs


def artifact_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("EVERGREEN_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_page(result: PageResult, expected_images: int) -> None:
    """The page's checks: no console errors, every image decoded, as many images as plots written."""
    assert not result.console_errors, f"console errors: {result.console_errors}"
    assert not result.broken_images(), f"images that did not load: {result.broken_images()}"
    assert len(result.images) == expected_images, (
        f"{len(result.images)} <img> on the page, {expected_images} plots written: {[i['alt'] for i in result.images]}")


def test_report_page_in_headless_chromium(tmp_path, record_property):
    require_chromium()
    page = render_report(experiment(tmp_path / "runs"), out=tmp_path / "report")
    plots = sorted(p.stem for p in page.parent.glob("*.png"))
    assert plots == sorted(["learning_curve", "evaluation", "plasticity", "throughput", "losses", "interventions"])
    with Chromium(tmp_path / "browser") as browser:
        result = browser.open(page)
    shot = artifact_dir(tmp_path) / "report-browser.png"
    shot.write_bytes(result.screenshot)
    record_property("screenshot", str(shot))
    print(f"report screenshot: {shot}")
    check_page(result, expected_images=len(plots))
    assert sorted(i["alt"] for i in result.images) == plots
    assert all(i["naturalWidth"] > 300 and i["naturalHeight"] > 200 for i in result.images), result.images
    assert result.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(result.screenshot) > 50_000


def test_the_check_fails_on_a_broken_image_and_console_errors(tmp_path):
    """The checks above can fail: a report with one image's data corrupted, and a page that logs errors."""
    require_chromium()
    page = render_report(experiment(tmp_path / "runs")[:2], out=tmp_path / "report")
    text = page.read_text()
    broken = re.sub(r'(<img alt="losses" src="data:image/png;base64,)[^"]+', r"\1AAAAbroken", text, count=1)
    assert broken != text
    page.write_text(broken)
    noisy = tmp_path / "noisy.html"
    noisy.write_text('<!doctype html><html><body><img alt="gone" src="missing.png">'
                     '<script>console.error("boom"); undefined_function();</script></body></html>')
    with Chromium(tmp_path / "browser") as browser:
        report, errors = browser.open(page), browser.open(noisy)
    with pytest.raises(AssertionError, match="images that did not load.*losses"):
        check_page(report, expected_images=len(list(page.parent.glob("*.png"))))
    assert [i["alt"] for i in report.broken_images()] == ["losses"]
    assert any("console.error: boom" in e for e in errors.console_errors), errors.console_errors
    assert any("undefined_function" in e for e in errors.console_errors), errors.console_errors
    assert [i["alt"] for i in errors.broken_images()] == ["gone"]
    with pytest.raises(AssertionError, match="console errors"):
        check_page(errors, expected_images=1)
