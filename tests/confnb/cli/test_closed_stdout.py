"""Every command stops quietly when the reader of its output goes away (``confnb … | head``), as Unix tools do."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SIGPIPE_STATUS = 128 + signal.SIGPIPE


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _into_closed_pipe(*args: str) -> tuple[int, str]:
    """Run ``confnb ARGS`` with its stdout a pipe whose only reader is closed before the first byte is written."""
    process = subprocess.Popen([sys.executable, "-m", "confnb", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # what `| head -1` amounts to once head has its line
    with process.stderr:
        stderr = process.stderr.read().decode()
    return process.wait(timeout=120), stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("closed-stdout")
    assert _run("broker", "init", "--dir", str(root / "owner")).returncode == 0
    (root / "policy.toml").write_text('[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\n')
    pq.write_table(pa.table({"id": list(range(100)), "ward": ["a", "b"] * 50}), root / "t.parquet")
    encrypted = _run(
        "dataset", "encrypt", str(root / "t.parquet"), "--broker-dir", str(root / "owner"), "--id", "t",
        "--policy", str(root / "policy.toml"), "--out", str(root / "t"),
    )  # fmt: skip
    assert encrypted.returncode == 0, encrypted.stderr
    return root / "t"


def test_dataset_inspect_into_a_closed_pipe_exits_quietly(dataset: Path) -> None:
    readable = _run("dataset", "inspect", str(dataset))
    assert readable.returncode == 0 and "ward: string" in readable.stdout  # the twin: output when it is read
    status, stderr = _into_closed_pipe("dataset", "inspect", str(dataset))
    assert stderr == "" and status == SIGPIPE_STATUS


@pytest.mark.parametrize(
    "args",
    [("attest", "measure", "--simulated", "--json"), ("policy", "init")],
    ids=["attest-measure", "policy-init"],
)
def test_other_commands_into_a_closed_pipe_exit_quietly(args: tuple[str, ...]) -> None:
    status, stderr = _into_closed_pipe(*args)
    assert stderr == "" and status == SIGPIPE_STATUS


def test_a_broken_pipe_elsewhere_is_still_an_error(monkeypatch: pytest.MonkeyPatch, capfd, shared_vectors) -> None:
    """Only a closed stdout is quiet: a peer that went away while a command talked to it is reported."""
    import confnb.cli.attest as attest_cli
    from confnb.cli import main

    def peer_went_away(data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(attest_cli, "decode_report", peer_went_away)
    status = main(["attest", "show", str(shared_vectors / "teekit/sev-gcp.bin")])
    assert status == 2 and "internal error: BrokenPipeError" in capfd.readouterr().err
