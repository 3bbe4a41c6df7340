"""The expected launch MEASUREMENT of a real SEV-SNP VM booted from OVMF (optionally a measured direct boot).

A verifier can only pin a measurement it can predict. The PSP hashes every page the VMM hands it at launch (the
firmware, the metadata pages OVMF declares, the page holding the kernel/initrd/command-line hashes, one VMSA per
vCPU), so the expected value is a function of those inputs alone. The page-by-page replay is delegated to
``sev-snp-measure`` (the virtee project's reference calculator) rather than re-implemented here; this module
validates the inputs first, so that a wrong file or an OVMF build without SEV-SNP support is reported as such
instead of producing a plausible but unbootable measurement.
"""

from __future__ import annotations

import ctypes
import hashlib
import stat
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from confnb.attest.errors import AttestInputError

VMM_TYPES = ("qemu", "ec2")
DEFAULT_GUEST_FEATURES = 0x1  # SNPActive alone, as KVM sets it except on Linux 6.6 and 6.7 (0x21, with DebugSwap)
MAX_VCPUS = 4096  # KVM's x86 ceiling (with MAXSMP); beyond it the input is a typo, not a VM
MAX_FIRMWARE_SIZE = 64 * 1024 * 1024  # far above any OVMF build; stops a disk image being read by mistake
PAGE_SIZE = 4096
INSTALL_HINT = "pip install 'sev-snp-measure>=0.0.13,<0.1'"


class MeasureInputError(AttestInputError):
    """The launch inputs cannot describe an SEV-SNP launch: the message names the input and what is wrong."""


@dataclass(frozen=True)
class LaunchConfig:
    """What the VMM feeds the PSP at launch. ``vcpu_signature`` is None only for EC2, which fixes its own."""

    ovmf: Path
    vcpus: int
    vcpu_signature: int | None
    vmm_type: str = "qemu"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    guest_features: int = DEFAULT_GUEST_FEATURES


@dataclass(frozen=True)
class LaunchMeasurement:
    measurement: bytes
    config: LaunchConfig
    calculator: str

    def policy_line(self) -> str:
        """The ``[attestation]`` key that pins this measurement, ready to paste into a policy."""
        return f'measurements = ["{self.measurement.hex()}"]'

    def to_dict(self) -> dict[str, Any]:
        """Inputs with their SHA-256, so an operator can later show which files a pinned value came from."""
        config = self.config
        signature = None if config.vcpu_signature is None else f"0x{config.vcpu_signature:08x}"
        return {
            "tee": "sev-snp",
            "measurement": self.measurement.hex(),
            "inputs": {
                "vmm_type": config.vmm_type,
                "vcpus": config.vcpus,
                "vcpu_signature": signature,
                "guest_features": f"0x{config.guest_features:x}",
                "ovmf": _file_entry(config.ovmf),
                "kernel": _file_entry(config.kernel),
                "initrd": _file_entry(config.initrd),
                "append": config.append,
            },
            "calculator": self.calculator,
            "policy": self.policy_line(),
        }


def vcpu_signature(
    vcpu_type: str | None = None,
    signature: int | None = None,
    family: int | None = None,
    model: int | None = None,
    stepping: int | None = None,
) -> int | None:
    """The CPUID(1).EAX value QEMU puts in each vCPU's RDX at reset (and so in each measured VMSA).

    Exactly one way of naming it may be used, so that two contradicting descriptions never silently pick one.
    """
    by_numbers = (family, model, stepping)
    given = [name for name, value in (("--vcpu-type", vcpu_type), ("--vcpu-sig", signature)) if value is not None]
    if any(value is not None for value in by_numbers):
        given.append("--vcpu-family/--vcpu-model/--vcpu-stepping")
    if len(given) > 1:
        raise MeasureInputError(f"give the vCPU one way, not {' and '.join(given)}")
    if vcpu_type is not None:
        known = _library().vcpu_types.CPU_SIGS
        if vcpu_type not in known:
            raise MeasureInputError(f"unknown --vcpu-type {vcpu_type!r} (known: {', '.join(known)})")
        return int(known[vcpu_type])
    if signature is not None:
        if not 0 <= signature <= 0xFFFFFFFF:
            raise MeasureInputError(f"--vcpu-sig 0x{signature:x} does not fit CPUID(1).EAX (32 bits)")
        return signature
    if family is None and model is None and stepping is None:
        return None
    if family is None or model is None or stepping is None:
        raise MeasureInputError("--vcpu-family, --vcpu-model and --vcpu-stepping go together")
    for name, value, limit in (("family", family, 0xFF + 0xF), ("model", model, 0xFF), ("stepping", stepping, 0xF)):
        if not 0 <= value <= limit:
            raise MeasureInputError(f"--vcpu-{name} {value} is outside CPUID's range 0..{limit}")
    return int(_library().vcpu_types.cpu_sig(family, model, stepping))


def snp_launch_measurement(config: LaunchConfig) -> LaunchMeasurement:
    """Validate the launch inputs, then replay the launch with sev-snp-measure (mode SEV-SNP)."""
    library = _library()
    _check_config(config)
    ovmf = _load_ovmf(library, config)
    _check_metadata(library, ovmf, config)
    try:
        digest = library.guest.calc_launch_digest(
            library.sev_mode.SevMode.SEV_SNP,
            config.vcpus,
            config.vcpu_signature,
            str(config.ovmf),
            str(config.kernel) if config.kernel else None,
            str(config.initrd) if config.initrd else None,
            config.append,
            config.guest_features,
            vmm_type=library.vmm_types.VMMType[config.vmm_type if config.vmm_type == "ec2" else "QEMU"],
        )
    except OSError as exc:
        raise MeasureInputError(f"{exc.filename or 'input'}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise MeasureInputError(f"OVMF {config.ovmf}: {exc}") from None
    measurement = bytes(digest)
    if len(measurement) != 48:
        raise MeasureInputError(f"sev-snp-measure returned {len(measurement)} bytes, not a 48-byte MEASUREMENT")
    return LaunchMeasurement(measurement, config, f"sev-snp-measure {metadata.version('sev-snp-measure')}")


# -- validation ---------------------------------------------------------------------------------------------


def _check_config(config: LaunchConfig) -> None:
    if config.vmm_type not in VMM_TYPES:
        raise MeasureInputError(f"unknown VMM type {config.vmm_type!r} (known: {', '.join(VMM_TYPES)})")
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise MeasureInputError(f"--vcpus {config.vcpus} is outside 1..{MAX_VCPUS}")
    if config.vmm_type == "qemu" and config.vcpu_signature is None:
        raise MeasureInputError(
            "QEMU measures each vCPU's signature: give --vcpu-type (e.g. EPYC-v4, as passed to -cpu), "
            "--vcpu-sig, or --vcpu-family/--vcpu-model/--vcpu-stepping"
        )
    if config.vmm_type == "ec2" and config.vcpu_signature is not None:
        raise MeasureInputError("EC2 fixes the vCPU signature itself: drop --vcpu-type/--vcpu-sig/--vcpu-family")
    if not 0 <= config.guest_features < 1 << 64:
        raise MeasureInputError(f"--guest-features 0x{config.guest_features:x} does not fit SEV_FEATURES (64 bits)")
    if not config.guest_features & 0x1:
        raise MeasureInputError(
            f"--guest-features 0x{config.guest_features:x} lacks bit 0 (SNPActive), which every SEV-SNP vCPU has"
        )
    if config.kernel is None and (config.initrd is not None or config.append is not None):
        raise MeasureInputError("--initrd and --append are measured only with --kernel (a measured direct boot)")
    for what, path in (("kernel", config.kernel), ("initrd", config.initrd)):
        if path is not None:
            _file_size(what, path)
    if config.append is not None and "\x00" in config.append:
        raise MeasureInputError("--append contains a NUL byte, which would end the command line early")


def _file_size(what: str, path: Path) -> int:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise MeasureInputError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise MeasureInputError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise MeasureInputError(f"{what} {path}: not a regular file")
    return status.st_size


def _load_ovmf(library: Any, config: LaunchConfig) -> Any:
    size = _file_size("OVMF", config.ovmf)
    if size > MAX_FIRMWARE_SIZE:
        raise MeasureInputError(f"OVMF {config.ovmf}: larger than {MAX_FIRMWARE_SIZE >> 20} MiB, not a firmware image")
    if size == 0 or size % PAGE_SIZE:
        raise MeasureInputError(f"OVMF {config.ovmf}: {size} bytes is not a whole number of 4 KiB pages")
    try:
        ovmf = library.ovmf.OVMF(str(config.ovmf))
    except OSError as exc:
        raise MeasureInputError(f"OVMF {config.ovmf}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise MeasureInputError(f"OVMF {config.ovmf}: SEV metadata does not parse ({exc})") from None
    if not ovmf.metadata_items():
        raise MeasureInputError(
            f"OVMF {config.ovmf}: no SEV metadata (no OVMF_SEV_META_DATA_GUID entry in the footer table): "
            "not a firmware build that can launch an SEV-SNP guest"
        )
    try:
        ovmf.sev_es_reset_eip()
    except RuntimeError:
        raise MeasureInputError(
            f"OVMF {config.ovmf}: no SEV-ES reset block in the footer table, so the APs' start address is unknown"
        ) from None
    return ovmf


def _check_metadata(library: Any, ovmf: Any, config: LaunchConfig) -> None:
    """Reject what sev-snp-measure would only catch with ``assert`` (gone under ``python -O``)."""
    section_type = library.ovmf.SectionType
    for item in ovmf.metadata_items():
        if item.gpa % PAGE_SIZE or item.size % PAGE_SIZE:
            raise MeasureInputError(
                f"OVMF {config.ovmf}: SEV metadata section at 0x{item.gpa:x} (0x{item.size:x} bytes) "
                "is not page-aligned"
            )
    if config.kernel is None:
        return
    hashes = [item for item in ovmf.metadata_items() if item.section_type() == section_type.SNP_KERNEL_HASHES]
    if not hashes or not ovmf.is_sev_hashes_table_supported():
        raise MeasureInputError(
            f"OVMF {config.ovmf}: no SNP kernel-hashes section, so it cannot do a measured direct boot "
            "(use an OvmfPkg/AmdSev build)"
        )
    if any(item.size != PAGE_SIZE for item in hashes):
        raise MeasureInputError(f"OVMF {config.ovmf}: the SNP kernel-hashes section is not exactly one page")
    table_size = ctypes.sizeof(library.sev_hashes.PaddedSevHashTable)
    offset = ovmf.sev_hashes_table_gpa() % PAGE_SIZE
    if offset + table_size > PAGE_SIZE:
        raise MeasureInputError(f"OVMF {config.ovmf}: the kernel-hashes table at offset 0x{offset:x} crosses a page")


def _file_entry(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _library() -> Any:
    """sev-snp-measure's modules, imported on first use so that the rest of ``confnb attest`` never needs them."""
    try:
        import sevsnpmeasure.guest  # type: ignore[import-untyped]
        import sevsnpmeasure.ovmf  # type: ignore[import-untyped]
        import sevsnpmeasure.sev_hashes  # type: ignore[import-untyped]
        import sevsnpmeasure.sev_mode  # type: ignore[import-untyped]
        import sevsnpmeasure.vcpu_types  # type: ignore[import-untyped]
        import sevsnpmeasure.vmm_types  # type: ignore[import-untyped]
    except ImportError:
        raise MeasureInputError(f"measuring a real VM needs sev-snp-measure: {INSTALL_HINT}") from None
    return sevsnpmeasure
