"""Acceptance, in Debian's Chromium: the policy view's privacy section and the owner's differential-privacy budget.

A real owner's broker on loopback keeps the budget of a DP dataset; JupyterLab's kernels are started with that
broker (``CONFNB_BROKER_URL``), open the DP dataset and an exact-mode one, and spend part of the budget. The panel
must show the exact dataset's rules, the DP dataset's ε, δ, per-kernel cap and unit, and the budget spent and
remaining as the broker reports it; when the budget cannot be had, it must say so and still show the policies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from .conftest import Lab, _unavailable, _write_notebook, chromium_path, launch_lab
from .test_attestation_panel import PANEL, open_notebook, run_cell, wait_for_verdict

pytestmark = pytest.mark.slow

DP_POLICY = """
[policy]
id = "admissions-dp-v1"
[release]
allow = ["schema", "row_count", "aggregate"]
never_release = ["patient_id"]
[privacy]
mode = "dp"
epsilon = 1.0
delta = 1e-6
epsilon_per_kernel = 0.5
unit = "patient_id"
public = ["row_count"]
[privacy.bounds]
cost = [0.0, 10000.0]
"""
EXACT_POLICY = """
[policy]
id = "visits-exact-v1"
[release]
allow = ["schema", "row_count", "aggregate"]
min_group_size = 12
"""
DP_SECTION = '#confnb-policy-view section.confnb-policy[data-dataset="admissions"] .confnb-privacy'
EXACT_SECTION = '#confnb-policy-view section.confnb-policy[data-dataset="visits"] .confnb-privacy'
OPEN_BOTH = (
    'import confnb as cn; a = cn.open("admissions"); v = cn.open("visits"); print("opened", a.count().release())'
)


@dataclass(frozen=True)
class Owner:
    broker_url: str
    datasets: Path


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path) -> Iterator[Owner]:
    """A DP dataset and an exact-mode one, encrypted for the simulated kernel, and their owner's broker."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.measurement import simulated_measurement

    root = tmp_path_factory.mktemp("dp-owner")
    store = OwnerStore.create(root / "store")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    rng = np.random.default_rng(11)
    frame = pd.DataFrame(
        {"patient_id": np.arange(600), "age": rng.integers(18, 90, 600), "cost": rng.gamma(2.0, 400.0, 600)}
    )
    for name, policy in (("admissions", DP_POLICY), ("visits", EXACT_POLICY)):
        encrypt_dataset(frame, root / "datasets" / name, store, name, OutputPolicy.from_toml(policy), attestation)
    with serve_locally(store) as url:
        yield Owner(url, root / "datasets")


@pytest.fixture(scope="module")
def lab(confnb_kernel_env: Path, owner: Owner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab whose kernels use the owner's broker and find the owner's datasets."""
    import confnb.server

    if not (Path(confnb.server.__file__).parent / "labextension" / "package.json").is_file():
        _unavailable("the lab extension is not built (pip install -e . builds it with node and jlpm)")
    chromium_path()
    root = tmp_path_factory.mktemp("lab-root-dp")
    _write_notebook(root / "budget.ipynb", "confnb-snp")
    _write_notebook(root / "no-budget.ipynb", "confnb-snp")
    env = {"CONFNB_BROKER_URL": owner.broker_url, "CONFNB_DATASET_PATH": str(owner.datasets)}
    with launch_lab(root, tmp_path_factory, env) as server:
        yield server


def test_the_policy_view_shows_the_privacy_mode_and_the_budget_the_broker_keeps(
    page: Any, lab: Lab, owner: Owner, artifacts_dir: Path
) -> None:
    open_notebook(page, lab, "budget.ipynb")
    wait_for_verdict(page, "verified")
    assert "opened 600" in run_cell(page, OPEN_BOTH)
    page.click("#confnb-policy-refresh")

    # Exact mode: the rules that protect exact numbers, in one line.
    exact = page.locator(EXACT_SECTION)
    exact.wait_for()
    assert exact.get_attribute("data-mode") == "exact"
    assert exact.inner_text().endswith("exact (minimum group size 12, difference checks on)")

    # DP: the owner's budget, and what the broker says is left of it (nothing spent yet).
    section = page.locator(DP_SECTION)
    assert section.get_attribute("data-mode") == "dp"
    page.wait_for_selector(f'{DP_SECTION} .confnb-budget[data-state="ok"]')
    assert section.locator(".confnb-privacy-total").inner_text() == "ε = 1 (δ = 1e-6)"
    assert section.locator(".confnb-privacy-cap").inner_text() == "at most ε = 0.5"
    assert section.locator(".confnb-privacy-unit").inner_text() == "one person is patient_id, up to 1 row each"
    budget = section.locator(".confnb-budget")
    assert budget.get_attribute("data-epsilon-remaining") == "1"
    assert "ε 0 spent, 1 remaining of 1" in budget.inner_text()

    # A noisy release is charged at the broker; after a refresh the panel shows what it spent.
    released = run_cell(page, "print(a.cost.sum().release(epsilon=0.25))")
    assert "PolicyViolation" not in released, released
    page.click("#confnb-policy-refresh")
    page.wait_for_selector(f'{DP_SECTION} .confnb-budget[data-state="ok"][data-epsilon-spent="0.25"]')
    text = budget.inner_text()
    assert "ε 0.25 spent, 0.75 remaining of 1" in text, text
    assert "1 release paid" in text and owner.broker_url in text, text
    assert page.locator(f"{DP_SECTION} progress").evaluate("bar => bar.value / bar.max") == pytest.approx(0.25)
    page.locator("#confnb-policy-view").screenshot(path=str(artifacts_dir / "policy-view-dp-budget.png"))


def test_an_unavailable_budget_is_said_so_and_the_policies_still_show(page: Any, lab: Lab) -> None:
    """The server extension fails (as when the broker is down): the panel says why, and shows the rest."""
    page.route(
        re.compile(r".*/confnb/api/kernels/[^/]+/budgets.*"),
        lambda route: route.fulfill(
            status=502, content_type="application/json", json={"message": "the kernel did not answer in time"}
        ),
    )
    open_notebook(page, lab, "no-budget.ipynb")
    wait_for_verdict(page, "verified")
    run_cell(page, OPEN_BOTH)
    page.click("#confnb-policy-refresh")
    page.wait_for_selector(f'{DP_SECTION} .confnb-budget[data-state="unavailable"]')
    budget = page.locator(f"{DP_SECTION} .confnb-budget").inner_text()
    assert budget.startswith("Budget unavailable: ") and "did not answer in time" in budget, budget
    # The rest of the policy stays: the owner's total, the explanation, and the exact dataset's rules.
    assert page.locator(f"{DP_SECTION} .confnb-privacy-total").inner_text() == "ε = 1 (δ = 1e-6)"
    assert page.locator(f"{PANEL} section.confnb-policy[data-dataset='admissions'] li").count() > 0
    assert page.locator(EXACT_SECTION).get_attribute("data-mode") == "exact"
