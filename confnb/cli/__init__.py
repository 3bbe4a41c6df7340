"""The ``confnb`` command line.

Exit codes are a contract other tools rely on: 0 success, 1 a verification or policy failure, 2 bad usage or
unreadable input. Input errors are reported in one line, never as a traceback (set ``CONFNB_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
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


if __name__ == "__main__":
    sys.exit(main())
