"""confnb: confidential notebooks on AMD SEV-SNP.

The client side (attestation verification, policies, datasets, the data owner's broker, the Jupyter integration)
lives here; everything that runs inside the confidential VM lives in ``kernel_enclave``.

Inside a confidential kernel, ``import confnb as cn`` is also the analyst API (``cn.open``, ``cn.fit``,
``cn.export``, ...; see :mod:`confnb.analyst`). Those names are loaded on first use, so that ``import confnb`` stays
light for the CLI and the client side, which never need pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confnb.analyst import (
        PolicyViolation,
        SealedModel,
        SealedTable,
        VaultError,
        audit,
        budget,
        col,
        export,
        fit,
        kernel_info,
        open,
        set_epsilon,
        unseal,
        where,
    )

__version__ = "0.1.0"

__all__ = [
    "PolicyViolation",
    "SealedModel",
    "SealedTable",
    "VaultError",
    "__version__",
    "audit",
    "budget",
    "col",
    "export",
    "fit",
    "kernel_info",
    "open",
    "set_epsilon",
    "unseal",
    "where",
]
_ANALYST_API = frozenset(__all__) - {"__version__"}  # provided by confnb.analyst, loaded by __getattr__


def __getattr__(name: str) -> Any:
    """Load the analyst API on first access of one of its names (PEP 562)."""
    if name in _ANALYST_API:
        import confnb.analyst

        return getattr(confnb.analyst, name)
    raise AttributeError(f"module 'confnb' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API and the module's own dunders: not the helpers this file imports (``Any``, ``TYPE_CHECKING``)."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__") and name.endswith("__"))})
