"""Single-use, short-lived nonces: the broker's defence against replayed evidence.

A kernel asks for a challenge, binds the nonce into its attestation report, and presents the evidence once. The
nonce is consumed atomically in SQLite (one UPDATE that succeeds for exactly one caller), so two concurrent releases
with the same evidence cannot both succeed, even across broker processes sharing the store.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confnb.attest.evidence import rfc3339
from confnb.broker.db import initialize, transaction

NONCE_BYTES = 32
DEFAULT_TTL_S = 300
# Challenges are handed out without authentication; capping the live ones bounds what a flood can make the broker
# store and sign, while leaving room for far more kernels starting at once than a deployment will see. The cap per
# client address keeps one client from holding them all and locking every kernel out until they expire.
DEFAULT_MAX_OUTSTANDING = 10_000
DEFAULT_MAX_PER_CLIENT = 64


class ChallengeLimitError(RuntimeError):
    """More unexpired, unused challenges are outstanding than the broker will keep."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS challenges (
    nonce TEXT PRIMARY KEY,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX IF NOT EXISTS challenges_expiry ON challenges (expires_at);
"""
# Added after the first release: older databases get the column (NULL for their challenges) when opened.
_CLIENT_COLUMN = "ALTER TABLE challenges ADD COLUMN client TEXT"
_CLIENT_INDEX = "CREATE INDEX IF NOT EXISTS challenges_client ON challenges (client, expires_at)"


@dataclass(frozen=True)
class Challenge:
    nonce: str  # hex
    expires_at: datetime

    def to_dict(self) -> dict[str, str]:
        return {"nonce": self.nonce, "expires_at": rfc3339(self.expires_at)}


class ChallengeStore:
    """Nonces in the broker's SQLite database; safe to share between threads and processes."""

    def __init__(
        self,
        path: str | Path,
        ttl_s: int = DEFAULT_TTL_S,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    ) -> None:
        self.path = str(path)
        self.ttl = timedelta(seconds=ttl_s)
        self.max_outstanding = max_outstanding
        self.max_per_client = max_per_client
        initialize(self.path, _SCHEMA)
        with transaction(self.path) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(challenges)")}
            if "client" not in columns:
                db.execute(_CLIENT_COLUMN)
            db.execute(_CLIENT_INDEX)

    def issue(self, now: datetime | None = None, client: str = "unknown") -> Challenge:
        """A fresh nonce for ``client`` (the per-address key); ChallengeLimitError past either cap."""
        moment = now or datetime.now(UTC)
        nonce = secrets.token_hex(NONCE_BYTES)
        expires = moment + self.ttl
        # A refusal is decided on a read transaction first: a flood of refused requests then never takes the
        # write lock that every legitimate challenge and release needs.
        with transaction(self.path, write=False) as db:
            self._check_caps(db, moment, client)
        with transaction(self.path) as db:  # one durable commit for all statements
            self._check_caps(db, moment, client)
            db.execute(
                "INSERT INTO challenges (nonce, issued_at, expires_at, client) VALUES (?, ?, ?, ?)",
                (nonce, moment.timestamp(), expires.timestamp(), client),
            )
            # Expired challenges are useless; dropping them keeps the table small without a sweeper thread.
            db.execute("DELETE FROM challenges WHERE expires_at < ?", ((moment - self.ttl).timestamp(),))
        return Challenge(nonce, expires)

    def _check_caps(self, db: sqlite3.Connection, moment: datetime, client: str) -> None:
        retry = f"retry within {int(self.ttl.total_seconds())} s"
        mine = db.execute(
            "SELECT COUNT(*) FROM challenges WHERE client = ? AND used_at IS NULL AND expires_at >= ?",
            (client, moment.timestamp()),
        ).fetchone()[0]
        if mine >= self.max_per_client:
            raise ChallengeLimitError(
                f"{mine} challenges are outstanding for {client}, the most one client may hold; {retry}"
            )
        outstanding = db.execute(
            "SELECT COUNT(*) FROM challenges WHERE used_at IS NULL AND expires_at >= ?", (moment.timestamp(),)
        ).fetchone()[0]
        if outstanding >= self.max_outstanding:
            raise ChallengeLimitError(f"{outstanding} challenges are outstanding; {retry}")

    def consume(self, nonce: str, now: datetime | None = None) -> str | None:
        """Mark ``nonce`` used. None if it was valid and unused until now; otherwise why it cannot be used."""
        moment = (now or datetime.now(UTC)).timestamp()
        nonce = nonce.lower()
        with transaction(self.path) as db:
            updated = db.execute(
                "UPDATE challenges SET used_at = ? WHERE nonce = ? AND used_at IS NULL AND expires_at >= ?",
                (moment, nonce, moment),
            ).rowcount
            if updated == 1:
                return None
            row = db.execute("SELECT expires_at, used_at FROM challenges WHERE nonce = ?", (nonce,)).fetchone()
        if row is None:
            return "the nonce was not issued by this broker (or expired long ago)"
        if row[1] is not None:
            return "the nonce was already used: evidence is accepted once"
        return "the nonce expired before the evidence arrived"
