"""Uploads over the ``confnb.upload`` comm to a real confidential kernel, with this test acting as the browser.

The "browser" verifies the kernel's evidence against the kernelspec's attestation policy, seals a content key to
the attested HPKE key, encrypts the file with Tink's streaming AEAD and sends it in 1 MiB chunks over a real comm
(jupyter_client, CurveZMQ, the relay). The vault decrypts, parses and registers it; the analyst then opens it with
``cn.open`` and lives by the uploaded policy. The relay also reports every dataset's policy in
``confnb_gate_reply``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import pwd
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confidential_fixtures import ConfidentialWorld, start_confidential_kernel, stop_confidential_kernel

from confnb import hpke
from confnb.attest.evidence import Evidence, canonical_claims
from confnb.attest.policy import AttestationPolicy
from confnb.attest.verifier import verify_evidence
from confnb.datasets.streaming_aead import encrypt_stream
from kernel_enclave.relay.upload import UPLOAD_COMM_TARGET

pytestmark = pytest.mark.slow

CHUNK = 1 << 20
NAME = "sales"
POLICY = """
[policy]
id = "sales-upload-v1"
[release]
allow = ["schema", "row_count", "aggregate"]
min_group_size = 10
never_release = ["customer"]
[display]
mime = ["text/plain", "text/html", "text/markdown", "image/png"]
max_output_bytes = 4000000
tracebacks = "full"
"""
RARE_ROWS = 3  # group "rare" has 3 rows: below min_group_size 10
COMMON_ROWS = 75_000  # ten regions of 7,500


def sales_csv() -> bytes:
    """About 2.5 MiB: three Tink segments. Ten common groups and one of three rows."""
    lines = ["id,region,customer,amount"]
    for i in range(COMMON_ROWS):
        lines.append(f"{i},region-{i % 10},cust-{i:06d},{(i * 37) % 1000 / 10:.1f}")
    for i in range(RARE_ROWS):
        lines.append(f"{COMMON_ROWS + i},rare,cust-rare-{i},999.9")
    return ("\n".join(lines) + "\n").encode()


def descriptor(name: str = NAME, policy: str = POLICY, file_format: str = "csv") -> dict[str, str]:
    return {
        "format": "confnb-upload/1",
        "name": name,
        "file_format": file_format,
        "filename": f"{name}.{file_format}",
        "policy": policy,
    }


class Browser:
    """What the JupyterLab extension does, in Python: attest, seal, encrypt, and talk over the comm."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.last_size = 0
        self.hpke_public_key = base64.b64decode(self.verified_claims()["hpke_public_key"])

    def policy(self) -> AttestationPolicy:
        return AttestationPolicy.load(Path(self.kernel.manager.kernel_spec.resource_dir) / "attestation.toml")

    def evidence(self) -> tuple[Evidence, bytes]:
        nonce = secrets.token_bytes(32)
        reply = control_request(self.kernel, "confnb_attestation_request", {"nonce": nonce.hex()})
        assert reply["content"]["status"] == "ok", reply["content"]
        return Evidence.from_dict(reply["content"]["evidence"]), nonce

    def verified_claims(self) -> dict[str, str]:
        evidence, nonce = self.evidence()
        result = verify_evidence(evidence, self.policy(), nonce=nonce)
        assert result.ok, result.summary()
        return dict(evidence.claims)

    def seal(self, sealed_for: dict[str, str], plaintext: bytes) -> tuple[str, bytes]:
        """A fresh content key sealed for ``sealed_for`` and the file encrypted under it (AD: the descriptor)."""
        key = secrets.token_bytes(32)
        canonical = canonical_claims(sealed_for)
        info = b"confnb-upload/1:" + hashlib.sha256(canonical).hexdigest().encode("ascii")
        sealed = hpke.seal(self.hpke_public_key, key, info)
        sink = io.BytesIO()
        encrypt_stream(key, canonical, io.BytesIO(plaintext), sink)
        return base64.b64encode(sealed).decode(), sink.getvalue()

    def open(self, sent: dict[str, str], sealed_key: str, size: int) -> tuple[str, dict[str, Any]]:
        comm_id = secrets.token_hex(16)
        data = {"action": "begin", "descriptor": sent, "sealed_key": sealed_key, "ciphertext_size": size}
        self.send("comm_open", {"comm_id": comm_id, "target_name": UPLOAD_COMM_TARGET, "data": data})
        return comm_id, self.answer(comm_id)

    def message(self, comm_id: str, data: dict[str, Any], buffers: list[bytes] | None = None) -> dict[str, Any]:
        self.send("comm_msg", {"comm_id": comm_id, "data": data}, buffers)
        return self.answer(comm_id)

    def send(self, msg_type: str, content: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        client = self.kernel.client
        client.session.send(client.shell_channel.socket, client.session.msg(msg_type, content), buffers=buffers)

    def answer(self, comm_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.kernel.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            self.kernel.seen.append(message)
            if message["msg_type"] == "comm_msg" and message["content"]["comm_id"] == comm_id:
                data: dict[str, Any] = message["content"]["data"]
                return data

    def upload(
        self,
        plaintext: bytes,
        sent: dict[str, str],
        *,
        sealed_for: dict[str, str] | None = None,
        tamper_at: int | None = None,
    ) -> list[dict[str, Any]]:
        """Every reply of one upload, in order; stops at the first error."""
        sealed_key, ciphertext = self.seal(sealed_for or sent, plaintext)
        if tamper_at is not None:
            changed = bytearray(ciphertext)
            changed[tamper_at] ^= 0x01
            ciphertext = bytes(changed)
        self.last_size = len(ciphertext)
        comm_id, ready = self.open(sent, sealed_key, len(ciphertext))
        replies = [ready]
        if ready["action"] != "ready":
            return replies
        for seq, start in enumerate(range(0, len(ciphertext), CHUNK)):
            replies.append(self.message(comm_id, {"action": "chunk", "seq": seq}, [ciphertext[start : start + CHUNK]]))
            if replies[-1]["action"] != "progress":
                return replies
        replies.append(self.message(comm_id, {"action": "end"}))
        self.send("comm_close", {"comm_id": comm_id, "data": {}})
        return replies


def control_request(kernel: Any, msg_type: str, content: dict[str, Any], timeout: float = 15) -> dict[str, Any]:
    message = kernel.client.session.msg(msg_type, content)
    kernel.client.control_channel.send(message)
    deadline = time.monotonic() + timeout
    while True:
        reply: dict[str, Any] = kernel.client.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
        kernel.seen.append(reply)
        if reply["parent_header"].get("msg_id") == message["header"]["msg_id"]:
            return reply


def gate_datasets(kernel: Any) -> dict[str, dict[str, Any]]:
    reply = control_request(kernel, "confnb_gate_request", {})
    assert reply["msg_type"] == "confnb_gate_reply"
    return {entry["id"]: entry for entry in reply["content"]["datasets"]}


@pytest.fixture(scope="module")
def kernel(confnb_kernel_env: Path, confidential_world: ConfidentialWorld) -> Iterator[Any]:
    started = start_confidential_kernel(confidential_world)
    try:
        yield started
    finally:
        stop_confidential_kernel(started)


@pytest.fixture(scope="module")
def browser(kernel: Any) -> Browser:
    return Browser(kernel)


@pytest.fixture(scope="module")
def uploaded(browser: Browser) -> list[dict[str, Any]]:
    """The module's one successful upload of ``sales``, which later tests build on."""
    replies = browser.upload(sales_csv(), descriptor())
    replies[-1]["ciphertext_size"] = browser.last_size
    return replies


# -- a successful upload ----------------------------------------------------------------------------------------


def test_an_encrypted_csv_is_sealed_in_the_kernel(uploaded: list[dict[str, Any]]) -> None:
    done = dict(uploaded[-1])
    size = done.pop("ciphertext_size")
    chunks = -(-size // CHUNK)
    assert chunks >= 3  # several Tink segments, streamed
    assert [reply["action"] for reply in uploaded] == ["ready", *["progress"] * chunks, "done"], uploaded
    progress = uploaded[1:-1]
    assert [reply["seq"] for reply in progress] == list(range(chunks))
    assert [reply["received"] for reply in progress] == [min((seq + 1) * CHUNK, size) for seq in range(chunks)]
    assert done == {
        "action": "done",
        "dataset": NAME,
        "rows": COMMON_ROWS + RARE_ROWS,
        "columns": ["id", "region", "customer", "amount"],
        "policy_id": "sales-upload-v1",
    }


def test_the_analyst_opens_the_upload_and_lives_by_its_policy(kernel: Any, uploaded: list[dict[str, Any]]) -> None:
    assert uploaded[-1]["action"] == "done"
    shown = kernel.stdout(
        "import confnb as cn\n"
        f"t = cn.open({NAME!r})\n"
        "r = t.group_by('region').agg(n=('amount', 'count')).release()\n"
        "s = r.attrs['confnb_suppressed']\n"
        "print(sorted(r.index), list(r['n']), s['groups'], s['cells'])\n"
    )
    regions = [f"region-{i}" for i in range(10)]
    # The group of 3 is withheld whole; no number inside the released groups is.
    assert shown.strip().splitlines()[-1] == f"{regions} {[COMMON_ROWS // 10] * 10} 1 {{}}"

    reply, _ = kernel.execute("t[t['region'] == 'rare']['amount'].mean().release()")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "PolicyViolation"
    assert "release.min_group_size" in reply["content"]["evalue"] and f"'{NAME}'" in reply["content"]["evalue"]
    assert "999.9" not in kernel.everything_received()


def test_the_gate_reply_lists_the_upload_and_a_brokered_dataset_with_their_policies(
    kernel: Any, uploaded: list[dict[str, Any]]
) -> None:
    assert uploaded[-1]["action"] == "done"
    upload = gate_datasets(kernel)[NAME]
    assert (upload["source"], upload["policy_id"]) == ("upload", "sales-upload-v1")
    assert upload["policy"]["release"]["min_group_size"] == 10
    assert "customer" in upload["policy"]["release"]["never_release"]
    assert "explanation" not in upload  # words are the client's business (confnb.server); the relay reports facts

    assert "patients" not in gate_datasets(kernel)
    kernel.stdout("import confnb as cn\npatients = cn.open('patients')\n")
    brokered = gate_datasets(kernel)["patients"]
    assert (brokered["source"], brokered["policy_id"]) == ("broker", "clinic-patients-v1")
    assert brokered["policy"]["release"]["never_release"] == ["patient_id"]


# -- refusals ---------------------------------------------------------------------------------------------------


def _name_is_free(kernel: Any, name: str) -> bool:
    reply, _ = kernel.execute(f"import confnb as cn\ncn.open({name!r})")
    return reply["content"]["status"] == "error" and "no dataset" in reply["content"]["evalue"]


def test_a_tampered_chunk_fails_authentication_and_leaves_nothing(kernel: Any, browser: Browser) -> None:
    replies = browser.upload(sales_csv(), descriptor("tampered"), tamper_at=CHUNK + 500)  # inside segment 1
    assert replies[-1]["action"] == "error", replies
    assert "segment 1" in replies[-1]["message"] and "failed authentication" in replies[-1]["message"]
    assert "\n" not in replies[-1]["message"]
    assert _name_is_free(kernel, "tampered")
    assert "tampered" not in gate_datasets(kernel)
    again = browser.upload(b"a,b\n1,2\n", descriptor("tampered"))  # the name was released with the upload
    assert again[-1]["action"] == "done", again


def test_a_descriptor_changed_after_sealing_does_not_open(kernel: Any, browser: Browser) -> None:
    permissive = POLICY.replace("min_group_size = 10", "min_group_size = 1")
    replies = browser.upload(sales_csv(), descriptor("swapped", permissive), sealed_for=descriptor("swapped"))
    assert [reply["action"] for reply in replies] == ["error"]
    assert replies[0]["message"].startswith("HPKE: the sealed key does not open"), replies
    assert _name_is_free(kernel, "swapped")


def test_begin_refusals_name_the_problem(browser: Browser, uploaded: list[dict[str, Any]]) -> None:
    assert uploaded[-1]["action"] == "done"
    sealed_key, ciphertext = browser.seal(descriptor("fine"), b"x\n1\n")
    cases = {
        "descriptor.name": ({**descriptor("fine"), "name": "no spaces allowed"}, len(ciphertext)),
        "descriptor.file_format": ({**descriptor("fine"), "file_format": "xlsx"}, len(ciphertext)),
        "descriptor.policy: upload policy:4: release.min_group_size: must be an integer": (
            descriptor("fine", '[policy]\nid = "p"\n[release]\nmin_group_size = "ten"\n'),
            len(ciphertext),
        ),
        "descriptor.policy: upload policy: not valid TOML": (descriptor("fine", "[policy\n"), len(ciphertext)),
        "exceeds the limit of 4294967296 bytes": (descriptor("fine"), 4 * 1024**3 + 1),
        "descriptor.filename: must be a string": ({**descriptor("fine"), "filename": 7}, len(ciphertext)),
    }
    for expected, (sent, size) in cases.items():
        _, answer = browser.open(sent, sealed_key, size)  # type: ignore[arg-type]
        assert answer["action"] == "error", (expected, answer)
        assert expected in answer["message"], (expected, answer["message"])
    taken_key, taken = browser.seal(descriptor(NAME), b"x\n1\n")
    _, answer = browser.open(descriptor(NAME), taken_key, len(taken))
    assert answer == {"action": "error", "message": f"the dataset name {NAME!r} is already taken in this kernel"}
    _, answer = browser.open(descriptor("fine"), "not base64!", len(ciphertext))
    assert answer == {"action": "error", "message": "sealed_key: must be base64 text"}


def test_cancel_and_comm_close_discard_the_upload(kernel: Any, browser: Browser) -> None:
    sealed_key, ciphertext = browser.seal(descriptor("cancelled"), sales_csv())
    comm_id, ready = browser.open(descriptor("cancelled"), sealed_key, len(ciphertext))
    assert ready == {"action": "ready"}
    progress = browser.message(comm_id, {"action": "chunk", "seq": 0}, [ciphertext[:CHUNK]])
    assert progress == {"action": "progress", "seq": 0, "received": CHUNK}
    assert browser.message(comm_id, {"action": "cancel"}) == {"action": "cancelled"}
    late = browser.message(comm_id, {"action": "chunk", "seq": 1}, [ciphertext[CHUNK : 2 * CHUNK]])
    assert late["action"] == "error" and "no upload in progress" in late["message"]
    assert _name_is_free(kernel, "cancelled")

    comm_id, ready = browser.open(descriptor("cancelled"), sealed_key, len(ciphertext))
    assert ready == {"action": "ready"}  # the name is free again
    browser.message(comm_id, {"action": "chunk", "seq": 0}, [ciphertext[:CHUNK]])
    browser.send("comm_close", {"comm_id": comm_id, "data": {}})
    time.sleep(0.5)
    _, ready = browser.open(descriptor("cancelled"), sealed_key, len(ciphertext))
    assert ready == {"action": "ready"}  # closing the comm let go of the name, too


def test_the_upload_socket_refuses_the_analysts_code(kernel: Any) -> None:
    """The executor (the analyst's code) cannot reach the vault's upload operations; as root it runs as nobody,
    which neither the socket file's mode nor SO_PEERCRED lets in."""
    if os.geteuid() != 0:
        pytest.skip("needs root: without it the executor runs as the launcher's own user")
    path = kernel.stdout(
        "import os, pathlib\nprint(pathlib.Path(os.environ['CONFNB_VAULT_SOCKET']).with_name('upload.sock'))\n"
    ).strip()
    probe = (
        "import socket, sys\n"
        "c = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    c.connect(sys.argv[1])\n"
        "    from kernel_enclave.vault.protocol import recv_message, send_message\n"
        "    send_message(c, {'op': 'upload_cancel', 'upload': 'u1'})\n"
        "    print('answered', recv_message(c)[0])\n"
        "except (OSError, EOFError) as exc:\n"
        "    print('refused', type(exc).__name__)\n"
    )
    inside = kernel.stdout(
        "import subprocess, sys\n"
        f"run = subprocess.run([sys.executable, '-c', {probe!r}, {path!r}], capture_output=True, text=True)\n"
        "print(run.stdout + run.stderr)\n"
    )
    assert inside.startswith("refused"), inside
    nobody = pwd.getpwnam("nobody")
    outside = subprocess.run(
        [sys.executable, "-c", probe, path],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert outside.stdout.startswith("refused"), outside.stdout + outside.stderr


def test_an_interrupted_fit_leaves_an_upload_in_progress_whole(kernel: Any, browser: Browser) -> None:
    """An upload streams while the analyst's cell keeps the vault busy with a fit and is interrupted: the cell ends
    with ``KeyboardInterrupt``, the upload completes, and the next cell's answer is the upload's true counts."""
    name = "interrupted"
    sealed_key, ciphertext = browser.seal(descriptor(name), sales_csv())
    comm_id, ready = browser.open(descriptor(name), sealed_key, len(ciphertext))
    assert ready == {"action": "ready"}
    chunks = [ciphertext[start : start + CHUNK] for start in range(0, len(ciphertext), CHUNK)]
    assert len(chunks) >= 3
    assert browser.message(comm_id, {"action": "chunk", "seq": 0}, [chunks[0]])["action"] == "progress"

    msg_id = kernel.client.execute(
        "import confnb as cn\n"
        "from sklearn.ensemble import RandomForestClassifier\n"
        "p = cn.open('patients')\n"
        "m = cn.fit(RandomForestClassifier(n_estimators=20000, random_state=0), p, target='readmitted',"
        " features=['age', 'cost'])\n"
    )
    time.sleep(2.0)  # the fit is running in the vault's worker
    assert browser.message(comm_id, {"action": "chunk", "seq": 1}, [chunks[1]])["action"] == "progress"
    kernel.manager.interrupt_kernel()
    reply = kernel.client.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kernel.client.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    for seq, chunk in enumerate(chunks[2:], start=2):
        assert browser.message(comm_id, {"action": "chunk", "seq": seq}, [chunk])["action"] == "progress"
    done = browser.message(comm_id, {"action": "end"})
    browser.send("comm_close", {"comm_id": comm_id, "data": {}})
    assert done["action"] == "done", done
    shown = kernel.stdout(
        f"u = cn.open({name!r})\nr = u.group_by('region').agg(n=('amount', 'count')).release()\nprint(list(r['n']))\n"
    )
    assert shown.strip().splitlines()[-1] == str([COMMON_ROWS // 10] * 10)
