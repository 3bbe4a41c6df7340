"""The analyst API's exceptions: the vault's own, so ``except cn.PolicyViolation`` catches what the vault raised.

:class:`PolicyViolation` carries ``rule`` (e.g. ``release.min_group_size``) and ``datasets`` (whose policy imposed
it); neither it nor :class:`VaultError` ever carries a data value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from kernel_enclave.vault.protocol import PolicyViolation, ProtocolError, VaultError

__all__ = ["NotInKernelError", "PolicyViolation", "ProtocolError", "VaultError", "short_traceback"]

P = ParamSpec("P")
R = TypeVar("R")


class NotInKernelError(VaultError):
    """The analyst API was used outside a confidential kernel (no vault to talk to)."""

    kind = "NotInKernelError"


def short_traceback(function: Callable[P, R]) -> Callable[P, R]:
    """Re-raise the vault's refusals from the public API's own frame, without the wire plumbing below it.

    An analyst who hits a policy rule needs the rule and the dataset, not ten frames of socket code; and a traceback
    that stops here cannot show local variables of the request machinery.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except VaultError as exc:
            raise exc.with_traceback(None) from None

    return wrapper
