"""Evidence binds the kernel's keys and the verifier's nonce into a report a verifier can check end to end."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from zmq.utils import z85

from confnb.attest.evidence import CLAIM_NAMES, Evidence, parse_rfc3339, report_data_for
from confnb.attest.report import AttestationReport
from kernel_enclave import measurement
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee import TeeBackend, TeeError, TeeQuote
from kernel_enclave.tee.simulated import SimulatedBackend

NONCE = bytes.fromhex("5eed") * 16


class Keys:
    """Real keys of the three kinds the kernel binds."""

    def __init__(self) -> None:
        self.hpke = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        self.signing = (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        self.curve = z85.encode(os.urandom(32)).decode("ascii")

    def kwargs(self) -> dict[str, Any]:
        return {"hpke_public_key": self.hpke, "signing_public_key": self.signing, "curve_public_key": self.curve}


@pytest.fixture
def keys() -> Keys:
    return Keys()


def test_evidence_binds_every_claim(
    simulated_backend: SimulatedBackend, keys: Keys, signature_valid: Callable[[bytes, str], bool]
) -> None:
    moment = datetime(2026, 11, 27, 12, 30, 15, 999, tzinfo=UTC)
    evidence = issue_evidence(simulated_backend, NONCE, issued_at=moment, vmpl=1, **keys.kwargs())

    assert evidence.tee == "simulated"
    assert evidence.simulated
    assert set(evidence.claims) == set(CLAIM_NAMES)
    assert evidence.claims["nonce"] == NONCE.hex()
    assert base64.b64decode(evidence.claims["hpke_public_key"], validate=True) == keys.hpke
    assert base64.b64decode(evidence.claims["signing_public_key"], validate=True) == keys.signing
    assert z85.decode(evidence.claims["curve_public_key"]) and evidence.claims["curve_public_key"] == keys.curve
    assert evidence.claims["bundle_digest"] == measurement.bundle_digest()
    assert evidence.claims["issued_at"] == "2026-11-27T12:30:15Z"

    report = AttestationReport.parse(evidence.report)
    assert report.report_data == report_data_for(evidence.claims) == evidence.report_data()
    assert report.vmpl == 1
    assert report.measurement == measurement.simulated_measurement()
    assert evidence.vek is not None
    assert signature_valid(evidence.report, evidence.vek)
    assert evidence.chain == (simulated_backend.ask_pem, simulated_backend.ark_pem)


def test_evidence_survives_its_json_form(simulated_backend: SimulatedBackend, keys: Keys) -> None:
    evidence = issue_evidence(simulated_backend, NONCE, **keys.kwargs())
    assert Evidence.from_json(evidence.to_json()) == evidence
    document = evidence.to_dict()
    assert document["format"] == "confnb-evidence/1"
    assert document["certs"]["chain"] == list(evidence.chain)


def test_issued_at_defaults_to_now_in_utc(simulated_backend: SimulatedBackend, keys: Keys) -> None:
    evidence = issue_evidence(simulated_backend, NONCE, **keys.kwargs())
    assert evidence.claims["issued_at"].endswith("Z")
    assert abs(parse_rfc3339(evidence.claims["issued_at"]) - datetime.now(UTC)) < timedelta(seconds=5)


def test_issued_at_in_another_zone_is_written_in_utc(simulated_backend: SimulatedBackend, keys: Keys) -> None:
    moment = datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    evidence = issue_evidence(simulated_backend, NONCE, issued_at=moment, **keys.kwargs())
    assert evidence.claims["issued_at"] == "2025-12-31T23:00:00Z"


def test_each_claim_changes_report_data(simulated_backend: SimulatedBackend, keys: Keys) -> None:
    moment = datetime(2026, 11, 27, tzinfo=UTC)
    base = issue_evidence(simulated_backend, NONCE, issued_at=moment, **keys.kwargs())
    other_keys = Keys()
    variants = [
        issue_evidence(simulated_backend, NONCE[:-1] + b"\0", issued_at=moment, **keys.kwargs()),
        issue_evidence(simulated_backend, NONCE, issued_at=moment + timedelta(seconds=1), **keys.kwargs()),
        issue_evidence(
            simulated_backend, NONCE, issued_at=moment, **{**keys.kwargs(), "hpke_public_key": other_keys.hpke}
        ),
        issue_evidence(
            simulated_backend, NONCE, issued_at=moment, **{**keys.kwargs(), "curve_public_key": other_keys.curve}
        ),
    ]
    report_data = {base.report[0x50:0x90]} | {variant.report[0x50:0x90] for variant in variants}
    assert len(report_data) == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nonce": b""}, "nonce must be 1 to 64 bytes"),
        ({"nonce": b"\0" * 65}, "nonce must be 1 to 64 bytes"),
        ({"hpke_public_key": b""}, "hpke_public_key"),
        ({"signing_public_key": "not bytes"}, "signing_public_key"),
        ({"curve_public_key": "abc"}, "Z85"),
        ({"curve_public_key": "a" * 39 + "\u00e9"}, "Z85"),
        ({"issued_at": datetime(2026, 1, 1)}, "time zone"),  # noqa: DTZ001 - the naive datetime is the point
        ({"vmpl": 4}, "vmpl"),
    ],
)
def test_bad_inputs_are_refused_before_the_tee_is_asked(
    simulated_backend: SimulatedBackend, keys: Keys, change: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"nonce": NONCE, **keys.kwargs(), **change}
    nonce = arguments.pop("nonce")
    with pytest.raises(ValueError, match=message):
        issue_evidence(simulated_backend, nonce, **arguments)


class RelayingHost(TeeBackend):
    """A TEE whose host answers with a genuine report made for somebody else's REPORT_DATA."""

    name = "simulated"

    def __init__(self, inner: SimulatedBackend) -> None:
        self.inner = inner

    def get_quote(self, report_data: bytes, vmpl: int = 0) -> TeeQuote:
        return self.inner.get_quote(bytes(64), vmpl)

    def derive_sealing_key(self, context: bytes) -> bytes:
        return self.inner.derive_sealing_key(context)


def test_a_report_for_other_report_data_is_refused(simulated_backend: SimulatedBackend, keys: Keys) -> None:
    with pytest.raises(TeeError, match="does not carry the requested REPORT_DATA"):
        issue_evidence(RelayingHost(simulated_backend), NONCE, **keys.kwargs())


def test_the_verifier_accepts_simulated_evidence_only_when_its_policy_allows(
    simulated_backend: SimulatedBackend, keys: Keys
) -> None:
    """End to end through the JSON form with confnb's verifier: one code path for real and simulated evidence."""
    from confnb.attest.policy import AttestationPolicy
    from confnb.attest.verifier import verify_evidence

    evidence = issue_evidence(simulated_backend, NONCE, **keys.kwargs()).to_json()
    pinned = (simulated_backend.measurement.hex(),)

    allowed = verify_evidence(evidence, AttestationPolicy(allow_simulated=True, measurements=pinned))
    assert allowed.ok, [check for check in allowed.checks if check.outcome.value != "pass"]
    assert allowed.simulated

    strict = verify_evidence(evidence, AttestationPolicy(measurements=pinned))
    assert not strict.ok
    assert [check.name for check in strict.checks if check.outcome.value == "fail"] == ["ark_pinned"]


def test_a_policy_can_pin_its_simulated_chip(simulated_backend: SimulatedBackend, keys: Keys) -> None:
    """Anyone can make a simulated chip and claim any measurement with it; a pinned root tells them apart."""
    from confnb.attest.policy import AttestationPolicy
    from confnb.attest.verifier import verify_evidence

    evidence = issue_evidence(simulated_backend, NONCE, **keys.kwargs()).to_json()
    measurement = (simulated_backend.measurement.hex(),)
    mine = AttestationPolicy(
        allow_simulated=True, measurements=measurement, simulated_roots=(simulated_backend.ark_sha256(),)
    )
    assert verify_evidence(evidence, mine).ok
    theirs = AttestationPolicy(allow_simulated=True, measurements=measurement, simulated_roots=("ab" * 32,))
    refused = verify_evidence(evidence, theirs)
    assert not refused.ok
    failed = [check for check in refused.checks if check.outcome.value == "fail"]
    assert [check.name for check in failed] == ["simulated_root"]
    assert "someone else's" in failed[0].detail


def test_a_tee_quote_is_always_a_whole_report() -> None:
    with pytest.raises(TeeError, match="returned 1183 bytes; an ATTESTATION_REPORT is 1184 bytes"):
        TeeQuote(report=bytes(1183))
    with pytest.raises(TypeError, match="bytes"):
        TeeQuote(report=bytearray(1184))  # type: ignore[arg-type]
    assert TeeQuote(report=bytes(1184)).chain_pem == ()


_SERVER_SIDE = ("jupyterlab", "jupyter_server", "notebook", "fastapi", "uvicorn")
_ENCLAVE_PROBES = {
    # Attestation and key release need no Jupyter or ZeroMQ at all.
    "attestation": (
        "kernel_enclave.attestation, kernel_enclave.tee, kernel_enclave.tee.sevsnp, kernel_enclave.tee.simulated, "
        "kernel_enclave.vault.broker_client",
        (*_SERVER_SIDE, "jupyter", "tornado", "zmq", "ipykernel"),
    ),
    # The launcher and relay speak ZeroMQ and the executor is ipykernel, but nothing of a Jupyter server.
    "kernel": (
        "kernel_enclave.launcher, kernel_enclave.executor, kernel_enclave.relay.relay, kernel_enclave.relay.gate, "
        "kernel_enclave.relay.display",
        (*_SERVER_SIDE, "pyarrow", "sklearn"),
    ),
    # The vault reads datasets and runs scikit-learn, but speaks neither Jupyter nor ZeroMQ.
    "vault": (
        "kernel_enclave.vault.process, kernel_enclave.vault.service, kernel_enclave.vault.vault",
        (*_SERVER_SIDE, "jupyter", "tornado", "ipykernel"),
    ),
}
# The data formats and the output policy, which the vault enforces; nothing of the owner's or the analyst's side.
_VAULT_MODULES = {
    "confnb.receipt_format",
    "confnb.policy",
    "confnb.policy.output",
    "confnb.policy.privacy",
    "confnb.policy.schema",
    "confnb.policy.toml",
    "confnb.datasets",
    "confnb.datasets.errors",
    "confnb.datasets.ipc",
    "confnb.datasets.manifest",
    "confnb.datasets.parquet",
    "confnb.datasets.reader",
    "confnb.datasets.streaming_aead",
}


@pytest.mark.parametrize("part", sorted(_ENCLAVE_PROBES))
def test_the_enclave_imports_no_client_side_code(part: str) -> None:
    """DESIGN.md: code inside the CVM must not pull in JupyterLab, the server extension or the broker."""
    modules, forbidden = _ENCLAVE_PROBES[part]
    probe = f"import json, sys\nimport {modules}\nprint(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True).stdout)
    assert [name for name in loaded if name.split(".")[0] in forbidden] == []
    # Only the pure format modules: no verifier, KDS client, policy engine, provisioner or CLI inside the VM.
    allowed = {
        "confnb.fileio",
        "confnb.hpke",
        "confnb.attest",
        "confnb.attest.report",
        "confnb.attest.tcb",
        "confnb.attest.evidence",
        "confnb.attest.errors",
        "confnb.attest.certs",
        "confnb.attest.der",
        "confnb.attest.certtable",
        *(_VAULT_MODULES if part == "vault" else ()),
    }
    assert [name for name in loaded if name.startswith("confnb.") and name not in allowed] == []
    # Whatever a part may import is measured with the enclave's code.
    measured = {
        path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for path in measurement.ENCLAVE_CONFNB_MODULES
    }
    assert allowed - measured == set()
