"""Where a benchmark's figures come from: the commit of the code that produced them and the machine they ran on.

Every benchmark script writes its result to ``benchmarks/results/<script>.json`` (or ``--out``): its figures, a
one-row ``summary`` for the table in ``benchmarks/README.md``, and ``provenance``: the commit (``git rev-parse
HEAD``, with ``-dirty`` when tracked files differ from it), the machine (cores, memory, CPU model), the time and the
command. A figure in the README is therefore always one that the code at a named commit produced.

Run as a script, this module rewrites the README's results table from those files::

    python benchmarks/_provenance.py            # rewrite the table between the markers
    python benchmarks/_provenance.py --check    # exit 1 if the table differs from the results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
README = BENCHMARKS / "README.md"
TABLE_START = "<!-- results table: written by `python benchmarks/_provenance.py` from results/*.json -->"
TABLE_END = "<!-- end of results table -->"


def scripts() -> list[str]:
    """Every benchmark script's name (helpers such as this one start with an underscore)."""
    return sorted(path.stem for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_"))


def commit() -> str:
    """The commit the code was checked out at, ``-dirty`` if tracked files differ (results written by an earlier
    benchmark of the same session do not count: they are outputs), or ``unknown`` outside git."""
    try:
        head = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def _git(*arguments: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *arguments], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def machine() -> dict[str, Any]:
    """Cores, memory and CPU model: what a ratio measured here may depend on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _meminfo_total(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(value, 2) for value in os.getloadavg()]
    return info


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_output_argument(parser: argparse.ArgumentParser, script: str) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / f"{script}.json",
        help=f"where to write the result with its commit and machine (default results/{script}.json)",
    )


class Provenance:
    """Taken when a run starts: the code and the machine the figures belong to."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.started = dt.datetime.now(dt.UTC)
        self.commit = commit()
        self.machine = machine()
        self.command = [Path(sys.argv[0]).name, *sys.argv[1:]]

    def record(self, figures: dict[str, Any], summary: dict[str, Any], out: Path) -> dict[str, Any]:
        """``figures`` with ``summary`` and ``provenance`` added, written to ``out``; returns the document.

        ``summary`` is the README row: ``figure`` (what is compared), ``result``, ``target``, ``met`` (a bool, or
        None when there is no target).
        """
        document = {
            **figures,
            "summary": summary,
            "provenance": {
                "benchmark": self.script,
                "commit": self.commit,
                "machine": self.machine,
                "started": self.started.isoformat(timespec="seconds"),
                "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "command": self.command,
            },
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        temporary.replace(out)
        return document


TIMES = "\N{MULTIPLICATION SIGN}"


def ratio(value: float) -> str:
    return f"{value:.2f}{TIMES}"


# -- the README table -----------------------------------------------------------------------------------------------


def _machine_text(info: dict[str, Any]) -> str:
    memory = info.get("memory_bytes")
    size = f", {memory / 2**30:.0f} GiB" if isinstance(memory, int) else ""
    return f"{info.get('cores')} cores{size}, {info.get('cpu_model')}"


def table(results: Path = RESULTS) -> str:
    """The results table: one row per benchmark script, from its result file (or saying there is none)."""
    lines = [
        "| benchmark | figure | result | target | met | commit | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for script in scripts():
        path = results / f"{script}.json"
        if not path.is_file():
            lines.append(f"| `{script}.py` | — | not yet measured | — | — | — | — |")
            continue
        document = json.loads(path.read_text())
        summary, provenance = document["summary"], document["provenance"]
        met = {True: "yes", False: "**no**", None: "—"}[summary.get("met")]
        figure = summary["figure"]
        settings = _settings(provenance.get("command", []))
        if settings:  # not the benchmark's own sizes: say so where the figure is
            figure += f" (run with `{settings}`)"
        commit_id = str(provenance["commit"])
        shown = commit_id[:12] + ("-dirty" if commit_id.endswith("-dirty") else "")
        lines.append(
            f"| [`{script}.py`](results/{script}.json) | {figure} | {summary['result']} | "
            f"{summary['target']} | {met} | `{shown}` | {_machine_text(provenance['machine'])} |"
        )
    return "\n".join(lines)


def _settings(command: list[str]) -> str:
    """The arguments a run was given, other than where its output went."""
    kept, skip = [], False
    for argument in command[1:]:
        if skip:
            skip = False
        elif argument == "--out":
            skip = True
        elif argument != "--json" and not argument.startswith("--out="):
            kept.append(argument)
    return " ".join(kept)


def readme_with_table(text: str, results: Path = RESULTS) -> str:
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[:start] + "\n" + table(results) + "\n" + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description="Rewrite the results table of benchmarks/README.md from results/.")
    parser.add_argument("--check", action="store_true", help="only check that the table matches the results")
    args = parser.parse_args()
    current = README.read_text()
    try:
        updated = readme_with_table(current)
    except ValueError:
        print("benchmarks/README.md has no results-table markers", file=sys.stderr)
        return 2
    if args.check:
        if updated != current:
            print("benchmarks/README.md: the results table differs from results/*.json", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
