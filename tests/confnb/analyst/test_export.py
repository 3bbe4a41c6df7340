"""Exports with signed receipts, sealed persistence across kernels, and the kernel's audit log, against a real vault."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sklearn.linear_model import LogisticRegression

import confnb as cn
from confnb.analyst import SealedModel, SealedTable
from confnb.attest import AttestationPolicy
from confnb.receipts import verify_export
from kernel_enclave.measurement import simulated_measurement


@pytest.fixture
def claims(vault: Any) -> SealedTable:
    return cn.open("claims")


@pytest.fixture
def kernel_policy() -> AttestationPolicy:
    return AttestationPolicy(allow_simulated=True, measurements=(simulated_measurement().hex(),))


def _verified(path: Path, policy: AttestationPolicy, **options: Any) -> tuple[dict[str, Any], bytes]:
    verification = verify_export(path.read_bytes(), attestation_policy=policy, allow_simulated=True, **options)
    assert verification.ok, verification.summary()
    assert verification.receipt is not None and verification.payload is not None
    return verification.receipt, verification.payload


# -- export -----------------------------------------------------------------------------------------------


def test_a_released_frame_exports_as_csv_with_a_verifiable_receipt(
    claims: SealedTable, tmp_path: Path, kernel_policy: AttestationPolicy
) -> None:
    released = claims.group_by("sex").agg(mean_age=("age", "mean"), n=("age", "count")).release()
    written = cn.export(released, tmp_path / "by_sex.csv")
    assert written == tmp_path / "by_sex.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_sex.csv"]  # no temporary file left behind
    receipt, payload = _verified(written, kernel_policy)
    assert receipt["datasets"] == ["claims"] and receipt["policy_id"] == "claims-test-v1"
    assert receipt["media_type"] == "text/csv"
    exported = pd.read_csv(io.BytesIO(payload)).set_index("sex")
    pd.testing.assert_frame_equal(exported, released, check_dtype=False, check_index_type=False)


def test_parquet_and_json_exports_carry_the_released_value(
    claims: SealedTable, tmp_path: Path, kernel_policy: AttestationPolicy
) -> None:
    counts = claims["sex"].value_counts().release()  # every group released: they add up to the row count below
    _, payload = _verified(cn.export(counts, tmp_path / "sexes.parquet"), kernel_policy)
    table = pq.read_table(io.BytesIO(payload)).to_pandas()
    assert dict(zip(table["sex"], table["count"], strict=True)) == counts.to_dict()
    mean = claims["age"].mean().release()
    receipt, payload = _verified(cn.export(mean, tmp_path / "mean.json"), kernel_policy)
    assert json.loads(payload) == [{"age": pytest.approx(mean)}]  # the vault's one-row table
    assert receipt["media_type"] == "application/json"
    unreleased = claims.count()
    _, payload = _verified(cn.export(unreleased, tmp_path / "n.confnb", format="json"), kernel_policy)
    assert json.loads(payload) == 240


@pytest.mark.parametrize("form", ["pem-text", "pem-bytes", "pem-file", "key", "point"])
def test_an_export_sealed_to_a_recipient_opens_only_with_their_key(
    claims: SealedTable, tmp_path: Path, kernel_policy: AttestationPolicy, form: str
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "recipient.pem").write_bytes(pem)
    recipient: Any = {
        "pem-text": pem.decode(),
        "pem-bytes": pem,
        "pem-file": tmp_path / "recipient.pem",
        "key": public,
        "point": public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
    }[form]
    released = claims.agg(n=("age", "count")).release()
    written = cn.export(released, tmp_path / "sealed.json", recipient=recipient)
    receipt, payload = _verified(written, kernel_policy, recipient_private_key=private)
    assert receipt["sealed_to"] is not None
    assert json.loads(payload) == [{"n": 240}]
    stranger = verify_export(
        written.read_bytes(),
        attestation_policy=kernel_policy,
        allow_simulated=True,
        recipient_private_key=ec.generate_private_key(ec.SECP256R1()),
    )
    assert not stranger.ok


def test_bad_recipients_are_refused_before_anything_is_exported(claims: SealedTable, tmp_path: Path) -> None:
    released = claims["age"].mean().release()
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    for bad in (rsa_pem, p384, b"not a key", tmp_path / "missing.pem"):
        with pytest.raises(ValueError, match="P-256 public key"):
            cn.export(released, tmp_path / "x.json", recipient=bad)
    with pytest.raises(TypeError, match="P-256 public key"):
        cn.export(released, tmp_path / "x.json", recipient=42)
    assert list(tmp_path.iterdir()) == []


def test_only_values_released_here_and_unchanged_are_exported(claims: SealedTable, tmp_path: Path) -> None:
    released = claims.group_by("sex").agg(n=("age", "count")).release()
    with pytest.raises(ValueError, match="was not released by this kernel"):
        cn.export(released * 2, tmp_path / "derived.csv")
    with pytest.raises(ValueError, match="was not released by this kernel"):
        cn.export(pd.DataFrame({"n": [1]}), tmp_path / "forged.csv")
    with pytest.raises(ValueError, match="was not released by this kernel"):
        cn.export(123.0, tmp_path / "forged.json")
    with pytest.raises(ValueError, match=r"\.skops is for models"):
        cn.export(released, tmp_path / "frame.skops")
    with pytest.raises(ValueError, match="cannot tell the export format"):
        cn.export(released, tmp_path / "frame.xlsx")
    released.loc["F", "n"] = 1_000_000
    with pytest.raises(ValueError, match="changed after it was released"):
        cn.export(released, tmp_path / "changed.csv")
    assert list(tmp_path.iterdir()) == []


def test_a_model_exports_as_skops(claims: SealedTable, tmp_path: Path, kernel_policy: AttestationPolicy) -> None:
    import skops.io as sio

    model = cn.fit(LogisticRegression(), claims, target="readmitted", features=["age"], random_state=0)
    receipt, payload = _verified(model.export(tmp_path / "model.skops"), kernel_policy)
    assert receipt["datasets"] == ["claims"]
    loaded = sio.loads(payload, trusted=sio.get_untrusted_types(data=payload))
    assert loaded.coef_[0][0] == pytest.approx(model.params()["coef_"]["age"])
    with pytest.raises(ValueError, match=r"exported as \.skops"):
        cn.export(model, tmp_path / "model.json")


def test_a_tree_never_leaves_as_a_file(claims: SealedTable, tmp_path: Path) -> None:
    """Its leaves and split points are single patients' values, whatever params() may show."""
    from sklearn.tree import DecisionTreeClassifier

    model = cn.fit(DecisionTreeClassifier(min_samples_leaf=20), claims, target="readmitted", features=["age"])
    with pytest.raises(cn.PolicyViolation, match="keeps single records' values") as refused:
        model.export(tmp_path / "tree.skops")
    assert refused.value.rule == "release.min_group_size"
    assert list(tmp_path.iterdir()) == []


# -- sealed persistence -----------------------------------------------------------------------------------


def test_a_sealed_table_comes_back_in_a_later_kernel(
    claims: SealedTable, tmp_path: Path, start_vault: Callable[..., Any]
) -> None:
    older = claims[claims["age"] > 40].assign(decade=(claims["age"] // 10) * 10)
    expected = older.group_by("decade").agg(n=("age", "count")).release()
    path = older.seal(tmp_path / "older.sealed")
    assert path.stat().st_size > 0 and b"north" not in path.read_bytes()

    start_vault()  # a new kernel, same measurement
    restored = cn.unseal(path)
    assert isinstance(restored, SealedTable)
    assert restored.datasets == ("claims",)
    assert "decade" in restored.columns
    pd.testing.assert_frame_equal(restored.group_by("decade").agg(n=("age", "count")).release(), expected)
    with pytest.raises(cn.PolicyViolation) as caught:  # the owner's policy travels with the sealed table
        restored["patient_id"].min().release()
    assert caught.value.rule == "release.never_release"


def test_a_sealed_model_comes_back_in_a_later_kernel(
    claims: SealedTable, tmp_path: Path, start_vault: Callable[..., Any]
) -> None:
    model = cn.fit(LogisticRegression(), claims, target="readmitted", features=["age"], random_state=0)
    params = model.params()
    path = model.seal(tmp_path / "model.sealed")
    start_vault()
    restored = cn.unseal(path)
    assert isinstance(restored, SealedModel)
    assert restored.features == ["age"] and restored.params()["coef_"] == pytest.approx(params["coef_"])


def test_another_measurement_cannot_unseal(
    claims: SealedTable, tmp_path: Path, start_vault: Callable[..., Any], simulated_tee_dir: Path
) -> None:
    from kernel_enclave.tee.simulated import SimulatedBackend

    path = claims.seal(tmp_path / "claims.sealed")
    start_vault(SimulatedBackend(state_dir=simulated_tee_dir, measurement=bytes(48)))
    with pytest.raises(cn.VaultError):
        cn.unseal(path)


# -- audit and kernel -------------------------------------------------------------------------------------


def test_the_audit_log_records_releases_and_refusals_without_values(claims: SealedTable, tmp_path: Path) -> None:
    claims["age"].mean().release()
    with pytest.raises(cn.PolicyViolation):
        claims["patient_id"].mean().release()
    entries = cn.audit()
    events = [entry["event"] for entry in entries]
    assert "open" in events and "release" in events and "refusal" in events
    written = tmp_path / "audit.jsonl"
    again = cn.audit(written)
    lines = written.read_text().splitlines()
    assert len(lines) == len(again) >= len(entries)
    assert json.loads(lines[0]) == again[0]
    assert "north" not in written.read_text()


def test_kernel_info_names_the_tee_and_measurement(vault: Any) -> None:
    from confnb.analyst import kernel_info

    info = kernel_info()
    assert info["tee"] == "simulated"
    assert info["measurement"] == simulated_measurement().hex()
    assert len(bytes.fromhex(info["signing_public_key"])) == 32
    assert os.environ["CONFNB_VAULT_SOCKET"] == str(vault.socket_path)
