"""``confnb broker serve --tls-cert/--tls-key``: a real broker process serving HTTPS on loopback.

The client trusts exactly the broker's self-signed certificate (and nothing else), gets a challenge and a key release
over HTTPS, and opens the sealed key; plain HTTP to the same port gets no answer, and a client that does not trust the
certificate refuses the connection. The CLI refuses half a TLS configuration and unusable files in one line, exit 2.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confnb import hpke
from confnb.broker.audit import verify_log
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30
SIGNING_KEY = ed25519.Ed25519PrivateKey.generate()


def _self_signed(directory: Path, common_name: str = LOOPBACK) -> tuple[Path, Path, str]:
    """A P-256 certificate for 127.0.0.1 (IP SAN), valid for a day; returns (cert file, key file, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(Encoding.PEM).decode("ascii")
    cert_file, key_file = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_file.write_text(pem)
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file, pem


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _serve_command(owner: Path, port: int, *tls: str) -> list[str]:
    return [sys.executable, "-m", "confnb", "broker", "serve", "--dir", str(owner), "--port", str(port), *tls]


@dataclass
class TlsBroker:
    url: str
    port: int
    context: ssl.SSLContext
    store: OwnerStore
    dataset_key: bytes
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """One HTTPS broker process for this module's tests (starting one costs a second or two)."""
    tmp_path = tmp_path_factory.mktemp("tls-broker")
    store = OwnerStore.create(tmp_path / "owner")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    _, dataset_key = store.register_dataset("claims", OutputPolicy.from_toml('[policy]\nid = "p"\n'), attestation)
    cert_file, key_file, pem = _self_signed(tmp_path)
    context = ssl.create_default_context(cadata=pem)  # trusts this certificate and nothing else
    port = _free_port()
    log = tmp_path / "broker.log"
    with log.open("wb") as sink:  # a file, not a pipe nobody reads
        process = subprocess.Popen(
            _serve_command(store.directory, port, "--tls-cert", str(cert_file), "--tls-key", str(key_file)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env={**os.environ, "CONFNB_OFFLINE": "1"},
        )
    broker = TlsBroker(f"https://{LOOPBACK}:{port}", port, context, store, dataset_key, process, log)
    try:
        _wait_until_serving(broker)
        yield broker
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        store.audit.close()


def _wait_until_serving(broker: TlsBroker) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(broker.url + "/healthz", timeout=2, context=broker.context) as response:
                assert json.loads(response.read()) == {"status": "ok"}
                return
        except OSError:
            if broker.process.poll() is not None:
                raise RuntimeError(f"the broker exited: {broker.log.read_text()}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start: {broker.log.read_text()}") from None
            time.sleep(0.05)


def _evidence(backend: Any, nonce: str, hpke_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    evidence = issue_evidence(
        backend,
        bytes.fromhex(nonce),
        hpke_public_key=hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        signing_public_key=SIGNING_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    )
    return evidence.to_dict()


def test_challenge_and_key_release_over_https(tls_broker: TlsBroker, simulated_backend: Any) -> None:
    hpke_key = ec.generate_private_key(ec.SECP256R1())
    status, challenge = tls_broker.post("/v1/challenge", {})
    assert status == 200 and len(challenge["nonce"]) == 64
    evidence = _evidence(simulated_backend, challenge["nonce"], hpke_key)
    status, grant = tls_broker.post("/v1/datasets/claims/key-release", {"evidence": evidence})
    assert status == 200, grant
    sealed = base64.b64decode(grant["sealed_key"])
    assert hpke.open_sealed(hpke_key, sealed, grant["hpke_info"].encode()) == tls_broker.dataset_key

    # The same evidence again is a replay: refused over TLS exactly as over HTTP.
    status, denial = tls_broker.post("/v1/datasets/claims/key-release", {"evidence": evidence})
    assert status == 403 and "already used" in denial["reason"]

    verification = verify_log(tls_broker.store.directory / "audit.sqlite", tls_broker.store.owner_public_key)
    assert verification.ok, verification.problems
    releases = [entry for entry in verification.entries if entry.kind == "release"]
    assert [entry.detail["nonce"] for entry in releases] == [challenge["nonce"]]


def test_plain_http_to_the_https_port_gets_no_answer(tls_broker: TlsBroker) -> None:
    connection = http.client.HTTPConnection(LOOPBACK, tls_broker.port, timeout=10)
    try:
        connection.request("POST", "/v1/challenge", body=b"{}", headers={"Content-Type": "application/json"})
        # Reset or closed by the TLS layer (or, were a TLS alert sent back, an unparseable status line): never an
        # HTTP response.
        with pytest.raises((OSError, http.client.HTTPException)):
            connection.getresponse()
    finally:
        connection.close()
    # The broker survives the garbage and still serves HTTPS.
    status, _ = tls_broker.post("/v1/challenge", {})
    assert status == 200
    assert "Traceback" not in tls_broker.log.read_text()


def test_a_client_that_does_not_trust_the_certificate_refuses_it(tls_broker: TlsBroker, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    _, _, other_pem = _self_signed(stranger)  # same name, different key: not the broker's certificate
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(
            tls_broker.url + "/healthz", timeout=10, context=ssl.create_default_context(cadata=other_pem)
        )
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def _run_cli(owner: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _serve_command(owner, _free_port(), *tls),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CONFNB_OFFLINE": "1"},
        check=False,
    )


def test_the_cli_refuses_half_or_unusable_tls_settings(tmp_path: Path) -> None:
    owner = tmp_path / "owner"
    OwnerStore.create(owner).audit.close()
    cert_file, key_file, _ = _self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key, _ = _self_signed(other)
    cases = {
        ("--tls-cert", str(cert_file)): "--tls-cert and --tls-key go together",
        ("--tls-key", str(key_file)): "--tls-cert and --tls-key go together",
        ("--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(key_file)): "missing.crt: no such file",
        ("--tls-cert", str(cert_file), "--tls-key", str(other_key)): "the key does not belong to the certificate",
        ("--tls-cert", str(key_file), "--tls-key", str(key_file)): "not a PEM certificate and private key",
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda arguments: _run_cli(owner, *arguments), cases))
    for (arguments, message), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 2, (arguments, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("confnb: error: ") and message in lines[0], (arguments, lines)
        assert result.stdout == ""


def test_the_audit_log_records_the_peer_not_a_forwarded_for_header(tls_broker: TlsBroker) -> None:
    """Every client of a loopback broker connects from 127.0.0.1, which uvicorn trusts for proxy headers by default;
    the broker must not let a client choose the actor its challenges and releases are logged under."""
    status, challenge = tls_broker.post("/v1/challenge", {}, headers={"X-Forwarded-For": "203.0.113.7"})
    assert status == 200
    verification = verify_log(tls_broker.store.directory / "audit.sqlite", tls_broker.store.owner_public_key)
    (entry,) = [entry for entry in verification.entries if entry.detail.get("nonce") == challenge["nonce"]]
    assert entry.actor.startswith(f"{LOOPBACK}:") and "203.0.113.7" not in entry.actor
