"""TEE backends: where attestation reports and sealing keys come from.

``sev-snp`` talks to the SEV-SNP firmware through Linux (configfs-tsm, else ``/dev/sev-guest``); ``simulated``
signs reports with a locally generated, clearly non-AMD chain. Both return the same report format, so everything
downstream (evidence, verification, key release) runs one code path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kernel_enclave.tee.base import TeeBackend, TeeError, TeeQuote

__all__ = ["TeeBackend", "TeeError", "TeeQuote", "get_backend"]

BACKEND_NAMES = ("auto", "sev-snp", "simulated")
NO_INTERFACE = "no SEV-SNP guest interface found; use the simulated TEE with --simulated"


def get_backend(name: str = "auto", **options: Any) -> TeeBackend:
    """Build a backend by name; ``options`` go to its constructor.

    ``"auto"`` never falls back to the simulated TEE — silently attesting with a fake chip would be worse than
    failing. It picks configfs-tsm when that directory exists and its provider is ``sev_guest``, else
    ``/dev/sev-guest`` when present, else raises :class:`TeeError`.
    """
    if name == "simulated":
        from kernel_enclave.tee.simulated import SimulatedBackend

        return SimulatedBackend(**options)
    if name == "sev-snp":
        from kernel_enclave.tee.sevsnp import SevSnpBackend

        return SevSnpBackend(**options)
    if name != "auto":
        raise TeeError(f"unknown TEE backend {name!r} (choose {', '.join(BACKEND_NAMES)})")

    from kernel_enclave.tee import sevsnp

    root = Path(options.get("configfs_root", sevsnp.DEFAULT_CONFIGFS_ROOT))
    device = Path(options.get("device", sevsnp.DEFAULT_DEVICE))
    provider = sevsnp.configfs_provider(root, options.get("mkdir", os.mkdir), options.get("rmdir", os.rmdir))
    if provider == sevsnp.SEV_GUEST_PROVIDER:
        return sevsnp.SevSnpBackend(**{**options, "interface": options.get("interface", "configfs-tsm")})
    if device.exists():
        return sevsnp.SevSnpBackend(**{**options, "interface": options.get("interface", "sev-guest")})
    if provider:
        raise TeeError(f"configfs-tsm provider is {provider!r}, not sev_guest, and {device} is absent; {NO_INTERFACE}")
    raise TeeError(NO_INTERFACE)
