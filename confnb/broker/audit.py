"""The broker's append-only audit log: every challenge, key release, denial and admin action, hash-chained and signed.

Why a chain and signatures, not just a table: the log is how a data owner learns who got their keys, so whoever can
write the database file (a host administrator, a backup restore, a bug) must not be able to change history unseen.
Each entry stores

    entry_hash = SHA-256(canonical JSON of {seq, time, kind, actor, dataset_id, detail, prev_hash})
    signature  = Ed25519(owner key, the 32 bytes of entry_hash)

where ``prev_hash`` is the previous entry's ``entry_hash`` (64 zeros for seq 1) and canonical JSON is UTF-8 with
sorted keys and no whitespace. :func:`verify_log` recomputes every hash and checks every link, the contiguity of
``seq`` and every signature, so an edited, inserted, reordered or deleted entry is found and named by its seq.

What this cannot show, by construction:

* **Dropping the newest entries.** A log cut after seq N is a perfectly valid log of N entries. Whoever has seen a
  later head (``(seq, entry_hash)`` from :meth:`AuditLog.head` or :attr:`AuditVerification.head`) passes it as
  ``expected_head`` and truncation, or replacing the whole file with another log of the same owner, is detected.
  Publishing heads somewhere the host cannot write (the owner's machine, a transparency log) closes the gap.
* **The key holder rewriting history.** The broker holds the owner's signing key, so whoever controls the broker
  process can re-sign a rewritten log; the log is tamper-evident to everyone else, and again previously seen heads
  expose a rewrite.

Concurrency: many threads share one :class:`AuditLog` (a lock serializes its one connection) and many processes may
open the same file. ``seq`` and ``prev_hash`` are read and the new row written inside one ``BEGIN IMMEDIATE``
transaction, which takes SQLite's write lock up front, so two writers can never pick the same seq or link to the
same predecessor. WAL mode lets readers proceed meanwhile; ``synchronous=FULL`` makes every committed entry durable
before :meth:`AuditLog.append` returns, which is what a record of a released key has to be.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import random
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "AUDIT_FORMAT",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditKind",
    "AuditLog",
    "AuditLogBusyError",
    "AuditLogError",
    "AuditVerification",
    "ReleaseReconciliation",
    "compute_entry_hash",
    "reconcile_releases",
    "verify_log",
]

AUDIT_FORMAT: Final = "confnb-audit/1"
GENESIS_HASH: Final = "0" * 64
MAX_DETAIL_BYTES: Final = 1 << 20
MAX_REPORTED_PROBLEMS: Final = 1000
_BATCH = 256
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_T = TypeVar("_T")
_COLUMNS = ("seq", "time", "kind", "actor", "dataset_id", "detail", "prev_hash", "entry_hash", "signature")

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE entries (
    seq        INTEGER PRIMARY KEY,
    time       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    actor      TEXT NOT NULL,
    dataset_id TEXT,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    entry_hash TEXT NOT NULL,
    signature  TEXT NOT NULL
);
"""


class AuditKind(StrEnum):
    """What an entry records."""

    CHALLENGE = "challenge"  # a nonce handed out for an attestation
    RELEASE = "release"  # a dataset key released to an attested kernel
    DENIAL = "denial"  # a key release refused, with the failing checks
    ADMIN = "admin"  # a change by the owner: policy, dataset registration, key rotation
    CHARGE = "charge"  # a differentially private release charged to a dataset's budget


class AuditLogError(Exception):
    """The audit log cannot be used: not a confnb audit log, made for another owner key, closed, damaged."""


class AuditLogBusyError(AuditLogError):
    """Other writers held the log's write lock for longer than the caller's ``busy_timeout``."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _fingerprint(raw_public_key: bytes) -> str:
    """``sha256:<hex>`` of the raw key, the same form as :func:`confnb.datasets.manifest.public_key_fingerprint`."""
    return "sha256:" + hashlib.sha256(raw_public_key).hexdigest()


def compute_entry_hash(
    seq: int, time: str, kind: str, actor: str, dataset_id: str | None, detail: Mapping[str, Any], prev_hash: str
) -> str:
    """Hex SHA-256 of the canonical JSON of an entry's content and its link to the previous entry."""
    content = {
        "seq": seq,
        "time": time,
        "kind": kind,
        "actor": actor,
        "dataset_id": dataset_id,
        "detail": detail,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_canonical(content)).hexdigest()


def _format_time(moment: datetime) -> str:
    if moment.utcoffset() is None:
        raise ValueError("the audit clock must return timezone-aware datetimes")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AuditEntry:
    """One entry as stored. ``detail`` is the parsed canonical JSON object (treat it as read-only)."""

    seq: int
    time: str
    kind: AuditKind
    actor: str
    dataset_id: str | None
    detail: dict[str, Any] = field(hash=False)
    prev_hash: str
    entry_hash: str
    signature: bytes

    @property
    def timestamp(self) -> datetime:
        return datetime.fromisoformat(self.time)

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values (signature in base64), as ``confnb audit`` prints it."""
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind.value,
            "actor": self.actor,
            "dataset_id": self.dataset_id,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of :func:`verify_log`. ``problems`` are ordered by seq, each naming the seq and what is wrong."""

    ok: bool
    #: every entry whose columns could be parsed, in seq order, including entries with problems (the whole log is
    #: held in memory: about 1 KB an entry)
    entries: list[AuditEntry]
    problems: list[str]
    #: ``(seq, entry_hash)`` of the last entry: keep it and pass it as ``expected_head`` next time
    head: tuple[int, str] | None = None
    #: the seq of the first entry with a problem (None when the problem is not one entry's, or there is none)
    first_bad_seq: int | None = None


# -- reading rows, shared by the log and the verifier ----------------------------------------------------------------


class _RowError(Exception):
    """One stored row cannot even be parsed; the message names the column."""


def _text_column(name: str, value: object, kind: str) -> str:
    if kind != "text" or not isinstance(value, bytes):
        raise _RowError(f"{name} is stored as {kind}, not text")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _RowError(f"{name} is not valid UTF-8") from None


def _parse_row(row: tuple[Any, ...]) -> tuple[AuditEntry, str]:
    """An entry from ``SELECT <columns>, typeof(<each column>)`` read with ``text_factory=bytes``.

    Returns the entry and the stored ``detail`` text (whose canonical form the verifier checks). Everything is
    checked for shape here, so a hand-edited database gives a :class:`_RowError` naming the column, not a crash.
    """
    values = row[: len(_COLUMNS)]
    kinds = [kind.decode("ascii") if isinstance(kind, bytes) else str(kind) for kind in row[len(_COLUMNS) :]]
    seq = values[0]
    if kinds[0] != "integer" or type(seq) is not int:
        raise _RowError(f"seq is stored as {kinds[0]}, not an integer")
    stamp = _text_column("time", values[1], kinds[1])
    if not _RFC3339.fullmatch(stamp):
        raise _RowError(f"time {stamp[:40]!r} is not an RFC 3339 timestamp")
    try:
        datetime.fromisoformat(stamp)
    except ValueError:
        raise _RowError(f"time {stamp[:40]!r} is not a valid time") from None
    kind_text = _text_column("kind", values[2], kinds[2])
    try:
        kind = AuditKind(kind_text)
    except ValueError:
        raise _RowError(f"kind {kind_text[:40]!r} is not one of {', '.join(k.value for k in AuditKind)}") from None
    actor = _text_column("actor", values[3], kinds[3])
    dataset_id = None if kinds[4] == "null" else _text_column("dataset_id", values[4], kinds[4])
    detail_text = _text_column("detail", values[5], kinds[5])
    try:
        detail = json.loads(detail_text)
    except (ValueError, RecursionError):
        raise _RowError("detail is not valid JSON") from None
    if not isinstance(detail, dict):
        raise _RowError("detail is not a JSON object")
    prev_hash = _text_column("prev_hash", values[6], kinds[6])
    if not _HEX64.fullmatch(prev_hash):
        raise _RowError("prev_hash is not 64 lowercase hex digits")
    entry_hash = _text_column("entry_hash", values[7], kinds[7])
    if not _HEX64.fullmatch(entry_hash):
        raise _RowError("entry_hash is not 64 lowercase hex digits")
    signature_text = _text_column("signature", values[8], kinds[8])
    try:
        signature = base64.b64decode(signature_text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _RowError("signature is not base64") from None
    if len(signature) != 64 or base64.b64encode(signature).decode("ascii") != signature_text:
        raise _RowError("signature is not the canonical base64 of a 64-byte Ed25519 signature")
    entry = AuditEntry(seq, stamp, kind, actor, dataset_id, detail, prev_hash, entry_hash, signature)
    return entry, detail_text


_SELECT = f"SELECT {', '.join(_COLUMNS)}, {', '.join(f'typeof({column})' for column in _COLUMNS)} FROM entries"  # noqa: S608


def _is_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    message = str(error)
    return "locked" in message or "busy" in message


# -- the log --------------------------------------------------------------------------------------------------------


class AuditLog:
    """An audit log file, opened for appending with the owner's signing key.

    The first open creates the file (mode 0600) and records the owner key's fingerprint; later opens with any other
    key are refused, so one log never mixes entries signed by two keys. One instance may be shared by any number of
    threads; every process opens its own (an instance refuses to be used after ``fork``).
    """

    def __init__(
        self,
        path: str | Path,
        signing_key: Ed25519PrivateKey,
        *,
        clock: Callable[[], datetime] = _utc_now,
        busy_timeout: float = 30.0,
    ) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
        self.path = Path(path)
        self._key = signing_key
        self._public_key = _raw_public_key(signing_key.public_key())
        self.owner_fingerprint = _fingerprint(self._public_key)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = self._connect()
        try:
            self._retry(self._enable_wal)
            self._retry(self._initialize)
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # Created here, not by SQLite, so the file is private from its first byte (SQLite would use the umask).
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass
        except OSError as error:
            raise AuditLogError(f"{self.path}: cannot create the audit log ({error.strerror})") from None
        try:
            connection = sqlite3.connect(
                self.path, timeout=min(self._busy_timeout, 5.0), isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA trusted_schema = OFF")
            connection.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as error:
            raise AuditLogError(f"{self.path}: cannot open as an audit log ({error})") from None
        return connection

    def _enable_wal(self, connection: sqlite3.Connection) -> None:
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise AuditLogError(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode})")

    def _initialize(self, connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                # One statement at a time: executescript() would commit the transaction we are in.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("format", AUDIT_FORMAT),
                        ("owner_public_key", base64.b64encode(self._public_key).decode("ascii")),
                        ("owner_fingerprint", self.owner_fingerprint),
                    ],
                )
            elif not {"meta", "entries"} <= tables:
                raise AuditLogError(f"{self.path}: not a confnb audit log (tables: {', '.join(sorted(tables))})")
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        if meta.get("format") != AUDIT_FORMAT:
            raise AuditLogError(f"{self.path}: not a {AUDIT_FORMAT} log (format {meta.get('format')!r})")
        stored = str(meta.get("owner_fingerprint", ""))
        if not hmac.compare_digest(stored.encode(), self.owner_fingerprint.encode()):
            raise AuditLogError(
                f"{self.path}: this log belongs to owner key {stored}, not to the signing key {self.owner_fingerprint}"
            )

    # -- plumbing ---------------------------------------------------------------------------------------------------

    def _retry(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``operation`` under the instance lock, retrying with jittered exponential backoff while SQLite says
        BUSY or LOCKED (another process holds the write lock, or a WAL recovery is running)."""
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            with self._lock:
                connection = self._open_connection()
                try:
                    return operation(connection)
                except sqlite3.OperationalError as error:
                    if not _is_busy(error) or time.monotonic() >= deadline:
                        if _is_busy(error):
                            raise AuditLogBusyError(
                                f"{self.path}: still locked by another writer after {self._busy_timeout:g} s"
                            ) from error
                        raise AuditLogError(f"{self.path}: {error}") from error
                except sqlite3.DatabaseError as error:
                    raise AuditLogError(f"{self.path}: {error}") from error
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, 0.1)

    def _open_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise AuditLogError(f"{self.path}: the audit log is closed")
        if os.getpid() != self._pid:
            raise AuditLogError(f"{self.path}: an AuditLog cannot be used across fork; open a new one in this process")
        return self._connection

    def close(self) -> None:
        """Close the connection (idempotent). A forked child never closes its parent's connection."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None and os.getpid() == self._pid:
                connection.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------------------------------

    def append(
        self, kind: AuditKind | str, actor: str, dataset_id: str | None, detail: Mapping[str, Any]
    ) -> AuditEntry:
        """Record one event durably and return the entry as stored.

        Raises ``ValueError`` for content that cannot be recorded faithfully (an unknown kind, an empty actor, a
        detail that is not a JSON object or holds NaN or unpaired surrogates). Callers recording a decision about
        untrusted input must sanitize it first: a decision that could not be logged must not be acted on.
        """
        entry_kind = AuditKind(kind)
        if not isinstance(actor, str) or not actor:
            raise ValueError("audit actor must be a non-empty string")
        if dataset_id is not None and (not isinstance(dataset_id, str) or not dataset_id):
            raise ValueError("audit dataset_id must be a non-empty string or None")
        if not isinstance(detail, Mapping):
            raise ValueError(f"audit detail must be a JSON object, got {type(detail).__name__}")
        try:
            detail_text = _canonical(dict(detail)).decode("utf-8")
            _canonical([actor, dataset_id])
        except (TypeError, ValueError, RecursionError) as error:
            raise ValueError(f"audit detail or actor cannot be stored as canonical JSON: {error}") from None
        if len(detail_text.encode("utf-8")) > MAX_DETAIL_BYTES:
            raise ValueError(f"audit detail is larger than {MAX_DETAIL_BYTES} bytes")
        normalized: dict[str, Any] = json.loads(detail_text)

        def write(connection: sqlite3.Connection) -> AuditEntry:
            connection.execute("BEGIN IMMEDIATE")
            try:
                last = connection.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
                if last is None:
                    seq, prev_hash = 1, GENESIS_HASH
                else:
                    last_seq, prev_hash = last
                    if type(last_seq) is not int or not isinstance(prev_hash, str) or not _HEX64.fullmatch(prev_hash):
                        raise AuditLogError(
                            f"{self.path}: the newest entry (seq {last_seq!r}) is damaged; run verify_log before "
                            "appending more"
                        )
                    seq = last_seq + 1
                # Taken under the write lock, so times never go backwards along the chain within one clock.
                stamp = _format_time(self._clock())
                entry_hash = compute_entry_hash(seq, stamp, entry_kind.value, actor, dataset_id, normalized, prev_hash)
                signature = self._key.sign(bytes.fromhex(entry_hash))
                connection.execute(
                    f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",  # noqa: S608
                    (
                        seq,
                        stamp,
                        entry_kind.value,
                        actor,
                        dataset_id,
                        detail_text,
                        prev_hash,
                        entry_hash,
                        base64.b64encode(signature).decode("ascii"),
                    ),
                )
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            return AuditEntry(seq, stamp, entry_kind, actor, dataset_id, normalized, prev_hash, entry_hash, signature)

        return self._retry(write)

    # -- reading ----------------------------------------------------------------------------------------------------

    def head(self) -> tuple[int, str] | None:
        """``(seq, entry_hash)`` of the newest entry, to hand to a later ``verify_log(expected_head=...)``."""

        def read(connection: sqlite3.Connection) -> tuple[int, str] | None:
            row = connection.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return self._retry(read)

    def entries(self, since: int | None = None) -> Iterator[AuditEntry]:
        """Entries with ``seq > since`` (all when None), oldest first, read in batches so appends are not blocked.

        This reads; it does not prove anything. Use :func:`verify_log` to check the chain and signatures.
        """
        after = 0 if since is None else since

        def batch(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            cursor = connection.cursor()
            cursor.row_factory = None
            # text_factory is per connection; bytes lets a damaged row be reported instead of crashing the decoder.
            previous = connection.text_factory
            connection.text_factory = bytes
            try:
                return cursor.execute(f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (after, _BATCH)).fetchall()
            finally:
                connection.text_factory = previous

        while True:
            rows = self._retry(batch)
            for row in rows:
                try:
                    entry, _ = _parse_row(row)
                except _RowError as error:
                    raise AuditLogError(f"{self.path}: entry after seq {after} is damaged: {error}") from None
                after = entry.seq
                yield entry
            if len(rows) < _BATCH:
                return


# -- verification -----------------------------------------------------------------------------------------------------


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise AuditLogError(f"{path}: no such audit log")
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
        connection.execute("PRAGMA trusted_schema = OFF")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as error:
        raise AuditLogError(f"{path}: not a readable SQLite database ({error})") from None
    connection.text_factory = bytes
    return connection


def verify_log(
    path: str | Path,
    owner_public_key: Ed25519PublicKey | bytes,
    *,
    expected_head: tuple[int, str] | None = None,
) -> AuditVerification:
    """Check every entry of an audit log: shape, seq contiguity from 1, chain links, hashes and signatures.

    ``owner_public_key`` is the key the caller trusts (never the one recorded in the file). ``expected_head`` is a
    ``(seq, entry_hash)`` seen earlier; without it, removing the newest entries cannot be detected (see the module
    docstring). Raises :class:`AuditLogError` only when the file is not a SQLite database at all; a damaged log gives
    ``ok=False`` with problems such as ``"seq 7: entry_hash does not match the entry's content (edited?)"``.
    """
    log_path = Path(path)
    if isinstance(owner_public_key, Ed25519PublicKey):
        raw_key = _raw_public_key(owner_public_key)
    elif isinstance(owner_public_key, bytes) and len(owner_public_key) == 32:
        raw_key = owner_public_key
    else:
        raise ValueError("owner_public_key must be an Ed25519PublicKey or its 32 raw bytes")
    verifier = Ed25519PublicKey.from_public_bytes(raw_key)
    problems: list[tuple[int | None, str]] = []
    entries: list[AuditEntry] = []
    count = 0
    head: tuple[int, str] | None = None
    head_seen = False

    connection = _open_read_only(log_path)
    try:
        tables = {bytes(name).decode() for (name,) in connection.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "entries"} <= tables:
            return AuditVerification(False, [], ["meta, entries: the log's tables are missing (not a confnb log?)"])
        try:
            meta = {bytes(k).decode(): v for k, v in connection.execute("SELECT key, value FROM meta")}
        except (sqlite3.DatabaseError, UnicodeDecodeError):
            meta = {}
        stored_fingerprint = meta.get("owner_fingerprint")
        if not isinstance(stored_fingerprint, bytes) or not hmac.compare_digest(
            stored_fingerprint, _fingerprint(raw_key).encode()
        ):
            problems.append(
                (None, f"meta: the log records owner key {stored_fingerprint!r}, not {_fingerprint(raw_key)}")
            )

        previous_seq = 0
        previous_hash: str | None = GENESIS_HASH
        try:
            rows = connection.execute(f"{_SELECT} ORDER BY seq")
            for row in rows:
                count += 1
                seq = row[0] if type(row[0]) is int else None
                label = f"seq {seq}" if seq is not None else f"entry {count}"
                if seq is not None:
                    if seq != previous_seq + 1:
                        if seq < 1:
                            problems.append((seq, f"{label}: sequence numbers start at 1"))
                        else:
                            missing = (
                                f"seq {previous_seq + 1}"
                                if seq == previous_seq + 2
                                else f"seq {previous_seq + 1} to {seq - 1}"
                            )
                            problems.append((seq, f"{label}: {missing} missing (deleted or renumbered)"))
                    previous_seq = seq
                try:
                    entry, detail_text = _parse_row(row)
                except _RowError as error:
                    problems.append((seq, f"{label}: {error}"))
                    stored = row[7]
                    previous_hash = stored.decode("ascii", "replace") if isinstance(stored, bytes) else None
                    continue
                entries.append(entry)
                if previous_hash is not None and entry.prev_hash != previous_hash:
                    problems.append(
                        (
                            seq,
                            f"{label}: prev_hash does not link to the previous entry (inserted, removed or reordered)",
                        )
                    )
                if _canonical(entry.detail).decode("utf-8") != detail_text:
                    problems.append((seq, f"{label}: detail is not in canonical JSON form (edited?)"))
                recomputed = compute_entry_hash(
                    entry.seq,
                    entry.time,
                    entry.kind.value,
                    entry.actor,
                    entry.dataset_id,
                    entry.detail,
                    entry.prev_hash,
                )
                if not hmac.compare_digest(recomputed, entry.entry_hash):
                    problems.append((seq, f"{label}: entry_hash does not match the entry's content (edited?)"))
                try:
                    verifier.verify(entry.signature, bytes.fromhex(entry.entry_hash))
                except InvalidSignature:
                    problems.append((seq, f"{label}: signature does not verify with the owner key"))
                previous_hash = entry.entry_hash
                head = (entry.seq, entry.entry_hash)
                if expected_head is not None and entry.seq == expected_head[0]:
                    head_seen = True
                    if not hmac.compare_digest(entry.entry_hash.encode(), str(expected_head[1]).encode()):
                        problems.append(
                            (seq, f"{label}: entry_hash differs from the expected head (the log was rewritten)")
                        )
        except sqlite3.DatabaseError as error:
            problems.append((None, f"entries: cannot be read past entry {count} ({error})"))
    finally:
        connection.close()

    if expected_head is not None and not head_seen:
        last = "is empty" if head is None else f"ends at seq {head[0]}"
        problems.append((None, f"the log {last}, but seq {expected_head[0]} was seen before (newest entries removed?)"))
    messages = [message for _, message in problems]
    if len(messages) > MAX_REPORTED_PROBLEMS:
        extra = len(messages) - MAX_REPORTED_PROBLEMS
        messages = [*messages[:MAX_REPORTED_PROBLEMS], f"... and {extra} more problems"]
    first_bad = next((seq for seq, _ in problems if seq is not None), None)
    return AuditVerification(not problems, entries, messages, head, first_bad)


# -- reconciling with a kernel's log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseReconciliation:
    """One key-release attempt (one nonce) as the broker's log and a kernel's log tell it.

    ``broker`` is ``"released"`` (a ``release`` entry names the nonce), ``"not released"`` (only its ``challenge``
    entry: the broker refused, or stopped before deciding) or ``"unknown"`` (no entry at all). ``kernel`` is
    ``"received"``, ``"failed"`` (with the kernel's ``cause``), ``"no outcome"`` (the kernel recorded the request
    but nothing after it: it stopped first) or ``"absent"``. ``agree`` says whether the two tell the same story;
    ``finding`` says in a sentence what happened, and when they differ, why that can happen and what it means.
    """

    nonce: str
    dataset_id: str | None
    broker: str
    kernel: str
    cause: str
    agree: bool
    finding: str


def reconcile_releases(
    broker_entries: Iterable[AuditEntry], kernel_entries: Iterable[Mapping[str, Any]]
) -> list[ReleaseReconciliation]:
    """Match a kernel's key-release attempts (``key-request``/``key-received``/``key-request-failed`` entries of
    its audit log, as ``cn.audit()`` returns them) with the broker's log, nonce by nonce.

    The kernel records ``key-request`` durably *before* its evidence leaves, and the broker records ``release``
    durably *before* the key leaves, so a release the broker logged always has its request in the kernel's log, and
    a key the kernel received always has its release in the broker's. What can legitimately differ is the outcome
    of an interrupted exchange, and each such case is named here rather than hidden: the broker released but the
    answer was lost (the kernel says failed) or the kernel stopped before recording it (no outcome). Either way the
    key was sealed to that kernel's attested key, which never leaves its vault and ends with it.
    """
    released: dict[str, AuditEntry] = {}
    issued: set[str] = set()
    for entry in broker_entries:
        nonce = str(entry.detail.get("nonce") or "").lower()
        if entry.kind is AuditKind.RELEASE and nonce:
            released[nonce] = entry
        elif entry.kind is AuditKind.CHALLENGE and nonce:
            issued.add(nonce)
    attempts: dict[str, dict[str, Any]] = {}
    for record in kernel_entries:
        event, fields = record.get("event"), record.get("fields") or {}
        nonce = str(fields.get("nonce") or "").lower()
        if not nonce or event not in ("key-request", "key-received", "key-request-failed"):
            continue
        attempt = attempts.setdefault(nonce, {"dataset": fields.get("dataset"), "state": "absent", "cause": ""})
        if event == "key-request" and attempt["state"] == "absent":
            attempt["state"] = "no outcome"
        elif event == "key-received":
            attempt["state"] = "received"
        elif event == "key-request-failed" and attempt["state"] != "received":
            attempt["state"], attempt["cause"] = "failed", str(fields.get("cause", ""))
    return [_reconcile(nonce, attempt, released.get(nonce), nonce in issued) for nonce, attempt in attempts.items()]


def _reconcile(
    nonce: str, attempt: Mapping[str, Any], release: AuditEntry | None, issued: bool
) -> ReleaseReconciliation:
    kernel, cause = str(attempt["state"]), str(attempt["cause"])
    dataset = attempt.get("dataset") or (release.dataset_id if release else None)
    broker = "released" if release is not None else "not released" if issued else "unknown"
    findings: dict[tuple[str, str], tuple[bool, str]] = {
        ("released", "received"): (True, "released and received"),
        ("not released", "failed"): (True, f"not released: {cause}"),
        ("not released", "no outcome"): (True, "not released; the kernel stopped before the broker decided"),
        ("released", "failed"): (
            False,
            f"released but not received ({cause}): the answer was lost after the broker logged it; the key was "
            "sealed to that kernel's attested key only",
        ),
        ("released", "no outcome"): (
            False,
            "released; the kernel stopped before it recorded the answer; the key was sealed to that kernel's "
            "attested key only, which ended with it",
        ),
        ("not released", "received"): (False, "the kernel says it received a key the broker's log does not show"),
        ("unknown", "failed"): (True, f"not released: {cause} (the broker never saw the request)"),
    }
    agree, finding = findings.get(
        (broker, kernel), (False, f"the broker's log says {broker}, the kernel's log says {kernel}")
    )
    if broker == "unknown" and kernel in ("received", "no outcome"):
        agree, finding = False, "the broker's log does not know this nonce (another broker, or its log is incomplete)"
    return ReleaseReconciliation(nonce, dataset, broker, kernel, cause, agree, finding)
