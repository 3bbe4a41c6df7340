"""The appraisal policy: which genuine SEV-SNP VMs a verifier accepts (the ``[attestation]`` table).

Authenticity says "AMD signed this"; the policy says "and it is the VM I meant": its launch measurement, its
firmware floor, no debugging, no migration agent, the right privilege level. Analysts and data owners write it in
TOML. Every key is validated, and every error names the key and the line, because a silently ignored typo in a
security policy (``reject_debg = true``) is a hole.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confnb.attest.errors import PolicyError
from confnb.attest.report import Product
from confnb.policy.schema import GUEST_POLICY_BITS, PLATFORM_INFO_BITS
from confnb.policy.toml import KeyLines, TableReader, brief, parse_policy, read_policy_text

_SIGNING_KEYS = ("VCEK", "VLEK")
_FIRMWARE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")
_ABI = re.compile(r"^(\d+)\.(\d+)$")

__all__ = ["GUEST_POLICY_BITS", "PLATFORM_INFO_BITS", "AttestationPolicy"]


@dataclass(frozen=True)
class AttestationPolicy:
    """Defaults are the strict choices; a key left out keeps its default, an optional allowlist left out is off."""

    allow_simulated: bool = False
    # Hex SHA-256 of the simulated TEE roots (ARK DER) accepted with allow_simulated; None: any simulated root. Pin it:
    # anyone can make a simulated chip of their own, and claim any measurement with it.
    simulated_roots: tuple[str, ...] | None = None
    measurements: tuple[str, ...] | None = None  # None: not pinned; (): reject every measurement
    host_data: tuple[str, ...] | None = None
    family_ids: tuple[str, ...] | None = None
    image_ids: tuple[str, ...] | None = None
    chip_ids: tuple[str, ...] | None = None
    id_key_digests: tuple[str, ...] | None = None
    author_key_digests: tuple[str, ...] | None = None
    require_author_key: bool = False
    min_tcb: dict[str, int] = field(default_factory=dict)  # applies to every product
    min_tcb_by_product: dict[str, dict[str, int]] = field(default_factory=dict)
    min_launch_tcb: dict[str, int] = field(default_factory=dict)
    min_launch_tcb_by_product: dict[str, dict[str, int]] = field(default_factory=dict)
    reject_debug: bool = True
    reject_migration_agent: bool = True
    max_vmpl: int = 0
    max_evidence_age_s: int | None = None
    signing_keys: tuple[str, ...] = _SIGNING_KEYS
    products: tuple[str, ...] | None = None
    min_guest_svn: int = 0
    min_firmware: tuple[int, int, int] | None = None
    permit_provisional_firmware: bool = False
    check_revocation: bool = False
    guest_policy: dict[str, bool] = field(default_factory=dict)  # guest POLICY bits pinned to a value
    min_abi: tuple[int, int] | None = None
    platform_info: dict[str, bool] = field(default_factory=dict)  # PLATFORM_INFO bits pinned to a value
    required_launch_mitigations: int = 0  # bits that LAUNCH_MIT_VECTOR (v5) must have set
    required_current_mitigations: int = 0
    source: str = field(default="<defaults>", compare=False)

    def minimum_tcb(self, product: Product | None) -> dict[str, int]:
        """The TCB floor for ``product``: the generic floor, overridden by that product's own table."""
        floor = dict(self.min_tcb)
        if product is not None:
            floor.update(self.min_tcb_by_product.get(product.value, {}))
        return floor

    def minimum_launch_tcb(self, product: Product | None) -> dict[str, int]:
        floor = dict(self.min_launch_tcb)
        if product is not None:
            floor.update(self.min_launch_tcb_by_product.get(product.value, {}))
        return floor

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("source")
        for key, value in list(document.items()):
            if isinstance(value, tuple):
                document[key] = list(value)
        if self.min_firmware is not None:
            document["min_firmware"] = ".".join(map(str, self.min_firmware))
        if self.min_abi is not None:
            document["min_abi"] = ".".join(map(str, self.min_abi))
        return document

    def digest(self) -> str:
        """``sha256:<hex>`` of the policy's canonical JSON: what audit entries and receipts name."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(canonical).hexdigest()

    # -- loading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> AttestationPolicy:
        return cls.from_toml(read_policy_text(path), source=str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<policy>") -> AttestationPolicy:
        """Read the ``[attestation]`` table; the file's other tables must be known ones (checked, not read)."""
        document = parse_policy(text, source)
        table = document.get("attestation")
        if table is None:
            raise PolicyError(f"{source}: no [attestation] table")
        return _Reader(KeyLines(text), source, "attestation").read(table)


class _Reader(TableReader):
    """Validates the values of the ``[attestation]`` table, whose names the schema has already checked."""

    def read(self, table: Any) -> AttestationPolicy:
        if not isinstance(table, dict):
            raise self.fail("", "must be a table")
        values: dict[str, Any] = {"source": self.source}
        for key in (
            "allow_simulated",
            "reject_debug",
            "reject_migration_agent",
            "permit_provisional_firmware",
            "check_revocation",
            "require_author_key",
        ):
            if key in table:
                values[key] = self.boolean(key, table[key])
        if "measurements" in table:
            values["measurements"] = self.hex_list("measurements", table["measurements"], 48)
        if "simulated_roots" in table:
            values["simulated_roots"] = self.hex_list("simulated_roots", table["simulated_roots"], 32)
        for key, size in (
            ("host_data", 32),
            ("family_ids", 16),
            ("image_ids", 16),
            ("chip_ids", 64),
            ("id_key_digests", 48),
            ("author_key_digests", 48),
        ):
            if key in table:
                values[key] = self.hex_list(key, table[key], size)
        for key in ("min_tcb", "min_launch_tcb"):
            if key in table:
                values[key], values[f"{key}_by_product"] = self.min_tcb(key, table[key])
        if "guest_policy" in table:
            values["guest_policy"] = self.flags("guest_policy", table["guest_policy"], GUEST_POLICY_BITS)
        if "platform_info" in table:
            values["platform_info"] = self.flags("platform_info", table["platform_info"], PLATFORM_INFO_BITS)
        if "min_abi" in table:
            values["min_abi"] = self.abi("min_abi", table["min_abi"])
        for key in ("required_launch_mitigations", "required_current_mitigations"):
            if key in table:
                values[key] = self.integer(key, table[key], 0, 2**64 - 1)
        if "max_vmpl" in table:
            values["max_vmpl"] = self.integer("max_vmpl", table["max_vmpl"], 0, 3)
        if "max_evidence_age_s" in table:
            values["max_evidence_age_s"] = self.integer("max_evidence_age_s", table["max_evidence_age_s"], 1, 10**9)
        if "min_guest_svn" in table:
            values["min_guest_svn"] = self.integer("min_guest_svn", table["min_guest_svn"], 0, 2**32 - 1)
        if "signing_keys" in table:
            values["signing_keys"] = self.choices("signing_keys", table["signing_keys"], _SIGNING_KEYS)
        if "products" in table:
            values["products"] = self.choices("products", table["products"], tuple(p.value for p in Product))
        if "min_firmware" in table:
            values["min_firmware"] = self.firmware("min_firmware", table["min_firmware"])
        return AttestationPolicy(**values)

    def firmware(self, key: str, value: Any) -> tuple[int, int, int]:
        match = _FIRMWARE.match(value) if isinstance(value, str) else None
        if not match:
            raise self.fail(key, f'must be a version like "1.55" or "1.55.29", not {brief(value)}')
        major, minor, build = (int(part or 0) for part in match.groups())
        return (major, minor, build)

    def tcb_table(self, key: str, value: Any) -> dict[str, int]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table of SPLs such as { bootloader = 3, snp = 8 }")
        for name, spl in value.items():
            self.integer(f"{key}.{name}", spl, 0, 255)
        return dict(value)

    def min_tcb(self, key: str, value: Any) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table of SPLs, or of per-product tables (Milan, Genoa, Turin)")
        products = {p.value for p in Product}
        generic = {name: spl for name, spl in value.items() if name not in products}
        per_product = {
            name: self.tcb_table(f"{key}.{name}", table) for name, table in value.items() if name in products
        }
        return self.tcb_table(key, generic), per_product

    def flags(self, key: str, value: Any, known: dict[str, str]) -> dict[str, bool]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table of flags such as {{ {next(iter(known))} = false }}")
        for name, flag in value.items():
            self.boolean(f"{key}.{name}", flag)
        return dict(value)

    def abi(self, key: str, value: Any) -> tuple[int, int]:
        match = _ABI.match(value) if isinstance(value, str) else None
        if not match:
            raise self.fail(key, f'must be a version like "1.51", not {brief(value)}')
        return (int(match.group(1)), int(match.group(2)))
