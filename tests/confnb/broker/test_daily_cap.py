"""``[release] max_kernels_per_day``: the broker counts key releases per dataset per UTC day, atomically with the
audit entry, and denies beyond the owner's cap (a real uvicorn server on loopback, real HTTP, the simulated TEE)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from confnb.attest import Verifier
from confnb.broker.audit import verify_log
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.tee.base import TeeBackend

CAP = 2


def _policy(ident: str, extra: str = "") -> OutputPolicy:
    return OutputPolicy.from_toml(f'[policy]\nid = "{ident}"\n[release]\nallow = ["aggregate"]\n{extra}')


@dataclass
class Broker:
    url: str
    store: OwnerStore
    backend: TeeBackend

    def post(self, path: str, body: object) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def release(self, dataset: str) -> tuple[int, dict[str, Any], ec.EllipticCurvePrivateKey]:
        """One kernel asking for the key: a fresh challenge, fresh keys, evidence, the request."""
        hpke_key = ec.generate_private_key(ec.SECP256R1())
        status, challenge = self.post("/v1/challenge", {})
        assert status == 200, challenge
        evidence = issue_evidence(
            self.backend,
            bytes.fromhex(challenge["nonce"]),
            hpke_public_key=hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
            signing_public_key=ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw),
            curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
        ).to_dict()
        status, body = self.post(f"/v1/datasets/{dataset}/key-release", {"evidence": evidence})
        return status, body, hpke_key


@pytest.fixture
def broker(tmp_path: Path, simulated_backend: TeeBackend) -> Iterator[Broker]:
    store = OwnerStore.create(tmp_path / "owner")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    store.register_dataset("capped", _policy("capped-v1", f"max_kernels_per_day = {CAP}\n"), attestation)
    store.register_dataset("open", _policy("open-v1"), attestation)  # the twin: no cap
    with serve_locally(store, Verifier()) as url:
        yield Broker(url, store, simulated_backend)


def _opens(grant: dict[str, Any], hpke_key: ec.EllipticCurvePrivateKey) -> bool:
    key = hpke.open_sealed(hpke_key, base64.b64decode(grant["sealed_key"]), grant["hpke_info"].encode())
    return len(key) == 32


def test_key_releases_beyond_the_daily_cap_are_denied_naming_the_rule_and_audited(broker: Broker) -> None:
    for _ in range(CAP):
        status, grant, hpke_key = broker.release("capped")
        assert status == 200, grant
        assert _opens(grant, hpke_key)
    status, denial, _ = broker.release("capped")
    assert status == 403
    assert denial["released"] is False and "sealed_key" not in denial
    assert denial["reason"].startswith("release.max_kernels_per_day: ")
    assert f"to {CAP} kernels today (UTC)" in denial["reason"]

    # The twin without a cap keeps releasing.
    for _ in range(CAP + 1):
        status, grant, hpke_key = broker.release("open")
        assert status == 200, grant
        assert _opens(grant, hpke_key)

    verification = verify_log(broker.store.directory / "audit.sqlite", broker.store.owner_public_key)
    assert verification.ok, verification.problems
    capped = [entry for entry in verification.entries if entry.dataset_id == "capped"]
    releases = [entry.detail for entry in capped if entry.kind == "release"]
    assert [detail["released_today"] for detail in releases] == [1, 2]
    assert all(detail["max_kernels_per_day"] == CAP for detail in releases)
    denials = [entry.detail for entry in capped if entry.kind == "denial"]
    assert len(denials) == 1 and denials[0]["status"] == 403
    assert denials[0]["reason"].startswith("release.max_kernels_per_day: ")
    opened = [entry.detail for entry in verification.entries if entry.dataset_id == "open" and entry.kind == "release"]
    assert [detail["released_today"] for detail in opened] == [1, 2, 3]
    assert all("max_kernels_per_day" not in detail for detail in opened)
    assert broker.store.releases_on("capped", datetime.now(UTC)) == CAP


def test_concurrent_kernels_never_share_the_last_place(broker: Broker) -> None:
    """Eight kernels at once against a cap of two: exactly two keys leave, and the log shows exactly those."""
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: broker.release("capped"), range(8)))
    granted = [(body, key) for status, body, key in outcomes if status == 200]
    denied = [body for status, body, _ in outcomes if status != 200]
    assert len(granted) == CAP and all(_opens(body, key) for body, key in granted)
    assert len(denied) == 8 - CAP
    assert all(body["reason"].startswith("release.max_kernels_per_day: ") for body in denied)
    verification = verify_log(broker.store.directory / "audit.sqlite", broker.store.owner_public_key)
    assert verification.ok, verification.problems
    released = [e for e in verification.entries if e.kind == "release" and e.dataset_id == "capped"]
    assert sorted(e.detail["released_today"] for e in released) == list(range(1, CAP + 1))
    assert {e.detail["key_id"] for e in released} == {body["key_id"] for body, _ in granted}


def test_the_count_is_per_utc_day(tmp_path: Path) -> None:
    store = OwnerStore.create(tmp_path / "owner")
    store.register_dataset("capped", _policy("capped-v1", "max_kernels_per_day = 1\n"))
    late = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
    # 03:00 at UTC+05:00 is 22:00 UTC the day before: the same UTC day as ``late``.
    same_day_elsewhere = datetime(2026, 3, 2, 3, 0, tzinfo=timezone(timedelta(hours=5)))
    assert store.count_release("capped", 1, late, {"nonce": "a"}, "test") == 1
    assert store.count_release("capped", 1, same_day_elsewhere, {"nonce": "b"}, "test") is None
    assert store.count_release("capped", 1, late + timedelta(seconds=1), {"nonce": "c"}, "test") == 1
    assert store.releases_on("capped", late) == 1
    # A denied place is neither counted nor audited.
    nonces = [entry.detail.get("nonce") for entry in store.audit.entries() if entry.kind == "release"]
    assert nonces == ["a", "c"]
    assert store.count_release("other", None, late, {"nonce": "d"}, "test") == 1  # no cap: counted all the same


def test_the_cap_is_part_of_the_signed_policy_and_read_back_from_it() -> None:
    policy = _policy("p", "max_kernels_per_day = 3\nmax_releases = 50\n")
    assert policy.to_dict()["release"]["max_kernels_per_day"] == 3
    assert OutputPolicy.from_dict(policy.to_dict()).max_kernels_per_day == 3
    # An absent cap stays out of the canonical form: policies signed before it existed keep their digests.
    assert "max_kernels_per_day" not in _policy("p").to_dict()["release"]
