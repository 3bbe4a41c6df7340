"""Schemathesis against the broker's own OpenAPI document, over real HTTP: no request may cause a 500, and every
response, refusals included, must be one the document describes (status, content type, headers, body schema)."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from confnb.attest import Verifier
from confnb.broker.audit import verify_log
from confnb.broker.limits import BrokerLimits
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    owner = tmp_path_factory.mktemp("broker") / "owner"
    store = OwnerStore.create(owner)
    store.register_dataset(
        "claims", OutputPolicy.from_toml('[policy]\nid = "p"\n'), "[attestation]\nallow_simulated = true\n"
    )
    # A small per-client challenge cap, so that the fuzzing also meets (and checks) the 429 refusal.
    with serve_locally(store, Verifier(), BrokerLimits(max_challenges_per_client=20)) as url:
        yield store, url, schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_generated_request_causes_a_server_error_or_an_undocumented_response(served):
    store, _, schema = served
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/challenge",
        "POST /v1/datasets/{dataset_id}/key-release",
        "GET /v1/owner",
    }
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        # Only the key release takes input, so only it has requests that break the schema.
        negative = [GenerationMode.NEGATIVE] if operation.path.endswith("key-release") else []
        for mode in [GenerationMode.POSITIVE, *negative]:

            @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call()
                statuses.setdefault(f"{case.method} {case.operation.path}", set()).add(response.status_code)
                case.validate_response(response, checks=CHECKS)

            call()
    release = statuses["POST /v1/datasets/{dataset_id}/key-release"]
    assert 400 in release and release <= {400, 403, 404, 413}, release
    # A challenge takes no input, so Hypothesis sends one; more of them reach the per-client cap and its 429.
    challenge = schema.find_operation_by_path("POST", "/v1/challenge")
    for _ in range(25):
        case = challenge.Case()
        response = case.call()
        statuses["POST /v1/challenge"].add(response.status_code)
        case.validate_response(response, checks=CHECKS)
    assert statuses["POST /v1/challenge"] == {200, 429}
    assert verify_log(store.directory / "audit.sqlite", store.owner_public_key).ok


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/datasets/claims/key-release", {"evidence": {"format": "x" * (2 << 20), "tee": "sev-snp"}}),
        ("/v1/datasets/claims/key-release", {"evidence": {"format": "confnb-evidence/1", "tee": "t" * 65}}),
        ("/v1/datasets/claims/key-release", "not json"),
        ("/v1/datasets/claims/key-release", b"\xff\xfe{"),
        ("/v1/datasets/" + "d" * 129 + "/key-release", {"evidence": {}}),
        ("/v1/challenge", {"padding": "p" * (1 << 20)}),
    ],
    ids=["2-MiB-format", "long-tee", "not-json", "not-utf-8", "long-dataset-id", "2-MiB-challenge-body"],
)
def test_oversized_and_malformed_requests_get_documented_refusals(served, path, body):
    """The probe's 1 MiB fields once gave a 500 and no audit entry; each is now a documented, audited refusal."""
    store, url, schema = served
    before = len(_requests_audited(store))
    kwargs = {"data": body} if isinstance(body, str | bytes) else {"json": body}
    response = requests.post(url + path, timeout=30, headers={"Content-Type": "application/json"}, **kwargs)
    assert response.status_code in (400, 413), response.text[:300]
    operation = schema.find_operation_by_path(
        "POST", path if "challenge" in path else "/v1/datasets/{dataset_id}/key-release"
    )
    case = operation.Case(
        path_parameters={"dataset_id": path.split("/")[3]} if "key-release" in path else None,
        body=body,
        media_type="application/json",
    )
    case.validate_response(response, checks=CHECKS)
    refusal = response.json()
    assert len(refusal["reason"]) < 4000 and refusal["reason"].startswith("request: ")
    verification = verify_log(store.directory / "audit.sqlite", store.owner_public_key)
    assert verification.ok, verification.problems
    audited = _requests_audited(store)
    denial = audited[-1]
    assert len(audited) == before + 1 and denial.kind == "denial"
    assert denial.detail["status"] == response.status_code and denial.detail["reason"] == refusal["reason"]


def _requests_audited(store: OwnerStore) -> list:
    """The log's entries about single requests; the periodic count of refused challenges may land at any moment."""
    verification = verify_log(store.directory / "audit.sqlite", store.owner_public_key)
    return [entry for entry in verification.entries if "refused" not in entry.detail]
