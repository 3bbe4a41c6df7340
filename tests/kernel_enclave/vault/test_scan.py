"""Datasets larger than the vault's memory: scanned segment by segment into Polars' streaming engine, exactly.

The large test runs a real vault process under a data-segment limit (``RLIMIT_DATA``, which bounds the heap and
every private anonymous mapping, where decrypted data would live) over an encrypted dataset more than three times
that limit, checks the group-by and the filtered aggregate against the plaintext's exact values, and then looks
through every file written meanwhile, wherever the vault could write, for the plaintext's marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pytest

from confnb.policy.output import OutputPolicy
from kernel_enclave.vault.differences import weights_of

POLICY = """
[policy]
id = "scan-test-v1"
[release]
allow = ["schema", "aggregate", "row_count"]
min_group_size = 5
# The difference checks of this test's sums would list their record sets (every value of x is held by many records
# of a group, and a sum's set leaves out the records holding its group's most common value): 8 bytes a record, more
# than this vault's memory, so the release would fail closed. This test is about the scan; the checks over a scan
# are tested below, on sets that are sketched.
difference_checks = false
"""
GROUPS = 50
MARKER = b"PLAINTEXT-MARKER-7c1e"
TAG_BYTES = 48  # the marker, padded: most of each row, so the dataset is large in few rows
DATA_LIMIT = 448 * 2**20  # Arrow, Polars and the vault's threads take about 150 MB of it before any data
BATCH_ROWS = 1 << 16  # as the owner tooling writes them


def tags(rows: int) -> pa.Array:
    """``rows`` strings, each the marker and a row-dependent tail, built from buffers (no Python strings)."""
    tail = np.frombuffer(b"0123456789abcdef" * ((rows * 4) // 16 + 1), dtype=np.uint8)[: rows * 4].reshape(rows, 4)
    body = np.empty((rows, TAG_BYTES), dtype=np.uint8)
    body[:, : len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    body[:, len(MARKER) : TAG_BYTES - 4] = ord("-")
    body[:, TAG_BYTES - 4 :] = tail
    offsets = np.arange(rows + 1, dtype=np.int32) * TAG_BYTES
    return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(body.tobytes()))


@pytest.fixture
def publish(tmp_path: Path, simulated_tee_dir: Path) -> Iterator[Callable[..., str]]:
    """Encrypts record batches (a table or a reader) as the dataset ``big`` with the owner's tooling, under
    ``POLICY`` or the policy given; yields a function doing so that returns the URL of the broker serving its key."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from kernel_enclave.measurement import simulated_measurement

    store = OwnerStore.create(tmp_path / "store")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    with contextlib.ExitStack() as stack:

        def encrypted(source: Any, policy_text: str = POLICY) -> str:
            policy = OutputPolicy.from_toml(policy_text)
            encrypt_dataset(source, tmp_path / "datasets" / "big", store, "big", policy, attestation)
            return stack.enter_context(serve_locally(store))

        yield encrypted


@pytest.fixture
def make_dataset(publish: Callable[..., str]) -> Callable[[int], tuple[str, dict[str, Any]]]:
    """Encrypts a dataset of ``rows`` rows (g, x, tag); returns the broker URL and the truths."""

    def make(rows: int) -> tuple[str, dict[str, Any]]:
        rng = np.random.default_rng(rows)
        sums = np.zeros(GROUPS, dtype=np.int64)
        counts = np.zeros(GROUPS, dtype=np.int64)
        filtered = [0, 0]

        def batches() -> Iterator[pa.RecordBatch]:
            for start in range(0, rows, BATCH_ROWS):
                n = min(BATCH_ROWS, rows - start)
                g = rng.integers(0, GROUPS, n)
                x = rng.integers(-1000, 1000, n)
                sums[:] += np.bincount(g, weights=x, minlength=GROUPS).astype(np.int64)
                counts[:] += np.bincount(g, minlength=GROUPS)
                chosen = (g < 10) & (x > 500)
                filtered[0] += int(x[chosen].sum())
                filtered[1] += int(chosen.sum())
                yield pa.record_batch({"g": g, "x": x, "tag": tags(n)})

        schema = pa.schema([("g", pa.int64()), ("x", pa.int64()), ("tag", pa.string())])
        url = publish(pa.RecordBatchReader.from_batches(schema, batches()))
        truths = {"sums": sums, "counts": counts, "filtered_sum": filtered[0], "filtered_rows": filtered[1]}
        return url, truths

    return make


class LimitedVault:
    """``python -m kernel_enclave.vault`` as the launcher starts it, under ``RLIMIT_DATA``."""

    def __init__(self, socket: Path, broker_url: str, datasets: Path, limit: int, env: dict[str, str]) -> None:
        from kernel_enclave.vault.keys import VaultKeys

        def limited() -> None:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "kernel_enclave.vault"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            preexec_fn=limited,  # noqa: PLW1509  # setrlimit in the child only, before it imports anything
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        config = {
            "keys": VaultKeys.generate().to_dict(),
            "tee": "simulated",
            "broker_url": broker_url,
            "dataset_path": str(datasets),
            "socket": str(socket),
            "executor_uid": os.getuid(),
        }
        self._stdin.write(json.dumps(config).encode() + b"\n")
        self._stdin.flush()
        ready = json.loads(self.process.stdout.readline() or b'{"error": "the vault exited"}')
        assert ready.get("ready") is True, ready
        self._listener = threading.Thread(target=self._acknowledge, args=(self.process.stdout,), daemon=True)
        self._listener.start()

    def _acknowledge(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            with contextlib.suppress(ValueError, KeyError, OSError):
                self._stdin.write(json.dumps({"ack": int(json.loads(line)["seq"])}).encode() + b"\n")
                self._stdin.flush()

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"{field} not in the vault's status")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._listener.join(timeout=10)  # it ends with the vault's stdout
        assert self.process.stdout is not None
        self.process.stdout.close()


def files_written_since(roots: list[Path], since: float) -> list[Path]:
    found = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                with contextlib.suppress(OSError):
                    if path.is_file() and path.stat().st_mtime >= since:
                        found.append(path)
    return found


def holds_marker(path: Path) -> bool:
    """Whether the file holds the plaintext marker. A file removed since it was listed holds nothing now (the shared
    temporary directory has other processes' short-lived files), as one removed before the listing was never seen."""
    try:
        with path.open("rb") as handle:
            tail = b""
            while chunk := handle.read(1 << 22):
                if MARKER in tail + chunk:
                    return True
                tail = chunk[-len(MARKER) :]
    except FileNotFoundError:
        return False
    return False


@pytest.mark.slow
def test_group_by_and_filtered_aggregate_over_a_dataset_three_times_the_vaults_memory_limit(
    make_dataset: Callable[[int], tuple[str, dict[str, Any]]],
    tmp_path: Path,
    simulated_tee_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from confnb.analyst.session import current_session

    rows = (3 * DATA_LIMIT) // TAG_BYTES + 64 * BATCH_ROWS
    url, truths = make_dataset(rows)
    files = sorted((tmp_path / "datasets" / "big").glob("*"))
    manifest = json.loads((tmp_path / "datasets" / "big" / "manifest.json").read_text())
    plaintext = sum(entry["size"] for entry in manifest["files"])
    assert plaintext >= 3 * DATA_LIMIT, (plaintext, files)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    socket_dir = Path(tempfile.mkdtemp(prefix="cnb-"))  # a Unix socket's path is limited to about 100 bytes
    env = {
        **os.environ,
        "CONFNB_SIMULATED_TEE_DIR": str(simulated_tee_dir),
        "TMPDIR": str(scratch),  # the only temporary directory the vault is told of
        # The C allocators' per-thread arenas are address space, not data: keep them few under the limit.
        "MALLOC_ARENA_MAX": "2",
        "ARROW_DEFAULT_MEMORY_POOL": "system",
    }
    env.pop("CONFNB_VAULT_MEMORY_BUDGET", None)  # the vault derives its budget from the limit
    spill_dirs_before = set(Path("/dev/shm").glob("confnb-vault-*"))
    started = time.time()
    vault = LimitedVault(socket_dir / "vault.sock", url, tmp_path / "datasets", DATA_LIMIT, env)
    monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(socket_dir / "vault.sock"))
    try:
        import confnb as cn

        big = cn.open("big")
        grouped = big.group_by("g").agg(total=("x", "sum"), n=("x", "count")).release()
        assert grouped["total"].to_numpy().tolist() == truths["sums"].tolist()
        assert grouped["n"].to_numpy().tolist() == truths["counts"].tolist()
        chosen = big[(big["g"] < 10) & (big["x"] > 500)]
        filtered = chosen.agg(total=("x", "sum"), n=("x", "count")).release()
        assert int(filtered["total"]) == truths["filtered_sum"]
        assert int(filtered["n"]) == truths["filtered_rows"]
        # The dataset never was in the vault's memory: its peak resident set stayed below the plaintext's size.
        peak = vault.status("VmHWM")
        assert peak < plaintext / 2, (peak, plaintext)
        spilling = set(Path("/dev/shm").glob("confnb-vault-*")) - spill_dirs_before
        assert len(spilling) == 1  # where Polars would spill: the vault's own directory in memory
        assert (next(iter(spilling)).stat().st_mode & 0o777) == 0o700
    finally:
        current_session().close()
        vault.close()
        shutil.rmtree(socket_dir, ignore_errors=True)

    # Polars' spill directory was memory (tmpfs) of the vault's own, removed when the vault exited.
    assert spill_dirs_before == set(Path("/dev/shm").glob("confnb-vault-*"))
    # Nothing written meanwhile, anywhere the vault could write, holds the plaintext marker (the encrypted files,
    # written before, are checked too: they hold ciphertext only).
    written = files_written_since([tmp_path, Path(tempfile.gettempdir()), Path.cwd()], started)
    assert not [path for path in written if holds_marker(path)]
    assert not [path for path in files if holds_marker(path)]
    assert not any(holds_marker(path) for path in scratch.rglob("*") if path.is_file())


def test_a_scanned_dataset_answers_as_the_decrypted_one(
    make_dataset: Callable[[int], tuple[str, dict[str, Any]]],
    tmp_path: Path,
    simulated_backend: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same plans over the same dataset, scanned (budget 0) and decrypted whole: identical releases."""

    url, truths = make_dataset(30_000)
    results = []
    for budget in ("0", str(2**40)):
        vault, reply, _ = opened_big(url, budget, tmp_path, simulated_backend, monkeypatch)
        plans = [
            {
                "node": "aggregate",
                "input": {"node": "source", "handle": reply["handle"]},
                "by": ["g"],
                "aggs": [
                    {"name": "t", "column": "x", "func": "sum"},
                    {"name": "m", "column": "x", "func": "median"},
                    {"name": "lo", "column": "x", "func": "min"},
                ],
            },
            {"node": "describe", "input": {"node": "source", "handle": reply["handle"]}, "columns": ["x"]},
            {"node": "value_counts", "input": {"node": "source", "handle": reply["handle"]}, "column": "g"},
            {
                "node": "count",
                "input": {
                    "node": "join",
                    "left": {"node": "source", "handle": reply["handle"]},
                    "right": {"node": "source", "handle": reply["handle"]},
                    "on": ["x"],
                },
            },
        ]
        results.append([outcome(plan, vault) for plan in plans])
    assert results[0] == results[1]
    # The self-join on a column unique in neither side could exceed the join limit by the dataset's size alone: both
    # vaults refuse it the same way, before reading a row.
    assert results[0][-1][0] == "refused" and "join: the result could have more than" in results[0][-1][1]
    assert [row["t"] for row in results[0][0][0]] == truths["sums"].tolist()


def opened_big(
    url: str, budget: str, tmp_path: Path, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, Any], Any]:
    """A new vault that opened the dataset ``big`` under this memory budget ("0": scanned), its reply and source."""
    from kernel_enclave.vault.keys import VaultKeys
    from kernel_enclave.vault.vault import Vault

    monkeypatch.setenv("CONFNB_VAULT_MEMORY_BUDGET", budget)
    vault = Vault(backend=backend, keys=VaultKeys.generate(), broker_url=url, dataset_path=str(tmp_path / "datasets"))
    reply, _ = vault.handle({"op": "open", "source": "big"}, [])
    assert reply["ok"], reply
    source = vault._sources[reply["handle"]]
    assert source.streaming is (budget == "0")
    return vault, reply, source


def outcome(plan: dict[str, Any], vault: Any) -> tuple[Any, Any]:
    """A release as the analyst would see it: the released rows (or value) and suppression, or the refusal."""
    from kernel_enclave.vault import release
    from kernel_enclave.vault.protocol import VaultError

    try:
        released = release.release(plan, vault._sources, vault._policies)
    except VaultError as exc:
        return "refused", str(exc)
    return (released.table.to_pylist() if released.table is not None else released.value), released.suppressed


def test_a_scanned_dataset_numbers_and_weighs_its_records_as_the_decrypted_one(
    make_dataset: Callable[[int], tuple[str, dict[str, Any]]],
    tmp_path: Path,
    simulated_backend: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reader gives each row its position in the dataset (across segments, before a pushed-down filter) and the
    weight the decrypted dataset's row has; a release's sketches are then the same over both."""
    import polars as pl

    from kernel_enclave.vault import release

    url, _ = make_dataset(3 * BATCH_ROWS + 123)  # several segments, the last one short
    hidden, sketches = [], []
    for budget in ("0", str(2**40)):
        vault, reply, source = opened_big(url, budget, tmp_path, simulated_backend, monkeypatch)
        assert source.records is not None
        record = source.records[0][1]
        weight, bits = source.weights[record]
        picked = source.data.filter(pl.col("x") > 500).select(record, weight, "x")
        hidden.append(source.collect(picked))
        plan = {
            "node": "aggregate",
            "input": {"node": "source", "handle": reply["handle"]},
            "by": ["g"],
            "aggs": [{"name": "n", "column": "x", "func": "count"}, {"name": "rows", "column": None, "func": "count"}],
        }
        released = release.release(plan, vault._sources, vault._policies, record_sets=True, sketches=True)
        assert released.sketches is not None  # sketched over the scan too: no record id listed
        sketches.append(sorted((s.label, s.size, s.total) for s in released.sketches))
    scanned, decrypted = hidden
    assert scanned.height > 1000 and scanned.equals(decrypted)
    ids = scanned.get_column(record).to_numpy()
    assert np.all(np.diff(ids) > 0) and ids[-1] > 3 * BATCH_ROWS  # positions in the whole dataset, not per segment
    assert np.array_equal(scanned.get_column(weight).to_numpy(), weights_of(ids, bits))
    assert sketches[0] == sketches[1]


def float_table(rows: int) -> pa.Table:
    """Two float columns without NaN (one float32), one with a NaN in its very last row, and a key."""
    rng = np.random.default_rng(7)
    holed = rng.normal(size=rows)
    holed[-1] = np.nan  # in the last segment: only a read to the end sees it
    return pa.table(
        {
            "g": rng.integers(0, 4, rows),
            "clean": np.round(rng.normal(size=rows), 1),
            "holed": holed,
            "single": pa.array(rng.normal(size=rows), type=pa.float32()),
        }
    )


FLOAT_PLANS: list[dict[str, Any]] = [
    {
        "node": "aggregate",
        "by": ["g"],
        "aggs": [
            {"name": "c", "column": "clean", "func": "mean"},
            {"name": "h", "column": "holed", "func": "count"},
            {"name": "hs", "column": "holed", "func": "sum"},
            {"name": "s", "column": "single", "func": "max"},
        ],
    },
    {  # NaN compares unequal to everything, as in pandas: the row holding it passes != and fails ==
        "node": "count",
        "input": {"node": "filter", "predicate": {"fn": "ne", "args": [{"col": "holed"}, {"lit": 0.5}]}},
    },
    {"node": "count", "input": {"node": "filter", "predicate": {"fn": "not_null", "args": [{"col": "holed"}]}}},
]


def float_outcomes(vault: Any, handle: str) -> list[Any]:
    """The releases of FLOAT_PLANS, floats rounded to 9 significant digits (a streamed sum adds in another order)."""

    def on(plan: dict[str, Any]) -> dict[str, Any]:
        source = {"node": "source", "handle": handle}
        if plan["node"] == "aggregate":
            return {**plan, "input": source}
        return {**plan, "input": {**plan["input"], "input": source}}

    def rounded(found: Any) -> Any:
        if isinstance(found, float):
            return float(f"{found:.9g}")
        if isinstance(found, dict):
            return {name: rounded(value) for name, value in found.items()}
        if isinstance(found, list | tuple):
            return type(found)(rounded(item) for item in found)
        return found

    return [rounded(outcome(on(plan), vault)) for plan in FLOAT_PLANS]


def test_a_scanned_dataset_learns_which_float_columns_hold_no_nan(
    publish: Callable[..., str], tmp_path: Path, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first query that reads the dataset to its end learns, from every batch, which float columns hold no NaN
    (whatever columns the query reads); later plans read those without a NaN-to-null pass. The answers are the
    decrypted dataset's before and after, and a question asked before and after the learning is still the same
    question to the difference checks (recognised as asked again: nothing listed)."""
    from kernel_enclave.vault.plan import Source, evaluate_node

    url = publish(float_table(3 * BATCH_ROWS + 5), POLICY.replace("difference_checks = false", ""))
    vault, reply, _ = opened_big(url, str(2**40), tmp_path, simulated_backend, monkeypatch)
    expected = float_outcomes(vault, reply["handle"])
    assert vault._sources[reply["handle"]].nan_free == {"clean", "single"}  # checked at load, in memory

    vault, reply, source = opened_big(url, "0", tmp_path, simulated_backend, monkeypatch)
    assert source.nan_free == frozenset() and source.learned_nan_free is not None
    means = {"node": "aggregate", "by": ["g"], "aggs": [{"name": "s", "column": "single", "func": "mean"}]}
    asked = {"op": "release", "plan": {**means, "input": {"node": "source", "handle": reply["handle"]}}}
    first, _ = vault.handle(asked, [])  # reads g and single only (whose values no two records share: sketched)
    assert first["ok"] and source.learned_nan_free() == {"clean", "single"}
    assert evaluate_node(Source(reply["handle"]), vault._sources).nan_free == {"clean", "single"}
    assert vault._sources[reply["handle"]] is source  # the registered table is the one the first release named
    again, _ = vault.handle(asked, [])
    assert again["ok"] and vault._memory().listed() == 0
    assert float_outcomes(vault, reply["handle"]) == expected
    rows = 3 * BATCH_ROWS + 5
    assert expected[1][0] == rows and expected[2][0] == rows - 1  # the NaN row: unequal to 0.5, and missing


def test_a_file_altered_on_disk_fails_the_dataset_naming_the_check(
    publish: Callable[..., str], tmp_path: Path, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file altered after the dataset was opened (here a byte of its last segment): the request that reads it
    fails naming the check that failed, not as a query failure; nothing is learned from the read; every later
    request over the dataset fails the same way without reading it; the audit log's error entries say why."""
    from confnb.datasets.owner import PART_NAME

    url = publish(float_table(2 * BATCH_ROWS))
    vault, reply, source = opened_big(url, "0", tmp_path, simulated_backend, monkeypatch)
    part = tmp_path / "datasets" / "big" / PART_NAME
    data = bytearray(part.read_bytes())
    data[-20] ^= 1  # inside the last segment's ciphertext
    part.write_bytes(bytes(data))
    plan = {"node": "count", "input": {"node": "source", "handle": reply["handle"]}}
    answers = [vault.handle({"op": "release", "plan": plan}, [])[0] for _ in range(2)]
    for answer in answers:
        assert not answer["ok"]
        message = answer["error"]["message"]
        assert message.startswith("dataset 'big' failed its checks while it was read (big: segment ")
        assert "failed authentication" in message and "nothing read from them was released" in message
    assert answers[0]["error"]["message"] == answers[1]["error"]["message"]
    assert source.learned_nan_free is not None and source.learned_nan_free() == frozenset()
    errors = [entry for entry in vault.audit.entries() if entry["event"] == "error"]
    assert [entry["fields"].get("integrity") for entry in errors] == [answers[0]["error"]["message"]] * 2
