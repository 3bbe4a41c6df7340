"""Jupyter wire frames, handled the way a relay needs: verify with one key, re-sign with another, parse lazily.

``jupyter_client.session.Session`` would do this too, but it converts dates, re-packs JSON and keeps per-session
state on every call; on the path of every message that costs more than the relay's whole budget. A message whose
parts the gate leaves alone is re-signed over its original bytes, so what the client receives is byte-for-byte
what the executor said, once the gate has approved it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
Message = dict[str, Any]
_PART_NAMES = ("header", "parent_header", "metadata", "content")


class WireError(ValueError):
    """Frames that are not a signed Jupyter message; the relay drops them."""


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


class Signer:
    """HMAC-SHA256 over the four JSON parts, as the Jupyter messaging spec defines the signature."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a relay never runs unsigned: the key must not be empty")
        self._template = hmac.new(key, digestmod=hashlib.sha256)

    def sign(self, parts: Sequence[bytes]) -> bytes:
        mac = self._template.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> bool:
        return hmac.compare_digest(self.sign(parts), signature)


class ReplayGuard:
    """Refuses a signature seen before (jupyter_client's ``digest_history``), with bounded memory."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._seen: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self._capacity = capacity

    def fresh(self, signature: bytes) -> bool:
        if signature in self._seen:
            return False
        self._seen.add(signature)
        self._order.append(signature)
        if len(self._order) > self._capacity:
            self._seen.discard(self._order.popleft())
        return True


@dataclass
class WireMessage:
    """One received message: routing identities, the four JSON parts as bytes, and any binary buffers."""

    idents: list[bytes]
    parts: list[bytes]
    buffers: list[bytes]
    _parsed: Message | None = None

    @classmethod
    def receive(cls, frames: list[bytes], signer: Signer, replay: ReplayGuard | None = None) -> WireMessage:
        try:
            split = frames.index(DELIMITER)
        except ValueError:
            raise WireError("no delimiter frame") from None
        if len(frames) < split + 6:
            raise WireError("fewer than the four message parts")
        signature = frames[split + 1]
        parts = frames[split + 2 : split + 6]
        if not signer.verify(signature, parts):
            raise WireError("bad signature")
        if replay is not None and not replay.fresh(signature):
            raise WireError("replayed message")
        return cls(idents=frames[:split], parts=parts, buffers=frames[split + 6 :])

    @property
    def message(self) -> Message:
        """The parsed message, parsed once; JSON errors raise :class:`WireError`."""
        if self._parsed is None:
            try:
                values = [json.loads(part) for part in self.parts]
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise WireError("a message part is not JSON") from None
            if not all(isinstance(value, dict) for value in values):
                raise WireError("a message part is not a JSON object")
            self._parsed = dict(zip(_PART_NAMES, values, strict=True))
            self._parsed["buffers"] = self.buffers
        return self._parsed

    def frames(self, signer: Signer) -> list[bytes]:
        """These exact parts, signed by ``signer``."""
        return [*self.idents, DELIMITER, signer.sign(self.parts), *self.parts, *self.buffers]


def encode(message: Message, signer: Signer, idents: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for a message the relay made or the gate rewrote."""
    parts = [_dumps(message.get(name, {})) for name in _PART_NAMES]
    buffers = [bytes(buffer) for buffer in message.get("buffers", [])]
    return [*idents, DELIMITER, signer.sign(parts), *parts, *buffers]


def new_header(msg_type: str, session: str, username: str = "kernel") -> dict[str, Any]:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": username,
        "session": session,
        "date": datetime.now(UTC).isoformat(),
        "version": PROTOCOL_VERSION,
    }


def reply(
    msg_type: str, content: dict[str, Any], parent: Message, session: str, metadata: dict[str, Any] | None = None
) -> Message:
    return {
        "header": new_header(msg_type, session),
        "parent_header": parent.get("header", {}),
        "metadata": metadata or {},
        "content": content,
        "buffers": [],
    }
