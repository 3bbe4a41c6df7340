"""A client for AMD's Key Distribution Service (KDS) with an on-disk cache.

KDS throttles hard (about one request per 10 s per client, HTTP 429 otherwise) and is sometimes unreachable,
while what it serves barely changes: a VCEK for a (product, hwID, TCB) triple is immutable, the ASK/ARK chains
live for 25 years, and only the CRLs roll over. So everything is cached on disk and the network is the
fallback, never the first resort; with ``CONFNB_OFFLINE`` it is never used at all.

A server (the key broker) must not let a stranger's request make it wait on AMD: evidence without certificates and
with a made-up CHIP_ID would otherwise buy a fetch, with retries, per request. :meth:`KdsClient.for_server` builds a
client that never waits: one fetch per cache entry at a time (single-flight; a second asker is told to retry, not
queued), a bounded number of fetches at all, no retry loop, one short deadline per fetch, a pause for every fetch
after KDS answers 429/503, and failures remembered per entry for a while, so a flood costs AMD and the broker a
handful of requests instead of one per request.

The cache is *not* a trust anchor: the verifier checks every signature up to a pinned ARK no matter where a
certificate came from. What is checked here is only that a response is the kind of object that was asked for
(and, for a VCEK, that it is for the requested chip and TCB), because anything cached is kept for a long
time: a broken or mismatched response that got cached would fail every later verification until someone
deleted it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import http.client
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from confnb.attest.certs import KDS_ORIGIN, Cert, Role, load_certificates, vek_extensions
from confnb.attest.errors import CertificateError, KdsError
from confnb.attest.report import Product
from confnb.attest.tcb import TcbLayout, TcbVersion
from confnb.fileio import write_atomically

__all__ = [
    "DEFAULT_BASE_URL",
    "KdsClient",
    "KdsDeferredError",
    "cert_chain_url",
    "crl_url",
    "default_cache_dir",
    "vcek_url",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = KDS_ORIGIN
ENV_CACHE = "CONFNB_KDS_CACHE"
ENV_URL = "CONFNB_KDS_URL"
ENV_OFFLINE = "CONFNB_OFFLINE"
_TRUTHY = frozenset({"1", "true", "yes"})

SIGNING_KEYS = ("vcek", "vlek")
_INTERMEDIATE_ROLE = {"vcek": Role.ASK, "vlek": Role.ASVK}

# go-sev-guest's getter: start at 1 s, double, never wait more than 30 s at a time. The floor stops a server
# that keeps answering "Retry-After: 0" from turning the retry loop into a busy loop that never reaches
# max_wait_s.
INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MIN_RETRY_DELAY_S = 1.0
_RETRY_STATUSES = frozenset({429, 503})
# AMD's responses are a few KiB; the cap keeps a misbehaving proxy from making us buffer something huge.
MAX_RESPONSE_BYTES = 1 << 20
_USER_AGENT = "confnb-kds/1"
_READ_CHUNK = 64 * 1024
# A server's pause after 429/503 without a usable Retry-After, and the longest it believes one: a Retry-After of
# years (a broken proxy) must not switch fetching off for good.
SERVER_BACKOFF_S = 10.0
MAX_SERVER_BACKOFF_S = 600.0
# How many failed cache entries a client remembers; the oldest is forgotten first. Random CHIP_IDs make new
# entries without end, so the memory of failures has to be bounded too.
MAX_REMEMBERED_FAILURES = 4096


def default_cache_dir() -> Path:
    """Where certificates are cached unless told otherwise: ``$CONFNB_KDS_CACHE``, else the XDG cache."""
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored, not resolved against the cwd.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "confnb" / "kds"


def _offline_from_env() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in _TRUTHY


def _check_product(product: Product) -> None:
    if not isinstance(product, Product):
        raise TypeError(f"product must be a confnb.attest.report.Product, not {type(product).__name__}")


def _normalise_hw_id(product: Product, hw_id: bytes) -> bytes:
    """The hwID as KDS knows it: 64 bytes for Milan/Genoa, the first 8 bytes of CHIP_ID for Turin.

    Turin reports still carry a 64-byte CHIP_ID (zero after byte 8); sending all 64 bytes gets a 404 from KDS
    (AMDESE/AMDSEV#285), so both forms are accepted and reduced to the 8 bytes that name the chip. A CHIP_ID
    with anything after byte 8 is not a Turin chip's (a caller trying each product for a v2 report), and
    asking KDS would only spend a rate-limited request on a 404.
    """
    _check_product(product)
    raw = bytes(hw_id)
    if product is Product.TURIN:
        if len(raw) not in (8, 64):
            raise ValueError(f"a Turin hwID is 8 bytes (or a 64-byte CHIP_ID), not {len(raw)}")
        if any(raw[8:]):
            raise KdsError("not a Turin CHIP_ID: bytes 8-63 are not zero, so KDS has no Turin VCEK for it")
        raw = raw[:8]
    elif len(raw) != 64:
        raise ValueError(f"a {product.value} hwID is 64 bytes, not {len(raw)}")
    if not any(raw):
        # MASK_CHIP_ID zeroes CHIP_ID; KDS can only answer 404 for it, and a 404 costs a rate-limited request.
        raise KdsError(
            f"cannot fetch a VCEK for a {product.value} report whose CHIP_ID is all zero (masked chip ID); "
            "the VCEK must come with the evidence"
        )
    return raw


def _check_tcb(product: Product, tcb: TcbVersion) -> None:
    # A TCB decoded with the wrong layout yields plausible but wrong SPLs, and KDS would happily sign a VCEK
    # for them that can never match the report; fail loudly on the caller's mix-up instead.
    if tcb.layout is not product.tcb_layout:
        raise ValueError(
            f"{product.value} needs a TCB in the {product.tcb_layout.value} layout, not {tcb.layout.value}"
        )
    if tcb.layout is TcbLayout.TURIN and tcb.fmc is None:
        raise ValueError("a Turin TCB needs an FMC SPL")


def _check_signing_key(signing_key: str) -> str:
    key = str(signing_key).lower()
    if key not in SIGNING_KEYS:
        raise ValueError(f"signing_key must be 'vcek' or 'vlek', not {signing_key!r}")
    return key


def _spl(value: int) -> str:
    # snpguest and trustee zero-pad to two digits; KDS accepts both, and one spelling keeps cache misses and
    # server logs comparable with theirs.
    return f"{value:02d}"


def vcek_url(base_url: str, product: Product, hw_id: bytes, tcb: TcbVersion) -> str:
    """The KDS URL of the VCEK for ``hw_id`` at ``tcb``; Turin gets the 8-byte hwID and an ``fmcSPL``."""
    hw = _normalise_hw_id(product, hw_id)
    _check_tcb(product, tcb)
    query = [("blSPL", tcb.bootloader), ("teeSPL", tcb.tee), ("snpSPL", tcb.snp), ("ucodeSPL", tcb.microcode)]
    if product is Product.TURIN:
        assert tcb.fmc is not None  # _check_tcb
        query.insert(0, ("fmcSPL", tcb.fmc))
    params = "&".join(f"{name}={_spl(value)}" for name, value in query)
    return f"{base_url.rstrip('/')}/vcek/v1/{product.value}/{hw.hex()}?{params}"


def cert_chain_url(base_url: str, product: Product, signing_key: str = "vcek") -> str:
    """The KDS URL of the PEM chain (ASK or ASVK, then ARK) for ``product``."""
    _check_product(product)
    key = _check_signing_key(signing_key)
    return f"{base_url.rstrip('/')}/{key}/v1/{product.value}/cert_chain"


def crl_url(base_url: str, product: Product, signing_key: str = "vcek") -> str:
    """The KDS URL of the ARK-signed DER CRL that covers the ASK (``vcek``) or ASVK (``vlek``)."""
    _check_product(product)
    key = _check_signing_key(signing_key)
    return f"{base_url.rstrip('/')}/{key}/v1/{product.value}/crl"


def _short_hex(raw: bytes) -> str:
    text = raw.hex()
    return text if len(text) <= 16 else f"{text[:8]}…{text[-4:]}"


def _retry_after_seconds(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait per a Retry-After header (delay-seconds or HTTP-date); None if absent or invalid."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"\d{1,10}", text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate_to_datetime leaves "-0000" naive
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def _network_reason(exc: BaseException, timeout_s: float) -> str:
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    text = str(reason) or type(reason).__name__
    return " ".join(text.split())  # one line, whatever the OS put in the message


# --- what a valid response looks like ---------------------------------------------------------------------


def _validate_vcek(der: bytes, product: Product, hw_id: bytes, tcb: TcbVersion) -> str | None:
    """Why ``der`` is not the VCEK for (product, hw_id, tcb), or None if it is.

    Beyond "is a certificate" this compares the KDS extensions with the request: a VCEK is cached forever, so
    a certificate for another chip or TCB (a confused mirror, a stale proxy) would otherwise poison the cache
    for good. Signatures are left to the verifier.
    """
    if not der or der[0] != 0x30:
        return "not DER (does not start with a SEQUENCE)"
    try:
        (cert,) = load_certificates(der, "VCEK")
        extensions = vek_extensions(der)
    except (CertificateError, ValueError) as exc:
        return str(exc)
    if cert.role is not Role.VCEK:
        return f"certificate is {cert.common_name!r}, not a VCEK"
    if extensions.product is not product:
        return f"certificate is for product {extensions.product_name!r}, not {product.value}"
    if extensions.hw_id != hw_id:
        have = _short_hex(extensions.hw_id) if extensions.hw_id is not None else "none"
        return f"certificate is for hwID {have}, not {_short_hex(hw_id)}"
    wanted = tcb.components()
    have_spls = {name: extensions.spls.get(name) for name in wanted}
    if have_spls != wanted:
        return f"certificate TCB {have_spls} differs from the requested {wanted}"
    return None


def _parse_chain(data: bytes, product: Product, signing_key: str, *, check_signatures: bool) -> list[Cert]:
    """Parse a product chain into ``[ASK or ASVK, ARK]``, accepting either order; raises ValueError."""
    certs = load_certificates(data, f"{product.value} {signing_key} cert_chain")
    if len(certs) != 2:
        raise ValueError(f"expected 2 certificates (ASK/ASVK and ARK), got {len(certs)}")
    role = _INTERMEDIATE_ROLE[signing_key]
    by_role = {cert.role: cert for cert in certs}
    if set(by_role) != {role, Role.ARK}:
        names = ", ".join(cert.common_name for cert in certs)
        raise ValueError(f"expected {role.value} and ARK, got {names}")
    intermediate, ark = by_role[role], by_role[Role.ARK]
    for cert in (intermediate, ark):
        if cert.product is not product:
            raise ValueError(f"{cert.common_name} is not a {product.value} certificate")
    if check_signatures:
        # Not a trust decision (the ARK here is unpinned): it only keeps a mismatched pair out of the cache.
        try:
            ark.certificate.verify_directly_issued_by(ark.certificate)
            intermediate.certificate.verify_directly_issued_by(ark.certificate)
        except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as exc:
            raise ValueError(f"{intermediate.common_name} is not signed by {ark.common_name}: {exc}") from None
    return [intermediate, ark]


def _parse_crl(der: bytes) -> x509.CertificateRevocationList:
    if not der or der[0] != 0x30:
        raise ValueError("not a DER CRL (does not start with a SEQUENCE)")
    return x509.load_der_x509_crl(der)


def _crl_is_stale(crl: x509.CertificateRevocationList, now: dt.datetime) -> bool:
    # RFC 5280 requires nextUpdate; a CRL without one cannot say how long it is good for, so it is never
    # fresh.
    next_update = crl.next_update_utc
    return next_update is None or next_update <= now


class KdsDeferredError(KdsError):
    """A fetch was not attempted (another is in flight, the budget is spent, KDS asked us to pause): retry later."""


@dataclass
class _KeyLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class KdsClient:
    """Fetches VCEKs, product chains and CRLs from KDS, cache first; safe to share between threads.

    The cache layout (under ``cache_dir``) is meant to be inspectable and pre-seedable by hand for air-gapped
    hosts: ``vcek/<Product>/<hwID hex>/<TCB hex>.der``, ``cert_chain/<Product>/<vcek|vlek>.pem`` and
    ``crl/<Product>/<vcek|vlek>.crl``.

    By default a caller waits: for another thread fetching the same entry, for ``min_interval_s`` and for KDS's
    Retry-After (within ``max_wait_s``), which suits a command line. ``wait=False`` never waits (see the module
    docstring); ``max_in_flight`` bounds concurrent fetches, ``deadline_s`` bounds one fetch end to end and
    ``negative_ttl_s`` is how long a failed entry is answered from memory.
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        base_url: str | None = None,
        offline: bool | None = None,
        timeout_s: float = 10.0,
        max_wait_s: float = 120.0,
        opener: urllib.request.OpenerDirector | None = None,
        *,
        min_interval_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        wait: bool = True,
        max_in_flight: int | None = None,
        deadline_s: float | None = None,
        negative_ttl_s: float = 0.0,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        url = base_url if base_url is not None else os.environ.get(ENV_URL) or DEFAULT_BASE_URL
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            # urllib would also open file:// and ftp:// URLs; a KDS mirror is only ever HTTP(S).
            raise ValueError(f"KDS base URL must be http(s), not {url!r}")
        self.base_url = url.rstrip("/")
        self.offline = _offline_from_env() if offline is None else bool(offline)
        if timeout_s <= 0 or max_wait_s < 0 or min_interval_s < 0 or negative_ttl_s < 0:
            raise ValueError("timeout_s must be positive; max_wait_s, min_interval_s and negative_ttl_s non-negative")
        if (max_in_flight is not None and max_in_flight < 1) or (deadline_s is not None and deadline_s <= 0):
            raise ValueError("max_in_flight must be at least 1 and deadline_s positive")
        self.timeout_s = float(timeout_s)
        self.max_wait_s = float(max_wait_s)
        self.min_interval_s = float(min_interval_s)
        self._opener = opener if opener is not None else urllib.request.build_opener()
        self._sleep = sleep
        self._throttle_lock = threading.Lock()
        self._next_request_at = float("-inf")
        # One lock per cache file: concurrent verifications of reports from one chip fetch its VCEK once
        # instead of each spending a request of KDS's tiny budget (and it serialises writes to that file).
        # Entries live only while someone holds or waits for them, so made-up CHIP_IDs cannot grow the map.
        self._key_locks: dict[Path, _KeyLock] = {}
        self._key_locks_guard = threading.Lock()
        self.wait = bool(wait)
        self.deadline_s = deadline_s
        self.negative_ttl_s = float(negative_ttl_s)
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight is not None else None
        self._failures: OrderedDict[Path, tuple[float, str]] = OrderedDict()
        self._failures_lock = threading.Lock()
        self._paused_until = float("-inf")

    @classmethod
    def for_server(
        cls, cache_dir: Path | None = None, base_url: str | None = None, offline: bool | None = None
    ) -> KdsClient:
        """A client for a network service: never waits, one fetch at a time, 5 s per fetch, failures kept 5 min.

        A request's worst case is then one 5 s fetch, and only while no other fetch runs; every other miss is
        answered at once with a :class:`KdsDeferredError` naming when to retry.
        """
        return cls(
            cache_dir,
            base_url,
            offline,
            timeout_s=5.0,
            max_wait_s=0.0,
            min_interval_s=1.0,
            wait=False,
            max_in_flight=1,
            deadline_s=5.0,
            negative_ttl_s=300.0,
        )

    def __repr__(self) -> str:
        where = f"cache_dir={str(self.cache_dir)!r}, base_url={self.base_url!r}"
        return f"KdsClient({where}, offline={self.offline})"

    # --- paths ---------------------------------------------------------------------------------------------

    def vcek_path(self, product: Product, hw_id: bytes, tcb: TcbVersion) -> Path:
        """Cache file of a VCEK. The TCB part is the canonical 8-byte encoding (reserved bytes zero).

        The reserved bytes are not part of the KDS request, so TCBs differing only there name the same VCEK.
        """
        hw = _normalise_hw_id(product, hw_id)
        _check_tcb(product, tcb)
        canonical = TcbVersion(tcb.layout, tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, tcb.fmc)
        return self.cache_dir / "vcek" / product.value / hw.hex() / f"{canonical.encode().hex()}.der"

    def cert_chain_path(self, product: Product, signing_key: str = "vcek") -> Path:
        _check_product(product)
        return self.cache_dir / "cert_chain" / product.value / f"{_check_signing_key(signing_key)}.pem"

    def crl_path(self, product: Product, signing_key: str = "vcek") -> Path:
        _check_product(product)
        return self.cache_dir / "crl" / product.value / f"{_check_signing_key(signing_key)}.crl"

    # --- VCEK ----------------------------------------------------------------------------------------------

    def cached_vcek(self, product: Product, hw_id: bytes, tcb: TcbVersion) -> bytes | None:
        """The cached VCEK (DER) for this chip and TCB, or None; never touches the network.

        A masked (all-zero) CHIP_ID, or a non-Turin one asked for as Turin, has no cache entry: None, not an
        error, since the question "is it cached?" has a plain answer.
        """
        try:
            hw = _normalise_hw_id(product, hw_id)
        except KdsError:
            return None
        return self._read_vcek(self.vcek_path(product, hw, tcb), product, hw, tcb)

    def vcek(self, product: Product, hw_id: bytes, tcb: TcbVersion) -> bytes:
        """The VCEK (DER) for ``hw_id`` (CHIP_ID) at ``tcb`` (REPORTED_TCB): from the cache, else from KDS."""
        path = self.vcek_path(product, hw_id, tcb)
        hw = _normalise_hw_id(product, hw_id)
        what = f"the VCEK of {product.value} chip {_short_hex(hw)} at TCB {tcb}"
        cached = self._read_vcek(path, product, hw, tcb)
        if cached is not None:
            return cached
        with self._key_lock(path, what):
            cached = self._read_vcek(path, product, hw, tcb)
            if cached is not None:
                return cached
            url = vcek_url(self.base_url, product, hw, tcb)
            body = self._fetch(url, what, path)
            problem = _validate_vcek(body, product, hw, tcb)
            if problem is not None:
                raise self._remember(path, KdsError(f"KDS answered {url} with something that is not {what}: {problem}"))
            self._write(path, body)
            return body

    def _read_vcek(self, path: Path, product: Product, hw: bytes, tcb: TcbVersion) -> bytes | None:
        data = self._read(path)
        if data is None:
            return None
        problem = _validate_vcek(data, product, hw, tcb)
        if problem is not None:
            log.warning("ignoring corrupt cached VCEK %s: %s", path, problem)
            return None
        return data

    # --- product chains ------------------------------------------------------------------------------------

    def cached_cert_chain(self, product: Product, signing_key: str = "vcek") -> list[bytes] | None:
        """The cached ``[ASK or ASVK, ARK]`` (DER) for ``product``, or None; never touches the network."""
        key = _check_signing_key(signing_key)
        return self._read_chain(self.cert_chain_path(product, key), product, key)

    def cert_chain(self, product: Product, signing_key: str = "vcek") -> list[bytes]:
        """``[ASK, ARK]`` (``vcek``) or ``[ASVK, ARK]`` (``vlek``) as DER: from the cache, else from KDS.

        The ARK in here is whatever KDS (or the cache) said; the verifier must compare it with its pinned ARK.
        """
        key = _check_signing_key(signing_key)
        path = self.cert_chain_path(product, key)
        what = f"the {product.value} {key.upper()} certificate chain"
        cached = self._read_chain(path, product, key)
        if cached is not None:
            return cached
        with self._key_lock(path, what):
            cached = self._read_chain(path, product, key)
            if cached is not None:
                return cached
            url = cert_chain_url(self.base_url, product, key)
            body = self._fetch(url, what, path)
            try:
                chain = _parse_chain(body, product, key, check_signatures=True)
            except (CertificateError, ValueError) as exc:
                error = KdsError(f"KDS answered {url} with something that is not {what}: {exc}")
                raise self._remember(path, error) from None
            self._write(path, _to_pem(chain))
            return [cert.der for cert in chain]

    def store_cert_chain(self, product: Product, signing_key: str, ders: list[bytes]) -> None:
        """Cache a chain obtained elsewhere (an extended report's cert table) to spare KDS a request.

        Only call this once the chain has verified under the *pinned* ARK: the client checks that the pair is
        well-formed and that the ASK/ASVK is signed by the ARK in it, but cannot tell AMD's ARK from a
        lookalike, and a lookalike chain in the cache would make every later verification for ``product``
        fail.
        Raises KdsError if the certificates are not such a chain.
        """
        key = _check_signing_key(signing_key)
        path = self.cert_chain_path(product, key)
        try:
            pem = b"".join(_der_to_pem(bytes(der)) for der in ders)
            chain = _parse_chain(pem, product, key, check_signatures=True)
        except (CertificateError, ValueError) as exc:
            raise KdsError(f"not caching the {product.value} {key.upper()} chain: {exc}") from None
        with self._key_lock(path, f"the {product.value} {key.upper()} certificate chain"):
            self._write(path, _to_pem(chain))
        with self._failures_lock:
            self._failures.pop(path, None)

    def _read_chain(self, path: Path, product: Product, key: str) -> list[bytes] | None:
        data = self._read(path)
        if data is None:
            return None
        try:
            # Signatures were checked when the file was written; the verifier checks them again anyway.
            chain = _parse_chain(data, product, key, check_signatures=False)
        except (CertificateError, ValueError) as exc:
            log.warning("ignoring corrupt cached certificate chain %s: %s", path, exc)
            return None
        return [cert.der for cert in chain]

    # --- CRLs ----------------------------------------------------------------------------------------------

    def crl(self, product: Product, signing_key: str = "vcek") -> bytes:
        """The ARK-signed CRL (DER) covering the ASK/ASVK: cached until its nextUpdate, then fetched again.

        Offline, a stale cached CRL is returned rather than nothing: the caller chose to work from the cache
        and can see nextUpdate in the CRL. Online, a failed refresh raises instead of silently serving the
        stale one, since a revocation published since then would be missed.
        """
        key = _check_signing_key(signing_key)
        path = self.crl_path(product, key)
        what = f"the {product.value} {key.upper()} CRL"
        with self._key_lock(path, what):
            data = self._read(path)
            stale: bytes | None = None
            if data is not None:
                try:
                    crl = _parse_crl(data)
                except ValueError as exc:
                    log.warning("ignoring corrupt cached CRL %s: %s", path, exc)
                else:
                    if not _crl_is_stale(crl, dt.datetime.now(dt.UTC)):
                        return data
                    stale = data
            if stale is not None and self.offline:
                log.debug("offline: using cached %s although its nextUpdate has passed", what)
                return stale
            url = crl_url(self.base_url, product, key)
            try:
                body = self._fetch(url, what, path)
            except KdsError as exc:
                if stale is None:
                    raise
                raise KdsError(
                    f"{exc}; the cached CRL at {path} is past its nextUpdate (set {ENV_OFFLINE}=1 to use it anyway)"
                ) from exc
            try:
                _parse_crl(body)
            except ValueError as exc:
                raise self._remember(
                    path, KdsError(f"KDS answered {url} with something that is not {what}: {exc}")
                ) from None
            self._write(path, body)
            return body

    # --- plumbing ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _key_lock(self, path: Path, what: str) -> Iterator[None]:
        """Single-flight per cache entry; without ``wait`` a second asker is deferred instead of queued."""
        with self._key_locks_guard:
            entry = self._key_locks.setdefault(path, _KeyLock())
            entry.users += 1
        try:
            if not entry.lock.acquire(blocking=self.wait):
                raise KdsDeferredError(f"{what} is being fetched from KDS for another request; retry in a few seconds")
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            with self._key_locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._key_locks[path]

    def _remember(self, path: Path, error: KdsError) -> KdsError:
        """Keep a failed entry's error for ``negative_ttl_s``, so asking again costs KDS nothing; returns it."""
        if self.negative_ttl_s > 0 and not isinstance(error, KdsDeferredError):
            with self._failures_lock:
                self._failures[path] = (time.monotonic() + self.negative_ttl_s, str(error))
                self._failures.move_to_end(path)
                while len(self._failures) > MAX_REMEMBERED_FAILURES:
                    self._failures.popitem(last=False)
        return error

    def _remembered(self, path: Path) -> KdsError | None:
        with self._failures_lock:
            entry = self._failures.get(path)
            if entry is None:
                return None
            until, message = entry
            left = until - time.monotonic()
            if left <= 0:
                del self._failures[path]
                return None
        return KdsError(f"{message} (failed recently; KDS is not asked again for another {left:.0f} s)")

    @contextlib.contextmanager
    def _slot(self, what: str) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        if not self._slots.acquire(blocking=self.wait):
            raise KdsDeferredError(f"not fetching {what}: other KDS fetches are in progress; retry in a few seconds")
        try:
            yield
        finally:
            self._slots.release()

    def _pause(self, status: int, retry_after: str | None) -> float:
        """After 429/503 nobody fetches for a while: KDS limits the client, not one URL. Returns the pause."""
        pause = _retry_after_seconds(retry_after, dt.datetime.now(dt.UTC))
        pause = min(max(SERVER_BACKOFF_S if pause is None else pause, MIN_RETRY_DELAY_S), MAX_SERVER_BACKOFF_S)
        with self._throttle_lock:
            self._paused_until = max(self._paused_until, time.monotonic() + pause)
        return pause

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read cached %s: %s", path, exc)
            return None

    def _write(self, path: Path, data: bytes) -> None:
        """Atomically replace ``path``: other threads and processes see the old file or the new one.

        A failure to cache is logged, not raised: the certificate in hand is still good for this
        verification.
        """
        try:
            self._make_dirs(path.parent)
            write_atomically(path, data, mode=0o644)
        except OSError as exc:
            log.warning("cannot cache %s: %s", path, exc)

    def _make_dirs(self, directory: Path) -> None:
        # os.makedirs applies ``mode`` only to the leaf since Python 3.7, so each missing level is made here.
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        for level in reversed(missing):
            with contextlib.suppress(FileExistsError):
                level.mkdir(mode=0o700)

    def _throttle(self) -> None:
        """Space requests ``min_interval_s`` apart across threads; the slot is reserved under the lock so that
        the sleep can happen outside it without two threads picking the same slot."""
        with self._throttle_lock:
            now = time.monotonic()
            if not self.wait:
                start = max(self._next_request_at, self._paused_until)
                if start > now:
                    raise KdsDeferredError(
                        f"KDS requests are paused for another {start - now:.1f} s (rate limit); retry then"
                    )
                self._next_request_at = now + self.min_interval_s
                return
            if self.min_interval_s <= 0:
                return
            start = max(now, self._next_request_at)
            self._next_request_at = start + self.min_interval_s
        if start > now:
            self._sleep(start - now)

    def _fetch(self, url: str, what: str, cache_path: Path) -> bytes:
        """GET ``url`` once per cache entry at most every ``negative_ttl_s``; failures are one KdsError."""
        if self.offline:
            raise KdsError(f"{what} is not in the cache at {cache_path} and offline mode is on ({ENV_OFFLINE})")
        remembered = self._remembered(cache_path)
        if remembered is not None:
            raise remembered
        with self._slot(what):
            try:
                return self._get(url, what)
            except KdsError as exc:
                self._remember(cache_path, exc)
                raise

    def _get(self, url: str, what: str) -> bytes:
        """GET ``url``, waiting out 429/503 within ``max_wait_s`` (unless ``wait`` is off) and ``deadline_s``."""
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        waited = 0.0
        backoff = INITIAL_BACKOFF_S
        attempt = 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})  # noqa: S310 scheme checked in __init__
        while True:
            attempt += 1
            self._throttle()
            timeout = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                raise KdsError(f"cannot fetch {what} from {url}: no answer within {self.deadline_s:g} s")
            log.debug("KDS GET %s (attempt %d)", url, attempt)
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    status = int(response.status)
                    body = _read_within(response, deadline)
            except urllib.error.HTTPError as exc:
                status = exc.code
                retry_after = exc.headers.get("Retry-After") if exc.headers is not None else None
                exc.close()
                if status == 404:
                    raise KdsError(f"KDS has no certificate for {what}: {url} (404)") from None
                if status not in _RETRY_STATUSES:
                    raise KdsError(f"KDS request {url} failed: HTTP {status} {exc.reason}".rstrip()) from None
                if not self.wait:
                    paused = self._pause(status, retry_after)
                    raise KdsDeferredError(
                        f"KDS answered HTTP {status} for {what}; no KDS requests for {paused:g} s, retry then"
                    ) from None
                pause = _retry_after_seconds(retry_after, dt.datetime.now(dt.UTC))
                if pause is None:
                    pause, backoff = backoff, min(backoff * 2, MAX_BACKOFF_S)
                pause = max(pause, MIN_RETRY_DELAY_S)
                if waited + pause > self.max_wait_s or (deadline is not None and time.monotonic() + pause > deadline):
                    raise KdsError(
                        f"KDS kept answering HTTP {status} for {url}: gave up after {attempt} attempts and "
                        f"{waited:g} s of waiting (the next wait of {pause:g} s would exceed max_wait_s="
                        f"{self.max_wait_s:g} s)"
                    ) from None
                log.debug("KDS answered %d for %s; retrying in %g s", status, url, pause)
                self._sleep(pause)
                waited += pause
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise KdsError(f"cannot fetch {what} from {url}: {_network_reason(exc, timeout)}") from exc
            if status != 200:
                raise KdsError(f"KDS request {url} failed: HTTP {status}")
            if len(body) > MAX_RESPONSE_BYTES:
                raise KdsError(f"KDS answered {url} with more than {MAX_RESPONSE_BYTES} bytes; not {what}")
            log.debug("KDS GET %s: %d bytes", url, len(body))
            return body


def _read_within(response: http.client.HTTPResponse, deadline: float | None) -> bytes:
    """The body, at most MAX_RESPONSE_BYTES + 1 of it; a server trickling bytes past the deadline is cut off."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_RESPONSE_BYTES:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the response did not arrive within the deadline")
        chunk = response.read(min(_READ_CHUNK, MAX_RESPONSE_BYTES + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _der_to_pem(der: bytes) -> bytes:
    try:
        return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
    except ValueError as exc:
        raise ValueError(f"not a DER certificate: {exc}") from None


def _to_pem(chain: list[Cert]) -> bytes:
    return b"".join(cert.certificate.public_bytes(Encoding.PEM) for cert in chain)
