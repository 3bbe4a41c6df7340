"""The browser's cryptography (labextension/src) against confnb's Python side, both ways.

The jest specs run under Node with inputs this module makes with the real Python code: evidence from the simulated
TEE for the TypeScript verifier, a kernel-like HPKE key and files for the TypeScript upload encryptor. The Python
side then opens what TypeScript sealed and encrypted with ``confnb.hpke.open_sealed`` and
``confnb.datasets.streaming_aead``, compares Tink ciphertexts byte for byte, and compares the TypeScript report
decoder with ``AttestationReport`` on every real vector. One jest run serves every test here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb.attest.evidence import Evidence, canonical_claims
from confnb.attest.report import AttestationReport, Product
from confnb.attest.roots import PINNED_ARK_SHA256
from confnb.attest.verifier import Verifier
from confnb.datasets import streaming_aead
from confnb.datasets.errors import IntegrityError
from confnb.hpke import HpkeError, open_sealed
from kernel_enclave.attestation import issue_evidence

if TYPE_CHECKING:
    from kernel_enclave.tee.simulated import SimulatedBackend

REPO = Path(__file__).resolve().parents[2]
LABEXTENSION = REPO / "labextension"
JEST = LABEXTENSION / "node_modules" / ".bin" / "jest"
SHARED_VECTORS = REPO.parent / "shared" / "vectors" / "snp"
SPECS = ("src/__tests__/verify.spec.ts", "src/__tests__/encrypt.spec.ts")
UPLOAD_INFO_PREFIX = b"confnb-upload/1:"
JEST_TIMEOUT_S = 300

needs_node = pytest.mark.skipif(
    not JEST.exists() or shutil.which("node") is None,
    reason="the labextension's node modules are not installed (cd labextension && jlpm install), or node is missing",
)


def upload_info(descriptor: dict[str, str]) -> bytes:
    """The HPKE info the relay opens an upload's key with (lab spec: confnb.upload protocol)."""
    return UPLOAD_INFO_PREFIX + hashlib.sha256(canonical_claims(descriptor)).hexdigest().encode("ascii")


@dataclass(frozen=True)
class UploadCase:
    name: str
    descriptor: dict[str, str]
    plaintext: bytes
    content_key: bytes
    salt: bytes
    nonce_prefix: bytes


@dataclass(frozen=True)
class JestRun:
    evidence_dir: Path
    interop_dir: Path
    evidence: Evidence
    nonce: bytes
    hpke_key: ec.EllipticCurvePrivateKey
    cases: tuple[UploadCase, ...]
    results: dict[str, str]  # jest test full name -> status
    output: str

    def status(self, title: str) -> str:
        matches = [status for name, status in self.results.items() if name.endswith(title)]
        assert len(matches) == 1, f"expected one jest test named …{title!r}, found {len(matches)}\n{self.output}"
        return matches[0]


def _python_ciphertext(case: UploadCase) -> bytes:
    """Python's StreamEncryptor with the case's salt and nonce prefix in place of fresh random bytes."""
    draws = [case.salt, case.nonce_prefix]

    def token_bytes(size: int) -> bytes:
        value = draws.pop(0)
        assert len(value) == size, "StreamEncryptor drew its random values in an unexpected order"
        return value

    sink = io.BytesIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming_aead, "secrets", types.SimpleNamespace(token_bytes=token_bytes))
        streaming_aead.encrypt_stream(case.content_key, canonical_claims(case.descriptor), [case.plaintext], sink)
    ciphertext = sink.getvalue()
    assert ciphertext[:40] == bytes([40]) + case.salt + case.nonce_prefix  # the fixed values were used
    return ciphertext


def _cases() -> tuple[UploadCase, ...]:
    first = streaming_aead.AES256_GCM_HKDF_1MB.first_plaintext_size
    sizes = {"empty": 0, "one-segment": first, "multi-segment": 2 * (1 << 20) + 12345}
    formats = {"empty": "csv", "one-segment": "parquet", "multi-segment": "arrow"}
    return tuple(
        UploadCase(
            name=name,
            descriptor={
                "format": "confnb-upload/1",
                "name": f"ds_{name.replace('-', '_')}",
                "file_format": formats[name],
                "filename": f"données {name}.{formats[name]}",
                "policy": '[policy]\nid = "aggregates-10"\n\n[release]\nmin_group_size = 10\n',
            },
            plaintext=secrets.token_bytes(size),
            content_key=secrets.token_bytes(32),
            salt=secrets.token_bytes(32),
            nonce_prefix=secrets.token_bytes(7),
        )
        for name, size in sizes.items()
    )


@pytest.fixture(scope="module")
def jest_run(tmp_path_factory: pytest.TempPathFactory, simulated_backend: SimulatedBackend) -> JestRun:
    import zmq

    evidence_dir = tmp_path_factory.mktemp("evidence")
    interop_dir = tmp_path_factory.mktemp("interop")
    hpke_key = ec.generate_private_key(ec.SECP256R1())
    hpke_public = hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    signing_public = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    nonce = secrets.token_bytes(32)
    evidence = issue_evidence(
        simulated_backend,
        nonce,
        hpke_public_key=hpke_public,
        signing_public_key=signing_public,
        curve_public_key=zmq.curve_keypair()[0].decode("ascii"),
    )
    (evidence_dir / "evidence.json").write_text(evidence.to_json())
    (evidence_dir / "nonce.txt").write_text(nonce.hex())
    (evidence_dir / "simulated_root.txt").write_text(simulated_backend.ark_sha256())
    (evidence_dir / "canonical_claims.txt").write_bytes(canonical_claims(evidence.claims))

    cases = _cases()
    interop: dict[str, Any] = {"hpke_public_key": base64.b64encode(hpke_public).decode("ascii"), "cases": []}
    for case in cases:
        (interop_dir / f"{case.name}.plain").write_bytes(case.plaintext)
        (interop_dir / f"{case.name}.python.ct").write_bytes(_python_ciphertext(case))
        interop["cases"].append(
            {
                "name": case.name,
                "descriptor": case.descriptor,
                "plaintext": f"{case.name}.plain",
                "content_key": case.content_key.hex(),
                "salt": case.salt.hex(),
                "nonce_prefix": case.nonce_prefix.hex(),
            }
        )
    (interop_dir / "interop.json").write_text(json.dumps(interop, ensure_ascii=False))

    report = evidence_dir / "jest.json"
    environment = {
        **os.environ,
        "CONFNB_TEST_EVIDENCE_DIR": str(evidence_dir),
        "CONFNB_TEST_INTEROP_DIR": str(interop_dir),
    }
    completed = subprocess.run(
        [
            str(JEST),
            "--coverage=false",
            "--runInBand",
            "--ci",
            "--reporters=default",
            "--json",
            f"--outputFile={report}",
            *SPECS,
        ],
        cwd=LABEXTENSION,
        env=environment,
        capture_output=True,
        text=True,
        timeout=JEST_TIMEOUT_S,
        check=False,
    )
    output = (completed.stdout + completed.stderr)[-20000:]
    if not report.exists():
        pytest.fail(f"jest produced no results (exit {completed.returncode}):\n{output}")
    document = json.loads(report.read_text())
    results = {
        assertion["fullName"]: assertion["status"]
        for suite in document["testResults"]
        for assertion in suite["assertionResults"]
    }
    return JestRun(evidence_dir, interop_dir, evidence, nonce, hpke_key, cases, results, output)


# -- pinned roots -------------------------------------------------------------------------------------------------


def test_typescript_pins_the_same_amd_roots_as_python() -> None:
    source = (LABEXTENSION / "src" / "verify" / "roots.ts").read_text()
    block = re.search(r"AMD_ARK_FINGERPRINTS[^{]*\{(.*?)\}", source, re.S)
    assert block is not None, "roots.ts no longer defines AMD_ARK_FINGERPRINTS as an object literal"
    pinned = dict(re.findall(r"(\w+):\s*'([0-9a-f]{64})'", block.group(1)))
    assert pinned == {product.value: fingerprint for fingerprint, product in PINNED_ARK_SHA256.items()}


# -- the whole jest run -------------------------------------------------------------------------------------------


@needs_node
def test_every_jest_test_passed_and_none_was_skipped(jest_run: JestRun) -> None:
    failed = {name: status for name, status in jest_run.results.items() if status != "passed"}
    if not SHARED_VECTORS.is_dir():  # the real-vector describe block skips itself, saying why
        failed = {name: status for name, status in failed.items() if "real AMD reports" not in name}
    assert not failed, jest_run.output


# -- attestation: Python simulated TEE -> TypeScript verifier ------------------------------------------------------


@needs_node
def test_typescript_verifies_simulated_evidence_as_python_does(jest_run: JestRun) -> None:
    for title in (
        "verifies with allowSimulated and the simulated root",
        "fails ark_pinned without allowSimulated, and only that",
        "fails nonce for another nonce, and report_data for changed claims",
        "fails report_signature when the host flips a report bit",
        "hashes claims exactly as Python does",
    ):
        assert jest_run.status(title) == "passed", jest_run.output
    verdict = json.loads((jest_run.evidence_dir / "ts_verdict.json").read_text())
    assert verdict["ok"] is True and verdict["simulated"] is True

    # The Python verifier, without a policy allowing simulated roots, rejects this evidence for the same reason
    # the browser does without allowSimulated.
    python = Verifier(kds=None).verify_evidence(jest_run.evidence, nonce=jest_run.nonce)
    assert [check.name for check in python.checks if check.outcome.value == "fail"] == ["ark_pinned"]
    assert python.simulated is True

    report = AttestationReport.parse(jest_run.evidence.report).to_dict()
    _assert_same_report(verdict["report"], report)


# -- report parsing: every real vector ------------------------------------------------------------------------------


@needs_node
def test_typescript_decodes_every_real_vector_as_python_does(jest_run: JestRun) -> None:
    if not SHARED_VECTORS.is_dir():
        pytest.skip(f"real SEV-SNP vectors not found at {SHARED_VECTORS}: they live in ../shared beside the project")
    decoded = json.loads((jest_run.evidence_dir / "ts_decoded_vectors.json").read_text())
    vectors = json.loads((SHARED_VECTORS / "vectors.json").read_text())
    assert sorted(decoded) == sorted(vector["id"] for vector in vectors)
    for vector in vectors:
        ts = decoded[vector["id"]]
        product = Product(ts["product"]) if ts["product"] else None
        python = AttestationReport.parse((SHARED_VECTORS / vector["report"]).read_bytes()).to_dict(product)
        _assert_same_report(ts, python, vector["id"])


def _assert_same_report(ts: dict[str, Any], python: dict[str, Any], label: str = "simulated") -> None:
    same = {
        "version": "version",
        "product": "product",
        "guestSvn": "guest_svn",
        "familyId": "family_id",
        "imageId": "image_id",
        "vmpl": "vmpl",
        "signatureAlgo": "signature_algo",
        "signingKey": "signing_key",
        "reportData": "report_data",
        "measurement": "measurement",
        "hostData": "host_data",
        "idKeyDigest": "id_key_digest",
        "authorKeyDigest": "author_key_digest",
        "reportId": "report_id",
        "reportIdMa": "report_id_ma",
        "chipId": "chip_id",
        "currentFirmware": "current_firmware",
        "committedFirmware": "committed_firmware",
        "launchMitVector": "launch_mit_vector",
        "currentMitVector": "current_mit_vector",
        "cpuid": "cpuid",
        "signature": "signature",
    }
    for ts_name, python_name in same.items():
        assert ts[ts_name] == python[python_name], f"{label}: {ts_name} differs"
    for ts_name, python_name in (
        ("currentTcb", "current_tcb"),
        ("reportedTcb", "reported_tcb"),
        ("committedTcb", "committed_tcb"),
        ("launchTcb", "launch_tcb"),
    ):
        assert ts[ts_name] == python[python_name], f"{label}: {ts_name} differs"
    assert ts["platformInfo"] == python["platform_info"]["raw"]
    assert ts["keyInfo"] == python["key_info"]["raw"]
    assert ts["maskChipKey"] == python["key_info"]["mask_chip_key"]
    policy = python["policy"]
    assert ts["policy"] == {
        "raw": policy["raw"],
        "abi": policy["abi"],
        "smt": policy["smt_allowed"],
        **{name: policy[name] for name in ts["policy"] if name not in ("raw", "abi", "smt")},
    }, f"{label}: policy differs"


# -- upload: TypeScript encryptor -> Python relay-side decryption ---------------------------------------------------


@needs_node
def test_python_opens_what_typescript_sealed_and_encrypted(jest_run: JestRun) -> None:
    assert jest_run.status("encrypts each case with fresh and with fixed randomness for Python to open") == "passed"
    for case in jest_run.cases:
        associated_data = canonical_claims(case.descriptor)
        for run in ("random", "fixed"):
            sealed = (jest_run.interop_dir / f"{case.name}.{run}.sealed").read_bytes()
            ciphertext = (jest_run.interop_dir / f"{case.name}.{run}.ct").read_bytes()
            key = open_sealed(jest_run.hpke_key, sealed, upload_info(case.descriptor))
            if run == "fixed":
                assert key == case.content_key
            assert len(ciphertext) == streaming_aead.ciphertext_size(len(case.plaintext))
            assert bytes(streaming_aead.decrypt_to_buffer(key, associated_data, ciphertext)) == case.plaintext
            assert b"".join(streaming_aead.iter_decrypt(key, associated_data, io.BytesIO(ciphertext))) == case.plaintext


@needs_node
def test_a_swapped_descriptor_opens_neither_key_nor_data(jest_run: JestRun) -> None:
    case = next(case for case in jest_run.cases if case.name == "multi-segment")
    sealed = (jest_run.interop_dir / f"{case.name}.random.sealed").read_bytes()
    ciphertext = (jest_run.interop_dir / f"{case.name}.random.ct").read_bytes()
    swapped = {**case.descriptor, "policy": "[policy]\n"}
    with pytest.raises(HpkeError):
        open_sealed(jest_run.hpke_key, sealed, upload_info(swapped))
    key = open_sealed(jest_run.hpke_key, sealed, upload_info(case.descriptor))
    with pytest.raises(IntegrityError, match="segment 0"):
        streaming_aead.decrypt_to_buffer(key, canonical_claims(swapped), ciphertext)
    truncated = ciphertext[: 2 * (1 << 20)]  # the last segment dropped at a segment boundary
    with pytest.raises(IntegrityError):
        streaming_aead.decrypt_to_buffer(key, canonical_claims(case.descriptor), truncated)


@needs_node
def test_typescript_tink_is_byte_identical_to_python(jest_run: JestRun) -> None:
    title = "is byte-identical to Python's StreamEncryptor with the same key, salt and nonce prefix"
    assert jest_run.status(title) == "passed"
    for case in jest_run.cases:
        typescript = (jest_run.interop_dir / f"{case.name}.fixed.ct").read_bytes()
        python = (jest_run.interop_dir / f"{case.name}.python.ct").read_bytes()
        assert hashlib.sha256(typescript).hexdigest() == hashlib.sha256(python).hexdigest(), case.name
