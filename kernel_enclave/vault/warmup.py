"""The vault's heavy imports (Polars, Arrow, Parquet; scikit-learn, pandas, skops and the estimator allowlist), kept
off the start path.

They take seconds to import, and a kernel is ready as soon as the analyst can run a cell: most cells never reach
the vault. So the vault binds its sockets and answers ``hello`` first, and loads what queries need in a background
thread; a request that needs them waits for that thread (:meth:`Warmup.wait`), never imports them itself, so two
threads never race through the same half-imported package. The ``warmup`` request reports how far the loading is,
which is how ``cn.open`` knows to say why it is waiting. scikit-learn is loaded by the kernel's first model
operation (:meth:`Warmup.wait_for_models`), under a lock: queries never wait for it.

``CONFNB_VAULT_WARMUP=on-demand`` leaves the loading to the first request that needs it instead: a kernel that
never touches a dataset never pays for it, and a test can watch a kernel answer while nothing is loaded.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeGuard

from kernel_enclave.vault.protocol import VaultError

WARMUP_VARIABLE: Final = "CONFNB_VAULT_WARMUP"
BACKGROUND: Final = "background"
ON_DEMAND: Final = "on-demand"
MODES: Final = (BACKGROUND, ON_DEMAND)
HEAVY_MODULES: Final = (
    "pyarrow",
    "kernel_enclave.vault.plan",  # pyarrow.compute
    "kernel_enclave.vault.release",  # NumPy
    "kernel_enclave.vault.export",
    "kernel_enclave.vault.upload",
    "confnb.datasets.reader",  # Parquet and pyarrow.dataset, for cn.open
)
# Loaded by a kernel's first model operation, not in the background: queries never wait for scikit-learn, nor fail
# with it (a vault under a tight memory limit, scanning a dataset larger than its memory, may be unable to load it).
MODEL_MODULES: Final = ("kernel_enclave.vault.models",)  # scikit-learn, skops and the estimator allowlist
# What ``warmup`` reports as loaded (top-level packages imported in this process), for whoever wonders why it waits.
WATCHED_PACKAGES: Final = ("polars", "pandas", "sklearn", "skops")
# Requests that need none of the heavy modules: answered at once, also while the others are still loading.
IMMEDIATE_OPS: Final = frozenset({"hello", "warmup", "audit", "drop"})
MAX_WAIT_S: Final = 30.0  # one ``warmup`` request waits at most this long; the client asks again

PENDING: Final = "pending"
LOADING: Final = "loading"
READY: Final = "ready"
FAILED: Final = "failed"


def configured_mode(value: str) -> str:
    """The warm-up mode ``value`` (from ``CONFNB_VAULT_WARMUP``; empty: the default) names; anything else is refused
    rather than guessed."""
    mode = value or BACKGROUND
    if mode not in MODES:
        raise ValueError(f"{WARMUP_VARIABLE} is {' or '.join(MODES)}, not {value!r}")
    return mode


def valid_wait(wait: object) -> TypeGuard[float]:
    """Whether a ``warmup`` request's ``wait`` is a number of seconds this vault waits."""
    return isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= MAX_WAIT_S


class Warmup:
    """Imports ``modules`` once, in a thread of its own, and lets requests wait for them."""

    def __init__(self, modules: Sequence[str] = HEAVY_MODULES, later: Sequence[str] = MODEL_MODULES) -> None:
        self._modules = tuple(modules)
        self._later = tuple(later)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._later_lock = threading.Lock()
        self._later_done = threading.Event()
        self._later_error = ""
        self._state = PENDING
        self._started_at = 0.0
        self._seconds = 0.0
        self._error = ""

    def start(self) -> None:
        """Begin loading (idempotent)."""
        with self._lock:
            if self._state != PENDING:
                return
            self._state = LOADING
            self._started_at = time.monotonic()
        threading.Thread(target=self._load, name="confnb-vault-warmup", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Start loading if nothing has yet, and wait up to ``timeout`` seconds (forever if None); True once done."""
        self.start()
        return self._done.wait(timeout)

    def wait_for_models(self) -> None:
        """Load the model modules (once, whichever thread asks first); :class:`VaultError` naming the module if they
        could not be."""
        self.wait()
        with self._later_lock:
            if not self._later_done.is_set():
                self._later_error = self._error
                for name in self._later if not self._error else ():
                    try:
                        importlib.import_module(name)
                    except Exception as exc:  # model operations are refused, naming it; queries go on
                        self._later_error = f"{type(exc).__name__} while importing {name}"
                        break
                self._later_done.set()
        if self._later_error:
            raise VaultError(f"the vault could not load what this request needs ({self._later_error})")

    @property
    def state(self) -> str:
        return self._state

    @property
    def later_modules(self) -> tuple[str, ...]:
        return self._later

    @property
    def error(self) -> str:
        """Why loading failed ('' unless the state is ``failed``): the exception type and the module."""
        return self._error

    def status(self) -> dict[str, Any]:
        """What the ``warmup`` request reports: the state, seconds spent so far (or in all), the failure if any."""
        with self._lock:
            state, started = self._state, self._started_at
            seconds = self._seconds if state in (READY, FAILED) else (time.monotonic() - started if started else 0.0)
        loaded = [name for name in WATCHED_PACKAGES if name in sys.modules]
        status: dict[str, Any] = {"state": state, "seconds": round(seconds, 3), "loaded": loaded}
        if state == FAILED:
            status["error"] = self._error
        return status

    def _load(self) -> None:
        state, error = READY, ""
        for name in self._modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a broken install: every request that needs it is refused, naming it
                state, error = FAILED, f"{type(exc).__name__} while importing {name}"
                break
        with self._lock:
            self._state, self._error = state, error
            self._seconds = time.monotonic() - self._started_at
        self._done.set()


class Deferred:
    """A module imported on first attribute access, so that importing its user stays cheap.

    In the vault process the warm-up thread has imported it before any request that uses it runs; elsewhere (a
    vault inside a test's process) the first use imports it.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        if self._name in VAULT_WARMUP.later_modules:
            VAULT_WARMUP.wait_for_models()
        if VAULT_WARMUP.state == FAILED:  # fail closed, and say why, rather than import half a package again
            raise VaultError(f"the vault could not load what this request needs ({VAULT_WARMUP.error})")
        return getattr(importlib.import_module(self._name), attribute)


def deferred_function(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when first called (see :class:`Deferred`)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(Deferred(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


VAULT_WARMUP: Final = Warmup()
"""The process's one warm-up (imports are process-wide): the vault process starts it, requests wait for it."""
