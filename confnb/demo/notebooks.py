"""Running the example notebooks headless on ``confnb-snp`` and checking what they showed.

A notebook states its own expectations in cell metadata, so the checks travel with the notebook:

- ``tags: ["refused-leak"]``: the cell tries to take out something the owner's policy protects; its output must
  show the vault's ``PolicyViolation`` message, which names the rule (``[rule release.… of 'dataset']``, or
  ``[rule privacy.… of 'dataset']`` for an exact request or an overspent budget under differential privacy);
- ``tags: ["refused-leak", "raises-exception"]``: the same, left uncaught: the cell's error must be that
  ``PolicyViolation`` (nbclient's ``raises-exception`` tag; JupyterLab stops "Run All" at it, so only a notebook's
  last code cell has it);
- ``confnb.expect``: text that must appear in the cell's output (released values, group names, rules);
- ``confnb.absent``: text that must not (a withheld group's name, say).

Every code cell must run without an error, and no output may have been withheld by the kernel's display gate: the
examples are written to pass it, so a gate notice means the notebook no longer shows what it explains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KERNEL_NAME = "confnb-snp"
REFUSED_TAG = "refused-leak"
RAISES_TAG = "raises-exception"
REFUSAL_MARK = "PolicyViolation"
# How a refusal names its rule: the release rules of exact mode, the privacy rules of differential privacy.
RULE_MARKS = ("[rule release.", "[rule privacy.")
GATE_NOTICE = "[confnb] output withheld"
CELL_TIMEOUT_S = 300


@dataclass
class NotebookOutcome:
    """One notebook's run: did every check hold, how long it took, what failed."""

    name: str
    seconds: float = 0.0
    cells: int = 0
    refused_leaks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "notebook": self.name,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "cells": self.cells,
            "refused_leaks": self.refused_leaks,
            "problems": self.problems,
        }


def cell_text(cell: Any) -> str:
    """Everything a cell showed as text: streams, plain-text results and displays, and errors."""
    parts: list[str] = []
    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream":
            parts.append(str(output.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            parts.append(str(data.get("text/plain", "")))
            parts.append(str(data.get("text/markdown", "")))
        elif kind == "error":
            parts.append(f"{output.get('ename', '')}: {output.get('evalue', '')}")
    return "\n".join(parts)


def check(notebook: Any, name: str) -> NotebookOutcome:
    """The checks on an executed notebook (see the module docstring)."""
    outcome = NotebookOutcome(name)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        outcome.cells += 1
        where = f"cell {index}"
        text = cell_text(cell)
        errors = [output for output in cell.outputs if output.get("output_type") == "error"]
        tags = cell.metadata.get("tags", [])
        if errors and not (RAISES_TAG in tags and REFUSED_TAG in tags and _all_refusals(errors)):
            outcome.problems.append(f"{where} raised {errors[0].get('ename')}: {errors[0].get('evalue')}")
        if GATE_NOTICE in text:
            outcome.problems.append(f"{where}: the display gate withheld output ({_line_with(text, GATE_NOTICE)})")
        metadata = cell.metadata.get("confnb", {})
        if REFUSED_TAG in tags:
            outcome.refused_leaks += 1
            if REFUSAL_MARK not in text or not _names_a_rule(text):
                outcome.problems.append(f"{where} should show a refused leak with its policy rule, but shows: {text!r}")
        for expected in metadata.get("expect", []):
            if expected not in text:
                outcome.problems.append(f"{where}: expected {expected!r} in its output")
        for absent in metadata.get("absent", []):
            if absent in text:
                outcome.problems.append(f"{where}: {absent!r} must not be in its output")
    return outcome


def _all_refusals(errors: list[Any]) -> bool:
    return all(error.get("ename") == REFUSAL_MARK and _names_a_rule(str(error.get("evalue", ""))) for error in errors)


def _names_a_rule(text: str) -> bool:
    return any(mark in text for mark in RULE_MARKS)


def run(path: Path, executed: Path | None = None) -> NotebookOutcome:
    """Execute ``path`` top to bottom on a fresh ``confnb-snp`` kernel (nbclient, as Jupyter runs it) and check it.

    The kernel is found, with its brokers and datasets, through the Jupyter environment the demo set up. The
    executed notebook goes to ``executed`` when given (``confnb demo --dir`` keeps it for inspection).
    """
    import nbformat
    from nbclient import NotebookClient

    started = time.monotonic()
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=True,  # every cell runs, so one failure does not hide the next
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except Exception as exc:  # the kernel did not start, or died: the notebook fails, the demo goes on
        outcome = NotebookOutcome(path.name, problems=[f"could not run on {KERNEL_NAME}: {_one_line(exc)}"])
    else:
        outcome = check(notebook, path.name)
    outcome.seconds = time.monotonic() - started
    if executed is not None:
        executed.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, executed / path.name)  # type: ignore[no-untyped-call]
    return outcome


def _line_with(text: str, needle: str) -> str:
    return next((line.strip() for line in text.splitlines() if needle in line), needle)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
