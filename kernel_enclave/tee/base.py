"""What every TEE backend offers the kernel: a signed report over 64 chosen bytes, and a sealing key.

The rest of the enclave only ever talks to :class:`TeeBackend`, so the launcher, the relay and the vault run the
same code on real SEV-SNP hardware and on the simulated TEE. A backend returns the report exactly as the
firmware produced it plus whatever certificates the platform handed over; it does not judge either, because the
verifier (outside the VM, in ``confnb.attest``) is the only party whose judgement counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from confnb.attest.report import REPORT_SIZE

REPORT_DATA_SIZE = 64
MAX_VMPL = 3
SEALING_KEY_SIZE = 32
# HKDF "info" prefix for sealing keys; versioned so a future derivation can never collide with this one.
SEALING_KEY_INFO = b"confnb-sealing-key/1"


class TeeError(RuntimeError):
    """The TEE could not do what was asked; the message is one line naming the interface and the cause."""


@dataclass(frozen=True)
class TeeQuote:
    """One report request's result: the raw report and the certificates the platform supplied with it.

    ``vek_pem`` is the VCEK or VLEK that signed the report when the platform delivered it (extended report,
    configfs ``auxblob``, or the simulated TEE); ``chain_pem`` is ``(ASK-or-ASVK, ARK)`` in that order, or only
    the part that was supplied, or empty. Missing certificates are normal on real hosts: verifiers fetch them.
    """

    report: bytes
    vek_pem: str | None = None
    chain_pem: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here so that no backend can hand the evidence builder something that is not a report.
        if not isinstance(self.report, bytes):
            raise TypeError(f"a report is bytes, not {type(self.report).__name__}")
        if len(self.report) != REPORT_SIZE:
            raise TeeError(f"the TEE returned {len(self.report)} bytes; an ATTESTATION_REPORT is {REPORT_SIZE} bytes")
        if not isinstance(self.chain_pem, tuple):
            raise TypeError("chain_pem must be a tuple of PEM strings")


class TeeBackend(ABC):
    """A source of attestation reports and sealing keys. Implementations must be safe to call from threads."""

    name: ClassVar[str]  # the evidence bundle's "tee" value: "sev-snp" or "simulated"

    @abstractmethod
    def get_quote(self, report_data: bytes, vmpl: int = 0) -> TeeQuote:
        """Ask for a report whose REPORT_DATA is ``report_data`` (exactly 64 bytes), requested at ``vmpl``."""

    @abstractmethod
    def derive_sealing_key(self, context: bytes) -> bytes:
        """A 32-byte key that only this launch measurement on this platform can derive again.

        ``context`` separates uses (e.g. ``b"vault/audit-log"``); different contexts give unrelated keys.
        """


def check_report_request(report_data: bytes, vmpl: int) -> None:
    """Reject malformed requests before they reach a firmware that would answer with an opaque status code."""
    if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data).__name__
        raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {size}")
    if isinstance(vmpl, bool) or not isinstance(vmpl, int) or not 0 <= vmpl <= MAX_VMPL:
        raise ValueError(f"vmpl must be an integer from 0 to {MAX_VMPL}, got {vmpl!r}")


def check_context(context: bytes) -> None:
    if not isinstance(context, bytes):
        raise TypeError(f"a sealing-key context is bytes, not {type(context).__name__}")
