"""AMD's certificates: loading, roles in the chain, the X.509 profile, and the VCEK/VLEK extensions.

The chain is ARK (self-signed root, RSA-4096) -> ASK (for VCEKs) or ASVK (for VLEKs) -> VEK (the P-384 key that
signs reports). The VEK carries the TCB it was derived at and, for a VCEK, the chip's hwID in private extensions
under 1.3.6.1.4.1.3704.1; binding those to the report is what makes a signature mean "this chip, this firmware".
"""

from __future__ import annotations

import enum
import functools
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from confnb.attest.der import DerError, check_certificate_envelope, read_ia5_string, read_integer, read_octet_string
from confnb.attest.errors import CertificateError
from confnb.attest.report import Product

# AMD issues every VCEK and VLEK with serial number 0, which RFC 5280 forbids, and cryptography warns about it
# on every load. The certificates are genuine and the serial is never used, so this one warning is silenced.
warnings.filterwarnings(
    "ignore",
    message="Parsed a serial number which wasn't positive",
    category=CryptographyDeprecationWarning,
)

AMD_ORGANIZATION = "Advanced Micro Devices"
KDS_ORIGIN = "https://kdsintf.amd.com"
# The simulated TEE's certificates carry this organisation instead of AMD's, so no verifier can mistake them.
SIMULATED_ORGANIZATION = "confnb SIMULATED TEE - not AMD"
_AMD_NAME = {
    NameOID.ORGANIZATIONAL_UNIT_NAME: "Engineering",
    NameOID.COUNTRY_NAME: "US",
    NameOID.LOCALITY_NAME: "Santa Clara",
    NameOID.STATE_OR_PROVINCE_NAME: "CA",
}

OID_ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{OID_ARC}.1"
OID_PRODUCT_NAME = f"{OID_ARC}.2"
OID_BL_SPL = f"{OID_ARC}.3.1"
OID_TEE_SPL = f"{OID_ARC}.3.2"
OID_SNP_SPL = f"{OID_ARC}.3.3"
OID_SPL_4 = f"{OID_ARC}.3.4"
OID_SPL_5 = f"{OID_ARC}.3.5"
OID_SPL_6 = f"{OID_ARC}.3.6"
OID_SPL_7 = f"{OID_ARC}.3.7"
OID_UCODE_SPL = f"{OID_ARC}.3.8"
OID_FMC_SPL = f"{OID_ARC}.3.9"
OID_HW_ID = f"{OID_ARC}.4"
OID_CSP_ID = f"{OID_ARC}.5"

_SPL_OIDS = {
    OID_BL_SPL: "bootloader",
    OID_TEE_SPL: "tee",
    OID_SNP_SPL: "snp",
    OID_SPL_4: "spl_4",
    OID_SPL_5: "spl_5",
    OID_SPL_6: "spl_6",
    OID_SPL_7: "spl_7",
    OID_UCODE_SPL: "microcode",
    OID_FMC_SPL: "fmc",
}
KNOWN_OIDS = {OID_STRUCT_VERSION, OID_PRODUCT_NAME, OID_HW_ID, OID_CSP_ID, *_SPL_OIDS}

PSS_SHA384 = SignatureAlgorithmOID.RSASSA_PSS


class Role(enum.Enum):
    """Where a certificate sits in AMD's hierarchy, read from its subject common name."""

    ARK = "ARK"
    ASK = "ASK"
    ASVK = "ASVK"
    VCEK = "VCEK"
    VLEK = "VLEK"


@dataclass(frozen=True)
class VekExtensions:
    """The KDS extensions of a VCEK or VLEK, decoded strictly."""

    struct_version: int | None
    product_name: str | None
    spls: dict[str, int]
    hw_id: bytes | None
    hw_id_encoding: str | None  # "raw" (what KDS issues) or "octet-string" (seen in some test certificates)
    csp_id: str | None
    problems: tuple[str, ...] = ()

    @property
    def product(self) -> Product | None:
        return Product.from_name(self.product_name) if self.product_name else None

    def tcb_components(self) -> dict[str, int]:
        """The SPLs a report's REPORTED_TCB must equal: bl/tee/snp/ucode, plus fmc for Turin-layout certs."""
        names = ["bootloader", "tee", "snp", "microcode"]
        if self.struct_version == 1 or "fmc" in self.spls:
            names.insert(0, "fmc")
        return {name: self.spls[name] for name in names if name in self.spls}

    def to_dict(self) -> dict[str, Any]:
        return {
            "struct_version": self.struct_version,
            "product_name": self.product_name,
            "tcb": self.tcb_components(),
            "hw_id": self.hw_id.hex() if self.hw_id is not None else None,
            "hw_id_encoding": self.hw_id_encoding,
            "csp_id": self.csp_id,
        }


@dataclass(frozen=True, eq=False)
class Cert:
    """A parsed certificate with what the verifier keeps asking of it computed once. Equal when the DER is."""

    der: bytes
    certificate: x509.Certificate = field(repr=False)
    sha256: str
    role: Role | None
    product: Product | None  # from the subject CN (ARK-Genoa, SEV-Genoa, SEV-VLEK-Genoa); None for a VEK
    common_name: str
    organization: str
    subject: x509.Name = field(repr=False)
    issuer: x509.Name = field(repr=False)
    name_problems: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cert) and other.der == self.der

    def __hash__(self) -> int:
        return hash(self.der)

    @property
    def is_self_issued(self) -> bool:
        return self.issuer == self.subject

    def describe(self) -> str:
        return f"{self.common_name} (sha256 {self.sha256[:16]}…)"


def _name_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else ""


def _role_and_product(common_name: str) -> tuple[Role | None, Product | None]:
    if common_name == "SEV-VCEK":
        return Role.VCEK, None
    if common_name == "SEV-VLEK":
        return Role.VLEK, None
    if common_name.startswith("ARK-"):
        return Role.ARK, Product.from_name(common_name[4:])
    if common_name.startswith("SEV-VLEK-"):
        return Role.ASVK, Product.from_name(common_name[9:])
    if common_name.startswith("SEV-"):
        return Role.ASK, Product.from_name(common_name[4:])
    return None, None


@functools.lru_cache(maxsize=256)
def parse_certificate(der: bytes) -> Cert:
    """Parse one DER certificate (memoised: a verifier sees the same few AMD certificates over and over)."""
    with warnings.catch_warnings(record=True) as caught:
        # cryptography warns (rather than fails) on malformed name attributes, such as a 3-letter country;
        # those warnings become profile problems here instead of noise on stderr.
        warnings.simplefilter("always", UserWarning)
        try:
            certificate = x509.load_der_x509_certificate(der)
            # cryptography decodes lazily; touch everything the verifier reads so bad DER fails here, once.
            subject, issuer = certificate.subject, certificate.issuer
            _ = (
                certificate.extensions,
                certificate.public_key(),
                certificate.not_valid_before_utc,
                certificate.not_valid_after_utc,
                certificate.signature_algorithm_oid,
                certificate.signature_algorithm_parameters,
                certificate.signature_hash_algorithm,
            )
            check_certificate_envelope(der)
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion) as exc:
            raise CertificateError(f"not a valid X.509 certificate: {exc}") from None
    name_problems = tuple(
        str(warning.message)
        for warning in caught
        if issubclass(warning.category, UserWarning)
        and not issubclass(warning.category, CryptographyDeprecationWarning)  # AMD's serial 0, see above
    )
    common_name = _name_attribute(subject, NameOID.COMMON_NAME)
    role, product = _role_and_product(common_name)
    return Cert(
        der=der,
        certificate=certificate,
        sha256=hashlib.sha256(der).hexdigest(),
        role=role,
        product=product,
        common_name=common_name or subject.rfc4514_string(),
        organization=_name_attribute(subject, NameOID.ORGANIZATION_NAME),
        subject=subject,
        issuer=issuer,
        name_problems=name_problems,
    )


def load_certificates(data: bytes | str, what: str = "certificate") -> list[Cert]:
    """Load PEM (one or more certificates) or a single DER certificate; ``what`` names the input in errors."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    if b"-----BEGIN" in raw:
        try:
            certificates = x509.load_pem_x509_certificates(raw)
        except ValueError as exc:
            raise CertificateError(f"{what}: bad PEM: {exc}") from None
        ders = [c.public_bytes(Encoding.DER) for c in certificates]
    else:
        if not raw:
            raise CertificateError(f"{what}: empty input")
        if raw[0] != 0x30:
            raise CertificateError(f"{what}: neither PEM nor DER (first byte {raw[0]:#04x})")
        ders = [raw]
    try:
        return [parse_certificate(der) for der in ders]
    except CertificateError as exc:
        raise CertificateError(f"{what}: {exc}") from None


@functools.lru_cache(maxsize=256)
def vek_extensions(der: bytes) -> VekExtensions:
    """Decode the KDS extensions of a VCEK/VLEK. Malformed values raise; unknown or misplaced ones are noted."""
    cert = parse_certificate(der).certificate
    problems: list[str] = []
    struct_version = product_name = csp_id = hw_id_encoding = None
    hw_id: bytes | None = None
    spls: dict[str, int] = {}
    seen: set[str] = set()
    for extension in cert.extensions:
        oid = extension.oid.dotted_string
        if not oid.startswith(OID_ARC + "."):
            continue
        if oid in seen:
            problems.append(f"extension {oid} appears twice")
        seen.add(oid)
        value = extension.value
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        try:
            if oid == OID_STRUCT_VERSION:
                struct_version = read_integer(raw)
            elif oid == OID_PRODUCT_NAME:
                product_name = read_ia5_string(raw)
            elif oid in _SPL_OIDS:
                spl = read_integer(raw)
                if spl > 255:
                    raise DerError(f"SPL {spl} does not fit the TCB's byte")
                spls[_SPL_OIDS[oid]] = spl
            elif oid == OID_HW_ID:
                hw_id, hw_id_encoding = _decode_hw_id(raw)
            elif oid == OID_CSP_ID:
                csp_id = read_ia5_string(raw)
            else:
                problems.append(f"unknown AMD extension {oid}")
        except DerError as exc:
            raise CertificateError(f"extension {oid} is malformed: {exc}") from None
    if hw_id is not None and csp_id is not None:
        problems.append("carries both hwID (VCEK) and cspID (VLEK)")
    for required in ("bootloader", "tee", "snp", "microcode"):
        if required not in spls:
            problems.append(f"missing {required} SPL extension")
    if struct_version == 1 and "fmc" not in spls:
        problems.append("structVersion 1 (Turin layout) without an fmcSPL extension")
    if product_name is None:
        problems.append("missing productName extension")
    return VekExtensions(struct_version, product_name, spls, hw_id, hw_id_encoding, csp_id, tuple(problems))


def _crl_point_problems(cert: Cert, role: Role, organization: str) -> list[str]:
    """AMD's CAs name exactly one CRL: ``https://kdsintf.amd.com/{vcek|vlek}/v1/<Product>/crl``."""
    try:
        points = cert.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ["no CRL distribution point"]
    uris = [
        name.value
        for point in points
        for name in point.full_name or ()
        if isinstance(name, x509.UniformResourceIdentifier)
    ]
    if len(uris) != 1:
        return [f"{len(uris)} CRL distribution point URIs, AMD's CAs carry exactly one"]
    kind = "vlek" if role is Role.ASVK else "vcek"
    product = cert.product.value if cert.product else "?"
    path = f"/{kind}/v1/{product}/crl"
    expected = f"{KDS_ORIGIN}{path}" if organization == AMD_ORGANIZATION else None
    if (expected and uris[0] != expected) or not uris[0].endswith(path):
        return [f"CRL distribution point {uris[0]!r} is not {expected or '…' + path!r}"]
    return []


def _decode_hw_id(raw: bytes) -> tuple[bytes, str]:
    # KDS puts the 64-byte (Milan/Genoa) or 8-byte (Turin) hwID in extnValue with no tag; some tools wrap it in
    # an OCTET STRING. The lengths never collide (66 and 10 bytes wrapped), so the length decides.
    if len(raw) in (64, 8):
        return raw, "raw"
    if len(raw) in (66, 10):
        inner = read_octet_string(raw)
        if len(inner) in (64, 8):
            return inner, "octet-string"
    raise DerError(f"hwID is {len(raw)} bytes; expected 64 or 8 raw bytes, or an OCTET STRING of them")


def profile_problems(cert: Cert, role: Role, organization: str) -> list[str]:
    """How ``cert`` departs from AMD's certificate profile for ``role`` (names, algorithms, key types)."""
    return list(_profile_problems(cert.der, role, organization))


@functools.lru_cache(maxsize=256)
def _profile_problems(der: bytes, role: Role, organization: str) -> tuple[str, ...]:
    cert = parse_certificate(der)
    problems: list[str] = []
    c = cert.certificate
    if c.version is not x509.Version.v3:
        problems.append("not an X.509 v3 certificate")
    if c.signature_algorithm_oid != PSS_SHA384:
        problems.append(f"signed with {c.signature_algorithm_oid.dotted_string}, not RSASSA-PSS")
    else:
        params = c.signature_algorithm_parameters
        hash_name = c.signature_hash_algorithm.name if c.signature_hash_algorithm else None
        if not isinstance(params, padding.PSS) or hash_name != "sha384":
            problems.append("RSASSA-PSS parameters are not SHA-384")
    problems += [f"malformed name: {problem}" for problem in cert.name_problems]
    for name_kind, name in (("subject", cert.subject), ("issuer", cert.issuer)):
        if _name_attribute(name, NameOID.ORGANIZATION_NAME) != organization:
            problems.append(f"{name_kind} organisation is not {organization!r}")
        for oid, expected in _AMD_NAME.items():
            if _name_attribute(name, oid) != expected:
                problems.append(f"{name_kind} {oid._name} is not {expected!r}")
    key = c.public_key()
    if role in (Role.ARK, Role.ASK, Role.ASVK):
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 4096:
            problems.append("key is not RSA-4096")
        problems += _crl_point_problems(cert, role, organization)
    elif not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        problems.append("key is not ECDSA P-384")
    return tuple(problems)
