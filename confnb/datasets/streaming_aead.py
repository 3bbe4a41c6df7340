"""Tink's streaming AEAD "AES-GCM-HKDF" wire format, built from ``cryptography`` primitives only.

Why Tink's format: encrypted datasets must stay readable by anything that speaks a published format (a data owner
can decrypt a file with stock Tink, in any language), and it has the properties a large Arrow file needs: segments
are authenticated independently, their offsets follow from the ciphertext length, so they can be decrypted in
parallel straight into one output buffer; and dropping, reordering, truncating or extending segments is detected.
Why not the ``tink`` package itself: its Python stream is sequential, not seekable, and decrypted at about
0.5 GB/s in ``reference/arrow.md``'s measurements, an order of magnitude below ``AESGCM.decrypt_into`` on two
threads.

The format (https://developers.google.com/tink/streaming-aead/aes_gcm_hkdf_streaming, and tink-java's
``subtle/AesGcmHkdfStreaming.java``), for confnb's parameters ``AES256_GCM_HKDF_1MB``::

    ciphertext = header || segment_0 || segment_1 || ... || segment_{n-1}
    header     = header_length (1 byte, 0x28 = 40) || salt (32 random bytes) || nonce_prefix (7 random bytes)
    key_i      = HKDF-SHA256(ikm=key, salt=salt, info=associated_data, length=32)      (one key per stream)
    segment_i  = AES-256-GCM(key_i, nonce = nonce_prefix || uint32_be(i) || last, plaintext_i, aad = empty)
    last       = 0x01 for the final segment, 0x00 otherwise

Every ciphertext segment is 1 MiB (1,048,576 bytes, 16 of which are the GCM tag) except that the header counts as
part of the first one (so segment 0 holds 1,048,576 - 40 - 16 plaintext bytes) and the last one may be shorter.
Tink's "ciphertext offset" (``firstSegmentOffset``) is 0 for this API. A plaintext that fills its last segment
exactly gets no extra empty segment; an empty plaintext is one empty segment (header + 16-byte tag).

What the construction guarantees: the associated data is bound through the key derivation (wrong associated data
means wrong key), the segment number through the nonce (so reordering, dropping or duplicating segments fails), and
the end of the stream through the last-segment flag (so truncation at a segment boundary fails, and so does
appending, because the real last segment is then no longer last). The header is not authenticated directly, but
changing the salt or nonce prefix changes every key and nonce, so segment 0 fails.

All failures raise :class:`IntegrityError` with a one-line message naming what failed. Keys are 32 bytes (Tink
requires the input key material to be at least the derived key size; Tink's generated keys for this template are
exactly 32 bytes).
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Generic, Protocol, Self, TypeVar, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confnb.datasets.errors import IntegrityError

__all__ = [
    "AES256_GCM_HKDF_1MB",
    "AES256_GCM_HKDF_4KB",
    "DecryptingReader",
    "IntegrityError",
    "Parameters",
    "PlaintextReader",
    "StreamEncryptor",
    "ciphertext_size",
    "decrypt_to_buffer",
    "encrypt_stream",
    "iter_decrypt",
    "iter_decrypt_windows",
    "plaintext_size",
]

TAG_SIZE: Final = 16
NONCE_PREFIX_SIZE: Final = 7
SEGMENT_SIZE: Final = 1 << 20
_MAX_SEGMENTS: Final = 1 << 32  # the segment number is a 32-bit counter in the nonce
_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "SHA1": hashes.SHA1,
    "SHA256": hashes.SHA256,
    "SHA512": hashes.SHA512,
}
_PAGE_SIZE: Final = mmap.PAGESIZE
_Window = TypeVar("_Window")  # a writable buffer a window of plaintext is decrypted into
_Chunk = TypeVar("_Chunk")  # decrypted plaintext a reader serves reads from: bytes, a window


@dataclass(frozen=True)
class Parameters:
    """Tink ``AesGcmHkdfStreamingParameters``: what both sides must agree on besides the key.

    confnb writes only :data:`AES256_GCM_HKDF_1MB`. Other values exist so that the implementation can be checked
    against Tink's published test vectors and its other templates, and so tests can cross many segment boundaries
    with little data.
    """

    key_size: int = 32
    derived_key_size: int = 32
    hkdf_hash: str = "SHA256"
    segment_size: int = SEGMENT_SIZE

    def __post_init__(self) -> None:
        if self.derived_key_size not in (16, 32):
            raise ValueError(f"derived key size must be 16 or 32 bytes, not {self.derived_key_size}")
        if self.key_size < self.derived_key_size:
            raise ValueError("the key must be at least as long as the derived key")
        if self.hkdf_hash not in _HASHES:
            raise ValueError(f"unsupported HKDF hash {self.hkdf_hash!r}; expected one of {sorted(_HASHES)}")
        if not self.header_size + TAG_SIZE < self.segment_size < 1 << 31:
            raise ValueError(f"segment size {self.segment_size} must exceed header + tag and fit in 31 bits")

    @property
    def header_size(self) -> int:
        """1 length byte + salt (as long as the derived key) + nonce prefix: 40 bytes for AES-256."""
        return 1 + self.derived_key_size + NONCE_PREFIX_SIZE

    @property
    def first_plaintext_size(self) -> int:
        """Plaintext bytes in a full first segment (the header takes its share of the first segment)."""
        return self.segment_size - self.header_size - TAG_SIZE

    @property
    def plaintext_segment_size(self) -> int:
        """Plaintext bytes in every other full segment."""
        return self.segment_size - TAG_SIZE


AES256_GCM_HKDF_1MB: Final = Parameters()
"""Tink's ``AES256_GCM_HKDF_1MB`` key template: the parameters of every confnb encrypted Arrow file."""
AES256_GCM_HKDF_4KB: Final = Parameters(segment_size=4096)
"""Tink's ``AES256_GCM_HKDF_4KB`` key template (used in tests; not a confnb file format)."""


def _derive(key: bytes, salt: bytes, associated_data: bytes, params: Parameters) -> AESGCM:
    _check_key(key, params)
    derived = HKDF(
        algorithm=_HASHES[params.hkdf_hash](), length=params.derived_key_size, salt=salt, info=associated_data
    ).derive(key)
    return AESGCM(derived)


def _check_key(key: bytes, params: Parameters) -> None:
    if not isinstance(key, bytes | bytearray):
        raise TypeError(f"the key must be bytes, not {type(key).__name__}")
    if len(key) != params.key_size:
        raise ValueError(f"the key must be {params.key_size} bytes, got {len(key)}")


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def ciphertext_size(plaintext_length: int, params: Parameters = AES256_GCM_HKDF_1MB) -> int:
    """Ciphertext length for a plaintext length (Tink's ``expectedCiphertextSize`` with offset 0)."""
    if plaintext_length < 0:
        raise ValueError("plaintext length must not be negative")
    virtual = plaintext_length + params.header_size  # the header occupies the start of segment 0's plaintext slot
    full, rest = divmod(virtual, params.plaintext_segment_size)
    return full * params.segment_size + (rest + TAG_SIZE if rest else 0)


@dataclass(frozen=True)
class _Layout:
    """Where each segment of a ciphertext of a given length lies; computed, not read, so it needs no trust."""

    params: Parameters
    length: int
    segments: int

    @classmethod
    def of(cls, length: int, params: Parameters) -> _Layout:
        header = params.header_size
        if length < header:
            raise _truncated_header(length, params)
        full, rest = divmod(length, params.segment_size)
        segments = full + (1 if rest else 0)
        last_size = length - (segments - 1) * params.segment_size - (header if segments == 1 else 0)
        if last_size < TAG_SIZE:
            raise IntegrityError(
                f"truncated or extra trailing data: the last segment is {last_size} bytes, "
                f"shorter than its {TAG_SIZE}-byte tag"
            )
        if segments > _MAX_SEGMENTS:
            raise IntegrityError(f"{segments} segments exceed the format's 32-bit segment counter")
        return cls(params, length, segments)

    @property
    def plaintext_size(self) -> int:
        return self.length - self.params.header_size - TAG_SIZE * self.segments

    def ciphertext_range(self, index: int) -> tuple[int, int]:
        start = index * self.params.segment_size if index else self.params.header_size
        return start, min((index + 1) * self.params.segment_size, self.length)

    def plaintext_start(self, index: int) -> int:
        return self.ciphertext_range(index)[0] - self.params.header_size - TAG_SIZE * index


def plaintext_size(ciphertext_length: int, params: Parameters = AES256_GCM_HKDF_1MB) -> int:
    """The plaintext length of a well-formed ciphertext of this length, so that a reader can allocate the output
    before decrypting. Raises :class:`IntegrityError` for lengths no ciphertext can have."""
    return _Layout.of(ciphertext_length, params).plaintext_size


def _parse_header(header: bytes, params: Parameters) -> tuple[bytes, bytes]:
    if header[0] != params.header_size:
        raise IntegrityError(
            f"wrong header length byte 0x{header[0]:02x} (expected 0x{params.header_size:02x}): not a Tink "
            f"AES-GCM-HKDF streaming ciphertext with {params.derived_key_size * 8}-bit keys"
        )
    salt = bytes(header[1 : 1 + params.derived_key_size])
    prefix = bytes(header[1 + params.derived_key_size : params.header_size])
    return salt, prefix


def _truncated_header(length: int, params: Parameters) -> IntegrityError:
    return IntegrityError(f"truncated header: the ciphertext is {length} bytes, its header alone {params.header_size}")


def _auth_failure(index: int, segments: int | None) -> IntegrityError:
    of = f" of {segments}" if segments is not None else ""
    if index == 0:
        cause = "wrong key or associated data, or a modified header or first segment"
    else:
        cause = "the data was modified, reordered, truncated or extended"
    return IntegrityError(f"segment {index}{of} failed authentication ({cause})")


# --------------------------------------------------------------------------------------------------------- encrypt


class _Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


class StreamEncryptor:
    """A write-only file object that encrypts what is written to it and writes the ciphertext to ``sink``.

    Memory stays at one plaintext and one ciphertext segment whatever the stream's length. Large writes that start
    on a segment boundary are encrypted straight from the caller's buffer without copying. A full segment is held
    back until more data arrives, because only then is it known not to be the last one (as Tink does).

    :meth:`finish` (or :meth:`close`, or leaving a ``with`` block normally) writes the final segment. Leaving a
    ``with`` block by an exception, or calling :meth:`abort`, does not: the sink then holds a stream without a
    final segment, which every reader rejects, so a failed write can never pass for a complete one. This object
    deliberately has no ``__del__`` finaliser, for the same reason.
    """

    def __init__(
        self, key: bytes, associated_data: bytes, sink: _Sink, *, params: Parameters = AES256_GCM_HKDF_1MB
    ) -> None:
        salt = secrets.token_bytes(params.derived_key_size)
        self._prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
        self._aead = _derive(key, salt, associated_data, params)
        self._params = params
        self._sink = sink
        self._plain = bytearray(params.plaintext_segment_size)
        self._cipher = bytearray(params.segment_size)
        self._fill = 0
        self._capacity = params.first_plaintext_size
        self._index = 0
        self._plaintext_bytes = 0
        self._closed = False
        header = bytes([params.header_size]) + salt + self._prefix
        self._ciphertext_bytes = 0
        self._write(header)

    def __repr__(self) -> str:  # never shows key material
        return f"<StreamEncryptor segments={self._index} plaintext_bytes={self._plaintext_bytes} closed={self._closed}>"

    # -- file-object surface used by pyarrow's PythonFile

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mode(self) -> str:
        return "wb"

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        """Plaintext bytes written so far (pyarrow's writers ask for their position)."""
        return self._plaintext_bytes

    def flush(self) -> None:
        """Nothing to do: a segment can only be written once it is known whether it is the last."""

    @property
    def plaintext_bytes(self) -> int:
        return self._plaintext_bytes

    @property
    def ciphertext_bytes(self) -> int:
        """Ciphertext bytes handed to the sink so far (header included)."""
        return self._ciphertext_bytes

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a finished StreamEncryptor")
        with memoryview(data) as raw, raw.cast("B") as view:
            total = len(view)
            position = 0
            while position < total:
                if self._fill == self._capacity:
                    self._encrypt(self._plain, self._fill, last=False)  # more data follows, so it is not last
                remaining = total - position
                if self._fill == 0 and remaining > self._capacity:
                    # A whole segment from the caller's buffer that is certainly not the last one: no copy.
                    whole = self._capacity  # read before _encrypt moves on to the next segment's capacity
                    self._encrypt(view[position : position + whole], whole, last=False)
                    position += whole
                    continue
                take = min(self._capacity - self._fill, remaining)
                self._plain[self._fill : self._fill + take] = view[position : position + take]
                self._fill += take
                position += take
        self._plaintext_bytes += total
        return total

    def finish(self) -> None:
        """Encrypt and write the final segment. Idempotent."""
        if self._closed:
            return
        self._encrypt(self._plain, self._fill, last=True)
        self._closed = True

    def close(self) -> None:
        """Same as :meth:`finish`: closing a file you wrote to completes it, as with Tink's encrypting stream."""
        self.finish()

    def abort(self) -> None:
        """Stop without writing the final segment, leaving a stream that no reader accepts."""
        self._closed = True

    def __enter__(self) -> StreamEncryptor:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    # -- internals

    def _encrypt(self, plaintext: bytearray | memoryview, length: int, *, last: bool) -> None:
        if self._index >= _MAX_SEGMENTS:
            raise ValueError("stream too long: Tink's segment counter is 32 bits")
        nonce = _nonce(self._prefix, self._index, last)
        with (
            memoryview(plaintext) as source,
            memoryview(self._cipher) as target,
            source[:length] as chunk,
            target[: length + TAG_SIZE] as out,
        ):
            self._aead.encrypt_into(nonce, chunk, None, out)
            self._write(out)
        self._index += 1
        self._fill = 0
        self._capacity = self._params.plaintext_segment_size

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self._sink.write(view)
            if written is None:  # a raw file object in non-blocking mode: not supported
                raise OSError("the ciphertext sink did not accept the write")
            self._ciphertext_bytes += written
            view = view[written:]


def encrypt_stream(
    key: bytes,
    associated_data: bytes,
    source: BinaryIO | Iterable[bytes],
    sink: BinaryIO,
    *,
    params: Parameters = AES256_GCM_HKDF_1MB,
) -> int:
    """Encrypt everything read from ``source`` (a binary file or an iterable of byte chunks) into ``sink``.

    Memory is bounded by one segment plus one chunk of the source. Returns the number of ciphertext bytes written.
    If the source raises, the sink is left without a final segment, so the partial output cannot be mistaken for a
    complete ciphertext.
    """
    encryptor = StreamEncryptor(key, associated_data, sink, params=params)
    with encryptor:
        if hasattr(source, "read"):
            reader = cast(BinaryIO, source)
            while chunk := reader.read(params.plaintext_segment_size):
                encryptor.write(chunk)
        else:
            for piece in source:
                encryptor.write(piece)
    return encryptor.ciphertext_bytes


# --------------------------------------------------------------------------------------------------------- decrypt


def decrypt_to_buffer(
    key: bytes,
    associated_data: bytes,
    ciphertext: bytes | bytearray | memoryview | mmap.mmap,
    threads: int | None = None,
    *,
    out: bytearray | memoryview | None = None,
    release_consumed: bool = False,
    params: Parameters = AES256_GCM_HKDF_1MB,
) -> bytearray | memoryview:
    """Decrypt a whole ciphertext into one contiguous buffer, segments in parallel.

    The plaintext size follows from the ciphertext length (:func:`plaintext_size`), so the output is allocated
    once and every segment is decrypted straight into its place (``AESGCM.decrypt_into`` releases the GIL, so
    threads scale). ``out``, if given, must be a writable buffer of exactly that size (for example a
    ``memoryview`` of ``pyarrow.allocate_buffer(n)``, which is 64-byte aligned and not zero-filled); it is returned.
    Otherwise a new ``bytearray`` is. ``threads`` defaults to the CPUs this process may use.

    ``release_consumed`` (only for a read-only ``mmap`` of a file) tells the kernel after each segment that this
    process no longer needs those ciphertext pages (``MADV_DONTNEED``; the page cache keeps them), so resident
    memory peaks near the plaintext size instead of plaintext + ciphertext.

    Segment 0 is checked first, alone, so that a wrong key or associated data is reported as such at once. On any
    failure :class:`IntegrityError` is raised and the output holds unauthenticated bytes: discard it.
    """
    mapping = ciphertext if isinstance(ciphertext, mmap.mmap) and release_consumed else None
    if release_consumed and mapping is None:
        raise ValueError("release_consumed needs the ciphertext as a read-only mmap")
    layout = _Layout.of(len(ciphertext), params)
    size = layout.plaintext_size
    result: bytearray | memoryview = bytearray(size) if out is None else out
    # Unsigned-byte views: pyarrow exports its buffers as signed chars ("b"), which cryptography refuses.
    with (
        memoryview(ciphertext) as raw_source,
        raw_source.cast("B") as source,
        memoryview(result) as raw_target,
        raw_target.cast("B") as target,
    ):
        if target.readonly or target.nbytes != size:
            raise ValueError(f"out must be a writable byte buffer of exactly {size} bytes")
        salt, prefix = _parse_header(bytes(source[: params.header_size]), params)  # a copy: no view outlives us
        aead = _derive(key, salt, associated_data, params)
        segments = layout.segments
        decrypt = _SegmentDecrypter(aead, prefix, layout, source, target, mapping)
        decrypt.run(0, 1)
        decrypt.raise_first_failure()
        workers = min(_default_threads() if threads is None else max(1, threads), segments - 1)
        if workers <= 1:
            decrypt.run(1, segments)
        else:
            # Contiguous runs of segments, several per worker so that a slow one does not hold up the rest.
            tasks = min(segments - 1, workers * 8)
            bounds = [1 + (segments - 1) * k // tasks for k in range(tasks + 1)]
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="confnb-decrypt") as pool:
                for future in [pool.submit(decrypt.run, a, b) for a, b in itertools.pairwise(bounds)]:
                    future.result()
        decrypt.raise_first_failure()
    return result


def iter_decrypt_windows(
    key: bytes,
    associated_data: bytes,
    source: BinaryIO,
    *,
    window_segments: int = 16,
    threads: int | None = None,
    allocate: Callable[[int], _Window] = bytearray,  # type: ignore[assignment]  # bytearray is one such buffer
    params: Parameters = AES256_GCM_HKDF_1MB,
) -> Generator[_Window, None, None]:
    """Decrypt a ciphertext file a window at a time: ``window_segments`` consecutive segments, decrypted in
    parallel straight into a buffer of their own (``allocate(size)``, e.g. ``pyarrow.allocate_buffer``), yielded in
    order.

    This is the streaming counterpart of :func:`decrypt_to_buffer`, for a file too large to hold decrypted: memory
    holds one window plus one ciphertext segment per thread, and the segments of a window are read and decrypted
    on ``threads`` threads (default: the usable CPUs), at close to the bulk path's speed where :func:`iter_decrypt`
    decrypts and copies one segment at a time. ``source`` must be
    a file with a descriptor: segments are read at their offsets (``os.preadv``), which the layout computes from
    the file's length; its position is not used.

    Each window is authentic when yielded (every one of its segments was); the file is known to be complete only
    when the iterator ends without raising, as with :func:`iter_decrypt`. A file that shrinks while it is read
    raises :class:`IntegrityError` rather than yielding a short window.
    """
    if window_segments < 1:
        raise ValueError("window_segments must be at least 1")
    fd = source.fileno()
    layout = _Layout.of(os.fstat(fd).st_size, params)
    header = os.pread(fd, params.header_size, 0)
    if len(header) < params.header_size:
        raise _truncated_header(len(header), params)
    salt, prefix = _parse_header(header, params)
    aead = _derive(key, salt, associated_data, params)
    workers = max(1, min(_default_threads() if threads is None else threads, window_segments))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="confnb-decrypt") as pool:
        for first in range(0, layout.segments, window_segments):
            stop = min(first + window_segments, layout.segments)
            end = layout.plaintext_start(stop) if stop < layout.segments else layout.plaintext_size
            window = allocate(end - layout.plaintext_start(first))
            with memoryview(cast(Any, window)) as raw, raw.cast("B") as target:
                decrypt = _SegmentDecrypter(aead, prefix, layout, None, target, None, first_segment=first, fd=fd)
                start = first
                if first == 0:  # segment 0 alone first, so that a wrong key or associated data is reported as such
                    decrypt.run(0, 1)
                    decrypt.raise_first_failure()
                    start = 1
                runs = max(1, min(workers, stop - start))
                bounds = [start + (stop - start) * k // runs for k in range(runs + 1)]
                for future in [pool.submit(decrypt.run, a, b) for a, b in itertools.pairwise(bounds) if b > a]:
                    future.result()  # the views into the window outlive no worker
                decrypt.raise_first_failure()
            yield window


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _SegmentDecrypter:
    """Decrypts ranges of segments into a shared output; records failures instead of raising in workers.

    A failure stops the work on every later segment, never on an earlier one: whichever worker fails first, the
    segment reported is the first one of the file that fails, so the message is the same on every run.

    ``target`` holds the plaintext from segment ``first_segment`` on (0: the whole file's). The ciphertext is
    ``source`` (the whole ciphertext, sliced per segment) or, with ``fd``, read one segment at a time from that file
    by each worker into a buffer of its own (``os.preadv`` releases the GIL, so reads and decryptions overlap).
    """

    def __init__(
        self,
        aead: AESGCM,
        prefix: bytes,
        layout: _Layout,
        source: memoryview | None,
        target: memoryview,
        mapping: mmap.mmap | None,
        *,
        first_segment: int = 0,
        fd: int | None = None,
    ) -> None:
        self._aead = aead
        self._prefix = prefix
        self._layout = layout
        self._source = source
        self._target = target
        self._mapping = mapping
        self._base = layout.plaintext_start(first_segment)
        self._fd = fd
        self._stop_at = layout.segments  # the first segment found failing so far: later ones are not decrypted
        self._failures: list[int] = []
        self._short: list[int] = []  # segments the file no longer held in full when read
        self._lock = threading.Lock()

    def run(self, first: int, stop: int) -> None:
        if self._fd is None:
            assert self._source is not None
            self._decrypt(first, stop, self._source, 0)
            return
        read_buffer = bytearray(self._layout.params.segment_size)
        with memoryview(read_buffer) as buffer:
            for index in range(first, stop):
                if index > self._stop_at:
                    return
                start, end = self._layout.ciphertext_range(index)
                with buffer[: end - start] as place:
                    if os.preadv(self._fd, [place], start) != end - start:
                        self._fail(self._short, index)
                        return
                if not self._decrypt(index, index + 1, buffer, start):
                    return

    def _decrypt(self, first: int, stop: int, source: memoryview, source_start: int) -> bool:
        """Segments ``first`` to ``stop`` from ``source`` (which begins at ciphertext offset ``source_start``)."""
        layout, last = self._layout, self._layout.segments - 1
        for index in range(first, stop):
            if index > self._stop_at:
                return False
            start, end = layout.ciphertext_range(index)
            offset = layout.plaintext_start(index) - self._base
            nonce = _nonce(self._prefix, index, index == last)
            with (
                source[start - source_start : end - source_start] as segment,
                self._target[offset : offset + end - start - TAG_SIZE] as out,
            ):
                try:
                    self._aead.decrypt_into(nonce, segment, None, out)
                except InvalidTag:
                    self._fail(self._failures, index)
                    return False
            if self._mapping is not None:
                aligned = start - start % _PAGE_SIZE
                self._mapping.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        return True

    def _fail(self, found: list[int], index: int) -> None:
        with self._lock:
            found.append(index)
            self._stop_at = min(self._stop_at, index)

    def raise_first_failure(self) -> None:
        if self._short:
            raise IntegrityError(
                f"segment {min(self._short)} of {self._layout.segments} could not be read in full: the file was "
                "truncated while it was read"
            )
        if self._failures:
            raise _auth_failure(min(self._failures), self._layout.segments)


def _read_exactly(source: BinaryIO, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``source``; fewer bytes than its length only at the end of the stream."""
    filled = 0
    with memoryview(buffer) as view:
        while filled < len(buffer):
            got = source.readinto(view[filled:])  # type: ignore[attr-defined]  # BinaryIO omits readinto
            if not got:
                break
            filled += got
    return filled


def iter_decrypt(
    key: bytes, associated_data: bytes, source: BinaryIO, *, params: Parameters = AES256_GCM_HKDF_1MB
) -> Iterator[bytes]:
    """Decrypt ``source`` one segment at a time, for when the plaintext need not (or cannot) be in memory at once.

    Each yielded chunk is authentic, but the stream is only known to be complete when the iterator ends without
    raising: a truncated or extended stream raises :class:`IntegrityError` at its end, after earlier segments were
    yielded, so consumers must treat everything they received as void if it raises. Holds two ciphertext segments
    (one to decrypt, one read ahead to learn whether the current one is the last).
    """
    header = bytearray(params.header_size)
    got = _read_exactly(source, header)
    if got < params.header_size:
        raise _truncated_header(got, params)
    salt, prefix = _parse_header(bytes(header), params)
    aead = _derive(key, salt, associated_data, params)
    current = bytearray(params.segment_size - params.header_size)
    filled = _read_exactly(source, current)
    ahead = bytearray(params.segment_size)
    index = 0
    while True:
        full = filled == len(current)
        ahead_filled = _read_exactly(source, ahead) if full else 0
        last = ahead_filled == 0
        if filled < TAG_SIZE:
            raise IntegrityError(
                f"truncated or extra trailing data: the last segment is {filled} bytes, "
                f"shorter than its {TAG_SIZE}-byte tag"
            )
        if index >= _MAX_SEGMENTS:
            raise IntegrityError("the stream exceeds the format's 32-bit segment counter")
        with memoryview(current) as view, view[:filled] as segment:
            try:
                plaintext = aead.decrypt(_nonce(prefix, index, last), segment, None)
            except InvalidTag:
                raise _auth_failure(index, None) from None
        yield plaintext
        if last:
            return
        index += 1
        if len(current) != len(ahead):  # segment 0's buffer is short by the header: swap in a full-size one
            current = bytearray(params.segment_size)
        current, ahead, filled = ahead, current, ahead_filled


class PlaintextReader(Generic[_Chunk]):
    """A read-only binary file object over chunks of decrypted plaintext, for consumers that want ``read(n)``
    (pyarrow's IPC reader): :func:`iter_decrypt`'s segments, or :func:`iter_decrypt_windows`' windows.

    ``read(n)`` always returns ``n`` bytes unless the stream ends (pyarrow's IPC reader treats a short read as a
    truncated message). A read inside one chunk is :meth:`_piece` of it (here a copy; a subclass may hand out a
    zero-copy slice), a read across chunks one copy. Failures raise :class:`IntegrityError` and are also kept in
    :attr:`error`, because a caller in between (pyarrow) may translate the exception.
    """

    def __init__(self, chunks: Iterator[_Chunk]) -> None:
        self._chunks = chunks
        self._chunk: _Chunk | None = None
        self._view = memoryview(b"")  # the current chunk, as bytes
        self._offset = 0  # within the current chunk
        self._position = 0
        self._done = False
        self._closed = False
        self.error: IntegrityError | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mode(self) -> str:
        return "rb"

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _piece(self, chunk: _Chunk, start: int, size: int) -> Any:
        """``size`` bytes of the current chunk from ``start``."""
        return bytes(self._view[start : start + size])

    def _next_chunk(self) -> bool:
        try:
            self._chunk = next(self._chunks)
        except StopIteration:
            self._chunk, self._view, self._done = None, memoryview(b""), True
            return False
        except IntegrityError as error:
            self._chunk, self._view, self._done, self.error = None, memoryview(b""), True, error
            raise
        self._view, self._offset = memoryview(cast(Any, self._chunk)).cast("B"), 0
        return True

    def read(self, size: int = -1) -> Any:
        if self._closed:
            raise ValueError(f"read from a closed {type(self).__name__}")
        if self.error is not None:
            raise self.error
        if self._chunk is not None and 0 <= size <= len(self._view) - self._offset:  # inside the current chunk
            data = self._piece(self._chunk, self._offset, size)
            self._offset += size
            self._position += size
            return data
        parts: list[memoryview] = []
        wanted = size if size is not None and size >= 0 else None
        while wanted is None or wanted > 0:
            if self._offset >= len(self._view) and (self._done or not self._next_chunk()):
                break
            take = len(self._view) - self._offset if wanted is None else min(wanted, len(self._view) - self._offset)
            parts.append(self._view[self._offset : self._offset + take])
            self._offset += take
            if wanted is not None:
                wanted -= take
        joined = b"".join(parts)
        self._position += len(joined)
        return joined

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with memoryview(buffer) as view, view.cast("B") as target:
            data = self.read(len(target))
            target[: len(data)] = data
        return len(data)


class DecryptingReader(PlaintextReader[bytes]):
    """:class:`PlaintextReader` over :func:`iter_decrypt`: one segment at a time, from any binary stream."""

    def __init__(
        self, key: bytes, associated_data: bytes, source: BinaryIO, *, params: Parameters = AES256_GCM_HKDF_1MB
    ) -> None:
        super().__init__(iter_decrypt(key, associated_data, source, params=params))
