"""The attestation walkthrough: evidence, attacks, a data owner's broker and the kernel, on the simulated TEE.

A verifier sends a fresh nonce; the (simulated) confidential VM answers with evidence that binds the nonce and the
kernel's public keys into a signed report; the verifier checks it against AMD-shaped certificates and an analyst
policy that pins the kernel's measurement. Then the walkthrough shows the attacks the checks stop: a replayed
answer, a tampered report, and a policy that does not accept simulated hardware. A data owner encrypts synthetic
data, runs the key broker on loopback, and the broker releases the dataset key to the attested kernel, and refuses
it to a kernel running other code; the owner's audit log records both. Last, the confidential Jupyter kernel starts
as JupyterLab starts it, attested before Jupyter may use it.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb.attest.evidence import Evidence
from confnb.attest.policy import AttestationPolicy
from confnb.attest.result import VerificationResult
from confnb.attest.verifier import Verifier
from confnb.cli.attest import print_result, throwaway_public_keys
from confnb.cli.common import paint, write_output

Outcome = tuple[str, bool]  # what the walkthrough showed, and whether it held


def step(text: str) -> None:
    print()
    print(paint(f"== {text}", "bold"))


def run(workdir: Path) -> list[Outcome]:
    """Steps 1-15 in ``workdir``; returns each check the walkthrough made and whether it held."""
    from kernel_enclave.attestation import issue_evidence
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.tee.simulated import SimulatedBackend

    step("1. Start the simulated TEE (an AMD-shaped ARK -> ASK -> VCEK chain made on this machine)")
    tee = SimulatedBackend()  # persisted, so later runs and kernels share one simulated "chip"
    print(f"simulated chip state: {tee.state_dir} (root sha256 {tee.ark_sha256()[:16]}…)")
    measurement = simulated_measurement().hex()
    print(f"kernel measurement (SHA-384 of the enclave code): {measurement}")

    step("2. The analyst's policy: accept simulated hardware, but only this kernel's measurement")
    policy_path = workdir / "analyst-policy.toml"
    policy_text = (
        "[attestation]\n"
        "allow_simulated = true          # demo only: real deployments leave this false\n"
        f'simulated_roots = ["{tee.ark_sha256()}"]\n'
        f'measurements = ["{measurement}"]\n'
        "reject_debug = true\n"
        "max_vmpl = 0\n"
        "max_evidence_age_s = 300\n"
    )
    write_output(policy_path, policy_text.encode())
    print(policy_text.rstrip())
    policy = AttestationPolicy.load(policy_path)

    step("3. The verifier sends a fresh nonce; the kernel answers with evidence bound to it and to its keys")
    nonce = secrets.token_bytes(32)
    evidence = issue_evidence(tee, nonce, **throwaway_public_keys())
    write_output(workdir / "evidence.json", evidence.to_json().encode())
    print(f"nonce {nonce.hex()}")
    print(f"evidence written to {workdir / 'evidence.json'} (inspect it with 'confnb attest show')")

    verifier = Verifier(kds=None)
    step("4. Verify: AMD-shaped chain, report signature, TCB and chip binding, claims, nonce, policy")
    accepted = verifier.verify_evidence(evidence, policy, nonce=nonce)
    print_result(accepted)

    outcomes = [("genuine evidence is accepted", accepted.ok)]
    outcomes.append(
        _attack(
            "5. Replay: the same evidence offered for a new nonce",
            verifier.verify_evidence(evidence, policy, nonce=secrets.token_bytes(32)),
            "nonce",
        )
    )
    tampered = bytearray(evidence.report)
    tampered[0x90] ^= 0x01  # one bit of MEASUREMENT
    forged = Evidence(evidence.tee, bytes(tampered), evidence.claims, evidence.vek, evidence.chain)
    outcomes.append(
        _attack(
            "6. Tampering: one bit of the measurement flipped on the way",
            verifier.verify_evidence(forged, policy, nonce=nonce),
            "report_signature",
        )
    )
    strict = AttestationPolicy(measurements=(measurement,))
    outcomes.append(
        _attack(
            "7. A policy for real hardware (allow_simulated = false) on simulated evidence",
            verifier.verify_evidence(evidence, strict, nonce=nonce),
            "ark_pinned",
        )
    )

    outcomes += _data_owner(workdir, tee, measurement)
    outcomes += _kernel(workdir)
    return outcomes


def print_summary(outcomes: list[Outcome]) -> None:
    step("Summary")
    for text, held in outcomes:
        print(f"  {paint('ok', 'green') if held else paint('UNEXPECTED', 'red')}  {text}")


def _data_owner(workdir: Path, tee: Any, measurement: str) -> list[Outcome]:
    """Steps 8-12: an owner's broker on loopback releases a dataset key to the attested kernel, and only to it."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    from confnb import hpke
    from confnb.broker.audit import verify_log
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.manifest import verify_dataset
    from confnb.datasets.owner import encrypt_dataset
    from confnb.datasets.reader import read_verified
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.attestation import issue_evidence
    from kernel_enclave.tee.simulated import SimulatedBackend

    step("8. The data owner: a key broker store, synthetic claims data, an encrypted dataset")
    store = OwnerStore.create(workdir / "owner")
    output_policy = OutputPolicy.from_toml(
        '[policy]\nid = "claims-demo-v1"\n[release]\nallow = ["schema", "aggregate", "model_metrics"]\n'
        'min_group_size = 10\nnever_release = ["patient_id"]\n'
    )
    attestation = (
        f'[attestation]\nallow_simulated = true\nsimulated_roots = ["{tee.ark_sha256()}"]\n'
        f'measurements = ["{measurement}"]\nmax_evidence_age_s = 300\n'
    )
    table = _sample_claims(20_000)
    dataset = encrypt_dataset(table, workdir / "claims", store, "claims", output_policy, attestation)
    entry = dataset.manifest.files[0]
    print(
        f"owner store {store.directory}; dataset {dataset.directory}: {entry.rows:,} rows, {entry.size:,} bytes "
        f"of ciphertext, manifest signed by the owner"
    )

    step("9. The broker serves challenges and key releases on loopback")
    with serve_locally(store) as url:
        print(f"broker at {url} (OpenAPI document at {url}/openapi.json)")
        step("10. The kernel attests to the broker and receives the key, sealed to its attested HPKE key")
        key_pair = ec.generate_private_key(ec.SECP256R1())
        keys = {
            **throwaway_public_keys(),
            "hpke_public_key": key_pair.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        }
        _, challenge = _post(url, "/v1/challenge", {})
        evidence = issue_evidence(tee, bytes.fromhex(challenge["nonce"]), **keys)
        status, grant = _post(url, "/v1/datasets/claims/key-release", {"evidence": evidence.to_dict()})
        released = status == 200
        rows = 0
        if released:
            dataset_key = hpke.open_sealed(key_pair, base64.b64decode(grant["sealed_key"]), grant["hpke_info"].encode())
            verified = verify_dataset(dataset.directory, store.owner_public_key, dataset_id="claims")
            rows = int(read_verified(verified, dataset_key).num_rows)
            print(
                f"released ({grant['hpke_suite']}); the kernel verified the manifest and decrypted {rows:,} rows; "
                f"output policy {grant['output_policy']['policy']['id']} signed by the owner"
            )
        else:
            print(paint(f"refused: {grant.get('reason')}", "red"))

        step("11. A kernel running other code (another measurement) asks for the same key")
        impostor = SimulatedBackend(measurement=bytes(48))
        _, challenge = _post(url, "/v1/challenge", {})
        status, denial = _post(
            url,
            "/v1/datasets/claims/key-release",
            {"evidence": issue_evidence(impostor, bytes.fromhex(challenge["nonce"]), **keys).to_dict()},
        )
        refused = status == 403 and "measurement" in str(denial.get("reason"))
        print(paint(f"HTTP {status}: {denial.get('reason')}", "green" if refused else "red"))

    step("12. The owner's audit log: every challenge, release and refusal, hash-chained and signed")
    verification = verify_log(store.directory / "audit.sqlite", store.owner_public_key)
    kinds = [str(entry.kind) for entry in verification.entries]
    print(
        f"{len(kinds)} entries ({', '.join(f'{kinds.count(k)} {k}' for k in dict.fromkeys(kinds))}); "
        f"{'intact' if verification.ok else 'TAMPERED: ' + '; '.join(verification.problems)}"
    )
    return [
        (f"the attested kernel receives the key and reads {rows:,} rows", released and rows == table.num_rows),
        ("a kernel with another measurement is refused the key -> 403 measurement", refused),
        ("the owner's audit log verifies", verification.ok and kinds.count("release") == 1),
    ]


def _kernel(workdir: Path) -> list[Outcome]:
    """Steps 13-15: the confidential kernel, started as JupyterLab starts it, attested before it is used."""
    import os

    from jupyter_client.manager import KernelManager

    from confnb.provisioner import ConfidentialProvisioner, KernelLaunchError
    from confnb.provisioner.kernelspec import KERNEL_NAME, install, local_policy, private_jupyter_environment

    jupyter = workdir / "jupyter"
    os.environ.update(private_jupyter_environment(jupyter))  # a private kernelspec: nothing installed for the user
    install(prefix=str(jupyter))
    step("13. Start the 'Confidential Python (SEV-SNP)' kernel: launch, attest, verify, then connect")
    manager = KernelManager(kernel_name=KERNEL_NAME)
    manager.start_kernel()
    try:
        provisioner = manager.provisioner
        assert isinstance(provisioner, ConfidentialProvisioner)
        verified = provisioner.verification is not None and provisioner.verification.ok
        print(f"evidence verified against the kernelspec's policy: {verified} ({paint('SIMULATED TEE', 'yellow')})")
        print(f"CurveZMQ server key (bound in the report): {(manager.curve_publickey or b'').decode()}")
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        printed: list[str] = []
        code = (
            "import os; caps = open('/proc/self/status').read().split('CapEff:')[1].split()[0]\n"
            "print('a cell ran in the executor: pid', os.getpid(), 'effective capabilities', caps)"
        )
        client.execute_interactive(code, timeout=30, output_hook=lambda m: printed.append(m["content"].get("text", "")))
        print("".join(printed).rstrip())

        step("14. Fresh attestation on demand, answered by the relay (also while a cell runs)")
        nonce = secrets.token_hex(16)
        request = client.session.msg("confnb_attestation_request", {"nonce": nonce})
        client.control_channel.send(request)
        reply = client.get_control_msg(timeout=30)
        fresh = Evidence.from_dict(reply["content"]["evidence"]) if reply["content"]["status"] == "ok" else None
        bound = fresh is not None and fresh.claims["nonce"] == nonce
        print(f"confnb_attestation_reply carries nonce {nonce}: {bound}")
        client.stop_channels()
    finally:
        manager.shutdown_kernel()

    step("15. The same kernel under a policy that pins another measurement never starts")
    other = workdir / "other-measurement.toml"
    write_output(other, re.sub(r"measurements = \[.*\]", f'measurements = ["{"00" * 48}"]', local_policy()).encode())
    os.environ["CONFNB_ATTESTATION_POLICY"] = str(other)
    refused = False
    try:
        KernelManager(kernel_name=KERNEL_NAME).start_kernel()
    except KernelLaunchError as exc:
        refused = "measurement" in str(exc)
        print(paint(str(exc), "green" if refused else "red"))
    finally:
        del os.environ["CONFNB_ATTESTATION_POLICY"]
    return [
        ("the confidential kernel starts only after its evidence verifies", verified),
        ("fresh evidence on demand carries the client's nonce", bound),
        ("a kernel with another measurement never starts -> measurement", refused),
    ]


def _sample_claims(rows: int) -> Any:
    """Deterministic synthetic insurance claims: nobody's real data, the same on every run."""
    import numpy as np
    import pyarrow as pa  # type: ignore[import-untyped]

    rng = np.random.default_rng(2026)
    return pa.table(
        {
            "patient_id": pa.array(np.arange(100_000, 100_000 + rows)),
            "age": pa.array(rng.integers(18, 95, rows)),
            "region": pa.array(rng.choice(["north", "south", "east", "west"], rows)).dictionary_encode(),
            "diagnosis": pa.array(rng.choice(["J45", "E11", "I10", "M54", "F32"], rows)),
            "cost": pa.array(np.round(rng.gamma(2.0, 900.0, rows), 2)),
            "readmitted": pa.array(rng.random(rows) < 0.12),
        }
    )


def _post(url: str, path: str, body: object) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(  # noqa: S310 - an http:// loopback URL this module built
        url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback URL built here
            return int(response.status), dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        with error:  # it holds the connection's socket
            return int(error.code), dict(json.loads(error.read()))


def _attack(title: str, result: VerificationResult, expected_check: str) -> Outcome:
    step(title)
    failing = [check.name for check in result.failures]
    for check in result.failures:
        print(f"  {paint('FAIL', 'red')}  {check.name}: {check.detail}")
    held = not result.ok and expected_check in failing
    print(
        paint(f"rejected by {expected_check}, as it must be", "green")
        if held
        else paint(f"expected a rejection by {expected_check}", "red")
    )
    return (f"{title.split('. ', 1)[-1]} -> rejected by {expected_check}", held)
