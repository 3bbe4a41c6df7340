"""Sealed blobs open only in a kernel with the sealing kernel's measurement, and only if not a byte was changed."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.attest.evidence import parse_rfc3339
from kernel_enclave.tee.base import TeeBackend, TeeQuote
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.sealing import Sealed, SealingError, current_measurement, seal, unseal

OTHER_MEASUREMENT = bytes(range(48))
METADATA = {"columns": [{"name": "age", "type": "int64"}], "dataset": "claims", "rows": 3}


class CountingBackend(TeeBackend):
    """The real simulated backend, counting how often a report is requested."""

    name = "simulated"

    def __init__(self, inner: SimulatedBackend) -> None:
        self.inner = inner
        self.quotes = 0

    def get_quote(self, report_data: bytes, vmpl: int = 0) -> TeeQuote:
        self.quotes += 1
        return self.inner.get_quote(report_data, vmpl)

    def derive_sealing_key(self, context: bytes) -> bytes:
        return self.inner.derive_sealing_key(context)


@pytest.fixture(scope="module")
def other_kernel(simulated_tee_dir):
    """Same chip, another kernel image."""
    return SimulatedBackend(state_dir=simulated_tee_dir, measurement=OTHER_MEASUREMENT)


@pytest.fixture(scope="module")
def blob(simulated_backend):
    return seal(simulated_backend, "table", b"arrow ipc bytes" * 100, METADATA)


def split(blob: bytes) -> tuple[bytes, dict, bytes]:
    magic, header, ciphertext = blob.split(b"\n", 2)
    return magic, json.loads(header), ciphertext


def join(magic: bytes, header: dict, ciphertext: bytes) -> bytes:
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return magic + b"\n" + line + b"\n" + ciphertext


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) - 56, (1 << 20) * 2 + 7])
def test_round_trip(simulated_backend, size):
    payload = bytes(i % 251 for i in range(size))
    sealed = unseal(simulated_backend, seal(simulated_backend, "model", payload, METADATA))
    assert isinstance(sealed, Sealed)
    assert sealed.payload == payload
    assert sealed.kind == "model"
    assert sealed.metadata == METADATA
    assert sealed.measurement == simulated_backend.measurement
    parse_rfc3339(sealed.created)


def test_the_header_is_readable_and_the_payload_is_not(simulated_backend):
    payload = b"secret-value-1234567" * 10
    blob = seal(simulated_backend, "table", payload, METADATA)
    magic, header, ciphertext = split(blob)
    assert magic == b"confnb-sealed/1"
    assert set(header) == {"format", "kind", "measurement", "metadata", "created"}
    assert header["measurement"] == simulated_backend.measurement.hex()
    assert b"secret-value" not in blob
    # Tink AES256_GCM_HKDF_1MB: header length byte 0x28, then salt and nonce prefix; one segment with its tag.
    assert ciphertext[0] == 0x28
    assert len(ciphertext) == 40 + len(payload) + 16


def test_another_kernel_image_is_refused_with_both_measurements(blob, simulated_backend, other_kernel):
    with pytest.raises(SealingError) as raised:
        unseal(other_kernel, blob)
    message = str(raised.value)
    mine, theirs = simulated_backend.measurement.hex(), OTHER_MEASUREMENT.hex()
    assert message == (
        f"sealed by a kernel with measurement {mine[:16]}…; this kernel's measurement is {theirs[:16]}…: "
        "only the same kernel image can unseal it"
    )
    assert raised.value.sealed_measurement == simulated_backend.measurement
    assert raised.value.current_measurement == OTHER_MEASUREMENT


def test_a_header_claiming_this_kernel_does_not_help_another_image(blob, simulated_backend, other_kernel):
    magic, header, ciphertext = split(blob)
    header["measurement"] = OTHER_MEASUREMENT.hex()
    with pytest.raises(SealingError, match=r"^authentication: "):
        unseal(other_kernel, join(magic, header, ciphertext))


def test_the_other_kernel_reads_its_own_blobs(other_kernel):
    assert unseal(other_kernel, seal(other_kernel, "table", b"x", {})).payload == b"x"


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", "model"), ("metadata", {**METADATA, "rows": 4}), ("created", "2020-01-01T00:00:00Z")],
)
def test_an_edited_header_fails_authentication(blob, simulated_backend, field, value):
    magic, header, ciphertext = split(blob)
    header[field] = value
    with pytest.raises(SealingError, match=r"^authentication: .*modified"):
        unseal(simulated_backend, join(magic, header, ciphertext))


@pytest.mark.parametrize(
    ("mangle", "check"),
    [
        (lambda b: b"confnb-sealed/2" + b[15:], "magic: unsupported sealed-blob version"),
        (lambda b: b"PK\x03\x04" + b[4:], "magic: not a confnb sealed blob"),
        (lambda b: b[:16] + b"{not json" + b[b.index(b"\n", 16) :], "header: not valid JSON"),
        (lambda b: b[:16] + b"[]" + b[b.index(b"\n", 16) :], "header: not a JSON object"),
        (lambda b: b[:30], "header: truncated"),
        (lambda b: b[: b.index(b"\n", 16) + 1], "authentication: .*truncated header"),
        (lambda b: b[:-1], "authentication: "),
        (lambda b: b + b"\0", "authentication: "),
        (lambda b: b[:-17] + bytes([b[-17] ^ 1]) + b[-16:], "authentication: "),
    ],
)
def test_damage_names_the_failed_check(blob, simulated_backend, mangle, check):
    with pytest.raises(SealingError, match=f"^{check}"):
        unseal(simulated_backend, mangle(blob))


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("measurement", "ab" * 10, "header: measurement is not 96 lowercase hex digits"),
        ("format", "confnb-sealed/0", "header: format is not"),
        ("kind", "Table Rows", "header: kind is not a lowercase identifier"),
        ("metadata", [1], "header: metadata is not a JSON object"),
        ("extra", 1, "header: unexpected 'extra'"),
    ],
)
def test_malformed_headers_are_named(blob, simulated_backend, field, value, check):
    magic, header, ciphertext = split(blob)
    header[field] = value
    with pytest.raises(SealingError, match=re.escape(check)):
        unseal(simulated_backend, join(magic, header, ciphertext))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_refused(blob, simulated_backend, data):
    position = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(blob)
    damaged[position] ^= flip
    with pytest.raises(SealingError):
        unseal(simulated_backend, bytes(damaged))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_or_extension_is_refused(blob, simulated_backend, data):
    if data.draw(st.booleans()):
        damaged = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        damaged = blob + data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(SealingError):
        unseal(simulated_backend, damaged)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_cleanly(simulated_backend, junk):
    with pytest.raises(SealingError):
        unseal(simulated_backend, junk)


def test_the_measurement_comes_from_a_report_once(simulated_backend):
    counting = CountingBackend(simulated_backend)
    assert current_measurement(counting) == simulated_backend.measurement
    assert current_measurement(counting) == simulated_backend.measurement
    seal(counting, "table", b"", {})
    assert counting.quotes == 1


@pytest.mark.parametrize(
    ("kind", "metadata", "message"),
    [
        ("", {}, "kind must be"),
        ("Table", {}, "kind must be"),
        ("table", {"mean": float("nan")}, "metadata cannot be stored"),
        ("table", {"when": object()}, "metadata cannot be stored"),
        ("table", [("a", 1)], "metadata must be a JSON object"),
    ],
)
def test_bad_arguments_are_refused(simulated_backend, kind, metadata, message):
    with pytest.raises(SealingError, match=message):
        seal(simulated_backend, kind, b"x", metadata)
