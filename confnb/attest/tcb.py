"""TCB_VERSION: the security patch levels (SPLs) of the firmware components, packed into 8 bytes.

Milan and Genoa pack (bootloader, tee, 4 reserved, snp, microcode); Turin packs (fmc, bootloader, tee, snp,
3 reserved, microcode). Decoding a Turin value with the older layout silently yields wrong SPLs, which is why the
layout is always chosen from the product and never guessed from the bytes.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

COMPONENTS = ("fmc", "bootloader", "tee", "snp", "microcode")


class TcbLayout(enum.Enum):
    LEGACY = "legacy"  # Milan, Genoa (VCEK structVersion 0)
    TURIN = "turin"  # Turin and later (VCEK structVersion 1)


@dataclass(frozen=True)
class TcbVersion:
    """Decoded SPLs; ``fmc`` is None in the legacy layout. ``reserved`` holds the bytes no SPL occupies."""

    layout: TcbLayout
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None
    reserved: bytes = b""

    @classmethod
    def decode(cls, raw: bytes, layout: TcbLayout) -> TcbVersion:
        return _decode(bytes(raw), layout)

    def encode(self) -> bytes:
        if self.layout is TcbLayout.TURIN:
            reserved = self.reserved or bytes(3)
            return bytes([self.fmc or 0, self.bootloader, self.tee, self.snp, *reserved, self.microcode])
        reserved = self.reserved or bytes(4)
        return bytes([self.bootloader, self.tee, *reserved, self.snp, self.microcode])

    def components(self) -> dict[str, int]:
        """The SPLs that exist in this layout, by name."""
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            parts = {"fmc": self.fmc, **parts}
        return parts

    def shortfalls(self, minimum: dict[str, int]) -> list[str]:
        """Components below ``minimum`` (component-wise, as AMD compares TCBs), e.g. ``["snp 5 < 8"]``."""
        mine = self.components()
        return [
            f"{name} {mine[name]} < {floor}" for name, floor in minimum.items() if name in mine and mine[name] < floor
        ]

    def differences(self, other: dict[str, int]) -> list[str]:
        """Components that differ from ``other`` (only those both sides have)."""
        mine = self.components()
        return [
            f"{name} {mine[name]} != {value}" for name, value in other.items() if name in mine and mine[name] != value
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**self.components(), "raw": self.encode().hex()}

    def __str__(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.components().items())


@functools.lru_cache(maxsize=1024)
def _decode(raw: bytes, layout: TcbLayout) -> TcbVersion:
    # Decoded values are immutable, and a verifier meets the same few TCBs again and again.
    if len(raw) != 8:
        raise ValueError(f"a TCB_VERSION is 8 bytes, not {len(raw)}")
    if layout is TcbLayout.TURIN:
        return TcbVersion(
            layout, bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0], reserved=raw[4:7]
        )
    return TcbVersion(layout, bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7], reserved=raw[2:6])
