"""The kernel's audit log: every tampering with its entries is found and named by seq."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_enclave.vault.audit import (
    GENESIS_HASH,
    KernelAuditError,
    KernelAuditLog,
    parse_jsonl,
    verify_kernel_log,
)

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key().public_bytes_raw()
EVENTS = [
    ("request", {"op": "release", "operation_digest": "sha256:" + "1" * 64, "datasets": ["claims"]}),
    ("release", {"result": "r1", "kind": "aggregate", "result_digest": "sha256:" + "2" * 64, "suppressed": 2}),
    ("refusal", {"rule": "release.min_group_size", "datasets": ["claims"]}),
    ("export", {"result": "r1", "format": "csv", "recipient": None, "sealed": False}),
    ("request", {"op": "seal", "operation_digest": "sha256:" + "3" * 64}),
]


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build(count: int = len(EVENTS), key: Ed25519PrivateKey = KEY) -> list[dict]:
    log = KernelAuditLog(key)
    for index in range(count):
        event, fields = EVENTS[index % len(EVENTS)]
        log.append(event, **fields)
    return log.entries()


def resign(entries: list[dict], key: Ed25519PrivateKey) -> list[dict]:
    """Rebuild the chain over (possibly edited) content with ``key``, as a forger holding that key would."""
    forged, previous = [], GENESIS_HASH
    for entry in entries:
        content = {k: entry[k] for k in ("seq", "time", "event", "fields")} | {"prev_hash": previous}
        entry_hash = hashlib.sha256(canonical(content)).hexdigest()
        signature = base64.b64encode(key.sign(bytes.fromhex(entry_hash))).decode()
        forged.append({**content, "entry_hash": entry_hash, "signature": signature})
        previous = entry_hash
    return forged


def test_entries_follow_the_documented_format():
    log = KernelAuditLog(KEY)
    assert log.head() == (0, GENESIS_HASH)
    record = log.append("release", result="r1", datasets=["claims"], suppressed=0)
    second = log.append("export", result="r1")
    entries = log.entries()
    assert [entry["seq"] for entry in entries] == [1, 2]
    first = entries[0]
    assert set(first) == {"seq", "time", "event", "fields", "prev_hash", "entry_hash", "signature"}
    assert first["prev_hash"] == GENESIS_HASH and entries[1]["prev_hash"] == first["entry_hash"]
    content = {k: first[k] for k in ("seq", "time", "event", "fields", "prev_hash")}
    assert first["entry_hash"] == hashlib.sha256(canonical(content)).hexdigest() == record.entry_hash
    Ed25519PublicKey.from_public_bytes(PUBLIC).verify(
        base64.b64decode(first["signature"]), bytes.fromhex(first["entry_hash"])
    )
    assert log.head() == (2, second.entry_hash)
    assert log.signing_public_key == PUBLIC
    result = verify_kernel_log(entries, PUBLIC, expected_head=log.head())
    assert result.ok, result.problems
    assert result.head == log.head() and result.entries == 2


def test_entries_are_copies():
    log = KernelAuditLog(KEY)
    log.append("release", datasets=["claims"])
    log.entries()[0]["fields"]["datasets"].append("other")
    assert verify_kernel_log(log.entries(), PUBLIC).ok


def test_an_empty_log_verifies():
    assert verify_kernel_log([], PUBLIC, expected_head=(0, GENESIS_HASH)).ok


def test_jsonl_file_holds_the_same_entries(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    log = KernelAuditLog(KEY, path)
    for event, fields in EVENTS:
        log.append(event, **fields)
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == log.entries()
    assert all(line == canonical(json.loads(line)) for line in lines)
    assert verify_kernel_log(parse_jsonl(path.read_bytes()), PUBLIC, expected_head=log.head()).ok
    with pytest.raises(KernelAuditError, match="closed"):
        log.append("request")


def test_a_file_with_entries_is_refused(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"seq": 1}\n')
    with pytest.raises(KernelAuditError, match="already holds entries"):
        KernelAuditLog(KEY, path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_write_records_nothing_and_stops_the_log():
    log = KernelAuditLog(KEY, Path("/dev/full"))
    with pytest.raises(KernelAuditError, match="cannot record"):
        log.append("release", result="r1")
    assert log.entries() == [] and log.head() == (0, GENESIS_HASH)
    with pytest.raises(KernelAuditError, match="no longer accepts entries"):
        log.append("request")


@pytest.mark.parametrize(
    ("event", "fields", "message"),
    [
        ("Release", {}, "lowercase identifier"),
        ("", {}, "lowercase identifier"),
        ("release", {"mean": 41.5}, "float"),
        ("release", {"values": [1, 2.0]}, "float"),
        ("release", {"rows": {"a": b"x"}}, "bytes"),
        ("release", {"blob": "x" * 70000}, "larger than"),
    ],
)
def test_content_that_must_not_be_recorded_is_refused(event, fields, message):
    log = KernelAuditLog(KEY)
    with pytest.raises(ValueError, match=message):
        log.append(event, **fields)
    assert log.entries() == []


def test_concurrent_appends_form_one_chain():
    log = KernelAuditLog(KEY)

    def work(worker: int) -> None:
        for index in range(40):
            log.append("request", worker=worker, index=index)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = verify_kernel_log(log.entries(), PUBLIC, expected_head=log.head())
    assert result.ok and result.entries == 320


# -- tampering ----------------------------------------------------------------------------------------------


def problems_of(entries, **options) -> list[str]:
    result = verify_kernel_log(entries, PUBLIC, **options)
    assert not result.ok
    return result.problems


def test_an_edited_entry_is_named():
    entries = build()
    entries[2]["fields"]["rule"] = "release.allow"
    assert problems_of(entries) == ["seq 3: entry_hash does not match the entry's content (edited?)"]


def test_an_edited_and_rehashed_entry_fails_its_signature_and_the_next_link():
    entries = build()
    entries[1]["fields"]["suppressed"] = 0
    content = {k: entries[1][k] for k in ("seq", "time", "event", "fields", "prev_hash")}
    entries[1]["entry_hash"] = hashlib.sha256(canonical(content)).hexdigest()
    assert problems_of(entries) == [
        "seq 2: signature does not verify with the kernel's signing key",
        "seq 3: prev_hash does not link to the previous entry (inserted, removed or reordered)",
    ]


def test_a_deleted_entry_is_named():
    entries = build()
    del entries[2]
    problems = problems_of(entries)
    assert problems[0] == "seq 4: seq 3 missing (deleted or renumbered)"
    assert "seq 4: prev_hash does not link" in problems[1]


def test_a_deleted_first_entry_is_named():
    problems = problems_of(build()[1:])
    assert problems[0] == "seq 2: seq 1 missing (deleted or renumbered)"


def test_an_inserted_entry_is_named():
    entries = build()
    stranger = build(2, Ed25519PrivateKey.generate())[1]
    entries.insert(2, stranger)
    problems = problems_of(entries)
    assert "seq 2: out of order or duplicated (follows seq 2)" in problems
    assert "seq 2: signature does not verify with the kernel's signing key" in problems
    assert any(problem.startswith("seq 3: prev_hash") for problem in problems)


def test_reordered_entries_are_named():
    entries = build()
    entries[1], entries[2] = entries[2], entries[1]
    problems = problems_of(entries)
    assert problems[0] == "seq 3: seq 2 missing (deleted or renumbered)"
    assert "seq 2: out of order or duplicated (follows seq 3)" in problems
    assert any(problem.startswith("seq 4: prev_hash") for problem in problems)


def test_a_log_resigned_with_another_key_fails_every_signature():
    forged = resign(build(), Ed25519PrivateKey.generate())
    assert problems_of(forged) == [
        f"seq {seq}: signature does not verify with the kernel's signing key" for seq in range(1, 6)
    ]


def test_a_rewrite_by_the_key_holder_is_caught_by_a_known_head():
    entries = build()
    head = (entries[-1]["seq"], entries[-1]["entry_hash"])
    edited = copy.deepcopy(entries)
    edited[0]["fields"]["op"] = "schema"
    forged = resign(edited, KEY)
    assert verify_kernel_log(forged, PUBLIC).ok  # indistinguishable without a head: documented limit
    assert problems_of(forged, expected_head=head) == [
        "seq 5: entry_hash differs from the expected head (the log was rewritten)"
    ]


def test_dropped_newest_entries_are_caught_by_a_known_head():
    entries = build()
    head = (entries[-1]["seq"], entries[-1]["entry_hash"])
    assert verify_kernel_log(entries[:3], PUBLIC).ok  # a shorter log is a valid log on its own
    assert problems_of(entries[:3], expected_head=head) == [
        "the log ends at seq 3, but seq 5 was seen before (newest entries removed?)"
    ]
    assert problems_of([], expected_head=head) == [
        "the log is empty, but seq 5 was seen before (newest entries removed?)"
    ]


def test_malformed_entries_are_named_by_position_or_seq():
    entries: list[object] = list(build(3))
    entries[1] = {**entries[1], "signature": "not base64!"}  # type: ignore[dict-item]
    entries.insert(0, "junk")
    problems = problems_of(entries)
    assert problems[0] == "entry 1: is not a JSON object"
    assert "seq 2: signature is not base64" in problems


def test_parse_jsonl_keeps_bad_lines_in_place():
    lines = [canonical(entry) for entry in build(3)]
    lines[1] = b"{truncated"
    problems = problems_of(parse_jsonl(b"\n".join(lines) + b"\n\n"))
    assert problems[0] == "entry 2: is not a JSON object"


def test_the_key_must_be_a_raw_ed25519_key():
    with pytest.raises(ValueError, match="32 raw bytes"):
        verify_kernel_log([], PUBLIC.hex().encode())


_FIELDS = ("seq", "time", "event", "fields", "prev_hash", "entry_hash", "signature")
_REPLACEMENTS = {
    "seq": st.integers(-3, 50),
    "time": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000001Z", "yesterday"]),
    "event": st.sampled_from(["release", "refusal", "export", "request", "BAD"]),
    "fields": st.dictionaries(st.sampled_from(["rule", "result", "n"]), st.integers() | st.text(max_size=5)),
    "prev_hash": st.sampled_from([GENESIS_HASH, "f" * 64, "zz"]),
    "entry_hash": st.sampled_from([GENESIS_HASH, "e" * 64]),
    "signature": st.binary(min_size=64, max_size=64).map(lambda raw: base64.b64encode(raw).decode()),
}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), count=st.integers(1, 6))
def test_any_edit_of_any_field_is_found_and_names_the_entry(data, count):
    entries = build(count)
    index = data.draw(st.integers(0, count - 1))
    name = data.draw(st.sampled_from(_FIELDS))
    value = data.draw(_REPLACEMENTS[name])
    if entries[index][name] == value:
        return
    entries[index][name] = value
    result = verify_kernel_log(entries, PUBLIC)
    assert not result.ok
    label = f"seq {value}" if name == "seq" else f"seq {index + 1}"
    assert any(problem.startswith(label + ":") for problem in result.problems), result.problems


@settings(max_examples=100, deadline=None)
@given(data=st.data(), count=st.integers(2, 6))
def test_any_deletion_or_permutation_before_the_head_is_found(data, count):
    entries = build(count)
    head = (entries[-1]["seq"], entries[-1]["entry_hash"])
    if data.draw(st.booleans()):
        del entries[data.draw(st.integers(0, count - 1))]
    else:
        permuted = data.draw(st.permutations(entries))
        if [entry["seq"] for entry in permuted] == list(range(1, count + 1)):
            return
        entries = list(permuted)
    assert not verify_kernel_log(entries, PUBLIC, expected_head=head).ok
