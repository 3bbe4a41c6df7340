"""The simulated TEE must produce what a real Genoa would, signed by a chain a verifier checks like AMD's."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from confnb.attest import certs
from confnb.attest.report import AttestationReport, Product, SigningKey
from kernel_enclave import measurement
from kernel_enclave.tee import TeeError, get_backend
from kernel_enclave.tee.simulated import (
    ENV_STATE_DIR,
    LOCK_FILE,
    STATE_FILE,
    SimulatedBackend,
    default_state_dir,
    der_integer,
)

REPORT_DATA = bytes(range(64))
PSS_48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _der(pem: str) -> bytes:
    return _cert(pem).public_bytes(serialization.Encoding.DER)


# -- the report ----------------------------------------------------------------------------------------------


def test_report_is_a_byte_exact_v5_genoa_report(simulated_backend: SimulatedBackend) -> None:
    quote = simulated_backend.get_quote(REPORT_DATA, vmpl=2)
    report = AttestationReport.parse(quote.report)

    assert report.to_bytes() == quote.report
    assert report.version == 5
    assert report.cpuid_product is Product.GENOA
    assert (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == (0x19, 0x11, 1)
    assert report.report_data == REPORT_DATA
    assert report.vmpl == 2
    assert report.signature_algo == 1
    assert report.policy.raw == 0x30000
    assert not report.policy.debug
    assert not report.policy.migrate_ma
    assert report.policy.smt_allowed
    assert report.platform_info.raw == 0x25
    assert report.signing_key is SigningKey.VCEK
    assert not report.key_info.mask_chip_key
    assert report.chip_id == simulated_backend.chip_id
    assert len(report.chip_id) == 64
    assert report.report_id_ma == b"\xff" * 32
    assert (report.launch_mit_vector, report.current_mit_vector) == (0, 0)
    assert str(report.current_firmware) == str(report.committed_firmware) == "1.55.40"
    tcbs = {report.current_tcb(), report.reported_tcb(), report.committed_tcb(), report.launch_tcb()}
    assert len(tcbs) == 1
    assert tcbs.pop().components() == {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 84}
    assert report.measurement == measurement.simulated_measurement()
    assert report.reserved_problems() == ()
    assert report.signature_padding_problems() == []


def test_report_signature_verifies_with_the_vcek_and_breaks_when_tampered(
    simulated_backend: SimulatedBackend, signature_valid: Callable[[bytes, str], bool]
) -> None:
    quote = simulated_backend.get_quote(REPORT_DATA)
    assert quote.vek_pem is not None
    assert signature_valid(quote.report, quote.vek_pem)

    tampered = bytearray(quote.report)
    tampered[0x90] ^= 1  # one bit of MEASUREMENT
    assert not signature_valid(bytes(tampered), quote.vek_pem)


def test_report_id_is_random_per_instance_but_fixed_within_one(simulated_tee_dir: Path) -> None:
    first, second = SimulatedBackend(state_dir=simulated_tee_dir), SimulatedBackend(state_dir=simulated_tee_dir)
    ids = [AttestationReport.parse(b.get_quote(REPORT_DATA).report).report_id for b in (first, first, second)]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


def test_explicit_measurement_lands_in_the_report(simulated_tee_dir: Path) -> None:
    backend = SimulatedBackend(state_dir=simulated_tee_dir, measurement=b"\x42" * 48)
    assert AttestationReport.parse(backend.get_quote(REPORT_DATA).report).measurement == b"\x42" * 48


@pytest.mark.parametrize("bad", [b"", b"\x00" * 47, b"\x00" * 64])
def test_measurement_must_be_48_bytes(simulated_tee_dir: Path, bad: bytes) -> None:
    with pytest.raises(ValueError, match="48 bytes"):
        SimulatedBackend(state_dir=simulated_tee_dir, measurement=bad)


@pytest.mark.parametrize(
    ("report_data", "vmpl", "message"),
    [
        (b"\x00" * 63, 0, "exactly 64 bytes"),
        (b"\x00" * 65, 0, "exactly 64 bytes"),
        (bytearray(64), 0, "exactly 64 bytes"),
        (b"\x00" * 64, 4, "vmpl"),
        (b"\x00" * 64, -1, "vmpl"),
        (b"\x00" * 64, True, "vmpl"),
    ],
)
def test_bad_requests_are_refused(
    simulated_backend: SimulatedBackend, report_data: bytes, vmpl: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        simulated_backend.get_quote(report_data, vmpl)


def test_quotes_from_many_threads_all_verify(
    simulated_backend: SimulatedBackend, signature_valid: Callable[[bytes, str], bool]
) -> None:
    results: list[bool] = []

    def worker(index: int) -> None:
        data = bytes([index]) * 64
        quote = simulated_backend.get_quote(data)
        assert quote.vek_pem is not None
        results.append(quote.report[0x50:0x90] == data and signature_valid(quote.report, quote.vek_pem))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 8


# -- the certificates ------------------------------------------------------------------------------------------


def test_quote_carries_vcek_and_chain_in_evidence_order(simulated_backend: SimulatedBackend) -> None:
    quote = simulated_backend.get_quote(REPORT_DATA)
    assert quote.vek_pem == simulated_backend.vcek_pem
    assert quote.chain_pem == (simulated_backend.ask_pem, simulated_backend.ark_pem)
    loaded = [certs.load_certificates(pem)[0] for pem in (quote.vek_pem, *quote.chain_pem)]
    assert [c.role for c in loaded] == [certs.Role.VCEK, certs.Role.ASK, certs.Role.ARK]
    assert [c.common_name for c in loaded] == ["SEV-VCEK", "SEV-Genoa", "ARK-Genoa"]
    assert {c.organization for c in loaded} == {certs.SIMULATED_ORGANIZATION}


@pytest.mark.parametrize(
    ("attribute", "role"),
    [("vcek_pem", certs.Role.VCEK), ("ask_pem", certs.Role.ASK), ("ark_pem", certs.Role.ARK)],
)
def test_each_certificate_follows_amds_profile(
    simulated_backend: SimulatedBackend, attribute: str, role: certs.Role
) -> None:
    cert = certs.load_certificates(getattr(simulated_backend, attribute))[0]
    assert certs.profile_problems(cert, role, certs.SIMULATED_ORGANIZATION) == []
    # ...and it is not mistaken for AMD's.
    assert certs.profile_problems(cert, role, certs.AMD_ORGANIZATION) != []


def test_chain_signatures_are_pss_sha384_salt_48(simulated_backend: SimulatedBackend) -> None:
    ark, ask, vcek = (
        _cert(simulated_backend.ark_pem),
        _cert(simulated_backend.ask_pem),
        _cert(simulated_backend.vcek_pem),
    )
    for child, parent in ((ark, ark), (ask, ark), (vcek, ask)):
        child.verify_directly_issued_by(parent)
        key = parent.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.key_size == 4096
        # An explicit salt length makes OpenSSL reject any other salt length.
        key.verify(child.signature, child.tbs_certificate_bytes, PSS_48, hashes.SHA384())
    vcek_key = vcek.public_key()
    assert isinstance(vcek_key, ec.EllipticCurvePublicKey)
    assert vcek_key.curve.name == "secp384r1"


def test_certificate_extensions_and_validity_look_like_amds(simulated_backend: SimulatedBackend) -> None:
    ark, ask, vcek = (
        _cert(simulated_backend.ark_pem),
        _cert(simulated_backend.ask_pem),
        _cert(simulated_backend.vcek_pem),
    )
    now = datetime.now(UTC)
    for cert in (ark, ask, vcek):
        assert cert.version is x509.Version.v3
        assert cert.serial_number > 0
        assert now - timedelta(days=2) < cert.not_valid_before_utc < now - timedelta(hours=23)
    assert (ark.not_valid_after_utc - ark.not_valid_before_utc).days // 365 == 25
    assert (ask.not_valid_after_utc - ask.not_valid_before_utc).days // 365 == 25
    assert (vcek.not_valid_after_utc - vcek.not_valid_before_utc).days // 365 == 7

    assert ark.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ark.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length is None
    ark_usage = ark.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ark_usage.key_cert_sign
    assert ark_usage.crl_sign
    ask_constraints = ask.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (ask_constraints.ca, ask_constraints.path_length) == (True, 0)
    assert ask.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for cert in (ark, ask):
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert len(points) == 1
        assert points[0].full_name is not None
        assert str(points[0].full_name[0].value).endswith("/vcek/v1/Genoa/crl")

    # Like AMD's VCEKs: only the KDS extensions, no AKI/SKI.
    assert {e.oid.dotted_string.startswith(certs.OID_ARC + ".") for e in vcek.extensions} == {True}
    assert all(not e.critical for e in vcek.extensions)


def test_vcek_extensions_decode_cleanly_and_bind_the_report(simulated_backend: SimulatedBackend) -> None:
    quote = simulated_backend.get_quote(REPORT_DATA)
    assert quote.vek_pem is not None
    extensions = certs.vek_extensions(_der(quote.vek_pem))
    report = AttestationReport.parse(quote.report)

    assert extensions.problems == ()
    assert extensions.struct_version == 0
    assert extensions.product_name == "Genoa"
    assert extensions.product is Product.GENOA
    assert extensions.hw_id == report.chip_id
    assert extensions.hw_id_encoding == "raw"
    assert extensions.csp_id is None
    assert extensions.tcb_components() == report.reported_tcb().components()
    assert {extensions.spls[f"spl_{i}"] for i in range(4, 8)} == {0}


def test_vcek_extension_values_are_minimal_der(simulated_backend: SimulatedBackend) -> None:
    vcek = _cert(simulated_backend.vcek_pem)
    raw = {
        e.oid.dotted_string: e.value.value for e in vcek.extensions if isinstance(e.value, x509.UnrecognizedExtension)
    }
    assert raw[certs.OID_STRUCT_VERSION] == bytes.fromhex("020100")
    assert raw[certs.OID_PRODUCT_NAME] == b"\x16\x05Genoa"
    assert raw[certs.OID_BL_SPL] == bytes.fromhex("02010a")
    assert raw[certs.OID_SNP_SPL] == bytes.fromhex("020117")
    assert raw[certs.OID_UCODE_SPL] == bytes.fromhex("020154")
    assert raw[certs.OID_HW_ID] == simulated_backend.chip_id  # no tag, exactly like KDS


@pytest.mark.parametrize(
    ("value", "encoded"), [(0, "020100"), (0x7F, "02017f"), (0x80, "02020080"), (0xFF, "020200ff")]
)
def test_der_integer_is_minimal(value: int, encoded: str) -> None:
    assert der_integer(value) == bytes.fromhex(encoded)


@pytest.mark.parametrize("value", [-1, 256])
def test_der_integer_refuses_what_is_not_an_spl(value: int) -> None:
    with pytest.raises(ValueError, match="one byte"):
        der_integer(value)


def test_ark_sha256_is_the_digest_of_the_ark_der(simulated_backend: SimulatedBackend) -> None:
    cert = certs.load_certificates(simulated_backend.ark_pem)[0]
    assert simulated_backend.ark_sha256() == cert.sha256


# -- sealing keys ----------------------------------------------------------------------------------------------


def test_sealing_keys_are_stable_per_measurement_and_context(simulated_tee_dir: Path) -> None:
    code = measurement.simulated_measurement()
    first = SimulatedBackend(state_dir=simulated_tee_dir, measurement=code)
    again = SimulatedBackend(state_dir=simulated_tee_dir, measurement=code)
    other_code = SimulatedBackend(state_dir=simulated_tee_dir, measurement=b"\x01" * 48)

    key = first.derive_sealing_key(b"vault")
    assert len(key) == 32
    assert again.derive_sealing_key(b"vault") == key
    assert first.derive_sealing_key(b"audit") != key
    assert first.derive_sealing_key(b"") != key
    assert other_code.derive_sealing_key(b"vault") != key


def test_sealing_keys_depend_on_the_persisted_secret(simulated_tee_dir: Path, tmp_path: Path) -> None:
    document = json.loads((simulated_tee_dir / STATE_FILE).read_text())
    document["secret"] = bytes(32).hex()
    (tmp_path / STATE_FILE).write_text(json.dumps(document))
    same_chain_other_secret = SimulatedBackend(state_dir=tmp_path, measurement=b"\x00" * 48)
    original = SimulatedBackend(state_dir=simulated_tee_dir, measurement=b"\x00" * 48)
    assert same_chain_other_secret.derive_sealing_key(b"x") != original.derive_sealing_key(b"x")


def test_sealing_context_must_be_bytes(simulated_backend: SimulatedBackend) -> None:
    with pytest.raises(TypeError, match="bytes"):
        simulated_backend.derive_sealing_key("vault")  # type: ignore[arg-type]


# -- persisted state ---------------------------------------------------------------------------------------------


def test_state_is_persisted_privately_and_reused(simulated_tee_dir: Path, simulated_backend: SimulatedBackend) -> None:
    state = simulated_tee_dir / STATE_FILE
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE((simulated_tee_dir / LOCK_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in simulated_tee_dir.iterdir()) == sorted([STATE_FILE, LOCK_FILE])  # no temp files

    reloaded = SimulatedBackend(state_dir=simulated_tee_dir)
    assert reloaded.ark_sha256() == simulated_backend.ark_sha256()
    assert reloaded.vcek_pem == simulated_backend.vcek_pem
    assert reloaded.chip_id == simulated_backend.chip_id

    document = json.loads(state.read_text())
    assert {"ark_key", "ark_cert", "ask_key", "ask_cert", "vcek_key", "vcek_cert", "secret", "chip_id"} <= set(document)
    assert len(bytes.fromhex(document["secret"])) == 32
    assert bytes.fromhex(document["chip_id"]) == simulated_backend.chip_id


def test_default_backend_uses_the_environment_directory(simulated_tee_dir: Path) -> None:
    # tests/conftest.py points CONFNB_SIMULATED_TEE_DIR at the session chip.
    backend = get_backend("simulated")
    assert isinstance(backend, SimulatedBackend)
    assert backend.name == "simulated"
    assert backend.state_dir == simulated_tee_dir


def test_default_state_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_STATE_DIR, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "explicit"
    monkeypatch.delenv(ENV_STATE_DIR)
    assert default_state_dir() == tmp_path / "xdg" / "confnb" / "simulated-tee"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec says relative values are invalid
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "share" / "confnb" / "simulated-tee"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_state_dir() == tmp_path / "home" / ".local" / "share" / "confnb" / "simulated-tee"


def _blocked_flock_waiters(path: Path) -> int:
    """How many processes/threads wait for a flock on ``path`` (Linux /proc/locks marks waiters with ->)."""
    inode = path.stat().st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line and line.split()[-3].endswith(f":{inode}"))


def test_a_starting_kernel_waits_for_another_one_generating_the_chain(
    tmp_path: Path, simulated_tee_dir: Path, simulated_backend: SimulatedBackend
) -> None:
    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to observe the waiting kernel")
    state_dir = tmp_path / "fresh"
    state_dir.mkdir(mode=0o700)
    lock_path = state_dir / LOCK_FILE
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # "another kernel" is generating
    outcome: list[SimulatedBackend | BaseException] = []

    def start_second_kernel() -> None:
        try:
            outcome.append(SimulatedBackend(state_dir=state_dir))
        except BaseException as exc:  # surfaced by the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=start_second_kernel)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while _blocked_flock_waiters(lock_path) == 0:
            assert time.monotonic() < deadline, "the second kernel never waited for the lock"
            time.sleep(0.005)
        # The first kernel finishes: its state appears atomically, then it releases the lock.
        shutil.copy2(simulated_tee_dir / STATE_FILE, state_dir / STATE_FILE)
    finally:
        os.close(holder)
        thread.join(timeout=30)
    assert len(outcome) == 1
    second = outcome[0]
    assert isinstance(second, SimulatedBackend)
    assert second.ark_sha256() == simulated_backend.ark_sha256()  # it loaded, it did not generate its own


def test_corrupt_state_is_reported_not_regenerated(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(TeeError, match=r"unusable \(not JSON\); delete it"):
        SimulatedBackend(state_dir=tmp_path)
    assert (tmp_path / STATE_FILE).read_text() == "{not json"


def test_state_whose_key_does_not_match_its_vcek_is_refused(simulated_tee_dir: Path, tmp_path: Path) -> None:
    document = json.loads((simulated_tee_dir / STATE_FILE).read_text())
    stranger = ec.generate_private_key(ec.SECP384R1())
    document["vcek_key"] = stranger.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    (tmp_path / STATE_FILE).write_text(json.dumps(document))
    with pytest.raises(TeeError, match="does not match the VCEK certificate"):
        SimulatedBackend(state_dir=tmp_path)


def test_state_with_a_missing_field_is_refused(simulated_tee_dir: Path, tmp_path: Path) -> None:
    document = json.loads((simulated_tee_dir / STATE_FILE).read_text())
    del document["chip_id"]
    (tmp_path / STATE_FILE).write_text(json.dumps(document))
    with pytest.raises(TeeError, match="chip_id"):
        SimulatedBackend(state_dir=tmp_path)


# -- fault injection ----------------------------------------------------------------------------------------------


def test_the_report_signature_fault_spares_reports_until_armed(
    simulated_tee_dir: Path, signature_valid: Callable[[bytes, str], bool]
) -> None:
    backend = SimulatedBackend(state_dir=simulated_tee_dir, fault="report-signature", fault_armed=False)
    before = backend.get_quote(REPORT_DATA)
    assert before.vek_pem is not None and signature_valid(before.report, before.vek_pem)
    backend.arm_fault()
    after = backend.get_quote(REPORT_DATA)
    assert not signature_valid(after.report, before.vek_pem)
    assert after.report[:0x2A0] == before.report[:0x2A0]  # only the signature differs
    restored = bytearray(after.report)
    restored[0x2A0] ^= 0x01  # one bit: the lowest of r
    assert signature_valid(bytes(restored), before.vek_pem)
    assert backend.fault == "report-signature"


def test_an_armed_fault_corrupts_every_report_and_an_unknown_fault_is_refused(
    simulated_tee_dir: Path, signature_valid: Callable[[bytes, str], bool]
) -> None:
    backend = get_backend("simulated", state_dir=simulated_tee_dir, fault="report-signature")
    for _ in range(2):
        quote = backend.get_quote(REPORT_DATA)
        assert quote.vek_pem is not None and not signature_valid(quote.report, quote.vek_pem)
    with pytest.raises(TeeError, match="unknown simulated fault 'memory'"):
        SimulatedBackend(state_dir=simulated_tee_dir, fault="memory")
