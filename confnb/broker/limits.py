"""What the broker will spend on one client: the limits that keep strangers from costing more than their request.

The broker answers anyone who can reach it, before any authentication (attestation *is* the authentication, and it
comes last). So every resource a request can make it hold is capped up front and per client address: bytes of body
(refused with 413 before anything parses them), length of every field (400), challenges outstanding, open
connections, the time a client may take to send its request, and the threads that do blocking work. The numbers
are documented in the owner guide; a deployment behind a reverse proxy sees one address for everyone and should
raise the per-address caps (or terminate TLS at the broker itself).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from confnb.broker.challenges import DEFAULT_MAX_OUTSTANDING, DEFAULT_MAX_PER_CLIENT

# An evidence bundle is a 1,184-byte report in base64, a VCEK and a two-certificate chain in PEM and a few claims:
# about 10 KiB. Anything past 64 KiB is not evidence.
MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000  # a refusal's reason, in the response and in the audit log
MAX_DATASET_ID_CHARS = 128  # as the store allows

KEY_RELEASE_PATH = re.compile(r"/v1/datasets/([^/]*)/key-release")


@dataclass(frozen=True)
class BrokerLimits:
    """Every cap in one place; the defaults suit a broker serving kernels directly (no proxy in front)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_challenges: int = DEFAULT_MAX_OUTSTANDING
    max_challenges_per_client: int = DEFAULT_MAX_PER_CLIENT
    max_connections: int = 1024
    max_connections_per_client: int = 64
    request_timeout_s: float = 10.0  # from the first byte of a request (or the connection) to its last
    release_workers: int = 8  # threads appraising evidence and sealing keys
    challenge_workers: int = 4  # threads issuing challenges
    refusal_workers: int = 2  # threads auditing refusals made before a handler runs (413, 400)
    refusal_tally_s: float = 5.0  # challenge refusals are audited as one count per address per interval
    publish_dataset_ids: bool = False  # GET /v1/owner lists dataset ids only when the owner says so

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, bool) and value <= 0:
                raise ValueError(f"broker limit {name} must be positive, not {value}")


def client_key(host: str) -> str:
    """The unit per-address caps count: an IPv4 address, or the /64 of an IPv6 one (one host gets a whole /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Untrusted text made storable and short: lone surrogates become "?", the tail past ``limit`` is cut."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def key_release_dataset(path: str) -> str | None:
    """The dataset id of a key-release path (bounded), or None for any other path."""
    match = KEY_RELEASE_PATH.fullmatch(path)
    return (bounded(match.group(1), MAX_DATASET_ID_CHARS) or "-") if match else None


def refusal_body(path: str, reason: str) -> dict[str, Any]:
    """A refusal in the shape the OpenAPI document gives for ``path``: KeyReleaseDenial or Refusal."""
    dataset_id = key_release_dataset(path)
    if dataset_id is None:
        return {"reason": reason}
    return {"dataset_id": dataset_id, "released": False, "reason": reason, "checks": []}


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RefusalHook = Callable[[Scope, int, str], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: reads the whole body (at most ``max_bytes``) before the app sees the request.

    A declared Content-Length over the cap is refused at once, unread; a chunked body is refused as soon as it
    passes the cap. Either way the connection is closed, so the client cannot keep streaming, and ``on_refusal``
    (the audit) runs before the response leaves.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_refusal: RefusalHook) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = [value for name, value in scope["headers"] if name == b"content-length"]
        if declared:
            text = declared[0].decode("latin-1").strip()
            if not text.isdigit():
                await self._refuse(scope, send, 400, "request: Content-Length is not a number")
                return
            if int(text) > self.max_bytes:
                await self._refuse(scope, send, 413, self._too_large(f"declares {int(text)} bytes"))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left (or was timed out) before its body arrived: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, 413, self._too_large(f"sent more than {self.max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, what: str) -> str:
        return f"request: the body {what}; the broker accepts at most {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope, send: Send, status: int, reason: str) -> None:
        await self.on_refusal(scope, status, reason)
        payload = json.dumps(refusal_body(scope["path"], reason)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
