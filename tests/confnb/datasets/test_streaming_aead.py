"""Tink AES-GCM-HKDF streaming AEAD: the wire format, interoperability with Tink, and tamper detection.

Most tests use 256-byte segments (the same construction as AES256_GCM_HKDF_1MB otherwise) so that a kilobyte or two
of data crosses many segment boundaries; a few use the real 1 MiB format with a few MiB of data.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.datasets import streaming_aead as sa
from confnb.datasets.errors import IntegrityError
from tests.confnb.datasets._helpers import (
    AAD,
    DECRYPTERS,
    KEY,
    SMALL,
    Decrypt,
    NonClosingBytesIO,
    encrypt,
    pattern,
    segments_of,
    tink_keyset,
)

MiB = 1 << 20
FIRST = SMALL.first_plaintext_size  # 200
FULL = SMALL.plaintext_segment_size  # 240
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Plaintext lengths at and around every kind of boundary: empty, inside segment 0, exactly filling segment 0, one
# byte into segment 1, exactly filling k segments, and many segments.
BOUNDARY_LENGTHS = sorted(
    {0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + FULL - 1, FIRST + FULL, FIRST + FULL + 1, FIRST + 5 * FULL, 5000}
)


# ------------------------------------------------------------------------------------------------- the wire format


def test_confnb_parameters_are_tinks_aes256_gcm_hkdf_1mb() -> None:
    p = sa.AES256_GCM_HKDF_1MB
    assert (p.key_size, p.derived_key_size, p.hkdf_hash, p.segment_size) == (32, 32, "SHA256", 1_048_576)
    assert p.header_size == 0x28 == 40
    assert p.first_plaintext_size == 1_048_576 - 40 - 16
    assert p.plaintext_segment_size == 1_048_576 - 16


def spec_decrypt(key: bytes, aad: bytes, ciphertext: bytes, params: sa.Parameters) -> bytes:
    """An independent, deliberately naive reading of Tink's published format, to check the implementation's
    layout (not just that it agrees with itself)."""
    header, salt_end = params.header_size, 1 + params.derived_key_size
    assert ciphertext[0] == header
    salt, prefix = ciphertext[1:salt_end], ciphertext[salt_end:header]
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=aad).derive(key)
    size = params.segment_size  # the header counts as part of segment 0, so every segment starts at k * size
    segments = [ciphertext[header:size]] + [ciphertext[i : i + size] for i in range(size, len(ciphertext), size)]
    out = b""
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        nonce = prefix + index.to_bytes(4, "big") + bytes([last])
        out += AESGCM(derived).decrypt(nonce, segment, None)
    return out


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_ciphertext_follows_the_published_layout(length: int) -> None:
    plaintext = pattern(length)
    ciphertext = encrypt(plaintext)
    assert ciphertext[0] == 0x28
    assert len(ciphertext) == sa.ciphertext_size(length, SMALL)
    assert sa.plaintext_size(len(ciphertext), SMALL) == length
    assert spec_decrypt(KEY, AAD, ciphertext, SMALL) == plaintext


def test_a_plaintext_filling_its_last_segment_gets_no_empty_extra_segment() -> None:
    ciphertext = encrypt(pattern(FIRST + 2 * FULL))
    assert len(ciphertext) == 3 * SMALL.segment_size


def test_empty_plaintext_is_a_header_and_one_empty_segment() -> None:
    ciphertext = encrypt(b"")
    assert len(ciphertext) == 40 + 16
    assert spec_decrypt(KEY, AAD, ciphertext, SMALL) == b""


def test_each_stream_has_a_fresh_salt_and_nonce_prefix() -> None:
    first, second = encrypt(b"same"), encrypt(b"same")
    assert first[1:33] != second[1:33]
    assert first[33:40] != second[33:40]


def test_real_1mib_format_across_segments_and_exact_boundary() -> None:
    plaintext = os.urandom(2 * MiB + 12345)
    ciphertext = encrypt(plaintext, sa.AES256_GCM_HKDF_1MB)
    assert len(ciphertext) == len(plaintext) + 40 + 3 * 16
    assert spec_decrypt(KEY, AAD, ciphertext, sa.AES256_GCM_HKDF_1MB) == plaintext
    assert bytes(sa.decrypt_to_buffer(KEY, AAD, ciphertext, threads=3)) == plaintext
    assert b"".join(sa.iter_decrypt(KEY, AAD, io.BytesIO(ciphertext))) == plaintext
    exact = plaintext[: sa.AES256_GCM_HKDF_1MB.first_plaintext_size + sa.AES256_GCM_HKDF_1MB.plaintext_segment_size]
    exact_ciphertext = encrypt(exact, sa.AES256_GCM_HKDF_1MB)
    assert len(exact_ciphertext) == 2 * MiB
    assert bytes(sa.decrypt_to_buffer(KEY, AAD, exact_ciphertext)) == exact


# Published by Tink: tink-java src/main/java/com/google/crypto/tink/streamingaead/internal/testing/
# AesGcmHkdfStreamingTestUtil.java, test vector 0 ("From the cross language tests, test_manually_created_test_vector").
# AES-128 derived keys, HKDF-SHA1 and 64-byte segments: the same construction with Tink's other parameters.
TINK_VECTOR_PARAMS = sa.Parameters(key_size=16, derived_key_size=16, hkdf_hash="SHA1", segment_size=64)
TINK_VECTOR_KEY = bytes.fromhex("6eb56cdc726dfbe5d57f2fcdc6e9345b")
TINK_VECTOR_PLAINTEXT = b"This is a fairly long plaintext. It is of the exact length to create three output blocks. "
TINK_VECTOR_CIPHERTEXT = bytes.fromhex(
    "18" + "93b3af5e14ab378d065addfc8484da64" + "2c0862877baea8"
    "db92d9c77406a406168478821c4298eab3e6d531277f4c1a051714faebcaefcbca7b7be05e9445ea"
    "a0bb2904153398a25084dd80ae0edcd1c3079fcea2cd3770630ee36f7539207b8ec9d754956d486b71cdf989f0ed6fba6779b63558be0a66"
    "e668df14e1603cd2"
    "af8944844078345286d0b292e772e7190775c51a0f83e40c0b75821027e7e538e111"
)


def test_tinks_published_test_vector(decrypt: Decrypt) -> None:
    assert decrypt(TINK_VECTOR_KEY, b"aad", TINK_VECTOR_CIPHERTEXT, TINK_VECTOR_PARAMS) == TINK_VECTOR_PLAINTEXT
    with pytest.raises(IntegrityError):
        decrypt(TINK_VECTOR_KEY, b"aae", TINK_VECTOR_CIPHERTEXT, TINK_VECTOR_PARAMS)


# ------------------------------------------------------------------------------------------------- Tink interop


def tink_encrypt(handle: Any, plaintext: bytes, aad: bytes) -> bytes:
    from tink import streaming_aead

    primitive = handle.primitive(streaming_aead.StreamingAead)
    sink = NonClosingBytesIO()
    with primitive.new_encrypting_stream(sink, aad) as stream:
        for start in range(0, len(plaintext), 300_000):  # several writes, as a real producer would
            stream.write(plaintext[start : start + 300_000])
    return sink.getvalue()


def tink_decrypt(handle: Any, ciphertext: bytes, aad: bytes) -> bytes:
    from tink import streaming_aead

    primitive = handle.primitive(streaming_aead.StreamingAead)
    with primitive.new_decrypting_stream(io.BytesIO(ciphertext), aad) as stream:
        return bytes(stream.read())


INTEROP_LENGTHS = [0, 1000, 1_048_520, 1_048_520 + 1_048_560, 2 * MiB + 777]


@pytest.mark.parametrize("length", INTEROP_LENGTHS)
def test_tink_ciphertext_decrypts_with_confnb(tink: Any, length: int) -> None:
    key = os.urandom(32)
    plaintext = os.urandom(length)
    ciphertext = tink_encrypt(tink_keyset(key), plaintext, AAD)
    assert len(ciphertext) == sa.ciphertext_size(length)
    assert bytes(sa.decrypt_to_buffer(key, AAD, ciphertext)) == plaintext
    assert b"".join(sa.iter_decrypt(key, AAD, io.BytesIO(ciphertext))) == plaintext


@pytest.mark.parametrize("length", INTEROP_LENGTHS)
def test_confnb_ciphertext_decrypts_with_tink(tink: Any, length: int) -> None:
    key = os.urandom(32)
    plaintext = os.urandom(length)
    assert tink_decrypt(tink_keyset(key), encrypt(plaintext, sa.AES256_GCM_HKDF_1MB, key), AAD) == plaintext


def test_tink_rejects_what_confnb_rejects(tink: Any) -> None:
    key = os.urandom(32)
    ciphertext = encrypt(os.urandom(MiB + 5000), sa.AES256_GCM_HKDF_1MB, key)
    truncated = ciphertext[:MiB]  # a whole first segment, without its successor
    with pytest.raises(IntegrityError):
        sa.decrypt_to_buffer(key, AAD, truncated)
    with pytest.raises(tink.TinkError):
        tink_decrypt(tink_keyset(key), truncated, AAD)


def test_tinks_own_template_and_generated_key(tink: Any) -> None:
    """A keyset Tink generates from its AES256_GCM_HKDF_1MB template has exactly confnb's parameters."""
    from tink import cleartext_keyset_handle, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    serialized = io.BytesIO()
    cleartext_keyset_handle.write(tink.BinaryKeysetWriter(serialized), handle)
    keyset = tink_pb2.Keyset.FromString(serialized.getvalue())
    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey.FromString(keyset.key[0].key_data.value)
    assert key.params.ciphertext_segment_size == sa.AES256_GCM_HKDF_1MB.segment_size
    assert key.params.derived_key_size == sa.AES256_GCM_HKDF_1MB.derived_key_size
    assert key.params.hkdf_hash_type == common_pb2.SHA256
    assert len(key.key_value) == sa.AES256_GCM_HKDF_1MB.key_size
    plaintext = os.urandom(100_000)
    assert bytes(sa.decrypt_to_buffer(key.key_value, b"", tink_encrypt(handle, plaintext, b""))) == plaintext
    assert tink_decrypt(handle, encrypt(plaintext, sa.AES256_GCM_HKDF_1MB, key.key_value, b""), b"") == plaintext


def test_tink_4kb_template_interop_over_many_segments(tink: Any) -> None:
    key = os.urandom(32)
    handle = tink_keyset(key, segment_size=4096)
    plaintext = os.urandom(50_000)
    params = sa.AES256_GCM_HKDF_4KB
    assert bytes(sa.decrypt_to_buffer(key, AAD, tink_encrypt(handle, plaintext, AAD), threads=3, params=params)) == (
        plaintext
    )
    assert tink_decrypt(handle, encrypt(plaintext, params, key), AAD) == plaintext


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_round_trip_at_boundaries(decrypt: Decrypt, length: int) -> None:
    plaintext = pattern(length, seed=length)
    assert decrypt(KEY, AAD, encrypt(plaintext), SMALL) == plaintext


def test_encrypt_from_an_iterable_of_chunks_of_any_size() -> None:
    plaintext = pattern(3000)
    cuts = [0, 1, 2, 200, 201, 441, 442, 443, 1000, 2999, 3000]
    sink = io.BytesIO()
    written = sa.encrypt_stream(KEY, AAD, (plaintext[a:b] for a, b in itertools.pairwise(cuts)), sink, params=SMALL)
    assert written == len(sink.getvalue()) == sa.ciphertext_size(3000, SMALL)
    assert bytes(sa.decrypt_to_buffer(KEY, AAD, sink.getvalue(), params=SMALL)) == plaintext


@PROPERTY
@given(
    length=st.integers(min_value=0, max_value=FIRST + 6 * FULL + 3),
    chunk=st.integers(min_value=1, max_value=700),
    which=st.sampled_from(list(DECRYPTERS)),
)
def test_property_round_trip_around_segment_boundaries(length: int, chunk: int, which: str) -> None:
    plaintext = pattern(length, seed=chunk)
    sink = io.BytesIO()
    with sa.StreamEncryptor(KEY, AAD, sink, params=SMALL) as encryptor:
        for start in range(0, length, chunk):
            encryptor.write(plaintext[start : start + chunk])
    assert len(sink.getvalue()) == sa.ciphertext_size(length, SMALL) == encryptor.ciphertext_bytes
    assert DECRYPTERS[which](KEY, AAD, sink.getvalue(), SMALL) == plaintext


def test_decrypt_into_a_caller_buffer_from_arrow_and_from_a_read_only_mmap(tmp_path: Path) -> None:
    plaintext = pattern(4000)
    path = tmp_path / "blob"
    path.write_bytes(encrypt(plaintext))
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        out = pa.allocate_buffer(sa.plaintext_size(len(mapping), SMALL))
        with memoryview(out) as view:
            result = sa.decrypt_to_buffer(KEY, AAD, mapping, 2, out=view, release_consumed=True, params=SMALL)
            assert result is view
        assert out.to_pybytes() == plaintext


def test_out_buffer_and_release_checks() -> None:
    ciphertext = encrypt(pattern(500))
    with pytest.raises(ValueError, match="exactly 500 bytes"):
        sa.decrypt_to_buffer(KEY, AAD, ciphertext, out=bytearray(499), params=SMALL)
    with pytest.raises(ValueError, match="writable"):
        sa.decrypt_to_buffer(KEY, AAD, ciphertext, out=memoryview(bytes(500)), params=SMALL)
    with pytest.raises(ValueError, match="mmap"):
        sa.decrypt_to_buffer(KEY, AAD, ciphertext, release_consumed=True, params=SMALL)


# ------------------------------------------------------------------------------------------------- tampering


@pytest.fixture(scope="module")
def seven_segments() -> tuple[bytes, bytes]:
    plaintext = pattern(FIRST + 5 * FULL + 100)
    ciphertext = encrypt(plaintext)
    assert len(segments_of(ciphertext)) == 7
    return plaintext, ciphertext


def rejected(decrypt: Decrypt, ciphertext: bytes, *, key: bytes = KEY, aad: bytes = AAD) -> str:
    with pytest.raises(IntegrityError) as caught:
        decrypt(key, aad, ciphertext, SMALL)
    message = str(caught.value)
    assert "\n" not in message and KEY.hex() not in message
    return message


def test_wrong_key(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    message = rejected(decrypt, seven_segments[1], key=bytes(32))
    assert "segment 0" in message and "wrong key or associated data" in message


def test_wrong_associated_data(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    assert "segment 0" in rejected(decrypt, seven_segments[1], aad=AAD + b"x")


def test_truncated_header(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    for length in (0, 1, 39):
        assert "truncated header" in rejected(decrypt, seven_segments[1][:length])


def test_wrong_header_length_byte(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    assert "header length byte 0x18" in rejected(decrypt, b"\x18" + seven_segments[1][1:])


@pytest.mark.parametrize("field", ["salt", "nonce prefix"])
def test_modified_header_fields(decrypt: Decrypt, seven_segments: tuple[bytes, bytes], field: str) -> None:
    tampered = bytearray(seven_segments[1])
    tampered[5 if field == "salt" else 35] ^= 0x01
    assert "segment 0" in rejected(decrypt, bytes(tampered))


def test_truncated_at_every_segment_boundary(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    ciphertext = seven_segments[1]
    for boundary in range(SMALL.segment_size, len(ciphertext), SMALL.segment_size):
        rejected(decrypt, ciphertext[:boundary])  # the new last segment was not encrypted as the last one
    assert "shorter than its 16-byte tag" in rejected(decrypt, ciphertext[:40])  # a header without segments


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 100])
def test_truncated_inside_a_segment(decrypt: Decrypt, seven_segments: tuple[bytes, bytes], cut: int) -> None:
    ciphertext = seven_segments[1]
    rejected(decrypt, ciphertext[: 3 * SMALL.segment_size + cut])  # some bytes of segment 3
    rejected(decrypt, ciphertext[:-cut])  # the end of the last segment


def test_dropped_middle_segment(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    ciphertext, size = seven_segments[1], SMALL.segment_size
    assert "segment 2" in rejected(decrypt, ciphertext[: 2 * size] + ciphertext[3 * size :])


def test_swapped_segments(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    ciphertext, size = seven_segments[1], SMALL.segment_size
    one, two = ciphertext[size : 2 * size], ciphertext[2 * size : 3 * size]
    assert "segment 1" in rejected(decrypt, ciphertext[:size] + two + one + ciphertext[3 * size :])


def test_the_first_failing_segment_is_named_whichever_worker_fails_first(
    decrypt: Decrypt, seven_segments: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two altered segments on different workers: the file's first is named on every run, not the one a worker
    happened to reach first (a failure stops the work on later segments only). Segment 1's read is made slow, as
    on a busy machine, so that the worker holding segment 2 fails first."""
    ciphertext, size = seven_segments[1], SMALL.segment_size
    altered = bytearray(ciphertext)
    altered[size] ^= 1  # segment 1 (segment 0 and the header fill the first segment_size bytes)
    altered[2 * size] ^= 1  # segment 2
    read = os.preadv

    def slow_at_segment_one(fd: int, buffers: Any, offset: int) -> int:
        if offset == size:
            time.sleep(0.2)
        return read(fd, buffers, offset)

    monkeypatch.setattr(sa.os, "preadv", slow_at_segment_one)
    assert "segment 1 " in rejected(decrypt, bytes(altered))


def test_duplicated_segment(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    ciphertext, size = seven_segments[1], SMALL.segment_size
    rejected(decrypt, ciphertext[: 3 * size] + ciphertext[2 * size :])


def test_appended_segment_from_another_stream(decrypt: Decrypt, seven_segments: tuple[bytes, bytes]) -> None:
    plaintext, ciphertext = seven_segments
    other = encrypt(plaintext)  # same key, associated data and plaintext: only the salt and nonce prefix differ
    full = ciphertext[: 6 * SMALL.segment_size]  # the six full segments
    rejected(decrypt, full + other[6 * SMALL.segment_size :])  # the other stream's last segment in place of ours
    rejected(decrypt, ciphertext + other[SMALL.segment_size : 2 * SMALL.segment_size])


@pytest.mark.parametrize("extra", [b"\x00", bytes(15), bytes(16), bytes(17), os.urandom(256), os.urandom(300)])
def test_appended_bytes(decrypt: Decrypt, seven_segments: tuple[bytes, bytes], extra: bytes) -> None:
    rejected(decrypt, seven_segments[1] + extra)


def test_appending_to_a_stream_whose_last_segment_is_full(decrypt: Decrypt) -> None:
    ciphertext = encrypt(pattern(FIRST + 2 * FULL))
    assert len(ciphertext) % SMALL.segment_size == 0
    for extra in (bytes(1), bytes(16), bytes(17)):
        rejected(decrypt, ciphertext + extra)


def test_every_single_byte_change_is_detected(seven_segments: tuple[bytes, bytes]) -> None:
    ciphertext = seven_segments[1]
    rng = random.Random(20261128)
    for position in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 1 << rng.randrange(8)
        with pytest.raises(IntegrityError):
            sa.decrypt_to_buffer(KEY, AAD, bytes(tampered), threads=1, params=SMALL)


@PROPERTY
@given(data=st.data(), which=st.sampled_from(list(DECRYPTERS)))
def test_property_random_bit_flips_always_raise(
    data: st.DataObject, which: str, seven_segments: tuple[bytes, bytes]
) -> None:
    ciphertext = bytearray(seven_segments[1])
    flips = data.draw(st.lists(st.integers(0, len(ciphertext) * 8 - 1), min_size=1, max_size=4, unique=True))
    for bit in flips:
        ciphertext[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        DECRYPTERS[which](KEY, AAD, bytes(ciphertext), SMALL)


@PROPERTY
@given(data=st.data(), which=st.sampled_from(list(DECRYPTERS)))
def test_property_any_truncation_or_extension_raises(
    data: st.DataObject, which: str, seven_segments: tuple[bytes, bytes]
) -> None:
    ciphertext = seven_segments[1]
    if data.draw(st.booleans()):
        candidate = ciphertext[: data.draw(st.integers(0, len(ciphertext) - 1))]
    else:
        candidate = ciphertext + data.draw(st.binary(min_size=1, max_size=600))
    with pytest.raises(IntegrityError):
        DECRYPTERS[which](KEY, AAD, candidate, SMALL)


def test_the_lowest_failing_segment_is_reported(seven_segments: tuple[bytes, bytes]) -> None:
    tampered = bytearray(seven_segments[1])
    for segment in (5, 3):
        tampered[segment * SMALL.segment_size + 10] ^= 0xFF
    for threads in (1, 2, 6):
        with pytest.raises(IntegrityError, match="segment 3 of 7 failed authentication"):
            sa.decrypt_to_buffer(KEY, AAD, bytes(tampered), threads=threads, params=SMALL)


def test_streaming_decryption_yields_authentic_segments_then_raises_at_a_truncation(
    seven_segments: tuple[bytes, bytes],
) -> None:
    plaintext, ciphertext = seven_segments
    segments: Iterator[bytes] = sa.iter_decrypt(
        KEY, AAD, io.BytesIO(ciphertext[: 4 * SMALL.segment_size]), params=SMALL
    )
    received = [next(segments), next(segments), next(segments)]
    assert b"".join(received) == plaintext[: FIRST + 2 * FULL]
    with pytest.raises(IntegrityError, match="segment 3 failed"):
        next(segments)


# ------------------------------------------------------------------------------------------------- the encryptor


def test_a_failed_write_leaves_a_stream_no_reader_accepts(decrypt: Decrypt) -> None:
    def failing() -> Iterator[bytes]:
        yield pattern(700)
        raise OSError("disk full")

    sink = io.BytesIO()
    with pytest.raises(OSError, match="disk full"):
        sa.encrypt_stream(KEY, AAD, failing(), sink, params=SMALL)
    assert sink.getvalue()  # something was written ...
    rejected(decrypt, sink.getvalue())  # ... but it is not a complete ciphertext


def test_abort_and_finish() -> None:
    sink = io.BytesIO()
    encryptor = sa.StreamEncryptor(KEY, AAD, sink, params=SMALL)
    encryptor.write(b"abc")
    encryptor.abort()
    with pytest.raises(ValueError, match="finished"):
        encryptor.write(b"more")
    with pytest.raises(IntegrityError):
        sa.decrypt_to_buffer(KEY, AAD, sink.getvalue(), params=SMALL)

    sink = io.BytesIO()
    encryptor = sa.StreamEncryptor(KEY, AAD, sink, params=SMALL)
    encryptor.write(memoryview(b"abcdef")[1:4])
    assert encryptor.tell() == encryptor.plaintext_bytes == 3
    encryptor.finish()
    encryptor.finish()  # idempotent
    assert bytes(sa.decrypt_to_buffer(KEY, AAD, sink.getvalue(), params=SMALL)) == b"bcd"
    assert KEY.hex() not in repr(encryptor) and "closed=True" in repr(encryptor)


def test_key_and_parameter_checks() -> None:
    sink = io.BytesIO()
    with pytest.raises(ValueError, match="32 bytes, got 31"):
        sa.StreamEncryptor(bytes(31), AAD, sink)
    with pytest.raises(ValueError, match="32 bytes, got 33"):
        sa.decrypt_to_buffer(bytes(33), AAD, encrypt(b"x"), params=SMALL)
    with pytest.raises(TypeError, match="bytes"):
        sa.StreamEncryptor("k" * 32, AAD, sink)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="segment size"):
        sa.Parameters(segment_size=56)
    with pytest.raises(ValueError, match="hash"):
        sa.Parameters(hkdf_hash="MD5")
    with pytest.raises(ValueError, match="must not be negative"):
        sa.ciphertext_size(-1)


# ------------------------------------------------------------------------------------------------- plaintext reader


class _SlicingReader(sa.PlaintextReader[pa.Buffer]):
    """As the IPC window reader: reads inside a chunk are zero-copy slices of it."""

    def _piece(self, chunk: pa.Buffer, start: int, size: int) -> pa.Buffer:
        return chunk.slice(start, size)


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=40), max_size=8),
    sizes=st.lists(st.integers(-1, 50), max_size=20),
    slicing=st.booleans(),
)
def test_the_plaintext_reader_serves_any_reads_over_any_chunks(
    chunks: list[bytes], sizes: list[int], slicing: bool
) -> None:
    """Whatever the chunks (empty ones too) and the reads (a read of -1 takes the rest), the bytes read are the
    chunks' concatenation in order, every read but the last ones full, and tell() counts them."""
    whole = b"".join(chunks)
    reader: sa.PlaintextReader[Any] = (
        _SlicingReader(iter([pa.py_buffer(chunk) for chunk in chunks])) if slicing else sa.PlaintextReader(iter(chunks))
    )
    got = b""
    for size in sizes:
        data = bytes(reader.read(size))
        expected = whole[len(got) :] if size < 0 else whole[len(got) : len(got) + size]
        assert data == expected
        got += data
        assert reader.tell() == len(got)
    assert bytes(reader.read(-1)) == whole[len(got) :]
    assert bytes(reader.read(1)) == b""


def test_the_plaintext_reader_keeps_the_failure_and_refuses_after_close() -> None:
    def failing() -> Iterator[bytes]:
        yield b"abc"
        raise IntegrityError("segment 1 of 2 failed authentication")

    reader = sa.PlaintextReader(failing())
    assert reader.read(2) == b"ab"
    with pytest.raises(IntegrityError, match="segment 1"):
        reader.read(5)
    assert reader.error is not None
    with pytest.raises(IntegrityError, match="segment 1"):
        reader.read(1)  # the failure stays
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read(1)
