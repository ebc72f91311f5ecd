"""The HTML reports in a real headless browser: Debian's Chromium driven by Playwright.

Checked on the rendered page: the findings are the first thing on it and say what is wrong; every
plot is an inline PNG that decoded (natural size > 0); the page asked the network for nothing. A
full-page screenshot of each report is kept under ``tests/artifacts/audit/`` (ignored by git) and
in the test's tmp folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scenario import ARTIFACTS, copy_run, write_reports

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium is not installed at /usr/bin/chromium "
                                "(apt-get install -y chromium): the HTML report is checked in a real browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test dependency) drives Chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def _render(browser, html: Path, screenshot: Path) -> dict:
    """Open ``html`` offline, record every request, and read back what the page shows."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri(), wait_until="load")
    state = page.evaluate("""() => {
        const findings = document.querySelector('#findings');
        const firstSection = [...document.body.children].find(e => e.tagName === 'SECTION' || e.tagName === 'H2');
        const imgs = [...document.images].map(i => ({id: i.id, src: i.src.slice(0, 22), complete: i.complete,
                                                    width: i.naturalWidth, height: i.naturalHeight,
                                                    shown: i.getBoundingClientRect().width}));
        const first = document.querySelector('#findings .finding');
        return {findingsFirst: firstSection === findings, findingsTop: findings.getBoundingClientRect().top,
                firstFinding: first ? first.innerText : null, firstSeverity: first ? first.dataset.severity : null,
                imgs: imgs, title: document.title};
    }""")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    context.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(screenshot, ARTIFACTS / screenshot.name)
    return {**state, "requests": requests}


def _check_plots(state: dict, ids: set[str]) -> None:
    assert {i["id"] for i in state["imgs"]} == ids
    for img in state["imgs"]:
        assert img["src"] == "data:image/png;base64,"[:22] and img["complete"]
        assert img["width"] > 100 and img["height"] > 100 and img["shown"] > 100, img


def test_the_server_report_renders_findings_first_and_its_plots_inline(browser, reports, tmp_path):
    _, _, server_html, _ = reports
    state = _render(browser, server_html, tmp_path / "server-report.png")
    assert state["findingsFirst"] and state["firstSeverity"] == "warning"
    assert "expires on" in state["firstFinding"] and "startup/server.crt" in state["firstFinding"]
    _check_plots(state, {"plot-participation", "plot-bytes"})
    assert state["requests"] == [server_html.as_uri()]  # nothing but the page itself: no network
    assert (tmp_path / "server-report.png").stat().st_size > 10_000


def test_a_tampered_site_report_shows_the_critical_finding_at_the_top(browser, finished_run, tmp_path):
    import json

    run = copy_run(finished_run, tmp_path / "run")
    log = run.caches["site-1"] / "privacy" / "outgoing_payloads.jsonl"
    lines = log.read_text().splitlines()
    record = json.loads(lines[2])
    record["bytes"] += 1
    lines[2] = json.dumps(record, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    _, _, _, site_html = write_reports(run, tmp_path / "out")
    state = _render(browser, site_html, tmp_path / "site-report-tampered.png")
    assert state["findingsFirst"] and state["firstSeverity"] == "critical"
    assert "outgoing-payload log was edited" in state["firstFinding"]
    _check_plots(state, {"plot-epsilon", "plot-bytes"})
    assert state["requests"] == [site_html.as_uri()]


def test_the_empirical_report_renders_with_its_plot(browser, quick_empirical, tmp_path):
    state = _render(browser, quick_empirical["html"], tmp_path / "empirical-report.png")
    assert state["findingsFirst"]
    _check_plots(state, {"plot-empirical"})
    assert state["requests"] == [quick_empirical["html"].as_uri()]
