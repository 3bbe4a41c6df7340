"""The audit log: appends chain and sign, verify_log finds every kind of tampering, concurrent writers never fork
the chain, and a writer killed mid-append leaves a log that verifies and keeps growing."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import multiprocessing
import os
import signal
import sqlite3
import stat
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.broker.audit import (
    GENESIS_HASH,
    AuditKind,
    AuditLog,
    AuditLogError,
    compute_entry_hash,
    verify_log,
)

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite"


def _fill(path: Path, count: int = 5) -> list:
    with AuditLog(path, KEY) as log:
        kinds = list(AuditKind)
        return [
            log.append(kinds[i % len(kinds)], f"actor-{i}", "claims" if i % 2 else None, {"i": i, "note": "é"})
            for i in range(count)
        ]


def _execute(path: Path, sql: str, *parameters: object) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.execute(sql, parameters)
        connection.commit()
    finally:
        connection.close()


def _rows(path: Path) -> list[tuple]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT * FROM entries ORDER BY seq").fetchall()
    finally:
        connection.close()


# -- appending and reading -------------------------------------------------------------------------------------------


def test_append_chains_signs_and_verifies(log_path):
    moments = iter(datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC) + timedelta(seconds=i) for i in range(10))
    with AuditLog(log_path, KEY, clock=lambda: next(moments)) as log:
        assert log.head() is None
        first = log.append(AuditKind.CHALLENGE, "10.0.0.7", None, {"nonce": "ab" * 16})
        second = log.append("release", "kernel sha256:12", "claims", {"policy": "p1", "checks": [1, 2.5, None]})
        assert (first.seq, second.seq) == (1, 2)
        assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.entry_hash
        assert first.time == "2026-05-01T12:00:00.000000Z"
        assert second.kind is AuditKind.RELEASE and second.kind == "release"
        assert log.head() == (2, second.entry_hash)
        assert list(log.entries()) == [first, second]
        assert list(log.entries(since=1)) == [second]
        assert list(log.entries(since=2)) == []
    result = verify_log(log_path, PUBLIC)
    assert result.ok, result.problems
    assert result.entries == [first, second] and result.head == (2, second.entry_hash)
    assert result.first_bad_seq is None
    assert second.to_dict()["signature"] == base64.b64encode(second.signature).decode()


def test_hash_and_signature_are_exactly_as_documented(log_path):
    """Recomputed here from the documented formula, independently of the module's own helper."""
    (entry,) = _fill(log_path, 1)
    content = {
        "seq": entry.seq,
        "time": entry.time,
        "kind": entry.kind.value,
        "actor": entry.actor,
        "dataset_id": entry.dataset_id,
        "detail": entry.detail,
        "prev_hash": "0" * 64,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert hashlib.sha256(canonical).hexdigest() == entry.entry_hash
    PUBLIC.verify(entry.signature, bytes.fromhex(entry.entry_hash))
    (row,) = _rows(log_path)
    assert row[5] == '{"i":0,"note":"é"}'  # detail stored in canonical form


def test_more_than_one_batch_is_read_in_order(log_path):
    with AuditLog(log_path, KEY) as log:
        for i in range(300):
            log.append("admin", "owner", None, {"i": i})
        assert [entry.seq for entry in log.entries()] == list(range(1, 301))
        assert [entry.seq for entry in log.entries(since=250)] == list(range(251, 301))


def test_log_file_is_private_and_in_wal_mode_with_full_sync(log_path):
    with AuditLog(log_path, KEY) as log:
        log.append("admin", "owner", None, {})
        connection = log._connection
        assert connection is not None
        assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    connection = sqlite3.connect(log_path)
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    fingerprint = dict(connection.execute("SELECT key, value FROM meta"))["owner_fingerprint"]
    connection.close()
    raw = PUBLIC.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert fingerprint == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_refuses_a_different_signing_key(log_path):
    _fill(log_path, 1)
    with pytest.raises(AuditLogError, match=r"belongs to owner key sha256:[0-9a-f]{64}, not to the signing key"):
        AuditLog(log_path, Ed25519PrivateKey.generate())
    with AuditLog(log_path, KEY) as log:  # the right key still opens it
        assert log.head() is not None


def test_refuses_files_that_are_not_audit_logs(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(AuditLogError, match=r"junk\.sqlite"):
        AuditLog(junk, KEY)
    with pytest.raises(AuditLogError, match="not a readable SQLite database"):
        verify_log(junk, PUBLIC)
    other = tmp_path / "other.sqlite"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE users (name TEXT)")
    connection.close()
    with pytest.raises(AuditLogError, match="not a confnb audit log"):
        AuditLog(other, KEY)
    assert not verify_log(other, PUBLIC).ok
    with pytest.raises(AuditLogError, match="no such audit log"):
        verify_log(tmp_path / "missing.sqlite", PUBLIC)
    with pytest.raises(AuditLogError, match="cannot create the audit log"):
        AuditLog(tmp_path / "no" / "such" / "dir.sqlite", KEY)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("export", "a", None, {}), "not a valid AuditKind"),
        (("admin", "", None, {}), "actor must be a non-empty string"),
        (("admin", "a", "", {}), "dataset_id must be"),
        (("admin", "a", None, ["not", "an", "object"]), "must be a JSON object"),
        (("admin", "a", None, {"x": float("nan")}), "cannot be stored as canonical JSON"),
        (("admin", "a", None, {"x": object()}), "cannot be stored as canonical JSON"),
        (("admin", "a", None, {"x": "\ud800"}), "cannot be stored as canonical JSON"),
        (("admin", "\udfff", None, {}), "cannot be stored as canonical JSON"),
        (("admin", "a", None, {"x": "y" * (1 << 20)}), "larger than"),
    ],
)
def test_append_rejects_what_it_cannot_record_faithfully(log_path, arguments, message):
    with AuditLog(log_path, KEY) as log:
        with pytest.raises(ValueError, match=message):
            log.append(*arguments)
        assert log.head() is None  # nothing half-written


def test_closed_log_and_forked_use_are_refused(log_path):
    log = AuditLog(log_path, KEY)
    log.close()
    log.close()
    with pytest.raises(AuditLogError, match="closed"):
        log.append("admin", "owner", None, {})
    with AuditLog(log_path, KEY) as log:
        log._pid = -1  # as if this were a forked child
        with pytest.raises(AuditLogError, match="across fork"):
            log.append("admin", "owner", None, {})
        log._pid = os.getpid()


# -- tampering -------------------------------------------------------------------------------------------------------

# (column, SQL that edits entry 3, text the first problem must contain, the seq it must name)
COLUMN_EDITS = [
    ("seq", "UPDATE entries SET seq = 30 WHERE seq = 3", "seq 3 missing", 4),
    ("time", "UPDATE entries SET time = '2020-01-01T00:00:00.000000Z' WHERE seq = 3", "entry_hash does not match", 3),
    ("time-format", "UPDATE entries SET time = 'yesterday' WHERE seq = 3", "time 'yesterday' is not an RFC 3339", 3),
    ("kind", "UPDATE entries SET kind = 'release' WHERE seq = 3", "entry_hash does not match", 3),
    ("kind-unknown", "UPDATE entries SET kind = 'export' WHERE seq = 3", "kind 'export' is not one of", 3),
    ("kind-type", "UPDATE entries SET kind = CAST(kind AS BLOB) WHERE seq = 3", "kind is stored as blob", 3),
    ("actor", "UPDATE entries SET actor = 'someone else' WHERE seq = 3", "entry_hash does not match", 3),
    ("dataset_id", "UPDATE entries SET dataset_id = 'payroll' WHERE seq = 3", "entry_hash does not match", 3),
    ("dataset_id-null", "UPDATE entries SET dataset_id = NULL WHERE seq = 2", "entry_hash does not match", 2),
    ("detail", """UPDATE entries SET detail = '{"i":99,"note":"é"}' WHERE seq = 3""", "entry_hash does not match", 3),
    ("detail-layout", """UPDATE entries SET detail = '{"i": 2,"note":"é"}' WHERE seq = 3""", "canonical", 3),
    ("detail-json", "UPDATE entries SET detail = '{oops' WHERE seq = 3", "detail is not valid JSON", 3),
    ("prev_hash", f"UPDATE entries SET prev_hash = '{'1' * 64}' WHERE seq = 3", "prev_hash does not link", 3),
    ("entry_hash", f"UPDATE entries SET entry_hash = '{'2' * 64}' WHERE seq = 3", "entry_hash does not match", 3),
    ("signature", "UPDATE entries SET signature = (SELECT signature FROM entries WHERE seq = 1) WHERE seq = 3",
     "signature does not verify", 3),
    ("signature-blob", "UPDATE entries SET signature = CAST(signature AS BLOB) WHERE seq = 3",
     "signature is stored as blob", 3),
]  # fmt: skip


@pytest.mark.parametrize(("column", "sql", "reason", "seq"), COLUMN_EDITS, ids=[edit[0] for edit in COLUMN_EDITS])
def test_editing_any_column_is_detected_and_named(log_path, column, sql, reason, seq):
    _fill(log_path, 5)
    _execute(log_path, sql)
    result = verify_log(log_path, PUBLIC)
    assert not result.ok
    assert result.first_bad_seq == seq, result.problems
    assert result.problems[0].startswith(f"seq {seq}: "), result.problems
    assert reason in result.problems[0], result.problems


def test_recomputing_the_hash_after_an_edit_still_fails_on_the_signature_and_the_link(log_path):
    entries = _fill(log_path, 5)
    target = entries[2]
    forged = compute_entry_hash(3, target.time, "release", "mallory", "claims", target.detail, target.prev_hash)
    _execute(
        log_path, "UPDATE entries SET kind='release', actor='mallory', dataset_id='claims', entry_hash=? WHERE seq=3",
        forged,
    )  # fmt: skip
    result = verify_log(log_path, PUBLIC)
    assert result.problems[:2] == [
        "seq 3: signature does not verify with the owner key",
        "seq 4: prev_hash does not link to the previous entry (inserted, removed or reordered)",
    ]


def test_deleting_a_middle_entry_is_detected(log_path):
    _fill(log_path, 6)
    _execute(log_path, "DELETE FROM entries WHERE seq = 3")
    result = verify_log(log_path, PUBLIC)
    assert not result.ok and result.first_bad_seq == 4
    assert result.problems == [
        "seq 4: seq 3 missing (deleted or renumbered)",
        "seq 4: prev_hash does not link to the previous entry (inserted, removed or reordered)",
    ]


def test_deleting_the_newest_entries_needs_the_expected_head(log_path):
    """The documented limit: a log cut after seq N is a valid log of N entries, unless a later head is known."""
    _fill(log_path, 5)
    head = verify_log(log_path, PUBLIC).head
    assert head is not None and head[0] == 5
    assert verify_log(log_path, PUBLIC, expected_head=head).ok
    _execute(log_path, "DELETE FROM entries WHERE seq >= 4")
    assert verify_log(log_path, PUBLIC).ok  # signatures alone cannot see it
    result = verify_log(log_path, PUBLIC, expected_head=head)
    assert not result.ok
    assert result.problems == ["the log ends at seq 3, but seq 5 was seen before (newest entries removed?)"]
    _execute(log_path, "DELETE FROM entries")
    result = verify_log(log_path, PUBLIC, expected_head=head)
    assert result.problems == ["the log is empty, but seq 5 was seen before (newest entries removed?)"]


def test_a_rewritten_log_signed_by_the_same_owner_is_caught_by_the_expected_head(tmp_path):
    original, rewritten = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    _fill(original, 4)
    head = verify_log(original, PUBLIC).head
    with AuditLog(rewritten, KEY) as log:
        for _ in range(4):
            log.append("admin", "owner", None, {"nothing": "to see"})
    assert verify_log(rewritten, PUBLIC).ok
    result = verify_log(rewritten, PUBLIC, expected_head=head)
    assert result.problems == ["seq 4: entry_hash differs from the expected head (the log was rewritten)"]


def test_reordering_entries_is_detected(log_path):
    _fill(log_path, 5)
    rows = {row[0]: row[1:] for row in _rows(log_path)}
    columns = "time = ?, kind = ?, actor = ?, dataset_id = ?, detail = ?, prev_hash = ?, entry_hash = ?, signature = ?"
    _execute(log_path, f"UPDATE entries SET {columns} WHERE seq = 2", *rows[4])
    _execute(log_path, f"UPDATE entries SET {columns} WHERE seq = 4", *rows[2])
    result = verify_log(log_path, PUBLIC)
    assert not result.ok and result.first_bad_seq == 2
    assert result.problems[0].startswith("seq 2: prev_hash does not link")
    assert {problem.split(":")[0] for problem in result.problems} == {"seq 2", "seq 3", "seq 4", "seq 5"}


def test_inserting_a_forged_entry_is_detected(log_path):
    entries = _fill(log_path, 3)
    other = Ed25519PrivateKey.generate()
    stamp = entries[-1].time
    forged = compute_entry_hash(4, stamp, "release", "mallory", "claims", {}, entries[-1].entry_hash)
    signature = base64.b64encode(other.sign(bytes.fromhex(forged))).decode()
    _execute(
        log_path, "INSERT INTO entries VALUES (4, ?, 'release', 'mallory', 'claims', '{}', ?, ?, ?)",
        stamp, entries[-1].entry_hash, forged, signature,
    )  # fmt: skip
    result = verify_log(log_path, PUBLIC)
    assert result.problems == ["seq 4: signature does not verify with the owner key"]


def test_verifying_with_another_owner_key_fails_everywhere(log_path):
    _fill(log_path, 2)
    result = verify_log(log_path, Ed25519PrivateKey.generate().public_key())
    assert result.problems[0].startswith("meta: the log records owner key")
    assert result.problems[1:] == [f"seq {seq}: signature does not verify with the owner key" for seq in (1, 2)]
    raw = PUBLIC.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert verify_log(log_path, raw).ok  # raw 32 bytes are accepted too
    with pytest.raises(ValueError, match="32 raw bytes"):
        verify_log(log_path, raw[:31])


def test_appending_onto_a_damaged_head_is_refused(log_path):
    _fill(log_path, 2)
    _execute(log_path, "UPDATE entries SET entry_hash = 'garbage' WHERE seq = 2")
    with AuditLog(log_path, KEY) as log, pytest.raises(AuditLogError, match=r"newest entry .* is damaged"):
        log.append("admin", "owner", None, {})


# -- concurrency and crashes -----------------------------------------------------------------------------------------


def _assert_contiguous_and_intact(path: Path, expected: int) -> None:
    result = verify_log(path, PUBLIC)
    assert result.ok, result.problems[:5]
    assert [entry.seq for entry in result.entries] == list(range(1, expected + 1))
    assert len({entry.entry_hash for entry in result.entries}) == expected


@pytest.mark.parametrize("shared", [True, False], ids=["one-instance", "instance-per-thread"])
def test_concurrent_appends_from_threads(log_path, shared):
    threads_count, per_thread = 8, 50
    AuditLog(log_path, KEY).close()
    common = AuditLog(log_path, KEY) if shared else None
    start = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            log = common or AuditLog(log_path, KEY)
            start.wait()
            for index in range(per_thread):
                log.append("release", f"thread-{worker}", "claims", {"worker": worker, "index": index})
            if common is None:
                log.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if common is not None:
        common.close()
    assert not errors, errors
    _assert_contiguous_and_intact(log_path, threads_count * per_thread)
    per_worker = [
        entry.detail["index"] for entry in verify_log(log_path, PUBLIC).entries if entry.detail["worker"] == 3
    ]
    assert per_worker == list(range(per_thread))  # each writer's own entries stay in its order


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The writers' module under a top-level name, importable by spawned children from the path they inherit (a
    dependency's wheel ships a top-level ``tests`` package, which hides this suite's ``tests`` from a fresh
    interpreter)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return importlib.import_module("_audit_workers")


def test_concurrent_appends_from_processes(log_path, workers):
    processes_count, per_process = 4, 50  # the file does not exist yet: the writers also race to create it
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=workers.append_many, args=(str(log_path), _raw_private(KEY), worker, per_process))
        for worker in range(processes_count)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * processes_count
    _assert_contiguous_and_intact(log_path, processes_count * per_process)
    actors = {entry.actor for entry in verify_log(log_path, PUBLIC).entries}
    assert actors == {f"worker-{worker}" for worker in range(processes_count)}


def test_a_writer_killed_mid_append_leaves_an_intact_log_that_keeps_growing(log_path, workers):
    AuditLog(log_path, KEY).close()
    context = multiprocessing.get_context("spawn")
    writer = context.Process(target=workers.append_forever, args=(str(log_path), _raw_private(KEY)))
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            head = None
            with AuditLog(log_path, KEY) as reader:
                head = reader.head()
            if head is not None and head[0] >= 40:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the writer never got going")
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=10)
    assert writer.exitcode == -signal.SIGKILL
    # Read-only verification copes with the WAL and lock files the dead writer left behind.
    survived = verify_log(log_path, PUBLIC)
    assert survived.ok, survived.problems[:5]
    assert survived.head is not None
    count = survived.head[0]
    with AuditLog(log_path, KEY) as log:
        for index in range(10):
            log.append("admin", "owner", None, {"after-crash": index})
    _assert_contiguous_and_intact(log_path, count + 10)
    assert verify_log(log_path, PUBLIC, expected_head=survived.head).ok


# -- properties ------------------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
appends = st.lists(
    st.tuples(
        st.sampled_from(list(AuditKind)),
        st.text(min_size=1, max_size=20),
        st.none() | st.text(min_size=1, max_size=10),
        st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    ),
    min_size=1,
    max_size=5,
)
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@PROPERTY_SETTINGS
@given(appends)
def test_any_sequence_of_appends_verifies(records):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.sqlite"
        with AuditLog(path, KEY) as log:
            written = [log.append(*record) for record in records]
        result = verify_log(path, PUBLIC, expected_head=(written[-1].seq, written[-1].entry_hash))
        assert result.ok, result.problems
        assert result.entries == written
        assert [entry.detail for entry in written] == [json.loads(json.dumps(record[3])) for record in records]


TEXT_COLUMNS = ("time", "kind", "actor", "dataset_id", "detail", "prev_hash", "entry_hash", "signature")


MUTATIONS_PER_LOG = 4


def _mutate_one_byte(path: Path, written: list, data: st.DataObject) -> tuple[str, int] | None:
    """Change one byte of one stored field of one entry; None when the drawn change is impossible."""
    entry = data.draw(st.sampled_from(written), label="entry")
    column = data.draw(st.sampled_from(("seq", *TEXT_COLUMNS)), label="column")
    connection = sqlite3.connect(path)
    try:
        if column == "seq":
            stored = entry.seq.to_bytes(8, "big", signed=True)
        else:
            (stored,) = connection.execute(
                f"SELECT CAST({column} AS BLOB) FROM entries WHERE seq = ?", (entry.seq,)
            ).fetchone()
            if not stored:  # a NULL dataset_id has no bytes to change
                return None
        position = data.draw(st.integers(0, len(stored) - 1), label="position")
        replacement = data.draw(st.integers(0, 255).filter(lambda b: b != stored[position]), label="byte")
        changed = stored[:position] + bytes([replacement]) + stored[position + 1 :]
        if column == "seq":
            new_seq = int.from_bytes(changed, "big", signed=True)
            if new_seq in {other.seq for other in written}:
                return None
            connection.execute("UPDATE entries SET seq = ? WHERE seq = ?", (new_seq, entry.seq))
        else:
            # CAST(blob AS TEXT) stores the bytes as text whatever they are, as a hex editor would.
            connection.execute(f"UPDATE entries SET {column} = CAST(? AS TEXT) WHERE seq = ?", (changed, entry.seq))
        connection.commit()
    finally:
        connection.close()
    return column, entry.seq


@PROPERTY_SETTINGS
@given(records=appends, data=st.data())
def test_any_single_byte_change_to_any_stored_field_is_detected(records, data):
    with tempfile.TemporaryDirectory() as directory:
        pristine = Path(directory) / "pristine.sqlite"
        with AuditLog(pristine, KEY) as log:
            written = [log.append(*record) for record in records]
        # Closing the last connection checkpoints the WAL into the file, so a copy of the file is the whole log.
        snapshot = pristine.read_bytes()
        for attempt in range(MUTATIONS_PER_LOG):
            path = Path(directory) / f"mutated-{attempt}.sqlite"
            path.write_bytes(snapshot)
            assert verify_log(path, PUBLIC).ok
            mutation = _mutate_one_byte(path, written, data)
            if mutation is None:
                continue
            result = verify_log(path, PUBLIC)
            assert not result.ok, mutation
            assert result.first_bad_seq is not None, (mutation, result.problems)
