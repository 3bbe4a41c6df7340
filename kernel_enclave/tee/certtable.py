"""The GHCB certificate table, as the TEE backends use it: the format lives in :mod:`confnb.attest.certtable`.

The verifier reads the same tables (``confnb attest verify --vek`` given a ``/dev/sev-guest`` table, or a report
with its table appended), so the pure format is shared from confnb's side and the enclave imports it from there.
"""

from __future__ import annotations

from confnb.attest.certtable import (
    ARK_GUID,
    ASK_GUID,
    ENTRY_SIZE,
    EXTRA_PLATFORM_INFO_GUID,
    GUID_NAMES,
    VCEK_GUID,
    VLEK_GUID,
    CertTableError,
    build_cert_table,
    der_to_pem,
    parse_cert_table,
)

__all__ = [
    "ARK_GUID",
    "ASK_GUID",
    "ENTRY_SIZE",
    "EXTRA_PLATFORM_INFO_GUID",
    "GUID_NAMES",
    "VCEK_GUID",
    "VLEK_GUID",
    "CertTableError",
    "build_cert_table",
    "der_to_pem",
    "parse_cert_table",
]
