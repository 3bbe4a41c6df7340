"""A minimal OVMF image with the SEV metadata an SEV-SNP launch reads, written from the edk2 layout.

Real OVMF builds are megabytes and not redistributable here, but the launch measurement depends only on the
firmware's bytes and on its footer table (OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm): GUIDed entries growing
backwards from 32 bytes before the end, the SEV-ES reset block (the APs' start address), the SEV hash table
location, and the offset of the "ASEV" metadata (OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm) that lists the
pages the VMM must add as zero, secrets, CPUID or kernel-hashes pages.
"""

from __future__ import annotations

import struct
import uuid

FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_ES_RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
SEV_HASH_TABLE_RV_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEV_METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"

SNP_SEC_MEM, SNP_SECRETS, CPUID, SNP_KERNEL_HASHES = 1, 2, 3, 0x10
DEFAULT_SECTIONS = (
    (0x800000, 0x9000, SNP_SEC_MEM),
    (0x809000, 0x1000, SNP_SECRETS),
    (0x80A000, 0x1000, CPUID),
    (0x80B000, 0x1000, SNP_KERNEL_HASHES),
)
HASH_TABLE_GPA = 0x80BC00
IMAGE_SIZE = 4 * 4096


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def ovmf_image(
    sections: tuple[tuple[int, int, int], ...] = DEFAULT_SECTIONS,
    *,
    metadata: bool = True,
    footer: bool = True,
    hash_table_gpa: int = HASH_TABLE_GPA,
    reset_eip: int = 0xFFFFF000,
    fill: bytes = b"OVMF",
) -> bytes:
    """The image's last page carries the metadata and the footer table; the pages before it are code stand-ins."""
    image = bytearray((fill * (IMAGE_SIZE // len(fill) + 1))[:IMAGE_SIZE])
    header_offset_from_end = 0x1000  # the metadata starts the last page
    asev = b"ASEV" + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
    asev += b"".join(struct.pack("<III", gpa, size, kind) for gpa, size, kind in sections)
    start = IMAGE_SIZE - header_offset_from_end
    image[start : start + len(asev)] = asev
    entries = _entry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", reset_eip))
    entries += _entry(SEV_HASH_TABLE_RV_GUID, struct.pack("<II", hash_table_gpa, 0x400))
    if metadata:
        entries += _entry(SEV_METADATA_GUID, struct.pack("<I", header_offset_from_end))
    table = entries + struct.pack("<H", len(entries) + 18) + (uuid.UUID(FOOTER_GUID).bytes_le if footer else bytes(16))
    end = IMAGE_SIZE - 32
    image[end - len(table) : end] = table
    return bytes(image)
