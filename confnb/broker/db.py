"""SQLite for the broker: one short transaction per operation, durable, closed when done.

The broker's tables are small and its writes few, so each operation opens a connection, runs in one transaction
(``BEGIN IMMEDIATE`` for writers, so concurrent processes serialise instead of failing halfway) and closes it.
WAL lets readers proceed while a writer commits; ``synchronous=FULL`` makes every commit survive a power cut.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

BUSY_TIMEOUT_S = 30


def initialize(path: str | Path, schema: str) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")  # persistent: set once, kept by the database file
        db.executescript(schema)


@contextlib.contextmanager
def transaction(path: str | Path, *, write: bool = True) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()
