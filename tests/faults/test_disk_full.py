"""A full disk never leaves half a file, loses the previous one, or parts a key from its audit entry.

Each test mounts a small tmpfs of its own (as root; skipped, saying why, where mounting is not permitted), fills it
with a file of zeros and then makes confnb write there: ``confnb dataset encrypt`` (the real CLI, in its own
process), the broker's databases (a key registration, and key releases served by a real broker on loopback), and
``t.seal`` / ``cn.export`` in a real confidential kernel. Each failure must be one line naming the file and the
cause; afterwards the disk holds exactly what it held before (no temporary file, no partial dataset directory), the
previous file is unchanged, the broker registered nothing, and its audit log verifies and agrees with what
happened. Every test has its legitimate twin: with the space back, the same operation succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confnb.broker.audit import AuditKind, reconcile_releases, verify_log
from confnb.broker.store import OwnerStore, StoreError
from confnb.policy.output import OutputPolicy

pytestmark = pytest.mark.usefixtures("no_process_left_behind")

POLICY = '[policy]\nid = "disk-v1"\n[release]\nallow = ["aggregate", "row_count"]\nmin_group_size = 5\n'


@contextlib.contextmanager
def small_disk(size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (world-writable and sticky, like /tmp, so a kernel's executor can write there)."""
    mount_point = Path(tempfile.mkdtemp(prefix="confnb-small-disk-"))
    mount_point.chmod(0o755)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        mount_point.rmdir()
        pytest.skip("no mount command here: the full-disk tests mount a small tmpfs of their own")
    if done.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False, capture_output=True)
        if os.path.ismount(mount_point):
            subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
        mount_point.rmdir()


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with one file of zeros; delete the file to give the space back."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        chunk = b"\0" * 65536
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            if free <= leave:
                break
            try:
                handle.write(chunk[: max(1, min(len(chunk), free - leave))])
                handle.flush()
            except OSError:
                break
    return filler


def listing(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def _table(rows: int) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(5)
    return pd.DataFrame({"x": rng.normal(size=rows), "y": rng.normal(size=rows), "g": rng.integers(0, 4, rows)})


def _register_entries(store: OwnerStore, dataset_id: str) -> list[str]:
    return [
        str(entry.detail.get("action"))
        for entry in store.audit.entries()
        if entry.kind is AuditKind.ADMIN and entry.dataset_id == dataset_id
    ]


# -- confnb dataset encrypt ---------------------------------------------------------------------------------------


def _encrypt(source: Path, owner: Path, out: Path, policy: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "confnb", "dataset", "encrypt", str(source), "--broker-dir", str(owner)]
    command += ["--id", "big", "--policy", str(policy), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def test_encrypt_onto_a_full_disk_leaves_nothing_and_registers_no_key(tmp_path: Path) -> None:
    store = OwnerStore.create(tmp_path / "owner")
    source = tmp_path / "big.parquet"
    _table(40_000).to_parquet(source)  # about 1 MB of ciphertext
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    before = (store.dataset_ids(), store.audit.head())
    with small_disk("256k") as disk:
        (disk / "other").write_bytes(b"what was here before\n")
        failed = _encrypt(source, store.directory, disk / "big", policy)
        assert failed.returncode == 2, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1, failed.stderr
        assert lines[0].startswith(f"confnb: error: cannot write {disk / 'big'}: no space left on device"), lines
        assert "nothing was written, no key registered" in lines[0]
        assert listing(disk) == {"other": b"what was here before\n"}  # no staging directory, no partial file
        assert sorted(p.name for p in disk.iterdir()) == ["other"]
    assert (store.dataset_ids(), store.audit.head()) == before
    # The twin: with room, the same command succeeds (the id was never taken).
    done = _encrypt(source, store.directory, tmp_path / "big", policy)
    assert done.returncode == 0, done.stderr
    assert store.dataset_ids() == ["big"]
    assert verify_log(store.audit.path, store.owner_public_key).ok
    # The owner's way back, onto a full disk: the same one line, and nothing written.
    with small_disk("64k") as disk:
        command = [sys.executable, "-m", "confnb", "dataset", "decrypt", str(tmp_path / "big")]
        command += ["--broker-dir", str(store.directory), "--out", str(disk / "back.csv")]
        failed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr == (
            f"confnb: error: cannot write {disk / 'back.csv'}: no space left on device; nothing was written\n"
        )
        assert list(disk.iterdir()) == []


# -- the broker's databases ---------------------------------------------------------------------------------------


def test_a_registration_on_a_full_disk_leaves_no_key_and_a_log_that_says_so(tmp_path: Path) -> None:
    from confnb.datasets.owner import encrypt_dataset

    # An attestation policy with a long comment: its row cannot fit in whatever room SQLite's files still have.
    attestation = (
        "# " + "padding " * 40_000 + '\n[attestation]\nallow_simulated = true\nmeasurements = ["' + "0" * 96 + '"]\n'
    )
    with small_disk("1m") as disk:
        store = OwnerStore.create(disk / "owner")
        store.register_dataset("kept", OutputPolicy.from_toml(POLICY))
        head = store.audit.head()
        # A broker serving this store keeps the database open (and SQLite's shared-memory file with it); without
        # that, a full disk may already refuse the read before the registration (also a one-line StoreError).
        serving = sqlite3.connect(store.database)
        serving.execute("SELECT count(*) FROM datasets").fetchone()
        filler = fill(disk)
        with pytest.raises(StoreError) as refused:
            encrypt_dataset(_table(500), tmp_path / "d", store, "d", OutputPolicy.from_toml(POLICY), attestation)
        message = str(refused.value)
        assert message.startswith("cannot register dataset 'd': ") and message.endswith("; nothing was registered")
        assert "full" in message, message  # SQLite's "database or disk is full", or the audit log's
        assert "\n" not in message
        assert not (tmp_path / "d").exists()  # the encrypted directory went with its key
        assert store.dataset_ids() == ["kept"]
        assert store.dataset("kept") is not None  # the previous state is intact
        # If the log took the registration before the database failed, it also says that it failed.
        actions = _register_entries(store, "d")
        assert actions in ([], ["register", "register-failed"]), actions
        assert verify_log(store.audit.path, store.owner_public_key).ok
        filler.unlink()
        encrypt_dataset(_table(500), tmp_path / "d", store, "d", OutputPolicy.from_toml(POLICY), attestation)
        assert store.dataset_ids() == ["d", "kept"]
        assert len(store.dataset_key("kept")) == 32  # and usable
        assert _register_entries(store, "d")[-1] == "register"
        assert store.audit.head() != head
        serving.close()
        store.audit.close()


def test_key_releases_from_a_broker_on_a_full_disk_fail_cleanly_and_the_logs_agree(
    tmp_path: Path, simulated_backend: Any
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from confnb.attest import Verifier
    from confnb.broker.local import serve_locally
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.vault.audit import KernelAuditLog
    from kernel_enclave.vault.broker_client import BrokerClient, KeyReleaseError, RetryPolicy

    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    kernel_key = ed25519.Ed25519PrivateKey.generate()
    kernel_log = KernelAuditLog(kernel_key)
    with small_disk("1m") as disk:
        store = OwnerStore.create(disk / "owner")
        store.register_dataset("claims", OutputPolicy.from_toml(POLICY), attestation)
        owner_key = store.owner_public_key.public_bytes_raw()
        with serve_locally(store, Verifier()) as url:
            client = BrokerClient(
                simulated_backend,
                ec.generate_private_key(ec.SECP256R1()),
                kernel_key.public_key().public_bytes_raw(),
                "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
                url=url,
                retry=RetryPolicy(attempts=2, first_pause_s=0.05, timeout_s=10),
            )

            def journal(event: str, fields: Any) -> None:
                kernel_log.append(event, **fields)

            filler = fill(disk)
            outcomes: list[str] = []
            for _ in range(6):  # a few writes may still fit in SQLite's slack; then every one fails
                try:
                    client.release("claims", owner_key, journal)
                    outcomes.append("released")
                except KeyReleaseError as exc:
                    outcomes.append(str(exc))
            failures = [outcome for outcome in outcomes if outcome != "released"]
            assert failures and outcomes[-1] != "released", outcomes
            assert all("\n" not in failure and failure.startswith(f"broker {url} ") for failure in failures), failures
            filler.unlink()
            released = client.release("claims", owner_key, journal)  # the twin: with room, a release succeeds
            assert released.key == store.dataset_key("claims")
        assert verify_log(store.audit.path, store.owner_public_key).ok
        findings = reconcile_releases(store.audit.entries(), kernel_log.entries())
        store.audit.close()
    assert findings and all(finding.agree for finding in findings), [f.finding for f in findings if not f.agree]
    assert sum(finding.kernel == "received" for finding in findings) == outcomes.count("released") + 1


# -- t.seal and cn.export in a confidential kernel ------------------------------------------------------------------


@pytest.mark.slow
def test_seal_and_export_on_a_full_disk_keep_the_previous_files(shared_kernel: Any, confidential_world: Any) -> None:
    with small_disk("512k") as disk:
        sealed, exported = disk / "patients.sealed", disk / "mean.json"
        first = shared_kernel.run(
            f"t.seal({str(sealed)!r})\nmean = t['age'].mean().release()\ncn.export(mean, {str(exported)!r})"
        )
        assert first.status == "ok", first.reply["content"]
        previous = listing(disk)
        assert set(previous) == {"patients.sealed", "mean.json"}
        filler = fill(disk, leave=4096)
        for code, target in ((f"t.seal({str(sealed)!r})", sealed), (f"cn.export(mean, {str(exported)!r})", exported)):
            cell = shared_kernel.run(code)
            assert cell.status == "error", code
            ename, evalue = cell.error
            assert ename == "WriteError", cell.error
            assert evalue == f"cannot write {target}: no space left on device; nothing was written", evalue
            after = listing(disk)
            after.pop("filler")
            assert after == previous  # no temporary file, and the previous file byte for byte
        filler.unlink()
        again = shared_kernel.run(f"t.seal({str(sealed)!r})\ncn.export(mean, {str(exported)!r})")
        assert again.status == "ok", again.reply["content"]
        assert json.loads(exported.read_bytes())["format"] == "confnb-export/1"
        unsealed = shared_kernel.run(f"print(cn.unseal({str(sealed)!r})['age'].count().release())")
        assert unsealed.status == "ok", unsealed.reply["content"]
        assert int(unsealed.stdout) == int(confidential_world.frames["patients"]["age"].count())
