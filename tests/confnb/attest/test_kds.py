"""Tests for the KDS client against a real HTTP server on 127.0.0.1 that serves genuine AMD certificates.

The server is real (sockets, HTTP parsing, status codes and headers all go through urllib) so that retry,
timeout and error handling are exercised the way they run against kdsintf.amd.com; only ``sleep`` is replaced,
so that rate-limit back-off is recorded instead of waited out.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import socket
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from confnb.attest import kds
from confnb.attest.certs import Role, load_certificates
from confnb.attest.errors import KdsError
from confnb.attest.kds import KdsClient, cert_chain_url, crl_url, vcek_url
from confnb.attest.report import AttestationReport, Product
from confnb.attest.tcb import TcbLayout, TcbVersion

# tests/confnb/attest/test_kds.py -> parents[3] is the repository root; the vectors live beside it.
VECTORS = Path(__file__).resolve().parents[3] / ".." / "shared" / "vectors" / "snp"

R2_CHIP = (
    "d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc"
    "15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6"
)
R2_VCEK_PATH = f"/vcek/v1/Milan/{R2_CHIP}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115"
R14_VCEK_PATH = "/vcek/v1/Turin/0910b4f884ff4ba9?fmcSPL=01&blSPL=03&teeSPL=02&snpSPL=05&ucodeSPL=97"
MILAN_CHAIN_PATH = "/vcek/v1/Milan/cert_chain"
MILAN_CRL_PATH = "/vcek/v1/Milan/crl"


# --- the real AMD vectors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vectors:
    root: Path

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def entry(self, vector_id: str) -> dict[str, Any]:
        entries: list[dict[str, Any]] = json.loads((self.root / "vectors.json").read_text())
        return next(e for e in entries if e["id"] == vector_id)

    def report(self, vector_id: str) -> AttestationReport:
        return AttestationReport.parse(self.read(self.entry(vector_id)["report"]))


@pytest.fixture(scope="module")
def vectors() -> Vectors:
    if not VECTORS.is_dir():
        pytest.skip("…/shared/vectors/snp not found: the real AMD vectors live beside the project")
    return Vectors(VECTORS.resolve())


@pytest.fixture(scope="module")
def r2(vectors: Vectors) -> tuple[bytes, TcbVersion, bytes]:
    """R2 (virtee Milan): CHIP_ID and REPORTED_TCB straight from the report, and its genuine VCEK."""
    report = vectors.report("R2")
    assert report.chip_id.hex() == vectors.entry("R2")["chip_id"] == R2_CHIP
    return report.chip_id, report.reported_tcb(Product.MILAN), vectors.read("virtee-sev/vcek_milan.der")


@pytest.fixture(scope="module")
def r14(vectors: Vectors) -> tuple[bytes, TcbVersion, bytes]:
    """R14 (openanolis Turin): a 64-byte CHIP_ID whose first 8 bytes are the hwID KDS knows."""
    report = vectors.report("R14")
    assert report.chip_id.hex() == vectors.entry("R14")["chip_id"]
    return (
        report.chip_id,
        report.reported_tcb(Product.TURIN),
        vectors.read("openanolis-trustee/turin-vcek.der"),
    )


def chain_ders(vectors: Vectors, name: str) -> list[bytes]:
    return [cert.der for cert in load_certificates(vectors.read(name))]


# --- a real HTTP server that plays KDS ----------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # the handler waits for this before answering (timeouts, races)


class FakeKds:
    """Routes exact request targets (path and query) to replies; the last reply of a route repeats."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests: list[str] = []
        self._routes: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self.holds: list[threading.Event] = []

    def route(self, target: str, *replies: Reply) -> None:
        with self._lock:
            self._routes[target] = list(replies)
            self.holds.extend(r.hold for r in replies if r.hold is not None)

    def serve(self, target: str, body: bytes) -> None:
        self.route(target, Reply(200, body))

    def next_reply(self, target: str) -> Reply:
        with self._lock:
            self.requests.append(target)
            replies = self._routes.get(target)
            if not replies:
                return Reply(404, b"Not Found")
            return replies.pop(0) if len(replies) > 1 else replies[0]


class _Server(ThreadingHTTPServer):
    kds: FakeKds

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout test) leaves a broken pipe behind; that is expected


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        reply = self.server.kds.next_reply(self.path)
        if reply.hold is not None:
            reply.hold.wait(10)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeKds]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    host, port = httpd.server_address[:2]
    httpd.kds = FakeKds(f"http://{host!s}:{port}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield httpd.kds
    finally:
        for hold in httpd.kds.holds:
            hold.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@dataclass
class Harness:
    server: FakeKds
    cache: Path
    sleeps: list[float]
    make: Callable[..., KdsClient]


@pytest.fixture
def h(server: FakeKds, tmp_path: Path) -> Harness:
    sleeps: list[float] = []
    cache = tmp_path / "cache"

    def make(**kwargs: Any) -> KdsClient:
        options: dict[str, Any] = {
            "cache_dir": cache,
            "base_url": server.url,
            "offline": False,
            # No proxy from the environment may stand between the client and 127.0.0.1.
            "opener": urllib.request.build_opener(urllib.request.ProxyHandler({})),
            "sleep": sleeps.append,
        }
        options.update(kwargs)
        return KdsClient(**options)

    return Harness(server, cache, sleeps, make)


def vcek_cache_file(cache: Path, product: str, hw_hex: str, tcb_hex: str) -> Path:
    return cache / "vcek" / product / hw_hex / f"{tcb_hex}.der"


# --- URLs ---------------------------------------------------------------------------------------------------


def test_vcek_url_milan_is_zero_padded_like_snpguest(r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    assert vcek_url("https://kdsintf.amd.com/", Product.MILAN, chip, tcb) == (f"https://kdsintf.amd.com{R2_VCEK_PATH}")


def test_vcek_url_turin_uses_8_byte_hwid_and_fmc(r14: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r14
    assert len(chip) == 64
    expected = f"https://kdsintf.amd.com{R14_VCEK_PATH}"
    assert vcek_url("https://kdsintf.amd.com", Product.TURIN, chip, tcb) == expected
    assert vcek_url("https://kdsintf.amd.com", Product.TURIN, chip[:8], tcb) == expected


def test_chain_and_crl_urls() -> None:
    base = "https://kdsintf.amd.com"
    assert cert_chain_url(base, Product.GENOA) == f"{base}/vcek/v1/Genoa/cert_chain"
    assert cert_chain_url(base, Product.TURIN, "vlek") == f"{base}/vlek/v1/Turin/cert_chain"
    assert crl_url(base, Product.MILAN) == f"{base}/vcek/v1/Milan/crl"
    assert crl_url(base, Product.MILAN, "vlek") == f"{base}/vlek/v1/Milan/crl"
    with pytest.raises(ValueError, match="signing_key"):
        cert_chain_url(base, Product.MILAN, "vek")


_spl = st.integers(min_value=0, max_value=255)


@given(
    product=st.sampled_from([Product.MILAN, Product.GENOA, Product.TURIN]),
    hw=st.binary(min_size=64, max_size=64).filter(lambda b: any(b[:8])),
    bl=_spl,
    tee=_spl,
    snp=_spl,
    ucode=_spl,
    fmc=_spl,
)
def test_vcek_url_format_property(
    product: Product, hw: bytes, bl: int, tee: int, snp: int, ucode: int, fmc: int
) -> None:
    turin = product is Product.TURIN
    if turin:
        hw = hw[:8] + bytes(56)  # a Turin CHIP_ID is the 8-byte hwID and zeros
    tcb = TcbVersion(product.tcb_layout, bl, tee, snp, ucode, fmc if turin else None)
    url = urllib.parse.urlsplit(vcek_url("https://kds.example", product, hw, tcb))
    assert url.path == f"/vcek/v1/{product.value}/{(hw[:8] if turin else hw).hex()}"
    query = [tuple(part.split("=")) for part in url.query.split("&")]
    names = ["blSPL", "teeSPL", "snpSPL", "ucodeSPL"]
    values = [bl, tee, snp, ucode]
    if turin:
        names, values = ["fmcSPL", *names], [fmc, *values]
    assert [name for name, _ in query] == names
    assert [text for _, text in query] == [f"{v:02d}" for v in values]
    assert all(len(text) >= 2 for _, text in query)


def test_vcek_url_rejects_caller_mixups() -> None:
    legacy = TcbVersion(TcbLayout.LEGACY, 3, 0, 8, 115)
    turin = TcbVersion(TcbLayout.TURIN, 3, 2, 5, 97, fmc=1)
    with pytest.raises(ValueError, match="64 bytes"):
        vcek_url("https://k", Product.MILAN, b"\x01" * 8, legacy)
    with pytest.raises(ValueError, match="Turin hwID"):
        vcek_url("https://k", Product.TURIN, b"\x01" * 16, turin)
    with pytest.raises(ValueError, match="layout"):
        vcek_url("https://k", Product.TURIN, b"\x01" * 8, legacy)
    with pytest.raises(ValueError, match="layout"):
        vcek_url("https://k", Product.GENOA, b"\x01" * 64, turin)
    with pytest.raises(ValueError, match="FMC"):
        vcek_url("https://k", Product.TURIN, b"\x01" * 8, TcbVersion(TcbLayout.TURIN, 3, 2, 5, 97))


# --- VCEKs: fetch, cache, offline ---------------------------------------------------------------------------


def test_vcek_fetched_once_then_served_from_cache(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    client = h.make()

    assert client.cached_vcek(Product.MILAN, chip, tcb) is None
    assert client.vcek(Product.MILAN, chip, tcb) == der
    assert h.server.requests == [R2_VCEK_PATH]
    assert vcek_cache_file(h.cache, "Milan", R2_CHIP, "0300000000000873").read_bytes() == der

    assert client.vcek(Product.MILAN, chip, tcb) == der
    assert h.make().vcek(Product.MILAN, chip, tcb) == der  # a new client (process) finds it on disk
    assert client.cached_vcek(Product.MILAN, chip, tcb) == der
    assert h.server.requests == [R2_VCEK_PATH]
    assert h.sleeps == []


def test_turin_vcek_uses_8_byte_hwid_on_the_wire_and_in_the_cache(
    h: Harness, r14: tuple[bytes, TcbVersion, bytes]
) -> None:
    chip, tcb, der = r14
    h.server.serve(R14_VCEK_PATH, der)
    client = h.make()
    assert client.vcek(Product.TURIN, chip, tcb) == der
    assert h.server.requests == [R14_VCEK_PATH]
    assert vcek_cache_file(h.cache, "Turin", "0910b4f884ff4ba9", "0103020500000061").read_bytes() == der
    # The 8-byte hwID (as in the VCEK) and the 64-byte CHIP_ID (as in the report) name the same entry.
    assert client.cached_vcek(Product.TURIN, chip[:8], tcb) == der


def test_offline_hit_needs_no_server(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    h.make().vcek(Product.MILAN, chip, tcb)
    offline = h.make(offline=True, base_url="http://127.0.0.1:9")  # nothing listens there
    assert offline.vcek(Product.MILAN, chip, tcb) == der
    assert h.server.requests == [R2_VCEK_PATH]


def test_offline_miss_raises_naming_the_cache_path(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    offline = h.make(offline=True)
    path = vcek_cache_file(h.cache, "Milan", R2_CHIP, "0300000000000873")
    with pytest.raises(KdsError, match="offline mode is on \\(CONFNB_OFFLINE\\)") as info:
        offline.vcek(Product.MILAN, chip, tcb)
    assert f"not in the cache at {path}" in str(info.value)
    with pytest.raises(KdsError, match=r"not in the cache at .*cert_chain/Milan/vcek\.pem"):
        offline.cert_chain(Product.MILAN)
    with pytest.raises(KdsError, match=r"not in the cache at .*crl/Turin/vlek\.crl"):
        offline.crl(Product.TURIN, "vlek")
    assert h.server.requests == []


def test_masked_chip_id_is_refused_without_a_request(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    _, tcb, _ = r2
    client = h.make()
    with pytest.raises(KdsError, match="all zero"):
        client.vcek(Product.MILAN, bytes(64), tcb)
    assert client.cached_vcek(Product.MILAN, bytes(64), tcb) is None
    assert h.server.requests == []


def test_turin_guess_for_a_milan_chip_id_is_refused_without_a_request(
    h: Harness, r2: tuple[bytes, TcbVersion, bytes]
) -> None:
    chip, _, _ = r2  # 64 bytes, non-zero after byte 8: cannot be a Turin CHIP_ID
    turin_tcb = TcbVersion(TcbLayout.TURIN, 3, 2, 5, 97, fmc=1)
    with pytest.raises(KdsError, match="not a Turin CHIP_ID"):
        h.make().vcek(Product.TURIN, chip, turin_tcb)
    assert h.server.requests == []


def test_reserved_tcb_bytes_do_not_split_the_cache(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    client = h.make()
    client.vcek(Product.MILAN, chip, tcb)
    odd = TcbVersion.decode(bytes.fromhex("0300ff0000000873"), TcbLayout.LEGACY)
    assert client.cached_vcek(Product.MILAN, chip, odd) == der


# --- rate limits and HTTP errors ----------------------------------------------------------------------------


def test_429_honours_retry_after_seconds(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.route(R2_VCEK_PATH, Reply(429, b"slow down", {"Retry-After": "2"}), Reply(200, der))
    assert h.make().vcek(Product.MILAN, chip, tcb) == der
    assert h.sleeps == [2.0]
    assert h.server.requests == [R2_VCEK_PATH, R2_VCEK_PATH]


def test_429_honours_retry_after_http_date(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    when = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5), usegmt=True)
    h.server.route(R2_VCEK_PATH, Reply(429, b"", {"Retry-After": when}), Reply(200, der))
    assert h.make().vcek(Product.MILAN, chip, tcb) == der
    assert len(h.sleeps) == 1
    assert 3.0 <= h.sleeps[0] <= 6.0  # HTTP-dates have one-second resolution


def test_503_without_retry_after_backs_off_exponentially(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    busy = Reply(503, b"busy")
    h.server.route(R2_VCEK_PATH, busy, busy, busy, Reply(200, der))
    assert h.make().vcek(Product.MILAN, chip, tcb) == der
    assert h.sleeps == [1.0, 2.0, 4.0]


def test_backoff_is_capped_at_30_s_and_bounded_by_max_wait(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    h.server.route(R2_VCEK_PATH, Reply(429, b"Too Many Requests"))
    with pytest.raises(KdsError) as info:
        h.make(max_wait_s=120).vcek(Product.MILAN, chip, tcb)
    # 1+2+4+8+16+30+30 = 91; the next 30 would reach 121 > 120.
    assert h.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert len(h.server.requests) == 8
    assert "91 s" in str(info.value)


def test_repeated_429_beyond_max_wait_raises(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    h.server.route(R2_VCEK_PATH, Reply(429, b"Too Many Requests"))
    client = h.make(max_wait_s=10)
    with pytest.raises(KdsError, match="429") as info:
        client.vcek(Product.MILAN, chip, tcb)
    message = str(info.value)
    assert f"{h.server.url}{R2_VCEK_PATH}" in message
    assert "7 s" in message  # 1 + 2 + 4 waited; another 8 would exceed 10
    assert "\n" not in message
    assert h.sleeps == [1.0, 2.0, 4.0]
    assert client.cached_vcek(Product.MILAN, chip, tcb) is None


def test_retry_after_longer_than_max_wait_gives_up_at_once(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    h.server.route(R2_VCEK_PATH, Reply(429, b"", {"Retry-After": "600"}))
    with pytest.raises(KdsError, match="HTTP 429"):
        h.make().vcek(Product.MILAN, chip, tcb)
    assert h.sleeps == []
    assert len(h.server.requests) == 1


def test_retry_after_zero_still_waits_so_the_loop_ends(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    h.server.route(R2_VCEK_PATH, Reply(429, b"", {"Retry-After": "0"}))
    with pytest.raises(KdsError, match="429"):
        h.make(max_wait_s=3).vcek(Product.MILAN, chip, tcb)
    assert h.sleeps == [1.0, 1.0, 1.0]


def test_404_raises_without_retry(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    with pytest.raises(KdsError, match=r"KDS has no certificate for .*\(404\)"):
        h.make().vcek(Product.MILAN, chip, tcb)
    assert h.server.requests == [R2_VCEK_PATH]
    assert h.sleeps == []


def test_other_http_errors_are_not_retried(h: Harness) -> None:
    h.server.route(MILAN_CHAIN_PATH, Reply(500, b"oops"))
    with pytest.raises(KdsError, match="HTTP 500"):
        h.make().cert_chain(Product.MILAN)
    assert h.server.requests == [MILAN_CHAIN_PATH]


def test_connection_refused_is_a_one_line_kds_error(tmp_path: Path, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    with socket.socket() as sock:  # grab a free port, then close it so that nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = KdsClient(
        cache_dir=tmp_path,
        base_url=f"http://127.0.0.1:{port}",
        offline=False,
        opener=urllib.request.build_opener(urllib.request.ProxyHandler({})),
    )
    with pytest.raises(KdsError, match="cannot fetch") as info:
        client.vcek(Product.MILAN, chip, tcb)
    assert "\n" not in str(info.value)


def test_timeout_is_a_kds_error(h: Harness) -> None:
    h.server.route(MILAN_CHAIN_PATH, Reply(200, b"", hold=threading.Event()))
    start = time.monotonic()
    with pytest.raises(KdsError, match=r"timed out after 0\.3 s"):
        h.make(timeout_s=0.3).cert_chain(Product.MILAN)
    assert time.monotonic() - start < 5


def test_min_interval_spaces_requests(h: Harness, vectors: Vectors, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    h.server.serve(MILAN_CHAIN_PATH, vectors.read("go-sev-guest/verify_trust_ask_ark_milan.pem"))
    client = h.make(min_interval_s=10)
    client.vcek(Product.MILAN, chip, tcb)
    assert h.sleeps == []
    client.cert_chain(Product.MILAN)
    assert len(h.sleeps) == 1
    assert 9.0 < h.sleeps[0] <= 10.0


# --- validation before caching ------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"", b"<html>rate limited</html>", b"0\x82\x01\x00truncated"])
def test_garbage_vcek_is_an_error_and_not_cached(
    h: Harness, r2: tuple[bytes, TcbVersion, bytes], garbage: bytes
) -> None:
    chip, tcb, _ = r2
    h.server.serve(R2_VCEK_PATH, garbage)
    with pytest.raises(KdsError, match="not the VCEK"):
        h.make().vcek(Product.MILAN, chip, tcb)
    assert not vcek_cache_file(h.cache, "Milan", R2_CHIP, "0300000000000873").exists()


def test_vcek_for_another_chip_is_not_cached(h: Harness, vectors: Vectors, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    # trustee's test VCEK is a genuine Milan VCEK at the same TCB, but for chip c38427a3….
    h.server.serve(R2_VCEK_PATH, vectors.read("trustee/test_data_snp_test-vcek.der"))
    with pytest.raises(KdsError, match="hwID"):
        h.make().vcek(Product.MILAN, chip, tcb)
    assert h.make().cached_vcek(Product.MILAN, chip, tcb) is None


def test_garbage_chain_and_crl_are_errors_and_not_cached(h: Harness) -> None:
    h.server.serve(MILAN_CHAIN_PATH, b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    h.server.serve(MILAN_CRL_PATH, b"<html>maintenance</html>")
    client = h.make()
    with pytest.raises(KdsError, match="not the Milan VCEK certificate chain"):
        client.cert_chain(Product.MILAN)
    with pytest.raises(KdsError, match="not the Milan VCEK CRL"):
        client.crl(Product.MILAN)
    assert not (h.cache / "cert_chain").exists()
    assert not (h.cache / "crl").exists()


@pytest.mark.parametrize(
    ("served", "target", "signing_key", "why"),
    [
        ("go-sev-guest/verify_trust_ask_ark_milan.pem", "/vlek/v1/Milan/cert_chain", "vlek", "ASVK and ARK"),
        ("go-sev-guest/verify_trust_ask_ark_genoa.pem", MILAN_CHAIN_PATH, "vcek", "not a Milan"),
        ("virtee-sev/milan_ask.pem", MILAN_CHAIN_PATH, "vcek", "expected 2 certificates"),
        ("trustee/src_snp_milan_ask_ark_asvk.pem", MILAN_CHAIN_PATH, "vcek", "expected 2 certificates"),
    ],
)
def test_wrong_chain_is_rejected(
    h: Harness, vectors: Vectors, served: str, target: str, signing_key: str, why: str
) -> None:
    h.server.serve(target, vectors.read(served))
    with pytest.raises(KdsError, match=why):
        h.make().cert_chain(Product.MILAN, signing_key)
    assert not (h.cache / "cert_chain").exists()


def test_corrupt_cached_vcek_is_refetched_and_overwritten(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    path = vcek_cache_file(h.cache, "Milan", R2_CHIP, "0300000000000873")
    path.parent.mkdir(parents=True)
    path.write_bytes(der[: len(der) // 2])
    client = h.make()
    assert client.cached_vcek(Product.MILAN, chip, tcb) is None
    assert client.vcek(Product.MILAN, chip, tcb) == der
    assert path.read_bytes() == der
    assert h.server.requests == [R2_VCEK_PATH]


def test_corrupt_cached_chain_is_refetched(h: Harness, vectors: Vectors) -> None:
    pem = vectors.read("go-sev-guest/verify_trust_ask_ark_milan.pem")
    h.server.serve(MILAN_CHAIN_PATH, pem)
    path = h.cache / "cert_chain" / "Milan" / "vcek.pem"
    path.parent.mkdir(parents=True)
    path.write_bytes(pem[:100])
    assert h.make().cert_chain(Product.MILAN) == chain_ders(vectors, "go-sev-guest/verify_trust_ask_ark_milan.pem")
    assert h.server.requests == [MILAN_CHAIN_PATH]
    assert load_certificates(path.read_bytes())[1].role is Role.ARK


def test_corrupt_cache_offline_is_a_miss_not_a_crash(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    path = vcek_cache_file(h.cache, "Milan", R2_CHIP, "0300000000000873")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(KdsError, match="offline mode is on"):
        h.make(offline=True).vcek(Product.MILAN, chip, tcb)


# --- product chains -----------------------------------------------------------------------------------------


def test_cert_chain_fetched_once_as_ask_then_ark(h: Harness, vectors: Vectors) -> None:
    name = "go-sev-guest/verify_trust_ask_ark_milan.pem"
    h.server.serve(MILAN_CHAIN_PATH, vectors.read(name))
    client = h.make()
    chain = client.cert_chain(Product.MILAN)
    assert chain == chain_ders(vectors, name)
    assert [c.common_name for c in load_certificates(b"".join(_pem(d) for d in chain))] == [
        "SEV-Milan",
        "ARK-Milan",
    ]
    assert (h.cache / "cert_chain" / "Milan" / "vcek.pem").is_file()
    assert client.cert_chain(Product.MILAN) == chain
    assert client.cached_cert_chain(Product.MILAN) == chain
    assert h.server.requests == [MILAN_CHAIN_PATH]


@pytest.mark.parametrize(
    ("product", "name"),
    [
        (Product.MILAN, "go-sev-guest/verify_trust_ask_ark_milan_vlek.pem"),
        (Product.GENOA, "go-sev-guest/verify_trust_ask_ark_genoa_vlek.pem"),
        (Product.TURIN, "go-sev-guest/verify_trust_ask_ark_turin_vlek.pem"),
    ],
)
def test_vlek_chain_is_asvk_then_ark(h: Harness, vectors: Vectors, product: Product, name: str) -> None:
    target = f"/vlek/v1/{product.value}/cert_chain"
    h.server.serve(target, vectors.read(name))
    client = h.make()
    chain = client.cert_chain(product, "vlek")
    assert [load_certificates(d)[0].common_name for d in chain] == [
        f"SEV-VLEK-{product.value}",
        f"ARK-{product.value}",
    ]
    assert client.cached_cert_chain(product, "vcek") is None  # the VCEK chain is a separate entry
    assert (h.cache / "cert_chain" / product.value / "vlek.pem").is_file()
    assert h.server.requests == [target]


def test_store_cert_chain_warms_the_cache(h: Harness, vectors: Vectors) -> None:
    ask, ark = chain_ders(vectors, "go-sev-guest/verify_trust_ask_ark_turin_vcek.pem")
    client = h.make()
    client.store_cert_chain(Product.TURIN, "vcek", [ark, ask])  # order as found in evidence does not matter
    assert client.cached_cert_chain(Product.TURIN) == [ask, ark]
    assert client.cert_chain(Product.TURIN) == [ask, ark]
    assert h.server.requests == []


def test_store_cert_chain_refuses_a_mismatched_pair(h: Harness, vectors: Vectors) -> None:
    milan_ask, _ = chain_ders(vectors, "go-sev-guest/verify_trust_ask_ark_milan.pem")
    _, genoa_ark = chain_ders(vectors, "go-sev-guest/verify_trust_ask_ark_genoa.pem")
    client = h.make()
    with pytest.raises(KdsError, match="not caching"):
        client.store_cert_chain(Product.MILAN, "vcek", [milan_ask, genoa_ark])
    with pytest.raises(KdsError, match="not caching"):
        client.store_cert_chain(Product.MILAN, "vcek", [milan_ask, b"\x30\x03junk"])
    assert client.cached_cert_chain(Product.MILAN) is None


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


# --- CRLs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crl_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_crl(key: rsa.RSAPrivateKey, next_update: dt.datetime, serial: int = 1) -> bytes:
    """A throwaway ARK-style CRL: AMD publishes real ones, but none is among the vectors."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ARK-Milan")])
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(next_update - dt.timedelta(days=2))
        .build()
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(next_update - dt.timedelta(days=1))
        .next_update(next_update)
        .add_revoked_certificate(revoked)
    )
    return builder.sign(key, hashes.SHA384()).public_bytes(Encoding.DER)


def test_fresh_crl_is_cached_until_next_update(h: Harness, crl_key: rsa.RSAPrivateKey) -> None:
    fresh = make_crl(crl_key, dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    h.server.serve(MILAN_CRL_PATH, fresh)
    client = h.make()
    assert client.crl(Product.MILAN) == fresh
    assert client.crl(Product.MILAN) == fresh
    assert h.server.requests == [MILAN_CRL_PATH]
    assert (h.cache / "crl" / "Milan" / "vcek.crl").read_bytes() == fresh


def test_stale_crl_is_refetched(h: Harness, crl_key: rsa.RSAPrivateKey) -> None:
    now = dt.datetime.now(dt.UTC)
    stale = make_crl(crl_key, now - dt.timedelta(hours=1), serial=1)
    fresh = make_crl(crl_key, now + dt.timedelta(days=7), serial=2)
    h.server.route(MILAN_CRL_PATH, Reply(200, stale), Reply(200, fresh))
    client = h.make()
    assert client.crl(Product.MILAN) == stale  # nothing better was available
    assert client.crl(Product.MILAN) == fresh  # nextUpdate had passed: asked again
    assert client.crl(Product.MILAN) == fresh
    assert h.server.requests == [MILAN_CRL_PATH, MILAN_CRL_PATH]
    assert (h.cache / "crl" / "Milan" / "vcek.crl").read_bytes() == fresh


def test_stale_crl_offline_is_returned_but_online_failure_raises(h: Harness, crl_key: rsa.RSAPrivateKey) -> None:
    stale = make_crl(crl_key, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    target = "/vlek/v1/Milan/crl"
    h.server.route(target, Reply(200, stale), Reply(404, b""))
    h.make().crl(Product.MILAN, "vlek")
    assert h.make(offline=True).crl(Product.MILAN, "vlek") == stale
    with pytest.raises(KdsError, match=r"past its nextUpdate .*CONFNB_OFFLINE"):
        h.make().crl(Product.MILAN, "vlek")
    assert h.server.requests == [target, target]


def test_corrupt_cached_crl_is_refetched(h: Harness, crl_key: rsa.RSAPrivateKey) -> None:
    fresh = make_crl(crl_key, dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    h.server.serve(MILAN_CRL_PATH, fresh)
    path = h.cache / "crl" / "Milan" / "vcek.crl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x30\x82garbage")
    assert h.make().crl(Product.MILAN) == fresh
    assert path.read_bytes() == fresh


# --- the cache on disk, threads, configuration --------------------------------------------------------------


def test_cache_dirs_are_private_and_writes_leave_no_temp_files(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    h.make().vcek(Product.MILAN, chip, tcb)
    path = vcek_cache_file(h.cache, "Milan", R2_CHIP, "0300000000000873")
    for directory in [h.cache, *[p for p in path.parents if h.cache in p.parents]]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert os.listdir(path.parent) == [path.name]


def test_unwritable_cache_does_not_fail_the_fetch(
    h: Harness, tmp_path: Path, r2: tuple[bytes, TcbVersion, bytes]
) -> None:
    chip, tcb, der = r2
    h.server.serve(R2_VCEK_PATH, der)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert h.make(cache_dir=blocker / "kds").vcek(Product.MILAN, chip, tcb) == der


def test_concurrent_requests_for_one_vcek_fetch_it_once(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    release = threading.Event()
    h.server.route(R2_VCEK_PATH, Reply(200, der, hold=release))
    client = h.make()
    results: list[bytes] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(client.vcek(Product.MILAN, chip, tcb))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while not h.server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the other seven are now waiting; without the per-entry lock they would be requesting
    release.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert results == [der] * 8
    assert h.server.requests == [R2_VCEK_PATH]


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CONFNB_KDS_CACHE", raising=False)
    monkeypatch.delenv("CONFNB_KDS_URL", raising=False)
    monkeypatch.delenv("CONFNB_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    client = KdsClient()
    assert client.cache_dir == tmp_path / "xdg" / "confnb" / "kds"
    assert client.base_url == "https://kdsintf.amd.com"
    assert client.offline is False

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert KdsClient().cache_dir == tmp_path / "home" / ".cache" / "confnb" / "kds"

    monkeypatch.setenv("CONFNB_KDS_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("CONFNB_KDS_URL", "http://kds.mirror.example/")
    monkeypatch.setenv("CONFNB_OFFLINE", "yes")
    client = KdsClient()
    assert client.cache_dir == tmp_path / "explicit"
    assert client.base_url == "http://kds.mirror.example"
    assert client.offline is True
    assert KdsClient(offline=False).offline is False  # an explicit argument beats the environment


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_offline_env_values(monkeypatch: pytest.MonkeyPatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("CONFNB_OFFLINE", value)
    assert KdsClient(cache_dir=Path("unused")).offline is offline


def test_non_http_base_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        KdsClient(cache_dir=Path("unused"), base_url="file:///etc")


def test_module_exports() -> None:
    assert set(kds.__all__) >= {"KdsClient", "vcek_url"}


# --- the server's client: never waits, bounded, remembers -------------------------------------------------


def server_client(h: Harness, **kwargs: Any) -> KdsClient:
    """What KdsClient.for_server builds, pointed at the fake KDS."""
    options: dict[str, Any] = {
        "timeout_s": 5.0,
        "max_wait_s": 0.0,
        "wait": False,
        "max_in_flight": 1,
        "deadline_s": 5.0,
        "negative_ttl_s": 300.0,
    }
    options.update(kwargs)
    return h.make(**options)


def test_for_server_never_waits_and_bounds_everything(tmp_path: Path) -> None:
    client = KdsClient.for_server(cache_dir=tmp_path, base_url="http://127.0.0.1:9", offline=False)
    assert client.wait is False and client.max_wait_s == 0 and client.deadline_s == 5.0
    assert client.negative_ttl_s == 300.0 and client._slots is not None


def test_server_client_defers_a_second_asker_of_one_entry(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    release = threading.Event()
    h.server.route(R2_VCEK_PATH, Reply(200, der, hold=release))
    client = server_client(h)
    first: list[bytes] = []
    fetching = threading.Thread(target=lambda: first.append(client.vcek(Product.MILAN, chip, tcb)))
    fetching.start()
    deadline = time.monotonic() + 5
    while not h.server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(kds.KdsDeferredError, match="being fetched from KDS for another request"):
        client.vcek(Product.MILAN, chip, tcb)
    assert time.monotonic() - started < 1  # told at once, not queued behind the fetch
    release.set()
    fetching.join(10)
    assert first == [der]
    assert client.vcek(Product.MILAN, chip, tcb) == der  # the legitimate twin: the retry is served from the cache
    assert h.server.requests == [R2_VCEK_PATH] and h.sleeps == []
    assert client._key_locks == {}  # no lock outlives its users


def test_server_client_bounds_fetches_in_flight(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    release = threading.Event()
    h.server.route(R2_VCEK_PATH, Reply(200, der, hold=release))
    client = server_client(h)
    fetching = threading.Thread(target=client.vcek, args=(Product.MILAN, chip, tcb))
    fetching.start()
    deadline = time.monotonic() + 5
    while not h.server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(kds.KdsDeferredError, match="other KDS fetches are in progress"):
        client.vcek(Product.MILAN, os.urandom(64), tcb)
    release.set()
    fetching.join(10)
    assert h.server.requests == [R2_VCEK_PATH]


def test_server_client_pauses_every_fetch_after_429(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    h.server.route(R2_VCEK_PATH, Reply(429, headers={"Retry-After": "30"}))
    client = server_client(h)
    with pytest.raises(kds.KdsDeferredError, match=r"HTTP 429.*no KDS requests for 30 s"):
        client.vcek(Product.MILAN, chip, tcb)
    for _ in range(20):  # made-up chips, as a flood of certificate-less evidence would bring
        with pytest.raises(kds.KdsDeferredError, match="paused for another"):
            client.vcek(Product.MILAN, os.urandom(64), tcb)
    assert h.server.requests == [R2_VCEK_PATH] and h.sleeps == []  # one request, no retry, no waiting


def test_server_client_caps_an_absurd_retry_after(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, _ = r2
    h.server.route(R2_VCEK_PATH, Reply(503, headers={"Retry-After": "999999999"}))
    with pytest.raises(kds.KdsDeferredError, match=f"no KDS requests for {kds.MAX_SERVER_BACKOFF_S:g} s"):
        server_client(h).vcek(Product.MILAN, chip, tcb)


def test_server_client_remembers_a_failure_for_a_while(
    h: Harness, r2: tuple[bytes, TcbVersion, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    chip, tcb, der = r2
    client = server_client(h)
    missing = os.urandom(64)
    with pytest.raises(KdsError, match="404"):
        client.vcek(Product.MILAN, missing, tcb)
    with pytest.raises(KdsError, match="failed recently; KDS is not asked again"):
        client.vcek(Product.MILAN, missing, tcb)
    assert len(h.server.requests) == 1
    h.server.serve(R2_VCEK_PATH, der)
    assert client.vcek(Product.MILAN, chip, tcb) == der  # the legitimate twin: another entry is still fetched
    assert len(h.server.requests) == 2
    monkeypatch.setattr(kds, "MAX_REMEMBERED_FAILURES", 3)
    for _ in range(6):
        with pytest.raises(KdsError, match="404"):
            client.vcek(Product.MILAN, os.urandom(64), tcb)
    assert len(client._failures) == 3  # the memory of failures is bounded, oldest forgotten first


def test_server_client_remembered_failure_expires(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    client = server_client(h, negative_ttl_s=0.2)
    with pytest.raises(KdsError, match="404"):
        client.vcek(Product.MILAN, chip, tcb)
    h.server.serve(R2_VCEK_PATH, der)
    time.sleep(0.3)
    assert client.vcek(Product.MILAN, chip, tcb) == der


def test_deadline_bounds_one_fetch(h: Harness, r2: tuple[bytes, TcbVersion, bytes]) -> None:
    chip, tcb, der = r2
    h.server.route(R2_VCEK_PATH, Reply(200, der, hold=threading.Event()))
    started = time.monotonic()
    with pytest.raises(KdsError, match="timed out"):
        server_client(h, deadline_s=0.5).vcek(Product.MILAN, chip, tcb)
    assert time.monotonic() - started < 3
