"""The ``confnb`` command line.

Exit codes are a contract other tools rely on: 0 success, 1 a verification or policy failure, 2 bad usage or
unreadable input. Input errors are reported in one line, never as a traceback (set ``CONFNB_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import TextIO

from confnb import __version__
from confnb.attest.errors import AttestInputError
from confnb.cli import attest, broker, dataset, demo, kernel, policy, receipt
from confnb.cli.common import EXIT_USAGE, UsageError

_COMMANDS = (attest, policy, dataset, broker, kernel, demo, receipt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confnb",
        description="Confidential notebooks: attest SEV-SNP kernels, protect datasets, control what leaves.",
        epilog="Exit codes: 0 success, 1 verification or policy failure, 2 bad usage or unreadable input.",
    )
    parser.add_argument("--version", action="version", version=f"confnb {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError as exc:  # also from argparse printing --help into a closed pipe
        if _reader_gone(sys.stdout) or _reader_gone(sys.stderr):
            return _stdout_closed()
        # Some other pipe or socket broke (a peer went away mid-request): an error like any other.
        if os.environ.get("CONFNB_DEBUG"):
            traceback.print_exception(exc)
        print(f"confnb: internal error: BrokenPipeError: {exc} (set CONFNB_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_USAGE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, --version and usage errors: their text is still in stdout's buffer
        sys.stdout.flush()
        raise
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # inside the try: a reader that went away shows up here when output was buffered
        return status
    except BrokenPipeError:
        raise
    except (AttestInputError, UsageError) as exc:
        print(f"confnb: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("confnb: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("CONFNB_DEBUG"):
            traceback.print_exc()
        print(
            f"confnb: internal error: {type(exc).__name__}: {exc} (set CONFNB_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _reader_gone(stream: TextIO) -> bool:
    """Whether the pipe behind ``stream`` has lost its reader (poll reports POLLERR on such a pipe's write end)."""
    try:
        descriptor = stream.fileno()
        poller = select.poll()
        poller.register(descriptor, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no descriptor, or already closed: nobody reads it either
        return True


def _stdout_closed() -> int:
    """The reader of our output went away (``confnb dataset inspect DIR | head``): stop quietly, as Unix tools do.

    Python would report the failed flush of stdout once more at exit, so stdout is pointed at /dev/null first. The
    status is the one a shell reports for a tool that SIGPIPE ended (128 + 13).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout already closed or replaced by something without a descriptor
        pass
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
