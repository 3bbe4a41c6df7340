"""The two ways reading an encrypted dataset file can fail, kept apart because they mean different things.

``IntegrityError``: the bytes are not what the data owner's key produced (wrong key or associated data, a tampered,
truncated, reordered or extended file). ``DatasetFormatError``: the bytes are authentic but are not the format the
reader expects (e.g. a Tink stream that holds something other than Arrow IPC). Both are ``ValueError`` so that
callers which only care about "bad input" can catch one type; neither message ever contains key material or
plaintext.
"""

from __future__ import annotations


class IntegrityError(ValueError):
    """Ciphertext that failed authentication or is not a well-formed streaming-AEAD ciphertext."""


class DatasetFormatError(ValueError):
    """Decrypted, authenticated data that is not in the expected format (for example not an Arrow IPC stream)."""
