"""The broker's HTTP API (ASGI, FastAPI): challenges and key releases, with a published OpenAPI document.

Every challenge, release and denial is appended to the owner's audit log before the response leaves, so a release
the log does not show cannot have happened. Handlers are synchronous and run in the server's thread pool: the work
is SQLite, one ECDSA verification and one HPKE seal, all of which release the GIL or are short.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from confnb import __version__
from confnb.attest.errors import PolicyError
from confnb.attest.verifier import Verifier
from confnb.broker.challenges import ChallengeLimitError, ChallengeStore
from confnb.broker.release import Denial, Grant, decide
from confnb.broker.store import OwnerStore


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="64 hex characters; bind them into the evidence's claims and use them once")
    expires_at: str = Field(description="RFC 3339; evidence presented later is refused")


class KeyReleaseRequest(BaseModel):
    evidence: dict[str, Any] = Field(description="a confnb-evidence/1 bundle whose nonce claim is a fresh challenge")


class KeyReleaseGrant(BaseModel):
    dataset_id: str
    key_id: str
    sealed_key: str = Field(description="base64 of HPKE enc || ciphertext, sealed to the evidence's hpke_public_key")
    hpke_suite: str
    hpke_info: str = Field(description="the HPKE info string the kernel must use to open the sealed key")
    output_policy: dict[str, Any] = Field(description="the owner's output policy, canonical form")
    output_policy_signature: str = Field(description="base64 Ed25519 signature by the owner over the policy's JSON")
    evidence_digest: str


class KeyReleaseDenial(BaseModel):
    dataset_id: str
    released: bool = False
    reason: str = Field(description="which check failed and why")
    checks: list[dict[str, Any]] = Field(default_factory=list, description="every attestation check, when run")


class OwnerInfo(BaseModel):
    public_key: str = Field(description="the owner's Ed25519 public key, PEM; it signs output policies and the log")
    datasets: list[str]


def create_app(store: OwnerStore, verifier: Verifier | None = None) -> FastAPI:
    app = FastAPI(
        title="confnb key broker",
        version=__version__,
        description="Releases dataset keys only to kernels whose SEV-SNP attestation satisfies the owner's policy.",
    )
    challenges = ChallengeStore(store.database)
    verifier = verifier or Verifier()

    @app.post(
        "/v1/challenge",
        response_model=ChallengeResponse,
        responses={429: {"description": "too many challenges outstanding; retry later"}},
        summary="Get a fresh single-use nonce",
    )
    def challenge(request: Request) -> Any:
        try:
            issued = challenges.issue()
        except ChallengeLimitError as exc:
            return JSONResponse(status_code=429, content={"reason": str(exc)}, headers={"Retry-After": "30"})
        store.audit.append("challenge", _client(request), None, {"nonce": issued.nonce})
        return ChallengeResponse(**issued.to_dict())

    @app.post(
        "/v1/datasets/{dataset_id}/key-release",
        response_model=KeyReleaseGrant,
        responses={
            403: {"model": KeyReleaseDenial},
            400: {"model": KeyReleaseDenial},
            404: {"model": KeyReleaseDenial},
        },
        summary="Appraise evidence and release the dataset key sealed to the attested kernel",
    )
    def key_release(dataset_id: str, body: KeyReleaseRequest, request: Request) -> Any:
        outcome: Grant | Denial
        try:
            record = store.dataset(dataset_id)
        except PolicyError as exc:  # fail closed: an unreadable policy releases nothing
            record, outcome = None, Denial(dataset_id, f"policy: the owner's attestation policy is unusable: {exc}")
        else:
            outcome = Denial(dataset_id, "no such dataset", status=404)
        if record is not None:
            outcome = decide(body.evidence, record, challenges, verifier, store.master_key)
        actor = _client(request)
        dataset_id = _printable(dataset_id)
        if isinstance(outcome, Grant):
            store.audit.append(
                "release",
                actor,
                dataset_id,
                {
                    "key_id": outcome.key_id,
                    "evidence": outcome.evidence_digest,
                    "simulated": outcome.simulated,
                    "nonce": body.evidence.get("claims", {}).get("nonce"),
                },
            )
            return outcome.to_dict()
        store.audit.append(
            "denial", actor, dataset_id, {"reason": _printable(outcome.reason), "status": outcome.status}
        )
        return JSONResponse(status_code=outcome.status, content=outcome.to_dict())

    @app.get("/v1/owner", response_model=OwnerInfo, summary="The owner's public key and registered datasets")
    def owner() -> OwnerInfo:
        pem = store.owner_public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        return OwnerInfo(public_key=pem, datasets=store.dataset_ids())

    @app.get("/healthz", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _printable(text: str) -> str:
    """Untrusted text made storable: lone surrogates (valid in JSON escapes, not in UTF-8) become "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"
