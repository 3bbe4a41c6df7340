"""Fixtures for the encrypted-dataset tests (helpers live in ``_helpers``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.confnb.datasets._helpers import DECRYPTERS, Decrypt


@pytest.fixture(params=list(DECRYPTERS), ids=list(DECRYPTERS))
def decrypt(request: pytest.FixtureRequest) -> Decrypt:
    """Every way of decrypting: each must accept the same ciphertexts and reject the same tampering."""
    return DECRYPTERS[request.param]


@pytest.fixture
def tink() -> Any:
    """Stock Tink with streaming AEAD registered (skips, saying why, if the test dependency is missing)."""
    try:
        import tink
        from tink import streaming_aead
    except ImportError as error:  # pragma: no cover - tink is in the test extra; wheels exist for CPython 3.11
        pytest.skip(f"tink is not installed ({error}); pip install -e '.[test]' installs it")
    streaming_aead.register()
    return tink
