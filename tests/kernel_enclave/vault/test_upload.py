"""The vault's upload socket: every file format, every refusal, and nothing left of an upload that did not finish.

A real vault behind a real ``upload.sock`` (the relay's side of the wire), with real HPKE and Tink streaming
AEAD; the end-to-end path over the comm is in ``tests/kernel_enclave/relay/test_upload.py``.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from confnb import hpke
from confnb.attest.evidence import canonical_claims
from confnb.datasets.streaming_aead import encrypt_stream
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.protocol import recv_message, send_message
from kernel_enclave.vault.service import VaultServer
from kernel_enclave.vault.upload import Uploads
from kernel_enclave.vault.vault import Vault

POLICY = '[policy]\nid = "upload-test"\n[release]\nallow = ["schema", "row_count", "aggregate"]\nmin_group_size = 2\n'
TABLE = pa.table({"k": ["a", "b", "a", "b"] * 300_000, "v": list(range(1_200_000))})  # > 1 segment in any format


@dataclass
class Site:
    vault: Vault
    keys: VaultKeys
    path: Path
    policies: list[tuple[str, str, str]]  # what the gate was told: (dataset, source, policy id)

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(self.path))
        return client


@pytest.fixture
def site(simulated_backend: SimulatedBackend) -> Iterator[Site]:
    keys = VaultKeys.generate()
    told: list[tuple[str, str, str]] = []
    vault = Vault(
        backend=simulated_backend, keys=keys, on_policy=lambda d, s, p, broker=None: told.append((d, s, p.id))
    )
    directory = Path(tempfile.mkdtemp(prefix="confnb-upload-test-"))
    uploads = Uploads(vault, keys.hpke_private_key)
    server = VaultServer(vault, directory / "upload.sock", connections=uploads.connection)
    server.start()
    yield Site(vault, keys, directory / "upload.sock", told)
    server.close()
    directory.rmdir()


def descriptor(name: str, file_format: str = "csv", policy: str = POLICY) -> dict[str, str]:
    return {
        "format": "confnb-upload/1",
        "name": name,
        "file_format": file_format,
        "filename": f"{name}.{file_format}",
        "policy": policy,
    }


def encrypt(keys: VaultKeys, sealed_for: dict[str, str], plaintext: bytes) -> tuple[bytes, bytes]:
    key = secrets.token_bytes(32)
    canonical = canonical_claims(sealed_for)
    sealed = hpke.seal(keys.hpke_public_key, key, b"confnb-upload/1:" + hashlib.sha256(canonical).hexdigest().encode())
    sink = io.BytesIO()
    encrypt_stream(key, canonical, io.BytesIO(plaintext), sink)
    return sealed, sink.getvalue()


def call(client: socket.socket, header: dict[str, Any], buffers: list[bytes] | None = None) -> dict[str, Any]:
    send_message(client, header, buffers or [])
    return recv_message(client)[0]


def upload(
    site: Site, sent: dict[str, str], plaintext: bytes, chunk: int = 1 << 20, client: socket.socket | None = None
) -> dict[str, Any]:
    sealed, ciphertext = encrypt(site.keys, sent, plaintext)
    connection = client or site.connect()
    try:
        begun = call(
            connection, {"op": "upload_begin", "descriptor": sent, "ciphertext_size": len(ciphertext)}, [sealed]
        )
        if not begun["ok"]:
            return begun
        for seq, start in enumerate(range(0, len(ciphertext), chunk)):
            piece = ciphertext[start : start + chunk]
            answer = call(connection, {"op": "upload_chunk", "upload": begun["upload"], "seq": seq}, [piece])
            if not answer["ok"]:
                return answer
        return call(connection, {"op": "upload_end", "upload": begun["upload"]})
    finally:
        if client is None:
            connection.close()


def _files() -> dict[str, bytes]:
    import pyarrow.csv as pacsv  # type: ignore[import-untyped]

    csv, parquet, arrow_file, arrow_stream = io.BytesIO(), pa.BufferOutputStream(), pa.BufferOutputStream(), None
    pacsv.write_csv(TABLE, csv)
    pq.write_table(TABLE, parquet)
    with pa.ipc.new_file(arrow_file, TABLE.schema) as writer:
        writer.write_table(TABLE)
    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, TABLE.schema) as writer:
        writer.write_table(TABLE)
    arrow_stream = stream.getvalue().to_pybytes()
    return {
        "csv": csv.getvalue(),
        "parquet": parquet.getvalue().to_pybytes(),
        "arrow": arrow_file.getvalue().to_pybytes(),
        "arrow-stream": arrow_stream,
    }


@pytest.mark.parametrize("kind", ["csv", "parquet", "arrow", "arrow-stream"])
def test_every_file_format_is_decrypted_parsed_and_registered(site: Site, kind: str) -> None:
    file_format = kind.split("-", maxsplit=1)[0]
    data = _files()[kind]
    answer = upload(site, descriptor("t", file_format), data, chunk=777_777)  # a split unlike the segments
    assert answer == {
        "ok": True,
        "dataset": "t",
        "rows": TABLE.num_rows,
        "columns": ["k", "v"],
        "policy_id": "upload-test",
    }
    assert site.policies == [("t", "upload", "upload-test")]
    assert site.vault.has_dataset("t")
    entry = site.vault.audit.entries()[-1]
    assert entry["event"] == "upload" and entry["fields"]["rows"] == TABLE.num_rows


def test_a_file_that_is_not_its_declared_format_is_refused_and_forgotten(site: Site) -> None:
    answer = upload(site, descriptor("t", "parquet"), b"k,v\na,1\n")
    assert answer["ok"] is False
    assert answer["error"]["message"].startswith("the decrypted file is not a readable Parquet file (")
    assert not site.vault.has_dataset("t") and site.policies == []
    assert site.vault.audit.entries()[-1]["event"] == "upload-refused"
    assert upload(site, descriptor("t"), b"k,v\na,1\n")["ok"] is True  # the name was never taken


def test_stream_refusals(site: Site) -> None:
    sent = descriptor("s")
    sealed, ciphertext = encrypt(site.keys, sent, os.urandom(3_000_000))
    with site.connect() as client:

        def begin(size: int = len(ciphertext)) -> dict[str, Any]:
            return call(client, {"op": "upload_begin", "descriptor": sent, "ciphertext_size": size}, [sealed])

        assert "is not the length of any AES256_GCM_HKDF_1MB ciphertext" in begin(30)["error"]["message"]
        assert "must be a positive integer" in begin(0)["error"]["message"]

        upload_id = begin()["upload"]
        assert "already being uploaded" in begin()["error"]["message"]
        chunk = {"op": "upload_chunk", "upload": upload_id}
        assert call(client, {**chunk, "seq": 0}, [ciphertext[:1000]])["received"] == 1000
        gap = call(client, {**chunk, "seq": 2}, [ciphertext[1000:2000]])
        assert gap["error"]["message"] == "chunk seq 2 after 0: chunks must be numbered consecutively"
        gone = call(client, {**chunk, "seq": 1}, [ciphertext[1000:2000]])
        assert "no upload 'u1' in progress" in gone["error"]["message"]  # the failure ended the upload

        upload_id = begin()["upload"]
        assert call(client, {**chunk, "upload": upload_id, "seq": 0}, [ciphertext[:1000]])["ok"]
        early = call(client, {"op": "upload_end", "upload": upload_id})
        assert early["error"]["message"] == (
            f"the upload ended after 1000 of the {len(ciphertext)} announced ciphertext bytes"
        )

        upload_id = begin()["upload"]
        too_much = call(client, {**chunk, "upload": upload_id, "seq": 0}, [ciphertext + b"x"])
        assert "past the announced ciphertext_size" in too_much["error"]["message"]

        truncated_size = len(ciphertext) - 100  # a valid length, so only Tink's last-segment flag can tell
        upload_id = begin(truncated_size)["upload"]
        call(client, {**chunk, "upload": upload_id, "seq": 0}, [ciphertext[:truncated_size]])
        cut = call(client, {"op": "upload_end", "upload": upload_id})
        assert cut["ok"] is False and "failed authentication" in cut["error"]["message"]

        assert call(client, {"op": "open", "source": "s"})["error"]["message"].startswith("unknown upload operation")
    assert not site.vault.has_dataset("s")


def test_a_closed_connection_takes_its_uploads_along(site: Site) -> None:
    sent = descriptor("c")
    sealed, ciphertext = encrypt(site.keys, sent, b"k\n1\n")
    with site.connect() as client:
        begun = call(client, {"op": "upload_begin", "descriptor": sent, "ciphertext_size": len(ciphertext)}, [sealed])
        assert begun["ok"]
    with site.connect() as client:
        for _ in range(50):  # the server notices the close on its own thread
            if upload(site, sent, b"k\n1\n", client=client)["ok"]:
                break
        else:
            pytest.fail("the name stayed reserved after its connection closed")


def test_the_upload_socket_answers_only_the_allowed_user(simulated_backend: SimulatedBackend) -> None:
    keys = VaultKeys.generate()
    vault = Vault(backend=simulated_backend, keys=keys)
    directory = Path(tempfile.mkdtemp(prefix="confnb-upload-test-"))
    uploads = Uploads(vault, keys.hpke_private_key)
    server = VaultServer(
        vault, directory / "upload.sock", allowed_uid=os.getuid() + 4242, connections=uploads.connection
    )
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(directory / "upload.sock"))
            with pytest.raises((EOFError, ConnectionError)):
                call(client, {"op": "upload_cancel", "upload": "u1"})
    finally:
        server.close()
        directory.rmdir()


def test_an_arrow_file_with_offsets_outside_its_buffer_is_refused_and_audited_by_check(site: Site) -> None:
    """The parser process refuses it by full validation; the refusal names the check and the vault registers
    nothing, then takes the repaired file under the same name."""
    good = pa.array(["a", "b", "c"])
    offsets = pa.py_buffer(struct.pack("<4i", 0, 1 << 26, 2, 3))
    broken = pa.Array.from_buffers(pa.string(), 3, [None, offsets, good.buffers()[2]])

    def arrow(column: pa.Array) -> bytes:
        sink = pa.BufferOutputStream()
        table = pa.table({"s": column, "n": [1, 2, 3]})
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue().to_pybytes())

    answer = upload(site, descriptor("h", "arrow"), arrow(broken))
    expected = "the uploaded file: refused by check validation, Arrow full validation failed (column 0)"
    assert answer == {"ok": False, "error": {"type": "UploadError", "message": expected}}
    assert not site.vault.has_dataset("h") and site.policies == []
    refused = site.vault.audit.entries()[-1]
    assert refused["event"] == "upload-refused" and refused["fields"]["reason"] == expected
    assert upload(site, descriptor("h", "arrow"), arrow(good))["rows"] == 3
