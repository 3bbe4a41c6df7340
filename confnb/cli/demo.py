"""``confnb demo``: the product end to end on the simulated TEE, with embedded defaults only.

First the attestation walkthrough (:mod:`confnb.demo.walkthrough`): evidence, the attacks it stops, a key release
and the confidential kernel. Then the example use cases (``examples/``): each data owner generates and encrypts
synthetic data and serves its key broker on loopback, the ``confnb-snp`` kernelspec is installed in a private
Jupyter folder with the brokers and datasets in its environment, and the analysts' notebooks are copied into a
work folder. Interactively, JupyterLab opens there on the confidential kernel until Ctrl-C; ``--headless`` runs
every notebook through nbclient instead and checks what it showed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confnb.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, paint

EXIT_INTERRUPTED = 130


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="attestation, data owners' brokers and the example notebooks on the simulated TEE",
        description="Run confnb end to end on the simulated TEE (no hardware, no network, nothing installed for "
        "the user). Part 1, the attestation walkthrough: simulated SEV-SNP evidence for a fresh nonce is verified "
        "against a policy pinning the kernel's measurement; replay, tampering and a hardware-only policy are "
        "rejected; a data owner's broker releases a dataset key to the attested kernel and refuses an impostor; "
        "the confidential Jupyter kernel starts only once its evidence verifies. Part 2, the examples: the data "
        "owners of examples/ (a hospital, a bank, an insurer) generate deterministic synthetic data, encrypt it "
        "under their output policies and serve their key brokers on loopback; the confnb-snp kernelspec is "
        "installed in a private Jupyter folder; JupyterLab opens on the analysts' notebooks (hospital "
        "readmission risk, credit default scoring, a two-owner join) until Ctrl-C, which stops Lab, its kernels "
        "and the brokers.",
        epilog="Exit codes: 0 every check held (interactive: Lab was stopped cleanly), 1 a check or notebook "
        "failed, 2 bad usage or a step could not run, 130 interrupted.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--headless",
        action="store_true",
        help="no browser and no JupyterLab: execute every example notebook on confnb-snp (nbclient), check its "
        "outputs (refused leaks show the policy rule, expected values are present), print pass/fail per notebook",
    )
    mode.add_argument(
        "--attestation-only",
        action="store_true",
        help="run only part 1, the attestation walkthrough (what `confnb demo` did before the examples)",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        type=Path,
        help="keep everything in DIR (new or empty): policies, evidence, owner stores, encrypted datasets, the "
        "notebooks (DIR/notebooks), executed copies (DIR/executed) and Lab's log (default: a temporary folder, "
        "removed at the end)",
    )
    parser.add_argument(
        "--no-browser",
        action="store_true",
        help="start JupyterLab without opening a browser (it never opens one without a display); open the "
        "printed URL yourself",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --headless or --attestation-only: print a JSON summary on stdout (progress goes to stderr)",
    )
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.json and not (args.headless or args.attestation_only):
        raise UsageError("--json needs --headless or --attestation-only (the interactive demo has no summary)")
    if args.dir is not None and args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        raise UsageError(f"--dir {args.dir}: not an empty folder (the demo makes fresh owner keys and datasets)")
    # SIGTERM unwinds like Ctrl-C: kernels, brokers and the temporary folder are cleaned up on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    report: dict[str, Any] = {"ok": False, "seconds": 0.0, "workdir": str(args.dir.resolve()) if args.dir else None}
    with _workdir(args.dir) as workdir, _progress_to_stderr(args.json):
        status = _run(args, workdir, report)
    report["ok"] = status == EXIT_OK
    report["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return status


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="confnb-demo-") as temporary:
        yield Path(temporary)


@contextlib.contextmanager
def _progress_to_stderr(enabled: bool) -> Iterator[None]:
    """With --json, stdout carries only the summary; everything a person reads goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _run(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> int:
    from confnb.demo import walkthrough

    print(paint("Part 1: attestation, key release and the confidential kernel (simulated TEE)", "bold"))
    outcomes = walkthrough.run(workdir)
    walkthrough.print_summary(outcomes)
    report["attestation"] = [{"check": text, "ok": held} for text, held in outcomes]
    attested = all(held for _, held in outcomes)
    if args.attestation_only:
        return EXIT_OK if attested else EXIT_REJECTED
    if not attested and not args.headless:
        print(paint("\nthe walkthrough's checks did not all hold: JupyterLab is not started", "red"))
        return EXIT_REJECTED
    status = _examples(args, workdir, report)
    return status if attested or status != EXIT_OK else EXIT_REJECTED


def _examples(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> int:
    from confnb.demo import examples, lab

    print()
    print(
        paint("Part 2: the example use cases (examples/): data owners, their brokers, the analysts' notebooks", "bold")
    )
    try:
        root = examples.examples_root()
        example_owners = examples.owners(root)
        sources = examples.notebooks(root)
        _step("16. The data owners generate synthetic data, encrypt it under their policies, serve brokers")
        with examples.running_brokers(workdir, example_owners, _progress) as environment:
            _step("17. The confnb-snp kernelspec, with the brokers and datasets in its environment")
            jupyter = workdir / "jupyter"
            spec = examples.install_kernel(jupyter, environment)
            _progress(f"kernelspec {spec} (private to this demo; nothing is installed for the user)")
            folder = workdir / "notebooks"
            copies = examples.copy_notebooks(sources, folder)
            _progress(f"notebooks in {folder}: {', '.join(copy.name for copy in copies)}")
            if args.headless:
                return _headless(copies, workdir, report)
            lab.write_config(jupyter / "config")
            _step("18. JupyterLab on the confidential kernel (Ctrl-C stops Lab, its kernels and the brokers)")
            log = workdir / lab.LOG_FILE
            open_browser = not args.no_browser and lab.has_display()
            status = lab.run_lab(folder, copies[0].name if copies else None, log, open_browser, _announce(workdir, log))
            print("JupyterLab stopped; stopping the key brokers")
    except examples.DemoError as exc:
        raise UsageError(str(exc)) from None
    print("stopped: nothing of the demo is running")
    return EXIT_OK if status == 0 else EXIT_REJECTED


def _headless(copies: list[Path], workdir: Path, report: dict[str, Any]) -> int:
    from confnb.demo import notebooks

    _step("18. Every notebook, top to bottom on confnb-snp (nbclient), and its outputs checked")
    outcomes = []
    for path in copies:
        _progress(f"running {path.name} ...")
        outcome = notebooks.run(path, workdir / "executed")
        outcomes.append(outcome)
        if outcome.ok:
            print(
                f"  {paint('pass', 'green')}  {outcome.name}: {outcome.cells} cells, {outcome.refused_leaks} "
                f"refused leaks showed their policy rule ({outcome.seconds:.1f} s)"
            )
        else:
            print(f"  {paint('FAIL', 'red')}  {outcome.name} ({outcome.seconds:.1f} s)")
            for problem in outcome.problems:
                print(f"        {problem}")
    report["notebooks"] = [outcome.to_dict() for outcome in outcomes]
    passed = sum(outcome.ok for outcome in outcomes)
    print(f"\n{passed} of {len(outcomes)} notebooks passed")
    return EXIT_OK if outcomes and passed == len(outcomes) else EXIT_REJECTED


def _step(text: str) -> None:
    from confnb.demo.walkthrough import step  # imported late: `confnb --help` need not load the attestation stack

    step(text)


def _progress(text: str) -> None:
    print(f"  {text}", flush=True)


def _announce(workdir: Path, log: Path) -> Callable[[str], None]:
    def announce(url: str) -> None:
        print()
        print(paint("JupyterLab is running on the confidential kernel (simulated TEE):", "bold"))
        print(f"    {url}")
        print(f"work folder {workdir} (Lab's log: {log})")
        print("Press Ctrl-C to stop JupyterLab, its kernels and the key brokers.", flush=True)

    return announce
