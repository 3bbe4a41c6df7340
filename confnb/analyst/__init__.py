"""The analyst API inside a confidential kernel: ``import confnb as cn``.

``cn.open`` gives a :class:`SealedTable` (schema and policy visible, rows never); pandas-style operations on it
build a plan that the vault evaluates; ``.release()`` brings back what the data owner's output policy allows, as
pandas objects. ``cn.fit`` trains scikit-learn estimators in the vault; ``cn.export`` writes released values with a
receipt signed by the kernel's attested key; ``t.seal``/``cn.unseal`` keep tables and models encrypted between
kernels with the same measurement.
"""

from __future__ import annotations

from confnb.analyst.api import audit, export, kernel_info, open, unseal
from confnb.analyst.errors import NotInKernelError, PolicyViolation, VaultError
from confnb.analyst.expr import Column, Expr, col, lit, where
from confnb.analyst.model import SealedModel, fit
from confnb.analyst.privacy import budget, set_epsilon
from confnb.analyst.table import GroupBy, SealedResult, SealedTable

__all__ = [
    "Column",
    "Expr",
    "GroupBy",
    "NotInKernelError",
    "PolicyViolation",
    "SealedModel",
    "SealedResult",
    "SealedTable",
    "VaultError",
    "audit",
    "budget",
    "col",
    "export",
    "fit",
    "kernel_info",
    "lit",
    "open",
    "set_epsilon",
    "unseal",
    "where",
]
