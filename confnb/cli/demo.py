"""``confnb demo``: the attestation handshake end to end on the simulated TEE, with no setup.

A verifier sends a fresh nonce; the (simulated) confidential VM answers with evidence that binds the nonce and the
kernel's public keys into a signed report; the verifier checks it against AMD-shaped certificates and an analyst
policy that pins the kernel's measurement. Then the demo shows the attacks the checks stop: a replayed answer, a
tampered report, and a policy that does not accept simulated hardware.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
from pathlib import Path
from typing import Any

from confnb.attest.evidence import Evidence
from confnb.attest.policy import AttestationPolicy
from confnb.attest.result import VerificationResult
from confnb.attest.verifier import Verifier
from confnb.cli.attest import print_result, throwaway_public_keys
from confnb.cli.common import EXIT_OK, EXIT_REJECTED, paint, write_output


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="run the attestation handshake end to end on the simulated TEE",
        description="Issue simulated SEV-SNP evidence for a fresh nonce, verify it against a policy pinning the "
        "kernel's measurement, and show replay and tampering being rejected. Needs no hardware.",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        type=Path,
        help="where to keep the demo's policy and evidence (default: a temporary folder)",
    )
    parser.set_defaults(handler=_demo)


def _step(text: str) -> None:
    print()
    print(paint(f"== {text}", "bold"))


def _demo(args: argparse.Namespace) -> int:
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="confnb-demo-") as workdir:
            return _run(Path(workdir))
    args.dir.mkdir(parents=True, exist_ok=True)
    return _run(args.dir)


def _run(workdir: Path) -> int:
    from kernel_enclave.attestation import issue_evidence
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.tee.simulated import SimulatedBackend

    _step("1. Start the simulated TEE (an AMD-shaped ARK -> ASK -> VCEK chain made on this machine)")
    tee = SimulatedBackend()  # persisted, so later runs and kernels share one simulated "chip"
    print(f"simulated chip state: {tee.state_dir} (root sha256 {tee.ark_sha256()[:16]}…)")
    measurement = simulated_measurement().hex()
    print(f"kernel measurement (SHA-384 of the kernel_enclave code): {measurement}")

    _step("2. The analyst's policy: accept simulated hardware, but only this kernel's measurement")
    policy_path = workdir / "analyst-policy.toml"
    policy_text = (
        "[attestation]\n"
        "allow_simulated = true          # demo only: real deployments leave this false\n"
        f'measurements = ["{measurement}"]\n'
        "reject_debug = true\n"
        "max_vmpl = 0\n"
        "max_evidence_age_s = 300\n"
    )
    write_output(policy_path, policy_text.encode())
    print(policy_text.rstrip())
    policy = AttestationPolicy.load(policy_path)

    _step("3. The verifier sends a fresh nonce; the kernel answers with evidence bound to it and to its keys")
    nonce = secrets.token_bytes(32)
    evidence = issue_evidence(tee, nonce, **throwaway_public_keys())
    write_output(workdir / "evidence.json", evidence.to_json().encode())
    print(f"nonce {nonce.hex()}")
    print(f"evidence written to {workdir / 'evidence.json'} (inspect it with 'confnb attest show')")

    verifier = Verifier(kds=None)
    _step("4. Verify: AMD-shaped chain, report signature, TCB and chip binding, claims, nonce, policy")
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

    _step("Summary")
    for text, held in outcomes:
        print(f"  {paint('ok', 'green') if held else paint('UNEXPECTED', 'red')}  {text}")
    return EXIT_OK if all(held for _, held in outcomes) else EXIT_REJECTED


def _attack(title: str, result: VerificationResult, expected_check: str) -> tuple[str, bool]:
    _step(title)
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
