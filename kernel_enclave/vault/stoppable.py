"""Work an interrupt can stop: queries through Polars' own cancellation, model work in a fork the vault kills.

A thread cannot be stopped inside scikit-learn's native code, and the vault answers one request at a time; an
abandoned fit left in a thread kept the vault busy for minutes. So the service gives each request a cancellation
token (:class:`CancelToken`, :func:`cancellable`), and:

- every Polars query of a request goes through :func:`collect`, which runs it on Polars' thread pool and cancels it
  there when the token is set. Polars looks at its cancellation between operators, so an operator already running
  (one big group-by, say) finishes first; a release made of several queries stops before its next one, and a
  query over a dataset scanned from disk (Polars' streaming engine, which has no cancellation) runs to its end.
  Polars cannot run in a fork: the child would have Polars' thread pool without its threads, and a query there
  would wait for ever;
- model work (a fit, metrics, predictions) goes through :func:`run`, which computes in a child process forked for
  the purpose, on data the vault has already evaluated, and returns its result. A cancel kills the child at once
  (``SIGKILL``) and the request ends with :class:`Cancelled`.

A fork, not a fresh process: the child reads the vault's tables where they are (copy-on-write, no copy of the
data), and it is never dumpable (the flag survives ``fork`` but not ``execve``), so no other process of the same
user can read it or take it over, not even for an instant. What it inherits, and what stops that from mattering:

- **Keys and data.** The same memory as the vault, under the same protection. The child runs one function of the
  vault's own code on arguments the vault chose, and exits with ``os._exit`` (no exit handlers, no stdio flush).
- **Descriptors.** Every socket and pipe of the vault: the executor's connections, the listening sockets, the
  launcher's pipes. Before running anything the child points each of them, and its standard streams, at
  ``/dev/null``: it cannot answer the executor or tighten the relay's gate, and it cannot keep a connection open
  after the vault is gone.
- **Threads.** Only the forking thread exists in the child; locks that other threads held stay held. The child's
  work takes none of the vault's locks, and the native libraries it uses reinitialise after a fork (glibc,
  jemalloc, OpenBLAS, Arrow's thread pool) except OpenMP: libgomp's thread pool does not survive a fork (a child
  that uses it crashes), so the child limits OpenMP to one thread.
- **Its output.** One result, through a private pipe, to the vault thread that forked it. It is a value the vault
  computed, like any other: the vault applies the output policy to it, records it and answers the executor.
  Nothing is released, recorded or answered in the child. The result crosses the pipe as a pickle written by the
  vault's own code in a process nobody else can reach; nothing that comes from the executor is ever unpickled.
- **Its life.** ``PR_SET_PDEATHSIG`` kills the child when the vault thread that forked it ends (with the vault, or
  killed); the vault kills it on a cancel. A child killed for lack of memory is reported as such; the vault lives.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import os
import pickle
import select
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from kernel_enclave.vault.protocol import Cancelled, VaultError

if TYPE_CHECKING:
    import polars as pl

__all__ = ["CancelToken", "cancellable", "check", "collect", "run"]

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05  # how often a waiting vault thread looks at its cancellation token
_LENGTH = struct.Struct(">Q")
_current: ContextVar[threading.Event | None] = ContextVar("confnb_vault_cancel", default=None)
_in_worker = False  # set in a worker: work it asks to run stoppably runs there and then, no second fork


def _read_only(mapping: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(mapping)


# Results hold read-only mappings (a trained model's record counts); they cross the pipe as the dicts they wrap.
copyreg.pickle(MappingProxyType, lambda proxy: (_read_only, (dict(proxy),)))


class CancelToken(threading.Event):
    """One request's cancellation: set by the connection's reader; what runs the request may ask to be told."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks_lock = threading.Lock()
        self._callbacks: list[Callable[[], object]] = []

    def set(self) -> None:
        super().set()
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @contextlib.contextmanager
    def on_cancel(self, callback: Callable[[], object]) -> Iterator[None]:
        """Call ``callback`` (from the cancelling thread) if the token is set while the block runs."""
        with self._callbacks_lock:
            self._callbacks.append(callback)
        try:
            if self.is_set():  # set before the callback was registered: it may not have been called
                callback()
            yield
        finally:
            with self._callbacks_lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)


def collect(query: pl.LazyFrame, *, streaming: bool = False) -> pl.DataFrame:
    """``query`` collected, cancelled inside Polars if the current request is cancelled meanwhile."""
    check()
    token = _current.get()
    if streaming or _in_worker or not isinstance(token, CancelToken):
        return query.collect(engine="streaming" if streaming else "auto")
    running = query.collect(background=True)
    with token.on_cancel(running.cancel):
        try:
            return running.fetch_blocking()
        except Exception:
            if token.is_set():  # Polars ends a cancelled query with an error of its own
                raise Cancelled() from None
            raise


@contextlib.contextmanager
def cancellable(token: threading.Event) -> Iterator[None]:
    """Run the block as one request that setting ``token`` cancels (the service does this for every request)."""
    reset = _current.set(token)
    try:
        yield
    finally:
        _current.reset(reset)


def check() -> None:
    """Raise :class:`Cancelled` if the current request has been cancelled (between steps of a computation)."""
    token = _current.get()
    if token is not None and token.is_set():
        raise Cancelled()


def run(function: Callable[..., T], *args: Any, openmp: bool = False) -> T:
    """``function(*args)`` computed in a forked child; :class:`Cancelled` as soon as the request is cancelled.

    ``openmp``: the function may use OpenMP (scikit-learn), so the child limits it to one thread first, which
    costs some milliseconds (finding the loaded libraries). A :class:`VaultError` raised in the child is raised here
    as it was; any other exception by its type name only (its text may quote data, as in :meth:`Vault.handle`).
    A fork and a fresh thread pool in the child cost some tens of milliseconds: callers keep short work inline.
    """
    check()
    if _in_worker:
        return function(*args)
    token = _current.get()
    parent = os.getpid()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise VaultError(f"the vault could not start a worker process ({exc.strerror or type(exc).__name__})") from None
    if pid == 0:
        _child(function, args, write_end, parent, openmp)
    os.close(write_end)
    data: bytes | None = None
    try:
        data = _collect(read_end, token)
    finally:
        os.close(read_end)
        if data is None:  # cancelled, or this thread is failing: the child must not outlive its request
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        status = _reap(pid)
    if data is None:
        raise Cancelled()
    result: T = _outcome(data, status)
    return result


def _collect(read_end: int, token: threading.Event | None) -> bytes | None:
    """Everything the child writes until it closes the pipe, or ``None`` once the token is set."""
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(read_end, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        if token is not None and token.is_set():
            return None
        if not poller.poll(int(_POLL_S * 1000)):
            continue
        chunk = os.read(read_end, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return status
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


def _outcome(data: bytes, status: int) -> Any:
    if len(data) < _LENGTH.size or _LENGTH.unpack_from(data)[0] != len(data) - _LENGTH.size:
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            hint = " (out of memory?)" if number == signal.SIGKILL else ""
            raise VaultError(f"the computation's worker process was killed by {name}{hint}; the vault is intact")
        raise VaultError(f"the computation's worker process exited with status {os.waitstatus_to_exitcode(status)}")
    kind, value = pickle.loads(data[_LENGTH.size :])  # noqa: S301 - written by this vault's own fork (see above)
    if kind == "ok":
        return value
    if kind == "error":
        raise value
    if kind == "memory":
        raise VaultError("the computation ran out of memory in the vault's worker process")
    raise VaultError(f"the computation failed inside the vault ({value})")


def _child(function: Callable[..., Any], args: tuple[Any, ...], write_end: int, parent: int, openmp: bool) -> NoReturn:
    global _in_worker  # noqa: PLW0603 - this process is the worker now
    _in_worker = True
    status = 70
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the vault died before the line above took effect
            os._exit(1)
        _detach(write_end)
        if openmp:
            _one_openmp_thread()
        outcome: tuple[str, Any]
        try:
            outcome = ("ok", function(*args))
        except VaultError as exc:
            outcome = ("error", exc.with_traceback(None))
        except MemoryError:
            outcome = ("memory", None)
        except Exception as exc:
            outcome = ("failed", type(exc).__name__)
        try:
            payload = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            payload = pickle.dumps(("failed", f"unpicklable result: {type(exc).__name__}"))
        with open(write_end, "wb", closefd=False) as pipe:
            pipe.write(_LENGTH.pack(len(payload)))
            pipe.write(payload)
        status = 0
    finally:
        os._exit(status)


def _detach(keep: int) -> None:
    """Point every inherited socket and pipe, and the standard streams, at /dev/null (the numbers stay taken, so
    a Python object that still names one can never close something else)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        descriptor = int(name)
        if descriptor in (keep, devnull):
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue  # the directory listing's own descriptor, already closed
        if descriptor <= 2 or target.startswith(("socket:", "pipe:")):
            os.dup2(devnull, descriptor)
    os.close(devnull)


def _one_openmp_thread() -> None:
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:  # without threadpoolctl there is no scikit-learn, and no OpenMP pool to inherit
        return
    threadpool_limits(1, user_api="openmp")
