"""Attestation with the Python API: nonce, evidence, verification, and what a rejection looks like.

This runs against the simulated TEE, so it needs no confidential VM; on a real SEV-SNP guest replace
``get_backend("simulated")`` with ``get_backend()`` and drop ``allow_simulated``.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb.attest import AttestationPolicy, verify_evidence
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.tee import get_backend


def main() -> int:
    # The verifier's side: a fresh nonce, and a policy pinning the kernel it expects.
    nonce = secrets.token_bytes(32)
    policy = AttestationPolicy(
        allow_simulated=True,
        measurements=(simulated_measurement().hex(),),
        max_evidence_age_s=300,
    )

    # The kernel's side: fresh keys, bound with the nonce into a hardware report.
    hpke_key = ec.generate_private_key(ec.SECP256R1())
    signing_key = ed25519.Ed25519PrivateKey.generate()
    evidence = issue_evidence(
        get_backend("simulated"),
        nonce,
        hpke_public_key=hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        signing_public_key=signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    )

    result = verify_evidence(evidence, policy, nonce=nonce)
    print("verified" if result.ok else "rejected", "(SIMULATED)" if result.simulated else "")
    for check in result.checks:
        print(f"  {check.outcome.value:4}  {check.name}: {check.detail}")

    # A stranger's nonce: the same evidence is now a replay.
    replay = verify_evidence(evidence, policy, nonce=secrets.token_bytes(32))
    print("replay:", replay.summary())
    return 0 if result.ok and not replay.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
