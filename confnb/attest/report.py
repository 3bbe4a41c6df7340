"""The SEV-SNP ATTESTATION_REPORT (AMD SEV-SNP firmware ABI, "Table 23"), parsed completely.

Every byte of the 1184-byte structure lands in a field of :class:`AttestationReport`, reserved ones included, so
that :meth:`AttestationReport.to_bytes` reproduces the input exactly. Parsing never judges: a report with non-zero
reserved bytes parses, and the verifier's ``reserved_fields`` check says what is wrong with it. Only input that is
not a report at all (wrong length, a version we do not know the layout of) raises :class:`ReportFormatError`.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass, field
from typing import Any

from confnb.attest.errors import ReportFormatError
from confnb.attest.tcb import TcbLayout, TcbVersion

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SUPPORTED_VERSIONS = (2, 3, 4, 5)
ECDSA_P384_SHA384 = 1
_P384_COMPONENT = 48  # bytes of r and s that may be non-zero; the rest of each 72-byte slot is zero
_SIGNATURE_SLOT = 72
_ZERO_PAD = bytes(_SIGNATURE_SLOT - _P384_COMPONENT)
_ZERO_TAIL = bytes(REPORT_SIZE - SIGNED_SIZE - 2 * _SIGNATURE_SLOT)

# Little-endian layout of the signed part, as one struct; v2 keeps 24 reserved bytes where v3+ has CPUID bytes,
# and v2/v3 keep reserved bytes where v5 has mitigation vectors, so those regions are sliced separately.
_HEAD = struct.Struct("<II Q 16s16s II 8s Q I I 64s48s32s48s48s32s32s 8s")  # 0x000 .. 0x188
_TAIL = struct.Struct("<64s 8s BBBB BBBB 8s")  # 0x1A0 .. 0x1F8
assert _HEAD.size == 0x188
assert _TAIL.size == 0x1F8 - 0x1A0


class _Bit:
    """A named flag of a packed integer field (``raw``), read-only."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def __get__(self, owner: Any, cls: type | None = None) -> bool:
        return bool(owner.raw >> self.shift & 1)


class _Bits:
    """A named unsigned sub-field of a packed integer field (``raw``), read-only."""

    def __init__(self, shift: int, width: int) -> None:
        self.shift, self.mask = shift, (1 << width) - 1

    def __get__(self, owner: Any, cls: type | None = None) -> int:
        return int(owner.raw >> self.shift & self.mask)


class SigningKey(enum.IntEnum):
    """KEY_INFO.SIGNING_KEY: which endorsement key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7

    @classmethod
    def from_bits(cls, value: int) -> SigningKey | int:
        # 2..6 are reserved: kept as a bare int so the verifier can name it
        return _SIGNING_KEYS.get(value, value)


_SIGNING_KEYS = {key.value: key for key in SigningKey}


class Product(enum.Enum):
    """AMD EPYC generations with a KDS product name (the name AMD uses in URLs and certificates)."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @property
    def tcb_layout(self) -> TcbLayout:
        return TcbLayout.TURIN if self is Product.TURIN else TcbLayout.LEGACY

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> Product | None:
        """Map CPUID family/model to a KDS product (virtee/sev ``Generation::identify_cpu``).

        Bergamo and Siena (Genoa-class models 0xA0-0xAF) are served by KDS under "Genoa". Venice and unknown
        parts return None: AMD publishes no root we could pin for them yet.
        """
        if family == 0x19:
            if model <= 0x0F:
                return cls.MILAN
            if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
                return cls.GENOA
        if family == 0x1A and model <= 0x11:
            return cls.TURIN
        return None

    @classmethod
    def from_name(cls, name: str) -> Product | None:
        """Map a certificate productName such as ``Milan-B0`` or ``Genoa`` (stepping suffix ignored)."""
        return _PRODUCT_NAMES.get(name.split("-", 1)[0].lower())


_PRODUCT_NAMES = {product.value.lower(): product for product in Product}


@dataclass(frozen=True)
class GuestPolicy:
    """The guest POLICY word, chosen by the guest owner at launch and enforced by the firmware."""

    raw: int

    abi_minor = _Bits(0, 8)
    abi_major = _Bits(8, 8)
    smt_allowed = _Bit(16)
    reserved_bit17 = _Bit(17)
    migrate_ma = _Bit(18)
    debug = _Bit(19)
    single_socket = _Bit(20)
    cxl_allowed = _Bit(21)
    mem_aes_256_xts = _Bit(22)
    rapl_disabled = _Bit(23)
    ciphertext_hiding = _Bit(24)
    page_swap_disabled = _Bit(25)
    reserved_high = _Bits(26, 38)

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw": f"{self.raw:#x}",
            "abi": f"{self.abi_major}.{self.abi_minor}",
            "smt_allowed": self.smt_allowed,
            "migrate_ma": self.migrate_ma,
            "debug": self.debug,
            "single_socket": self.single_socket,
            "cxl_allowed": self.cxl_allowed,
            "mem_aes_256_xts": self.mem_aes_256_xts,
            "rapl_disabled": self.rapl_disabled,
            "ciphertext_hiding": self.ciphertext_hiding,
            "page_swap_disabled": self.page_swap_disabled,
        }


@dataclass(frozen=True)
class PlatformInfo:
    """PLATFORM_INFO: what the host platform had enabled when the report was made."""

    raw: int

    smt_enabled = _Bit(0)
    tsme_enabled = _Bit(1)
    ecc_enabled = _Bit(2)
    rapl_disabled = _Bit(3)
    ciphertext_hiding_enabled = _Bit(4)
    alias_check_complete = _Bit(5)
    tio_enabled = _Bit(7)

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw": f"{self.raw:#x}",
            "smt_enabled": self.smt_enabled,
            "tsme_enabled": self.tsme_enabled,
            "ecc_enabled": self.ecc_enabled,
            "rapl_disabled": self.rapl_disabled,
            "ciphertext_hiding_enabled": self.ciphertext_hiding_enabled,
            "alias_check_complete": self.alias_check_complete,
            "tio_enabled": self.tio_enabled,
        }


@dataclass(frozen=True)
class KeyInfo:
    """KEY_INFO (signer info): which key signed, and whether the chip id was masked."""

    raw: int

    author_key_en = _Bit(0)
    mask_chip_key = _Bit(1)
    reserved_high = _Bits(5, 27)

    @property
    def signing_key(self) -> SigningKey | int:
        return SigningKey.from_bits(self.raw >> 2 & 0b111)

    def to_dict(self) -> dict[str, Any]:
        key = self.signing_key
        return {
            "raw": f"{self.raw:#x}",
            "author_key_en": self.author_key_en,
            "mask_chip_key": self.mask_chip_key,
            "signing_key": key.name if isinstance(key, SigningKey) else f"reserved({key})",
        }


@dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.build)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True)
class AttestationReport:
    """One ATTESTATION_REPORT, field by field, in ABI order. Byte strings are kept as the firmware wrote them."""

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb_raw: bytes
    platform_info: PlatformInfo
    key_info: KeyInfo
    reserved_0x04c: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb_raw: bytes
    cpuid_fam_id: int | None  # None in v2 reports, which have no CPUID bytes
    cpuid_mod_id: int | None
    cpuid_step: int | None
    reserved_0x18b: bytes  # 21 bytes (v3+) or, for v2, the 24 bytes from 0x188
    chip_id: bytes
    committed_tcb_raw: bytes
    current_build: int
    current_minor: int
    current_major: int
    reserved_0x1eb: int
    committed_build: int
    committed_minor: int
    committed_major: int
    reserved_0x1ef: int
    launch_tcb_raw: bytes
    launch_mit_vector: int | None  # v5 only
    current_mit_vector: int | None  # v5 only
    reserved_tail: bytes  # 152 bytes from 0x208 (v5) or 168 bytes from 0x1F8 (v2-v4)
    signature: bytes = field(repr=False)  # the 512-byte signature area (r, s, zero padding)

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> AttestationReport:
        """Decode exactly 1184 bytes. Raises ReportFormatError for anything that cannot be a report."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ReportFormatError(f"a report is bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise ReportFormatError(
                f"an ATTESTATION_REPORT is {REPORT_SIZE} bytes; this input is {len(data)} bytes"
                + (" (truncated?)" if len(data) < REPORT_SIZE else "")
            )
        (
            version,
            guest_svn,
            policy,
            family_id,
            image_id,
            vmpl,
            signature_algo,
            current_tcb,
            platform_info,
            key_info,
            reserved_0x04c,
            report_data,
            measurement,
            host_data,
            id_key_digest,
            author_key_digest,
            report_id,
            report_id_ma,
            reported_tcb,
        ) = _HEAD.unpack_from(data, 0)
        if version not in SUPPORTED_VERSIONS:
            raise ReportFormatError(
                f"report version {version} is not supported (known layouts: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        cpuid_fam_id: int | None
        cpuid_mod_id: int | None
        cpuid_step: int | None
        if version >= 3:
            cpuid_fam_id, cpuid_mod_id, cpuid_step = data[0x188], data[0x189], data[0x18A]
            reserved_0x18b = data[0x18B:0x1A0]
        else:
            cpuid_fam_id = cpuid_mod_id = cpuid_step = None
            reserved_0x18b = data[0x188:0x1A0]
        (
            chip_id,
            committed_tcb,
            current_build,
            current_minor,
            current_major,
            reserved_0x1eb,
            committed_build,
            committed_minor,
            committed_major,
            reserved_0x1ef,
            launch_tcb,
        ) = _TAIL.unpack_from(data, 0x1A0)
        if version >= 5:
            launch_mit: int | None
            current_mit: int | None
            launch_mit, current_mit = struct.unpack_from("<QQ", data, 0x1F8)
            reserved_tail = data[0x208:SIGNED_SIZE]
        else:
            launch_mit = current_mit = None
            reserved_tail = data[0x1F8:SIGNED_SIZE]
        # Built through __dict__: a frozen dataclass's __init__ pays object.__setattr__ for each of the 38 fields,
        # which on a warm verification costs as much as everything else the parser does.
        report = object.__new__(cls)
        report.__dict__.update(
            version=version,
            guest_svn=guest_svn,
            policy=_guest_policy(policy),
            family_id=family_id,
            image_id=image_id,
            vmpl=vmpl,
            signature_algo=signature_algo,
            current_tcb_raw=current_tcb,
            platform_info=_platform_info(platform_info),
            key_info=_key_info(key_info),
            reserved_0x04c=reserved_0x04c,
            report_data=report_data,
            measurement=measurement,
            host_data=host_data,
            id_key_digest=id_key_digest,
            author_key_digest=author_key_digest,
            report_id=report_id,
            report_id_ma=report_id_ma,
            reported_tcb_raw=reported_tcb,
            cpuid_fam_id=cpuid_fam_id,
            cpuid_mod_id=cpuid_mod_id,
            cpuid_step=cpuid_step,
            reserved_0x18b=reserved_0x18b,
            chip_id=chip_id,
            committed_tcb_raw=committed_tcb,
            current_build=current_build,
            current_minor=current_minor,
            current_major=current_major,
            reserved_0x1eb=reserved_0x1eb,
            committed_build=committed_build,
            committed_minor=committed_minor,
            committed_major=committed_major,
            reserved_0x1ef=reserved_0x1ef,
            launch_tcb_raw=launch_tcb,
            launch_mit_vector=launch_mit,
            current_mit_vector=current_mit,
            reserved_tail=reserved_tail,
            signature=data[SIGNED_SIZE:REPORT_SIZE],
        )
        return report

    def to_bytes(self) -> bytes:
        """Serialize back to the 1184-byte ABI form (the inverse of :meth:`parse`, byte for byte)."""
        out = bytearray(REPORT_SIZE)
        _HEAD.pack_into(
            out,
            0,
            self.version,
            self.guest_svn,
            self.policy.raw,
            self.family_id,
            self.image_id,
            self.vmpl,
            self.signature_algo,
            self.current_tcb_raw,
            self.platform_info.raw,
            self.key_info.raw,
            self.reserved_0x04c,
            self.report_data,
            self.measurement,
            self.host_data,
            self.id_key_digest,
            self.author_key_digest,
            self.report_id,
            self.report_id_ma,
            self.reported_tcb_raw,
        )
        if self.version >= 3:
            out[0x188:0x18B] = bytes([self.cpuid_fam_id or 0, self.cpuid_mod_id or 0, self.cpuid_step or 0])
            out[0x18B:0x1A0] = _exact(self.reserved_0x18b, 21, "reserved_0x18b")
        else:
            out[0x188:0x1A0] = _exact(self.reserved_0x18b, 24, "reserved_0x18b")
        _TAIL.pack_into(
            out,
            0x1A0,
            self.chip_id,
            self.committed_tcb_raw,
            self.current_build,
            self.current_minor,
            self.current_major,
            self.reserved_0x1eb,
            self.committed_build,
            self.committed_minor,
            self.committed_major,
            self.reserved_0x1ef,
            self.launch_tcb_raw,
        )
        if self.version >= 5:
            struct.pack_into("<QQ", out, 0x1F8, self.launch_mit_vector or 0, self.current_mit_vector or 0)
            out[0x208:SIGNED_SIZE] = _exact(self.reserved_tail, SIGNED_SIZE - 0x208, "reserved_tail")
        else:
            out[0x1F8:SIGNED_SIZE] = _exact(self.reserved_tail, SIGNED_SIZE - 0x1F8, "reserved_tail")
        out[SIGNED_SIZE:] = _exact(self.signature, REPORT_SIZE - SIGNED_SIZE, "signature")
        return bytes(out)

    # -- derived views ----------------------------------------------------------------------------------

    def signed_bytes(self) -> bytes:
        """The bytes the firmware signed: offsets 0x000..0x29F."""
        return self.to_bytes()[:SIGNED_SIZE]

    @property
    def signature_r(self) -> int:
        return int.from_bytes(self.signature[:_SIGNATURE_SLOT], "little")

    @property
    def signature_s(self) -> int:
        return int.from_bytes(self.signature[_SIGNATURE_SLOT : 2 * _SIGNATURE_SLOT], "little")

    def signature_padding_problems(self) -> list[str]:
        """Where the signature area holds non-zero bytes outside the 48-byte r and s values."""
        signature = self.signature
        if (
            signature[_P384_COMPONENT:_SIGNATURE_SLOT] == _ZERO_PAD
            and signature[_SIGNATURE_SLOT + _P384_COMPONENT : 2 * _SIGNATURE_SLOT] == _ZERO_PAD
            and signature[2 * _SIGNATURE_SLOT :] == _ZERO_TAIL
        ):
            return []
        problems = []
        for name, start in (("r", 0), ("s", _SIGNATURE_SLOT)):
            if any(self.signature[start + _P384_COMPONENT : start + _SIGNATURE_SLOT]):
                problems.append(f"{name} has non-zero bytes above its 48 P-384 bytes")
        if any(self.signature[2 * _SIGNATURE_SLOT :]):
            problems.append("signature bytes 0x330..0x49F must be zero")
        return problems

    @property
    def signing_key(self) -> SigningKey | int:
        return self.key_info.signing_key

    @property
    def cpuid_product(self) -> Product | None:
        """The product named by the report's own CPUID bytes (v3+); None for v2 or unknown parts."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return Product.from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def tcb_layout(self, product: Product | None = None) -> TcbLayout:
        """Turin's TCB layout puts the FMC SPL in byte 0; decoding it with Milan's layout misreads every SPL."""
        chosen = product or self.cpuid_product
        return chosen.tcb_layout if chosen else TcbLayout.LEGACY

    def current_tcb(self, product: Product | None = None) -> TcbVersion:
        return TcbVersion.decode(self.current_tcb_raw, self.tcb_layout(product))

    def reported_tcb(self, product: Product | None = None) -> TcbVersion:
        return TcbVersion.decode(self.reported_tcb_raw, self.tcb_layout(product))

    def committed_tcb(self, product: Product | None = None) -> TcbVersion:
        return TcbVersion.decode(self.committed_tcb_raw, self.tcb_layout(product))

    def launch_tcb(self, product: Product | None = None) -> TcbVersion:
        return TcbVersion.decode(self.launch_tcb_raw, self.tcb_layout(product))

    @property
    def current_firmware(self) -> FirmwareVersion:
        return FirmwareVersion(self.current_major, self.current_minor, self.current_build)

    @property
    def committed_firmware(self) -> FirmwareVersion:
        return FirmwareVersion(self.committed_major, self.committed_minor, self.committed_build)

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)

    def reserved_problems(self) -> tuple[str, ...]:
        """Every must-be-zero field that is not zero, and the policy bit that must be one."""
        return _reserved_problems(
            self.version,
            self.reserved_0x04c,
            self.key_info.raw,
            self.policy.raw,
            self.reserved_0x18b,
            self.reserved_0x1eb,
            self.reserved_0x1ef,
            self.reserved_tail,
            self.cpuid_fam_id,
        )

    def to_dict(self, product: Product | None = None) -> dict[str, Any]:
        """Every field, decoded, for people and for ``--json``. Byte strings are lower-case hex."""
        key = self.signing_key
        chosen = product or self.cpuid_product
        return {
            "version": self.version,
            "product": chosen.value if chosen else None,
            "guest_svn": self.guest_svn,
            "policy": self.policy.to_dict(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": self.current_tcb(product).to_dict(),
            "platform_info": self.platform_info.to_dict(),
            "key_info": self.key_info.to_dict(),
            "signing_key": key.name if isinstance(key, SigningKey) else f"reserved({key})",
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": self.reported_tcb(product).to_dict(),
            "cpuid": None
            if self.cpuid_fam_id is None
            else {"family": self.cpuid_fam_id, "model": self.cpuid_mod_id, "stepping": self.cpuid_step},
            "chip_id": self.chip_id.hex(),
            "committed_tcb": self.committed_tcb(product).to_dict(),
            "current_firmware": str(self.current_firmware),
            "committed_firmware": str(self.committed_firmware),
            "launch_tcb": self.launch_tcb(product).to_dict(),
            "launch_mit_vector": None if self.launch_mit_vector is None else f"{self.launch_mit_vector:#x}",
            "current_mit_vector": None if self.current_mit_vector is None else f"{self.current_mit_vector:#x}",
            "signature": {"r": f"{self.signature_r:096x}", "s": f"{self.signature_s:096x}"},
        }


# The flag words are immutable and take few distinct values in practice: share one object per value.
_guest_policy = functools.lru_cache(maxsize=256)(GuestPolicy)
_platform_info = functools.lru_cache(maxsize=256)(PlatformInfo)
_key_info = functools.lru_cache(maxsize=256)(KeyInfo)


@functools.lru_cache(maxsize=256)
def _reserved_problems(
    version: int,
    reserved_0x04c: int,
    key_info: int,
    guest_policy: int,
    reserved_0x18b: bytes,
    reserved_0x1eb: int,
    reserved_0x1ef: int,
    reserved_tail: bytes,
    cpuid_fam_id: int | None,
) -> tuple[str, ...]:
    # Memoised on exactly the fields it reads: verifiers see the same (all-zero) reserved fields again and again.
    problems = []
    if reserved_0x04c:
        problems.append(f"reserved word at 0x04C is {reserved_0x04c:#x}")
    if key_info >> 5:
        problems.append(f"KEY_INFO bits 31:5 are {key_info >> 5:#x}")
    signing_key = key_info >> 2 & 0b111
    if signing_key not in _SIGNING_KEYS:
        problems.append(f"KEY_INFO.SIGNING_KEY uses reserved value {signing_key}")
    if any(reserved_0x18b):
        problems.append(f"reserved bytes at {0x18B if version >= 3 else 0x188:#x}..0x19F are not zero")
    if reserved_0x1eb:
        problems.append("reserved byte at 0x1EB is not zero")
    if reserved_0x1ef:
        problems.append("reserved byte at 0x1EF is not zero")
    if any(reserved_tail):
        problems.append(f"reserved bytes at {0x208 if version >= 5 else 0x1F8:#x}..0x29F are not zero")
    if not guest_policy >> 17 & 1:
        problems.append("POLICY bit 17 must be 1")
    if guest_policy >> 26:
        problems.append(f"POLICY bits 63:26 are {guest_policy >> 26:#x}")
    if version >= 3 and cpuid_fam_id == 0:
        problems.append("CPUID_FAM_ID is zero in a v3+ report")
    return tuple(problems)


def _exact(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise ReportFormatError(f"{name} must be {size} bytes, not {len(value)}")
    return value
