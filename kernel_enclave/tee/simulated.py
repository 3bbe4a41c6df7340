"""A simulated SEV-SNP platform: byte-exact v5 Genoa reports signed by a local ARK -> ASK -> VCEK chain.

The point is that a verifier runs one code path for real and simulated evidence: the reports have AMD's layout,
the certificates AMD's profile (names, key types, RSASSA-PSS, KDS extensions binding TCB and chip id), and only
two things differ — the organisation in every certificate name is ``SIMULATED_ORGANIZATION`` and the roots are not
AMD's, so nothing but a policy with ``allow_simulated = true`` accepts them.

The chain is generated once per machine and user (RSA-4096 key generation takes seconds) and persisted, so a
verifier can pin the simulated ARK like a real one and sealed data survives restarts. The state file holds
private keys and the sealing secret: it is written 0600, atomically, under an exclusive lock so that two kernels
starting at once agree on one chip.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from confnb.attest import certs
from confnb.attest.report import (
    ECDSA_P384_SHA384,
    REPORT_SIZE,
    SIGNED_SIZE,
    AttestationReport,
    GuestPolicy,
    KeyInfo,
    PlatformInfo,
    Product,
    SigningKey,
)
from confnb.attest.tcb import TcbLayout, TcbVersion
from confnb.fileio import write_atomically
from kernel_enclave import measurement as code_measurement
from kernel_enclave.tee.base import (
    SEALING_KEY_INFO,
    SEALING_KEY_SIZE,
    TeeBackend,
    TeeError,
    TeeQuote,
    check_context,
    check_report_request,
)

log = logging.getLogger(__name__)

ENV_STATE_DIR = "CONFNB_SIMULATED_TEE_DIR"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STATE_FORMAT = "confnb-simulated-tee/1"

PRODUCT = Product.GENOA
# A plausible Genoa platform (the TCB of a real Azure Genoa report, firmware 1.55.40).
TCB = TcbVersion(TcbLayout.LEGACY, bootloader=10, tee=0, snp=23, microcode=84)
FIRMWARE = (1, 55, 40)  # major, minor, build
CPUID = (0x19, 0x11, 0x01)  # family, model, stepping: Genoa
POLICY = 0x30000  # SMT allowed + reserved bit 17; not DEBUG, not MIGRATE_MA, ABI minimum 0.0
POLICY_DEBUG = 1 << 19
# "1" simulates a guest launched with DEBUG allowed (its memory readable by the host), for demos and tests of
# policies that must reject it.
ENV_DEBUG = "CONFNB_SIMULATED_DEBUG"
# Faults a test can inject into a kernel through its kernelspec's environment, to see a failure exactly where a
# tampering host would cause it. "report-signature": every report after the launch evidence carries one flipped
# signature bit, so the kernel starts (its launch evidence verified) and every later verification fails.
ENV_FAULT = "CONFNB_SIMULATED_FAULT"
FAULTS = ("report-signature",)
PLATFORM_INFO = 0x25  # SMT_EN, ECC_EN, ALIAS_CHECK_COMPLETE, as on current Genoa firmware
REPORT_VERSION = 5
CHIP_ID_SIZE = 64
SECRET_SIZE = 32
# Same shape as AMD's CRL URL but under a reserved TLD (RFC 2606): it can never be fetched, nor mistaken for AMD's.
CRL_URL = f"https://simulated-tee.confnb.invalid/vcek/v1/{PRODUCT.value}/crl"
ROOT_VALIDITY = dt.timedelta(days=25 * 365 + 6)
VCEK_VALIDITY = dt.timedelta(days=7 * 365 + 2)
_BACKDATE = dt.timedelta(days=1)
_SIGNATURE_SLOT = 72


def default_state_dir() -> Path:
    """``$CONFNB_SIMULATED_TEE_DIR``, else ``$XDG_DATA_HOME/confnb/simulated-tee``, else under ~/.local/share."""
    explicit = os.environ.get(ENV_STATE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "confnb" / "simulated-tee"


@dataclass(frozen=True)
class _State:
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    secret: bytes
    chip_id: bytes


class SimulatedBackend(TeeBackend):
    """The simulated TEE. Every UI must label its evidence SIMULATED; its roots are not AMD's."""

    name = "simulated"

    def __init__(
        self,
        state_dir: Path | None = None,
        measurement: bytes | None = None,
        debug: bool | None = None,
        fault: str | None = None,
        fault_armed: bool = True,
    ) -> None:
        """``fault`` (one of :data:`FAULTS`) is injected only once armed: the launcher arms it after its launch
        evidence, so the kernel starts and later evidence fails as if the host had tampered with it."""
        self._debug = os.environ.get(ENV_DEBUG) == "1" if debug is None else debug
        if fault is not None and fault not in FAULTS:
            raise TeeError(f"unknown simulated fault {fault!r} (known: {', '.join(FAULTS)})")
        self._fault = fault
        self._fault_armed = fault_armed
        self._state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        if measurement is None:
            measurement = code_measurement.simulated_measurement()
        if not isinstance(measurement, bytes) or len(measurement) != 48:
            raise ValueError("a launch measurement is 48 bytes (SHA-384)")
        self._measurement = measurement
        self._state = _load_or_create(self._state_dir)
        self._report_id = secrets.token_bytes(32)
        pem = serialization.Encoding.PEM
        self._ark_pem = self._state.ark.public_bytes(pem).decode("ascii")
        self._ask_pem = self._state.ask.public_bytes(pem).decode("ascii")
        self._vcek_pem = self._state.vcek.public_bytes(pem).decode("ascii")

    # -- what callers may show or pin -------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def measurement(self) -> bytes:
        return self._measurement

    @property
    def chip_id(self) -> bytes:
        return self._state.chip_id

    @property
    def ark_pem(self) -> str:
        return self._ark_pem

    @property
    def ask_pem(self) -> str:
        return self._ask_pem

    @property
    def vcek_pem(self) -> str:
        return self._vcek_pem

    @property
    def fault(self) -> str | None:
        return self._fault

    def arm_fault(self) -> None:
        """From now on every report carries the configured fault (no effect without one)."""
        self._fault_armed = True

    def ark_sha256(self) -> str:
        """Hex SHA-256 of the simulated ARK's DER: what a policy would pin, and what the UI shows."""
        return hashlib.sha256(self._state.ark.public_bytes(serialization.Encoding.DER)).hexdigest()

    # -- TeeBackend -------------------------------------------------------------------------------------

    def get_quote(self, report_data: bytes, vmpl: int = 0) -> TeeQuote:
        check_report_request(report_data, vmpl)
        report = self._sign(self._unsigned_report(report_data, vmpl))
        if self._fault == "report-signature" and self._fault_armed:
            flipped = bytearray(report)
            flipped[SIGNED_SIZE] ^= 0x01  # the lowest bit of r: a signature that no longer verifies
            report = bytes(flipped)
        return TeeQuote(report=report, vek_pem=self._vcek_pem, chain_pem=(self._ask_pem, self._ark_pem))

    def derive_sealing_key(self, context: bytes) -> bytes:
        """HKDF-SHA256 of the persisted chip secret, bound to the measurement as SNP_GET_DERIVED_KEY would be."""
        check_context(context)
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=SEALING_KEY_SIZE,
            salt=None,
            info=SEALING_KEY_INFO + self._measurement + context,
        )
        return hkdf.derive(self._state.secret)

    # -- report -----------------------------------------------------------------------------------------

    def _unsigned_report(self, report_data: bytes, vmpl: int) -> AttestationReport:
        tcb = TCB.encode()
        major, minor, build = FIRMWARE
        family, model, stepping = CPUID
        return AttestationReport(
            version=REPORT_VERSION,
            guest_svn=0,
            policy=GuestPolicy(POLICY | (POLICY_DEBUG if self._debug else 0)),
            family_id=bytes(16),
            image_id=bytes(16),
            vmpl=vmpl,
            signature_algo=ECDSA_P384_SHA384,
            current_tcb_raw=tcb,
            platform_info=PlatformInfo(PLATFORM_INFO),
            key_info=KeyInfo(int(SigningKey.VCEK) << 2),
            reserved_0x04c=0,
            report_data=report_data,
            measurement=self._measurement,
            host_data=bytes(32),
            id_key_digest=bytes(48),
            author_key_digest=bytes(48),
            report_id=self._report_id,
            report_id_ma=b"\xff" * 32,
            reported_tcb_raw=tcb,
            cpuid_fam_id=family,
            cpuid_mod_id=model,
            cpuid_step=stepping,
            reserved_0x18b=bytes(21),
            chip_id=self._state.chip_id,
            committed_tcb_raw=tcb,
            current_build=build,
            current_minor=minor,
            current_major=major,
            reserved_0x1eb=0,
            committed_build=build,
            committed_minor=minor,
            committed_major=major,
            reserved_0x1ef=0,
            launch_tcb_raw=tcb,
            launch_mit_vector=0,
            current_mit_vector=0,
            reserved_tail=bytes(SIGNED_SIZE - 0x208),
            signature=bytes(REPORT_SIZE - SIGNED_SIZE),
        )

    def _sign(self, unsigned: AttestationReport) -> bytes:
        """ECDSA P-384/SHA-384 over bytes 0..0x29F; r and s little-endian in 72-byte slots, as the firmware does."""
        body = unsigned.to_bytes()[:SIGNED_SIZE]
        r, s = decode_dss_signature(self._state.vcek_key.sign(body, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(_SIGNATURE_SLOT, "little") + s.to_bytes(_SIGNATURE_SLOT, "little")
        return body + signature + bytes(REPORT_SIZE - SIGNED_SIZE - len(signature))


# -- persisted state --------------------------------------------------------------------------------------


def _load_or_create(state_dir: Path) -> _State:
    path = state_dir / STATE_FILE
    if path.exists():  # the common case needs no lock: the file only ever appears complete (rename)
        return _read_state(path)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TeeError(f"cannot create the simulated TEE state in {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if path.exists():  # another process generated it while we waited for the lock
            return _read_state(path)
        log.info("generating the simulated TEE's ARK -> ASK -> VCEK chain in %s (once)", state_dir)
        document = _generate_state(dt.datetime.now(dt.UTC))
        write_atomically(path, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"))
        return _read_state(path)
    finally:
        os.close(lock_fd)  # also releases the lock


def _read_state(path: Path) -> _State:
    def unusable(reason: str) -> TeeError:
        return TeeError(f"simulated TEE state {path} is unusable ({reason}); delete it to create a new simulated chip")

    try:
        mode = path.stat().st_mode
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise unusable(exc.strerror or str(exc)) from None
    except (ValueError, UnicodeDecodeError):
        raise unusable("not JSON") from None
    if mode & 0o077:
        log.warning("simulated TEE state %s is readable by other users (mode %o); it should be 0600", path, mode)
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise unusable(f"format is not {STATE_FORMAT}")
    try:
        ark = x509.load_pem_x509_certificate(_field(document, "ark_cert").encode("ascii"))
        ask = x509.load_pem_x509_certificate(_field(document, "ask_cert").encode("ascii"))
        vcek = x509.load_pem_x509_certificate(_field(document, "vcek_cert").encode("ascii"))
        vcek_key = serialization.load_pem_private_key(_field(document, "vcek_key").encode("ascii"), password=None)
        secret = bytes.fromhex(_field(document, "secret"))
        chip_id = bytes.fromhex(_field(document, "chip_id"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise unusable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if not isinstance(vcek_key, ec.EllipticCurvePrivateKey) or vcek_key.curve.name != "secp384r1":
        raise unusable("the VCEK key is not ECDSA P-384")
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if vcek_key.public_key().public_bytes(der, spki) != vcek.public_key().public_bytes(der, spki):
        raise unusable("the VCEK key does not match the VCEK certificate")
    if len(secret) != SECRET_SIZE or len(chip_id) != CHIP_ID_SIZE:
        raise unusable("the secret or chip id has the wrong length")
    return _State(ark=ark, ask=ask, vcek=vcek, vcek_key=vcek_key, secret=secret, chip_id=chip_id)


def _field(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} is missing")
    return value


def _generate_state(now: dt.datetime) -> dict[str, str]:
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    chip_id = secrets.token_bytes(CHIP_ID_SIZE)
    start = now - _BACKDATE
    ark = _ark_certificate(ark_key, start)
    ask = _ask_certificate(ask_key, ark_key, start)
    vcek = _vcek_certificate(vcek_key.public_key(), ask_key, chip_id, start)
    pem = serialization.Encoding.PEM

    def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()

    return {
        "format": STATE_FORMAT,
        "created": now.replace(microsecond=0).isoformat(),
        "ark_key": private_pem(ark_key),
        "ark_cert": ark.public_bytes(pem).decode(),
        "ask_key": private_pem(ask_key),
        "ask_cert": ask.public_bytes(pem).decode(),
        "vcek_key": private_pem(vcek_key),
        "vcek_cert": vcek.public_bytes(pem).decode(),
        "secret": secrets.token_bytes(SECRET_SIZE).hex(),
        "chip_id": chip_id.hex(),
    }


# -- certificates shaped like AMD's -----------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    # AMD's attribute order: OU, C, L, ST, O, CN.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, certs.SIMULATED_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


ARK_NAME = _name(f"ARK-{PRODUCT.value}")
ASK_NAME = _name(f"SEV-{PRODUCT.value}")
VCEK_NAME = _name("SEV-VCEK")


def _sign_pss(builder: x509.CertificateBuilder, key: rsa.RSAPrivateKey) -> x509.Certificate:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return builder.sign(key, hashes.SHA384(), rsa_padding=pss)


def _crl_distribution_points() -> x509.CRLDistributionPoints:
    point = x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(CRL_URL)], relative_name=None, reasons=None, crl_issuer=None
    )
    return x509.CRLDistributionPoints([point])


def _key_usage(*, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ark_certificate(key: rsa.RSAPrivateKey, start: dt.datetime) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(ARK_NAME)
        .issuer_name(ARK_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + ROOT_VALIDITY)
        .add_extension(_key_usage(crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_crl_distribution_points(), critical=False)
    )
    return _sign_pss(builder, key)


def _ask_certificate(key: rsa.RSAPrivateKey, ark_key: rsa.RSAPrivateKey, start: dt.datetime) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(ASK_NAME)
        .issuer_name(ARK_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + ROOT_VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ark_key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(crl_sign=False), critical=True)
        .add_extension(_crl_distribution_points(), critical=False)
    )
    return _sign_pss(builder, ark_key)


def der_integer(value: int) -> bytes:
    """Minimal DER INTEGER for 0..255, as KDS encodes SPLs (``02 01 xx``, or ``02 02 00 xx`` from 0x80)."""
    if not 0 <= value <= 0xFF:
        raise ValueError(f"an SPL is one byte, not {value}")
    return bytes([0x02, 0x01, value]) if value < 0x80 else bytes([0x02, 0x02, 0x00, value])


def _der_ia5(text: str) -> bytes:
    raw = text.encode("ascii")
    assert len(raw) < 0x80
    return bytes([0x16, len(raw)]) + raw


def vcek_extensions(tcb: TcbVersion, chip_id: bytes, product: Product = PRODUCT) -> list[x509.ExtensionType]:
    """The KDS extensions of a legacy-layout (Milan/Genoa) VCEK, in the order AMD's KDS emits them."""
    reserved = tcb.reserved or bytes(4)
    values = [
        (certs.OID_STRUCT_VERSION, der_integer(0)),
        (certs.OID_PRODUCT_NAME, _der_ia5(product.value)),
        (certs.OID_BL_SPL, der_integer(tcb.bootloader)),
        (certs.OID_TEE_SPL, der_integer(tcb.tee)),
        (certs.OID_SPL_4, der_integer(reserved[0])),
        (certs.OID_SPL_5, der_integer(reserved[1])),
        (certs.OID_SPL_6, der_integer(reserved[2])),
        (certs.OID_SPL_7, der_integer(reserved[3])),
        (certs.OID_SNP_SPL, der_integer(tcb.snp)),
        (certs.OID_UCODE_SPL, der_integer(tcb.microcode)),
        (certs.OID_HW_ID, chip_id),  # raw bytes, no DER tag: exactly what KDS does
    ]
    return [x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value) for oid, value in values]


def _vcek_certificate(
    public_key: ec.EllipticCurvePublicKey, ask_key: rsa.RSAPrivateKey, chip_id: bytes, start: dt.datetime
) -> x509.Certificate:
    # Like AMD's VCEKs: no AKI/SKI, no key usage, only the KDS extensions. AMD uses serial 0, which
    # cryptography refuses to issue; a random positive serial changes nothing a verifier checks.
    builder = (
        x509.CertificateBuilder()
        .subject_name(VCEK_NAME)
        .issuer_name(ASK_NAME)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + VCEK_VALIDITY)
    )
    for extension in vcek_extensions(TCB, chip_id):
        builder = builder.add_extension(extension, critical=False)
    return _sign_pss(builder, ask_key)
