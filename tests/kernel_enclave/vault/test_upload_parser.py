"""The upload parser process: confined before it reads a byte, and whatever it does, the vault ends up with a
validated table or an error in its own words.

The real parser program parses each format and refuses broken files by a named check; stand-in programs (the
``command`` hook: same protocol, file on stdin, IPC stream on stdout) crash, hang, flood, lie in their report or
hand back invalid Arrow, and the vault's side turns each into a one-line error, with the parser gone afterwards.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pacsv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from kernel_enclave.vault.protocol import VaultError
from kernel_enclave.vault.untrusted import UntrustedInputError
from kernel_enclave.vault.upload_parser import ParserError, parse_upload

TABLE = pa.table({"k": ["a", "b", None] * 100, "v": list(range(300)), "empty": pa.nulls(300)})


def _stand_in(source: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(source)]


def _csv(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def _arrow(table: pa.Table, **options: object) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("file_format", ["csv", "parquet", "arrow"])
def test_each_format_comes_back_as_the_same_table_with_empty_columns_as_strings(file_format: str) -> None:
    data = {"csv": _csv, "parquet": _parquet, "arrow": _arrow}[file_format](TABLE)
    parsed = parse_upload(pa.py_buffer(data), file_format)
    # CSV has no null strings: pyarrow reads an empty field of a text column as ""
    expected = [value if value is not None or file_format != "csv" else "" for value in TABLE.column("k").to_pylist()]
    assert parsed.column("k").to_pylist() == expected
    assert parsed.column("v").to_pylist() == list(range(300))
    assert parsed.schema.field("empty").type == pa.string()
    assert parsed.column("empty").null_count == 300
    assert parsed.schema.metadata is None  # pandas or writer metadata does not travel into the vault


def test_compressed_arrow_is_decompressed_by_the_parser_not_the_vault() -> None:
    parsed = parse_upload(pa.py_buffer(_arrow(TABLE.drop_columns(["empty"]), compression="zstd")), "arrow")
    assert parsed.column("v").to_pylist() == list(range(300))


def test_a_file_with_broken_offsets_is_refused_in_the_parser_by_name() -> None:
    good = pa.array(["a", "b", "c"])
    offsets = pa.py_buffer(struct.pack("<4i", 0, 1 << 24, 2, 3))
    broken = pa.Array.from_buffers(pa.string(), 3, [None, offsets, good.buffers()[2]])
    with pytest.raises(UntrustedInputError) as caught:
        parse_upload(pa.py_buffer(_arrow(pa.table({"n": [1, 2, 3], "s": broken}))), "arrow")
    assert str(caught.value) == (
        "the uploaded file: refused by check validation, Arrow full validation failed (column 1)"
    )


@pytest.mark.parametrize("file_format", ["csv", "parquet", "arrow"])
def test_the_parser_starts_no_thread_once_confined(file_format: str) -> None:
    """A thread that cannot start under the parser's limits makes C++ abort it on a good file: every thread the
    readers use must run before confinement. The real parser program, observed from inside."""
    observer = textwrap.dedent(
        """
        import os, sys
        from kernel_enclave.vault import upload_parser

        def threads():
            return len(os.listdir("/proc/self/task"))

        confine, confined = upload_parser._confine, []
        def observed(*args):
            failed = confine(*args)
            confined.append(threads())
            return failed
        upload_parser._confine = observed
        status = upload_parser.main(sys.argv[1:])
        if status == 0 and threads() != confined[0]:
            sys.stderr.write('{"error": "threads"}\\n')
            sys.exit(2)
        sys.exit(status)
        """
    )
    data = {"csv": _csv, "parquet": _parquet, "arrow": _arrow}[file_format](TABLE.drop_columns(["empty"]))
    wide = pa.table({f"c{i}": [1, 2, 3] for i in range(500)})
    for payload in (data, {"csv": _csv, "parquet": _parquet, "arrow": _arrow}[file_format](wide)):
        command = [sys.executable, "-c", observer, file_format, str(len(payload)), "60"]
        parsed = parse_upload(pa.py_buffer(payload), file_format, command=command)
        assert parsed.num_rows in (300, 3)


def test_confinement_before_input() -> None:
    """The parser's own confinement, observed from inside: no core, no files, no tracer, non-dumpable, and as
    root another user and no network."""
    probe = textwrap.dedent(
        """
        import json, os, resource, socket, sys, ctypes
        from kernel_enclave.vault.upload_parser import _confine
        identity = (65534, 65534) if os.geteuid() == 0 else None
        net_before = os.readlink("/proc/self/ns/net")
        failed = _confine(30, 1000, identity)
        libc = ctypes.CDLL(None)
        interfaces = sorted(name for _, name in socket.if_nameindex())
        print(json.dumps({
            "failed": failed,
            "uid": os.getuid(),
            "dumpable": libc.prctl(3, 0, 0, 0, 0),
            "no_new_privs": libc.prctl(39, 0, 0, 0, 0),
            "core": resource.getrlimit(resource.RLIMIT_CORE),
            "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
            "cpu": resource.getrlimit(resource.RLIMIT_CPU),
            "new_net": os.readlink("/proc/self/ns/net") != net_before,
            "interfaces": interfaces,
        }))
        """
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    seen = json.loads(run.stdout)
    assert seen["failed"] is None
    assert seen["dumpable"] == 0 and seen["no_new_privs"] == 1
    assert seen["core"] == [0, 0] and seen["fsize"] == [0, 0] and seen["cpu"] == [30, 31]
    if os.geteuid() == 0:
        assert seen["uid"] == 65534
        assert seen["new_net"] is True and seen["interfaces"] == ["lo"]


# -- a parser that misbehaves ------------------------------------------------------------------------------------------


def test_a_crashing_parser_is_a_clean_error() -> None:
    crash = _stand_in("import os, signal, sys\nsys.stdin.buffer.read(10)\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    with pytest.raises(ParserError, match=r"^the upload parser was killed by SIGSEGV; nothing of the upload was kept$"):
        parse_upload(pa.py_buffer(b"k\n1\n" * 1000), "csv", command=crash)


def test_a_hanging_parser_is_killed_at_the_deadline() -> None:
    hang = _stand_in("import time\ntime.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(ParserError, match=r"^the upload parser did not finish within 1 s$"):
        parse_upload(pa.py_buffer(b"k\n1\n" * 1_000_000), "csv", command=hang, timeout=1.0)
    assert time.monotonic() - started < 10


def test_a_parser_report_carries_no_words_of_its_own() -> None:
    """A compromised parser could put the file's content into its report: only fixed names are taken from it."""
    lies = [
        ({"check": "validation", "column": 3, "detail": "SECRET"}, "check validation", UntrustedInputError),
        ({"error": "unreadable", "type": "SECRET-value"}, "not a readable CSV file (an error)", ParserError),
        ({"check": "SECRET"}, "the upload parser failed (exit status 2)", ParserError),
        ({"check": "validation", "column": "SECRET"}, "Arrow full validation failed", UntrustedInputError),
    ]
    for report, expected, kind in lies:
        source = f"import sys\nsys.stderr.write({json.dumps(report)!r})\nsys.exit(2)\n"
        with pytest.raises(VaultError) as caught:
            parse_upload(pa.py_buffer(b"k\n1\n"), "csv", command=_stand_in(source))
        assert isinstance(caught.value, kind)
        assert expected in str(caught.value) and "SECRET" not in str(caught.value)
    garbage = _stand_in("import sys\nsys.stderr.write('SECRET ' * 5000)\nsys.exit(7)\n")
    with pytest.raises(ParserError, match=r"^the upload parser failed \(exit status 7\) without a report$"):
        parse_upload(pa.py_buffer(b"k\n1\n"), "csv", command=garbage)


def test_invalid_arrow_handed_back_by_the_parser_is_refused_by_the_vault() -> None:
    """A parser subverted into emitting broken Arrow gains nothing: the vault validates what it receives."""
    good = pa.array(["a", "b", "c"])
    offsets = pa.py_buffer(struct.pack("<4i", 0, 1 << 24, 2, 3))
    broken = pa.Array.from_buffers(pa.string(), 3, [None, offsets, good.buffers()[2]])
    sink = pa.BufferOutputStream()
    table = pa.table({"s": broken})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    emit = _stand_in(
        "import sys\nsys.stdin.buffer.read()\n"
        f"sys.stdout.buffer.write(bytes.fromhex({sink.getvalue().to_pybytes().hex()!r}))\n"
    )
    with pytest.raises(UntrustedInputError) as caught:
        parse_upload(pa.py_buffer(b"k\n1\n"), "csv", command=emit)
    assert str(caught.value) == (
        "the upload parser's output: refused by check validation, Arrow full validation failed (column 0)"
    )


def test_a_parser_that_exits_before_reading_its_input_does_not_block_the_vault() -> None:
    quitter = _stand_in("import sys\nsys.exit(5)\n")
    started = time.monotonic()
    with pytest.raises(ParserError, match=r"exit status 5"):
        parse_upload(pa.py_buffer(b"x" * (64 << 20)), "csv", command=quitter)
    assert time.monotonic() - started < 30
