"""Schemathesis against the broker's own OpenAPI document, over real HTTP: no request may cause a 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from confnb.attest import Verifier
from confnb.broker.audit import verify_log
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    owner = tmp_path_factory.mktemp("broker") / "owner"
    store = OwnerStore.create(owner)
    store.register_dataset(
        "claims", OutputPolicy.from_toml('[policy]\nid = "p"\n'), "[attestation]\nallow_simulated = true\n"
    )
    with serve_locally(store, Verifier()) as url:
        yield store, schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_generated_request_causes_a_server_error(served):
    store, schema = served
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/challenge",
        "POST /v1/datasets/{dataset_id}/key-release",
        "GET /v1/owner",
    }
    calls = 0
    for operation in operations:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def call(case) -> None:
            nonlocal calls
            response = case.call()
            calls += 1
            assert response.status_code < 500, (case.path, case.body, response.status_code, response.text[:500])

        call()
    assert calls > 100
    assert verify_log(store.directory / "audit.sqlite", store.owner_public_key).ok
