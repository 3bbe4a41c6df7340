"""The broker under the load a stranger can put on it, while a legitimate kernel opens its dataset.

The broker runs as ``confnb broker serve`` in its own process on loopback, with AMD's KDS played by a stub on
loopback that answers every request with 429. At once, from separate loopback addresses:

* 45 key releases whose evidence carries no certificates and a random CHIP_ID (each with a fresh challenge), which
  once made the broker fetch from KDS, with retries, per request and tie up every worker;
* four 256 MiB bodies with a declared length and one chunked one;
* 10,000 challenge requests from one address;
* 1,000 connections that send half a request line and then nothing, from ten addresses.

Meanwhile a kernel on 127.0.0.1 asks for challenges and releases with genuine (simulated-TEE) evidence. Its
releases must complete within 2 s at p99, ``/healthz`` must answer, the broker's RSS must stay bounded, KDS must
see a handful of requests rather than one per release, and afterwards the audit log must verify and hold every
refusal: each denial, each 413, and the count of refused challenges.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import resource
import secrets
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb.broker.audit import verify_log
from confnb.broker.limits import BrokerLimits
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement
from tests.confnb.broker._broker_process import BrokerProcess

LIMITS = BrokerLimits()  # the broker under test runs with the defaults
KERNEL = "127.0.0.1"
CERTLESS = "127.0.0.2"
BIG_BODIES = "127.0.0.3"
FLOOD = "127.0.0.4"
SLOW = [f"127.0.0.{10 + i}" for i in range(10)]
CERTLESS_RELEASES = 45
FLOOD_REQUESTS = 10_000
FLOOD_THREADS = 8
SLOW_CONNECTIONS = 1_000
BIG_BODY = 256 << 20
HPKE_KEY = ec.generate_private_key(ec.SECP256R1())
HPKE_PUBLIC = HPKE_KEY.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
SIGNING_PUBLIC = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
CURVE_PUBLIC = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
CHIP_ID = slice(0x1A0, 0x1E0)


class _Kds429(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_response(429)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def kds_stub() -> Iterator[tuple[str, list[str]]]:
    requests: list[str] = []
    handler = type("Handler", (_Kds429,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def broker(tmp_path: Path, kds_stub: tuple[str, list[str]]) -> Iterator[tuple[BrokerProcess, OwnerStore]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SLOW_CONNECTIONS + 512:
        if hard != resource.RLIM_INFINITY and hard < SLOW_CONNECTIONS + 512:
            pytest.skip(f"needs {SLOW_CONNECTIONS + 512} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (SLOW_CONNECTIONS + 512, hard))
    store = OwnerStore.create(tmp_path / "owner")
    store.register_dataset(
        "claims",
        OutputPolicy.from_toml('[policy]\nid = "p"\n'),
        f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n',
    )
    url, _ = kds_stub
    environment = {"CONFNB_OFFLINE": "0", "CONFNB_KDS_URL": url, "CONFNB_KDS_CACHE": str(tmp_path / "kds")}
    process = BrokerProcess(tmp_path / "owner", env=environment)
    process.start()
    try:
        yield process, store
    finally:
        process.stop()


class Client:
    """Keep-alive HTTP from one loopback source address."""

    def __init__(self, port: int, source: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, dict[str, Any]]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            self.connection.request(method, path, body=payload, headers=headers)
            response = self.connection.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            self.connection.close()  # closed by the broker between requests (keep-alive timeout): reconnect once
            self.connection.request(method, path, body=payload, headers=headers)
            response = self.connection.getresponse()
        return response.status, json.loads(response.read())

    def close(self) -> None:
        self.connection.close()


def _evidence(backend: Any, nonce: str) -> dict[str, Any]:
    return issue_evidence(
        backend,
        bytes.fromhex(nonce),
        hpke_public_key=HPKE_PUBLIC,
        signing_public_key=SIGNING_PUBLIC,
        curve_public_key=CURVE_PUBLIC,
    ).to_dict()


def _certless(evidence: dict[str, Any]) -> dict[str, Any]:
    """The probe's request: no certificates, a made-up CHIP_ID, so only KDS could supply a VCEK."""
    report = bytearray(base64.b64decode(evidence["report"]))
    report[CHIP_ID] = secrets.token_bytes(64)
    return {**evidence, "tee": "sev-snp", "report": base64.b64encode(bytes(report)).decode(), "certs": {}}


def _big_body(port: int, chunked: bool) -> tuple[int, int]:
    """Send (or try to) a 256 MiB body; returns the status the broker answered and how many bytes it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(BIG_BODIES, 0)) as sock:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG_BODY}"
        head = f"POST /v1/datasets/claims/key-release HTTP/1.1\r\nHost: broker\r\n{framing}\r\n\r\n"
        sock.sendall(head.encode())
        block = b"0" * (1 << 20)
        if chunked:
            block = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        sent = 0
        reply = b""
        try:
            while sent < BIG_BODY and not reply:
                sock.sendall(block)
                sent += 1 << 20
                with contextlib.suppress(BlockingIOError):
                    reply += sock.recv(65536, socket.MSG_DONTWAIT)
            while sent < BIG_BODY:  # the broker has answered; does it still take the body?
                sock.sendall(block)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker closed the connection: what it should do with a body it will not read
        # Whatever it answered before closing is still in our receive buffer, reset or not.
        with contextlib.suppress(OSError):
            sock.settimeout(5)
            while chunk := sock.recv(65536):
                reply += chunk
        return (int(reply[9:12]) if reply.startswith(b"HTTP/1.1 ") else 0), sent


def _open_slow(port: int) -> dict[socket.socket, float]:
    """Connections that send half a request line and then nothing; each with the moment it was opened."""
    sockets = {}
    for index in range(SLOW_CONNECTIONS):
        sock = socket.socket()
        sock.bind((SLOW[index % len(SLOW)], 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"POST /v1/challenge HTTP/1.1\r\nHost: bro")  # and never another byte
        except OSError:
            pass  # refused at once (per-address cap): as good as closed
        sock.setblocking(False)
        sockets[sock] = time.monotonic()
    return sockets


def _closed_by_broker(sockets: dict[socket.socket, float], until: float) -> dict[socket.socket, float]:
    """How long after opening each socket the other side closed it (EOF or reset); waits until ``until`` at most."""
    closed: dict[socket.socket, float] = {}
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    remaining = len(sockets)
    while remaining and time.monotonic() < until:
        for key, _ in selector.select(timeout=max(0.0, min(1.0, until - time.monotonic()))):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue
            closed[sock] = time.monotonic() - sockets[sock]
            selector.unregister(sock)
            remaining -= 1
    selector.close()
    return closed


def test_strangers_cannot_starve_a_legitimate_release(broker, kds_stub, simulated_backend):
    process, store = broker
    _, kds_requests = kds_stub
    port = process.port
    broker_process = psutil.Process(process.pid)

    kernel = Client(port, KERNEL)

    def open_dataset() -> float:
        started = time.monotonic()
        status, challenge = kernel.call("POST", "/v1/challenge", {})
        assert status == 200, challenge
        status, grant = kernel.call(
            "POST", "/v1/datasets/claims/key-release", {"evidence": _evidence(simulated_backend, challenge["nonce"])}
        )
        assert status == 200, grant
        return time.monotonic() - started

    for _ in range(3):
        open_dataset()  # warm: imports, SQLite pages, the first HPKE seal
    baseline_rss = broker_process.memory_info().rss
    peak_rss = baseline_rss
    stop = threading.Event()

    def sample_memory() -> None:
        nonlocal peak_rss
        while not stop.is_set():
            peak_rss = max(peak_rss, broker_process.memory_info().rss)
            time.sleep(0.1)

    # -- the attack -----------------------------------------------------------------------------------------
    t0 = time.monotonic()
    slow = _open_slow(port)

    def certless_release(_: int) -> tuple[int, str]:
        client = Client(port, CERTLESS)
        try:
            status, challenge = client.call("POST", "/v1/challenge", {})
            assert status == 200, challenge
            evidence = _certless(_evidence(simulated_backend, challenge["nonce"]))
            status, denial = client.call("POST", "/v1/datasets/claims/key-release", {"evidence": evidence})
            return status, denial["reason"]
        finally:
            client.close()

    def flood(_: int) -> Counter[int]:
        client = Client(port, FLOOD)
        statuses: Counter[int] = Counter()
        try:
            for _ in range(FLOOD_REQUESTS // FLOOD_THREADS):
                statuses[client.call("POST", "/v1/challenge")[0]] += 1
        finally:
            client.close()
        return statuses

    memory = threading.Thread(target=sample_memory)
    memory.start()
    latencies: list[float] = []
    health: list[float] = []
    with ThreadPoolExecutor(CERTLESS_RELEASES + FLOOD_THREADS + 6) as pool:
        # Watched from the start, so that a connection closed at once is told from one closed at its deadline.
        watcher = pool.submit(_closed_by_broker, slow, t0 + LIMITS.request_timeout_s + 20)
        certless = [pool.submit(certless_release, i) for i in range(CERTLESS_RELEASES)]
        floods = [pool.submit(flood, i) for i in range(FLOOD_THREADS)]
        bodies = [pool.submit(_big_body, port, chunked) for chunked in (False, False, False, False, True)]
        attack = [*certless, *floods, *bodies]
        while not all(future.done() for future in attack) or time.monotonic() - t0 < 3:
            latencies.append(open_dataset())
            started = time.monotonic()
            assert kernel.call("GET", "/healthz")[0] == 200
            health.append(time.monotonic() - started)
        attack_s = time.monotonic() - t0
        denials = [future.result() for future in certless]
        flood_statuses = sum((future.result() for future in floods), Counter())
        big = [future.result() for future in bodies]
        # The connections that hold half a request: the ones past the per-address cap were closed at once, the
        # rest when their request deadline passed, and not before.
        closed = watcher.result()
    for sock in slow:
        sock.close()
    latencies.append(open_dataset())  # and the kernel is still served afterwards
    stop.set()
    memory.join()
    kernel.close()

    # -- what had to hold -----------------------------------------------------------------------------------
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert len(latencies) >= 5 and p99 < 2.0, (p99, latencies, attack_s)
    assert max(health) < 2.0, health
    assert Counter(status for status, _ in denials) == {403: CERTLESS_RELEASES}
    assert all("certificates" in reason for _, reason in denials), denials[:3]
    # KDS saw a handful of requests, not one per release (let alone retries): one before it said 429, then the
    # broker paused all fetches as told.
    assert 1 <= len(kds_requests) <= 5, kds_requests
    held = LIMITS.max_connections_per_client * len(SLOW)
    assert len(closed) == SLOW_CONNECTIONS, f"{SLOW_CONNECTIONS - len(closed)} slow connections still open"
    late = [after for after in closed.values() if after > 2]
    assert len(late) == held and min(late) >= LIMITS.request_timeout_s - 0.5, (len(late), min(late, default=None))
    assert flood_statuses[200] + flood_statuses[429] == FLOOD_REQUESTS
    assert flood_statuses[200] == LIMITS.max_challenges_per_client, flood_statuses
    assert [status for status, _ in big] == [413] * 5
    assert all(sent < 64 << 20 for _, sent in big), big  # the broker closed the connection long before 256 MiB
    growth = peak_rss - baseline_rss
    assert growth < 128 << 20, f"broker RSS grew by {growth >> 20} MiB (baseline {baseline_rss >> 20} MiB)"

    process.stop()  # graceful: the refused challenges counted since the last interval are audited on the way out
    verification = verify_log(process.owner / "audit.sqlite", store.owner_public_key)
    assert verification.ok, verification.problems
    refusals = [entry for entry in verification.entries if entry.kind == "denial"]
    by_actor = Counter(entry.actor.rsplit(":", 1)[0] for entry in refusals if "refused" not in entry.detail)
    assert by_actor[CERTLESS] == CERTLESS_RELEASES
    assert by_actor[BIG_BODIES] == len(big)
    refused_challenges = sum(
        entry.detail["count"]
        for entry in refusals
        if entry.detail.get("refused") == "challenge" and entry.actor == FLOOD
    )
    assert refused_challenges == flood_statuses[429]
    assert all(len(json.dumps(entry.detail)) < 4096 for entry in refusals)
    assert sum(1 for entry in verification.entries if entry.kind == "release") == len(latencies) + 3
    print(
        f"\nattack {attack_s:.1f} s; kernel p99 {p99:.3f} s over {len(latencies)} releases; /healthz max "
        f"{max(health):.3f} s; RSS {baseline_rss >> 20} -> {peak_rss >> 20} MiB; KDS requests {len(kds_requests)}; "
        f"audit entries {len(verification.entries)}"
    )
