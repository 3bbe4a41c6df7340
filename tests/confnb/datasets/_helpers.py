"""Helpers for the encrypted-dataset tests: small segments so that many segment boundaries cost little data, every
decryption path behind one signature, and Tink keysets built from a known raw key for interoperability checks."""

from __future__ import annotations

import io
import itertools
import tempfile
from collections.abc import Callable
from typing import Any

from confnb.datasets import streaming_aead as sa

# Same construction as AES256_GCM_HKDF_1MB (AES-256, HKDF-SHA256, 40-byte header), 256-byte segments: the first
# holds 200 plaintext bytes, the others 240.
SMALL = sa.Parameters(segment_size=256)
KEY = bytes(range(32))
AAD = b"dataset=claims;file=part-0.arrows"


def encrypt(plaintext: bytes, params: sa.Parameters = SMALL, key: bytes = KEY, aad: bytes = AAD) -> bytes:
    sink = io.BytesIO()
    sa.encrypt_stream(key, aad, io.BytesIO(plaintext), sink, params=params)
    return sink.getvalue()


def segments_of(ciphertext: bytes, params: sa.Parameters = SMALL) -> list[bytes]:
    """The ciphertext cut at its segment boundaries (segment 0 without the header)."""
    size = params.segment_size
    cuts = [params.header_size, *range(size, len(ciphertext), size), len(ciphertext)]
    return [ciphertext[a:b] for a, b in itertools.pairwise(cuts) if b > a]


Decrypt = Callable[[bytes, bytes, bytes, sa.Parameters], bytes]


def _bulk_serial(key: bytes, aad: bytes, ciphertext: bytes, params: sa.Parameters) -> bytes:
    return bytes(sa.decrypt_to_buffer(key, aad, ciphertext, threads=1, params=params))


def _bulk_parallel(key: bytes, aad: bytes, ciphertext: bytes, params: sa.Parameters) -> bytes:
    return bytes(sa.decrypt_to_buffer(key, aad, ciphertext, threads=4, params=params))


def _streaming(key: bytes, aad: bytes, ciphertext: bytes, params: sa.Parameters) -> bytes:
    return b"".join(sa.iter_decrypt(key, aad, io.BytesIO(ciphertext), params=params))


def _reader(key: bytes, aad: bytes, ciphertext: bytes, params: sa.Parameters) -> bytes:
    with sa.DecryptingReader(key, aad, io.BytesIO(ciphertext), params=params) as reader:
        parts = []
        while chunk := reader.read(97):  # an odd size, so reads straddle segment boundaries
            parts.append(chunk)
        return b"".join(parts)


def _windows(window_segments: int, threads: int) -> Decrypt:
    def decrypt(key: bytes, aad: bytes, ciphertext: bytes, params: sa.Parameters) -> bytes:
        with tempfile.TemporaryFile() as source:
            source.write(ciphertext)
            source.flush()
            windows = sa.iter_decrypt_windows(
                key, aad, source, window_segments=window_segments, threads=threads, params=params
            )
            return b"".join(bytes(window) for window in windows)

    return decrypt


DECRYPTERS: dict[str, Decrypt] = {
    "bulk-1-thread": _bulk_serial,
    "bulk-4-threads": _bulk_parallel,
    "iter_decrypt": _streaming,
    "DecryptingReader": _reader,
    "windows-of-1-segment": _windows(1, 1),
    "windows-of-3-segments-2-threads": _windows(3, 2),
}


class NonClosingBytesIO(io.BytesIO):
    """Tink's encrypting stream closes its destination on exit; keep the bytes readable afterwards."""

    def close(self) -> None:
        pass


def tink_keyset(raw_key: bytes, segment_size: int = 1 << 20) -> Any:
    """A Tink keyset handle holding ``raw_key`` as an AES256-GCM-HKDF streaming key (built from Tink's protos)."""
    from tink import cleartext_keyset_handle
    from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
        version=0,
        params=aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
            ciphertext_segment_size=segment_size, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256
        ),
        key_value=raw_key,
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=7,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=7,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    return cleartext_keyset_handle.from_keyset(keyset)


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking plaintext (a wrong offset anywhere shows up as a mismatch)."""
    return bytes((i * 7919 + seed * 31 + (i >> 8)) % 251 for i in range(n))
