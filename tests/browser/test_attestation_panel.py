"""Acceptance, in Debian's Chromium: the attestation panel, the status badge, and the encrypted upload.

Every test opens a notebook in a real JupyterLab, whose kernel is a real confnb-snp kernel on the simulated TEE,
and reads only what the page shows. The panel's verdict needs both the server extension's verification and the
browser's own WebCrypto check of the same evidence against the nonce the browser chose; the last test stands in
for a compromised Jupyter server that reports success over evidence it altered, and the panel must still fail.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

PANEL = "#confnb-attestation-panel"
BADGE = "#confnb-status-badge"
UPLOAD = "#confnb-upload-button"
VERIFY_TIMEOUT_MS = 90_000  # the first kernel start also measures the enclave code and generates its keys

# Every change of the panel's verdict and of the upload button, as the page saw it, from the first paint on.
RECORD_STATES = """
window.__confnbStates = [];
const record = () => {
  const panel = document.getElementById('confnb-attestation-panel');
  const button = document.getElementById('confnb-upload-button');
  const state = {
    status: panel ? panel.dataset.status : null,
    disabled: button ? button.disabled : null,
  };
  const last = window.__confnbStates[window.__confnbStates.length - 1];
  if (!last || last.status !== state.status || last.disabled !== state.disabled) {
    window.__confnbStates.push({ ...state, at: performance.now() });
  }
};
setInterval(record, 5);
"""


def open_notebook(page: Any, lab: Any, name: str, *, keyboard: bool = False) -> None:
    page.add_init_script(RECORD_STATES)
    # A workspace of its own: Lab would otherwise restore the tabs an earlier test left open, and the panel
    # follows whichever notebook is current.
    page.goto(lab.page_url(f"/lab/workspaces/{Path(name).stem}-{secrets.token_hex(4)}/tree/{name}") + "&reset")
    if keyboard:  # found by its role and accessible name, as a screen reader finds it, and opened with Enter
        page.get_by_role("button", name=re.compile(r"^Kernel attestation: .+ Open the attestation panel\.$")).focus()
        page.keyboard.press("Enter")
    else:
        page.click(BADGE)  # the badge opens the panel in the right sidebar
    page.wait_for_selector(PANEL, state="visible")


def wait_for_verdict(page: Any, status: str) -> None:
    page.wait_for_selector(f'{PANEL}[data-status="{status}"]', timeout=VERIFY_TIMEOUT_MS)


def checks(page: Any) -> dict[str, bool]:
    found = page.eval_on_selector_all(
        f"{PANEL} li.confnb-check", "items => items.map(item => [item.dataset.check, item.dataset.ok])"
    )
    return {name: ok == "true" for name, ok in found}


def test_panel_verifies_the_simulated_kernel(page: Any, lab: Any, artifacts_dir: Path) -> None:
    open_notebook(page, lab, "attested.ipynb")
    wait_for_verdict(page, "verified")
    panel = page.locator(PANEL)

    assert panel.get_attribute("data-simulated") == "true"
    assert page.locator(f"{PANEL} .confnb-simulated-banner").is_visible()
    assert banner_contrast(page) >= 4.5
    assert page.locator(BADGE).get_attribute("data-state") == "simulated"
    verdicts = checks(page)
    assert verdicts, "the panel lists no checks"
    assert all(verdicts.values()), f"failing checks on a verified panel: {verdicts}"
    for required in (
        "report_signature",
        "browser.report_signature",
        "browser.nonce",
        "browser.ark_pinned",
        "agreement",
    ):
        assert verdicts.get(required) is True, f"check {required} missing from the panel"

    # The upload button was disabled for as long as the panel was not verified, and is enabled now.
    states = page.evaluate("window.__confnbStates")
    assert any(state["status"] == "pending" and state["disabled"] is True for state in states), states
    shown = [state for state in states if state["status"] is not None]  # before Lab draws the panel: nothing
    assert all(state["disabled"] is True for state in shown if state["status"] != "verified"), states
    assert page.locator(UPLOAD).is_enabled()

    page.screenshot(path=str(artifacts_dir / "attestation-panel.png"))  # Lab with the panel open beside the notebook
    panel.screenshot(path=str(artifacts_dir / "attestation-panel-full.png"))  # the whole panel, scrolled out
    first_verified = next(state["at"] for state in states if state["status"] == "verified")
    timings = {
        "navigation_to_verified_ms": round(first_verified, 1),
        "request_to_verified_ms": float(panel.get_attribute("data-verify-ms") or "nan"),
    }
    (artifacts_dir / "time-to-verified.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"time to a verified panel: {timings}")

    # "Verify again" asks for fresh evidence: a new nonce, verified again.
    nonce = panel.get_attribute("data-nonce")
    page.click("#confnb-verify-again")
    page.wait_for_function(
        "nonce => { const p = document.getElementById('confnb-attestation-panel');"
        " return p.dataset.status === 'verified' && p.dataset.nonce !== nonce; }",
        arg=nonce,
        timeout=VERIFY_TIMEOUT_MS,
    )
    bundle = json.loads(page.locator("#confnb-evidence-json").text_content() or "")
    assert bundle["format"] == "confnb-evidence/1"
    assert bundle["claims"]["nonce"] == panel.get_attribute("data-nonce") != nonce


# Lab's theme variables resolved on a probe inside the panel, against what the panel itself computes to.
THEME_COLORS = """
panel => {
  const probe = document.createElement('div');
  probe.style.background = 'var(--jp-layout-color1)';
  probe.style.color = 'var(--jp-ui-font-color1)';
  panel.appendChild(probe);
  const expected = getComputedStyle(probe);
  const sidebar = getComputedStyle(panel.closest('.confnb-Sidebar') || panel);
  const result = {
    background: sidebar.backgroundColor, expected_background: expected.backgroundColor,
    color: sidebar.color, expected_color: expected.color,
  };
  probe.remove();
  return result;
}
"""


def _luminance(css_color: str) -> float:
    """WCAG 2 relative luminance of an opaque ``rgb(r, g, b)``."""

    def linear(channel: float) -> float:
        return channel / 12.92 if channel <= 0.04045 else ((channel + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(int(part) / 255) for part in re.findall(r"\d+", css_color)[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def banner_contrast(page: Any) -> float:
    """WCAG contrast ratio of the SIMULATED banner's text on its background (4.5 is the AA minimum)."""
    colors = page.locator(f"{PANEL} .confnb-simulated-banner").evaluate(
        "banner => { const style = getComputedStyle(banner); return [style.color, style.backgroundColor]; }"
    )
    lighter, darker = sorted((_luminance(color) for color in colors), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_the_panel_works_from_the_keyboard_and_follows_the_dark_theme(page: Any, lab: Any, artifacts_dir: Path) -> None:
    lab.put_setting("@jupyterlab/apputils-extension:themes", {"theme": "JupyterLab Dark"})
    try:
        open_notebook(page, lab, "attested.ipynb", keyboard=True)
        wait_for_verdict(page, "verified")
        page.wait_for_selector('body[data-jp-theme-name="JupyterLab Dark"]', state="attached")

        # The verdict is announced to assistive technology, and every control has a name it can read out.
        verdict = page.locator(f"{PANEL} .confnb-verdict")
        assert verdict.get_attribute("role") == "status" and verdict.get_attribute("aria-live") == "polite"
        assert page.get_by_label("File (CSV, Parquet or Arrow)").is_enabled()
        assert page.get_by_role("button", name="Encrypt and upload").is_enabled()
        assert page.get_by_role("button", name="Verify again").is_enabled()

        # "Verify again" from the keyboard: fresh evidence under a new nonce.
        nonce = page.locator(PANEL).get_attribute("data-nonce")
        page.get_by_role("button", name="Verify again").focus()
        page.keyboard.press("Enter")
        page.wait_for_function(
            "nonce => { const p = document.getElementById('confnb-attestation-panel');"
            " return p.dataset.status === 'verified' && p.dataset.nonce !== nonce; }",
            arg=nonce,
            timeout=VERIFY_TIMEOUT_MS,
        )

        # The panel draws with the dark theme's own colours: dark background, light text.
        colors = page.locator(PANEL).evaluate(THEME_COLORS)
        assert colors["background"] == colors["expected_background"], colors
        assert colors["color"] == colors["expected_color"], colors
        assert _luminance(colors["background"]) < 0.1 < _luminance(colors["color"]), colors
        assert banner_contrast(page) >= 4.5  # SIMULATED stays impossible to miss on a dark background
        page.screenshot(path=str(artifacts_dir / "attestation-panel-dark.png"))
    finally:
        lab.put_setting("@jupyterlab/apputils-extension:themes", {"theme": "JupyterLab Light"})


def run_cell(page: Any, code: str) -> str:
    """Put code into the notebook's last cell, run it, and return the text of its output."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    cell = cells.nth(cells.count() - 1)  # fixed now: running it appends a new last cell
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea-output")
    output.first.wait_for(timeout=60_000)
    page.wait_for_function(
        "cell => !cell.querySelector('.jp-InputPrompt').textContent.includes('*')", arg=cell.element_handle()
    )
    return "\n".join(output.all_inner_texts())


def test_uploaded_csv_arrives_in_the_kernel_as_a_sealed_dataset(page: Any, lab: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rows = 80_000  # about 1.7 MiB of CSV: more than one 1 MiB segment of the streaming format
    visits = pd.DataFrame(
        {
            "visit_id": np.arange(rows),
            "region": rng.choice(["north", "south", "east", "west"], rows),
            "age": rng.integers(18, 90, rows),
            "cost": rng.gamma(2.0, 400.0, rows).round(2),
        }
    )
    source = tmp_path / "visits.csv"
    visits.to_csv(source, index=False)
    assert source.stat().st_size > 1 << 20

    open_notebook(page, lab, "upload.ipynb")
    wait_for_verdict(page, "verified")
    page.fill("#confnb-upload-name", "visits")
    page.select_option("#confnb-upload-policy", "aggregates-10")
    page.set_input_files("#confnb-upload-file", str(source))
    page.click(UPLOAD)
    status = page.locator("#confnb-upload-status")
    page.wait_for_selector('#confnb-upload-status[data-state="done"]', timeout=120_000)
    assert f"{rows:,}" in status.inner_text() or str(rows) in status.inner_text(), status.inner_text()
    page.wait_for_selector('#confnb-policy-view section.confnb-policy[data-dataset="visits"]')

    # In the kernel the upload is a sealed dataset: aggregates come out, rows do not.
    released = run_cell(
        page, 'import confnb as cn; t = cn.open("visits"); t.group_by("region").agg(n=("age", "count")).release()'
    )
    expected = visits.groupby("region")["age"].count()
    for region, count in expected.items():
        assert re.search(rf"{region}\s+{count}\b", released), released
    refused = run_cell(
        page,
        "try:\n"
        '    t.filter(cn.col("visit_id") < 3).agg(mean_cost=("cost", "mean")).release()\n'
        "except cn.PolicyViolation as refusal:\n"
        '    print(f"PolicyViolation: {refusal}")',
    )
    assert "PolicyViolation" in refused and "min_group_size" in refused, refused
    assert str(visits["cost"].iloc[:3].mean()) not in refused


def test_a_restarted_kernel_is_verified_afresh_and_upload_waits_for_it(page: Any, lab: Any) -> None:
    """A restart is a new launch with new keys: the old verdict must not carry over to the new kernel."""
    open_notebook(page, lab, "restarted.ipynb")
    wait_for_verdict(page, "verified")
    before = json.loads(page.locator("#confnb-evidence-json").text_content() or "")
    verified_at = len(page.evaluate("window.__confnbStates"))

    page.get_by_role("menuitem", name="Kernel").click()
    page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel…")).click()
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()  # "Restart"
    page.wait_for_function(
        "claims => { const p = document.getElementById('confnb-attestation-panel');"
        " const shown = document.getElementById('confnb-evidence-json');"
        " if (p.dataset.status !== 'verified' || !shown) return false;"
        " return JSON.parse(shown.textContent).claims.hpke_public_key !== claims.hpke_public_key; }",
        arg=before["claims"],
        timeout=VERIFY_TIMEOUT_MS,
    )
    after = json.loads(page.locator("#confnb-evidence-json").text_content() or "")
    assert after["claims"]["nonce"] != before["claims"]["nonce"]

    # Between the two verdicts the panel went back to pending, and upload was disabled all that time.
    since = page.evaluate("window.__confnbStates")[verified_at:]
    assert any(state["status"] != "verified" for state in since), since
    assert all(state["disabled"] is True for state in since if state["status"] != "verified"), since
    assert page.locator(UPLOAD).is_enabled()


def test_tampered_evidence_fails_and_keeps_upload_disabled(page: Any, lab: Any) -> None:
    open_notebook(page, lab, "tampered.ipynb")
    wait_for_verdict(page, "failed")
    verdicts = checks(page)
    assert verdicts.get("report_signature") is False, verdicts
    assert verdicts.get("browser.report_signature") is False, verdicts
    assert page.locator(BADGE).get_attribute("data-state") == "failed"
    assert page.locator(UPLOAD).is_disabled()


def test_a_compromised_server_cannot_fake_a_verified_panel(page: Any, lab: Any) -> None:
    """The server says "verified" about evidence it altered; the browser's own check must catch it."""

    def tamper(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        if body.get("evidence"):
            import base64

            report = bytearray(base64.b64decode(body["evidence"]["report"]))
            report[0x90] ^= 0x01  # one bit of the launch measurement
            body["evidence"]["report"] = base64.b64encode(bytes(report)).decode()
        route.fulfill(response=response, json=body)

    page.route(re.compile(r".*/confnb/api/kernels/[^/]+/attestation.*"), tamper)
    open_notebook(page, lab, "compromised.ipynb")
    wait_for_verdict(page, "failed")
    verdicts = checks(page)
    assert verdicts.get("report_signature") is True, f"the server's own verdict was meant to pass here: {verdicts}"
    assert verdicts.get("browser.report_signature") is False, verdicts
    assert page.locator(UPLOAD).is_disabled()


def test_a_plain_kernel_is_shown_as_not_confidential(page: Any, lab: Any) -> None:
    open_notebook(page, lab, "plain.ipynb")
    page.wait_for_selector(f'{BADGE}[data-state="not-confidential"]', timeout=VERIFY_TIMEOUT_MS)
    wait_for_verdict(page, "failed")
    assert page.locator(UPLOAD).is_disabled()
