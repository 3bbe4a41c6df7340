"""Uploaded files are parsed in a process of their own, which holds nothing worth stealing and can harm nothing.

pyarrow's CSV, Parquet and Arrow readers are large C++ parsers that have had memory-safety bugs. Run inside the
vault, one such bug in a hostile file would read or corrupt the memory that holds every other owner's plaintext
and the kernel's keys. So the vault never runs them on upload bytes: :func:`parse_upload` starts
``python -I -m kernel_enclave.vault.upload_parser`` for each upload, writes the decrypted file to its stdin and
reads an uncompressed Arrow IPC stream from its stdout, which :func:`kernel_enclave.vault.untrusted.read_ipc`
checks like any input from outside the vault before the table is registered.

The child holds only the one file it parses: no key (it is exec'd, so nothing of the vault's memory survives), no
other dataset. Before it reads a byte of input it makes itself non-dumpable, dies with the vault, refuses to run
traced, sets ``no_new_privs`` and resource limits (CPU, address space, no files written, no core); when the vault
runs as root it also leaves the network (a network namespace of its own, so a compromised parser cannot send the
file anywhere) and drops to the executor's unprivileged user (``nobody`` by default). A crash, a hang past the
deadline or output beyond the limits ends the upload with an error naming what happened; the vault stays up.

The child's failures come back as one JSON line on stderr, which the vault treats as hostile too: it only picks a
check name or an exception type from fixed lists and writes the message itself, so no byte of the file can reach
an error message.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped]

from kernel_enclave.vault.protocol import VaultError
from kernel_enclave.vault.untrusted import CHECKS, UPLOAD_LIMITS, UntrustedInputError, read_ipc, validate_table

PARSE_TIMEOUT_S: Final = 600.0
FORMAT_NAMES: Final = {"csv": "CSV", "parquet": "Parquet", "arrow": "Arrow IPC"}
# What the parser may name as the reason a file did not parse; anything else is reported as "an error".
ERROR_TYPES: Final = frozenset(
    {
        "ArrowInvalid",
        "ArrowTypeError",
        "ArrowNotImplementedError",
        "ArrowIndexError",
        "ArrowKeyError",
        "ArrowCapacityError",
        "ArrowSerializationError",
        "ArrowMemoryError",
        "ArrowIOError",
        "OSError",
        "ValueError",
        "MemoryError",
        "UnicodeDecodeError",
    }
)
_WHAT = "the uploaded file"
_MAX_STDERR = 4096
_READ = 1 << 20
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_EXIT_REFUSED = 2
_EXIT_SANDBOX = 3


class ParserError(VaultError):
    """The parser process failed or misbehaved; the message is the vault's own words."""

    kind = "UploadError"


# -- the vault's side ---------------------------------------------------------------------------------------------


def parse_upload(
    data: pa.Buffer,
    file_format: str,
    *,
    timeout: float = PARSE_TIMEOUT_S,
    command: Sequence[str] | None = None,
) -> pa.Table:
    """The decrypted upload as a validated table, parsed in a separate process.

    ``command`` replaces the parser program (its protocol stays: file on stdin, IPC stream on stdout); tests use
    it to stand in a parser that crashes or hangs.
    """
    if file_format not in FORMAT_NAMES:
        raise ParserError(f"no parser for file format {file_format!r}")
    argv = list(command) if command is not None else _command(file_format, data.size, timeout)
    try:
        process = subprocess.Popen(  # noqa: S603 - this interpreter and arguments built here (or a test's stand-in)
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise ParserError(f"the upload parser did not start ({type(exc).__name__})") from None
    writer = threading.Thread(target=_feed, args=(process, data), name="confnb-upload-feed", daemon=True)
    writer.start()
    deadline = time.monotonic() + timeout
    try:
        output, errors = _collect(process, deadline, timeout)
        try:
            status = process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ParserError(f"the upload parser did not finish within {timeout:g} s") from None
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        writer.join(5)
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        raise ParserError(f"the upload parser was killed by {name}; nothing of the upload was kept")
    if status != 0:
        raise _failure(errors, status, file_format)
    return read_ipc(output, "the upload parser's output", UPLOAD_LIMITS)


def _command(file_format: str, size: int, timeout: float) -> list[str]:
    argv = [sys.executable, "-I", "-m", "kernel_enclave.vault.upload_parser", file_format, str(size)]
    argv.append(str(max(1, int(timeout))))
    if os.geteuid() == 0:
        from kernel_enclave.privileges import PrivilegeError, executor_identity

        try:
            identity = executor_identity()
        except PrivilegeError as exc:
            raise ParserError(f"the upload parser has no unprivileged user: {exc}") from None
        argv += [str(identity.uid), str(identity.gid)]
    return argv


def _feed(process: subprocess.Popen[bytes], data: pa.Buffer) -> None:
    stdin = process.stdin
    assert stdin is not None
    try:
        with memoryview(data) as view:
            for start in range(0, len(view), _READ):
                stdin.write(view[start : start + _READ])
        stdin.close()
    except (OSError, ValueError):
        pass  # the parser is gone; its status says why


def _collect(process: subprocess.Popen[bytes], deadline: float, timeout: float) -> tuple[bytearray, bytes]:
    """stdout (up to the upload limit) and stderr (up to a few KiB) until both close, or a refusal."""
    assert process.stdout is not None
    assert process.stderr is not None
    output, errors = bytearray(), bytearray()
    limit = UPLOAD_LIMITS.max_bytes
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, output)
        selector.register(process.stderr, selectors.EVENT_READ, errors)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ParserError(f"the upload parser did not finish within {timeout:g} s")
            for key, _ in selector.select(min(remaining, 1.0)):
                chunk = os.read(key.fd, _READ)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                sink: bytearray = key.data
                sink += chunk
                if len(output) > limit:
                    raise UntrustedInputError("the upload parser's output", "size", f"more than {limit} bytes")
                if len(errors) > _MAX_STDERR:
                    del errors[_MAX_STDERR:]
    return output, bytes(errors)


def _failure(errors: bytes, status: int, file_format: str) -> VaultError:
    """The vault's words for the parser's report: only names from fixed lists are taken from it."""
    try:
        report = json.loads(errors.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = None
    if not isinstance(report, dict):
        return ParserError(f"the upload parser failed (exit status {status}) without a report")
    check, column = report.get("check"), report.get("column")
    if isinstance(check, str) and check in CHECKS:
        shown = column if isinstance(column, int) and not isinstance(column, bool) and 0 <= column < 1 << 20 else None
        return UntrustedInputError(_WHAT, check, column=shown)
    if report.get("error") == "unreadable":
        kind = report.get("type")
        named = kind if isinstance(kind, str) and kind in ERROR_TYPES else "an error"
        return ParserError(
            f"the decrypted file is not a readable {FORMAT_NAMES[file_format]} file ({named}); "
            "check that file_format matches the file"
        )
    if report.get("error") == "sandbox":
        return ParserError("the upload parser could not confine itself (network namespace, user); not parsed")
    return ParserError(f"the upload parser failed (exit status {status})")


# -- the parser's side --------------------------------------------------------------------------------------------


def _report(value: dict[str, Any], status: int) -> int:
    sys.stderr.write(json.dumps(value) + "\n")
    sys.stderr.flush()
    return status


def _confine(cpu_seconds: int, size: int, identity: tuple[int, int] | None) -> str | None:
    """Everything before the first byte of input is read; returns why confinement failed, if it did."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    from kernel_enclave.privileges import make_undumpable

    make_undumpable()
    if identity is not None:
        if libc.unshare(_CLONE_NEWNET) != 0:
            return "unshare(CLONE_NEWNET)"
        uid, gid = identity
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            return "setuid"
        make_undumpable()  # a change of user resets it to the system default; make sure
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return "no_new_privs"
    with open("/proc/self/status", encoding="ascii", errors="replace") as status:
        tracer = next((line.split()[1] for line in status if line.startswith("TracerPid:")), "0")
    if tracer != "0":
        return "traced"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # The file, the parsed table and its IPC copy, with room for the readers' own allocations.
    address_space = 4 * size + 4 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return None


def _read_stdin(size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    received = 0
    while received < size:
        count = os.readv(sys.stdin.fileno(), [view[received:]])
        if not count:
            raise EOFError
        received += count
    return data


def _parse(data: bytearray, file_format: str) -> pa.Table:
    """The file read without Arrow's CPU pool; the one I/O thread the readers still use runs already (``_warm_up``)."""
    buffer = pa.py_buffer(data)
    if file_format == "csv":
        csv = sys.modules["pyarrow.csv"]
        return csv.read_csv(pa.BufferReader(buffer), read_options=csv.ReadOptions(use_threads=False))
    if file_format == "parquet":
        return sys.modules["pyarrow.parquet"].read_table(pa.BufferReader(buffer), use_threads=False, pre_buffer=False)
    try:  # Arrow IPC file format (.arrow, Feather v2) first, then the streaming format
        return pa.ipc.open_file(buffer).read_all()
    except (pa.ArrowException, ValueError, OSError):
        return pa.ipc.open_stream(buffer).read_all()


def _warm_up(file_format: str) -> None:
    """Start, before confinement, every thread the readers will use, by reading a small file of fixed content.

    Arrow starts pool threads on first use; one that cannot start after confinement (the address-space limit, or
    the machine's process limit while many kernels run) makes C++ abort the parser on a perfectly good file.
    """
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    sample = pa.table({"warm_up": pa.array([1], pa.int64())})
    sink = pa.BufferOutputStream()
    if file_format == "csv":
        sys.modules["pyarrow.csv"].write_csv(sample, sink)
    elif file_format == "parquet":
        sys.modules["pyarrow.parquet"].write_table(sample, sink)
    else:
        with pa.ipc.new_stream(sink, sample.schema) as writer:
            writer.write_table(sample)
    _parse(bytearray(sink.getvalue().to_pybytes()), file_format)


def _normalized(table: pa.Table) -> pa.Table:
    """Without the file's metadata, and with all-empty columns (Arrow's null type) as strings."""
    columns = [
        pa.nulls(len(column), pa.string()) if pa.types.is_null(column.type) else column for column in table.columns
    ]
    fields = [
        pa.field(field.name, column.type, field.nullable or column.type != field.type)
        for field, column in zip(table.schema, columns, strict=True)
    ]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    file_format, size, cpu_seconds = args[0], int(args[1]), int(args[2])
    identity = (int(args[3]), int(args[4])) if len(args) >= 5 else None
    # Every module the parse needs is loaded before confinement: the unprivileged user may not reach them.
    importlib.import_module({"csv": "pyarrow.csv", "parquet": "pyarrow.parquet"}.get(file_format, "pyarrow.ipc"))
    _warm_up(file_format)
    failed = _confine(cpu_seconds, size, identity)
    if failed is not None:
        return _report({"error": "sandbox", "step": failed}, _EXIT_SANDBOX)
    try:
        data = _read_stdin(size)
    except (EOFError, OSError):
        return _report({"error": "input"}, _EXIT_REFUSED)
    try:
        table = _parse(data, file_format)
    except (pa.ArrowException, ValueError, OSError, MemoryError, IndexError) as exc:
        return _report({"error": "unreadable", "type": type(exc).__name__}, _EXIT_REFUSED)
    try:
        # The readers do not validate what they build; writing an invalid table out would read past its buffers.
        table = validate_table(_normalized(table), _WHAT, UPLOAD_LIMITS)
    except UntrustedInputError as exc:
        return _report({"check": exc.check, "column": exc.column}, _EXIT_REFUSED)
    options = pa.ipc.IpcWriteOptions(compression=None)
    with pa.ipc.new_stream(sys.stdout.buffer, table.schema, options=options) as writer:
        writer.write_table(table)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
