"""The broker's HTTP API (ASGI, FastAPI): challenges, key releases and privacy-budget charges, with a published
OpenAPI document.

Every challenge, release, charge and denial is appended to the owner's audit log before the response leaves, so a
release the log does not show cannot have happened; so is every refusal made before a handler runs (a body over the
cap, a field that does not validate). Challenge refusals past the per-address cap are counted and audited as one entry
per address per interval, so a flood of them cannot make the log, and the broker's disk, pay for each.

The event loop never blocks: SQLite, signatures and seals run in thread pools of their own, one for releases, one
for challenges and one for auditing early refusals, each bounded. A flood of release requests therefore queues
behind its own few workers while ``/healthz`` and ``/v1/challenge`` keep answering, and no handler waits on AMD's
KDS (see :meth:`confnb.attest.kds.KdsClient.for_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from confnb import __version__
from confnb.attest.errors import PolicyError
from confnb.attest.verifier import Verifier
from confnb.broker.budget import MAX_PLAN_DIGEST_CHARS, BudgetLedger, ChargeRefusedError
from confnb.broker.challenges import ChallengeLimitError, ChallengeStore
from confnb.broker.limits import (
    MAX_DATASET_ID_CHARS,
    BodyLimit,
    BrokerLimits,
    Scope,
    bounded,
    client_key,
    key_release_dataset,
    refusal_body,
)
from confnb.broker.release import Denial, Grant, decide
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy

_T = TypeVar("_T")
log = logging.getLogger(__name__)

# Field caps, all far above what a genuine bundle holds (see confnb.attest.evidence); a longer field is a 400 that
# names it, before any parsing beyond JSON.
PemText = Annotated[str, StringConstraints(max_length=16 * 1024)]
ClaimName = Annotated[str, StringConstraints(max_length=64)]
ClaimValue = Annotated[str, StringConstraints(max_length=4096)]


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="64 hex characters; bind them into the evidence's claims and use them once")
    expires_at: str = Field(description="RFC 3339; evidence presented later is refused")


class Refusal(BaseModel):
    reason: str = Field(description="why the request was refused (at most a few thousand characters)")


class EvidenceCerts(BaseModel):
    vek: PemText | None = Field(default=None, description="the VCEK or VLEK, PEM")
    chain: list[PemText] = Field(default_factory=list, max_length=4, description="ASK or ASVK, then ARK, PEM")


class EvidenceBundle(BaseModel):
    format: str = Field(max_length=64, description="confnb-evidence/1")
    tee: str = Field(max_length=32, description="sev-snp or simulated")
    report: str = Field(max_length=8192, description="the attestation report, base64")
    certs: EvidenceCerts = Field(
        default_factory=EvidenceCerts,
        description="without them the broker uses its certificate cache; it does not wait on AMD's KDS",
    )
    claims: dict[ClaimName, ClaimValue] = Field(max_length=32, description="what REPORT_DATA binds, nonce included")


class KeyReleaseRequest(BaseModel):
    evidence: EvidenceBundle = Field(description="a confnb-evidence/1 bundle whose nonce claim is a fresh challenge")


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
    datasets: list[str] | None = Field(
        default=None,
        description="the registered dataset ids, only if the owner publishes them (broker serve "
        "--publish-dataset-ids); null otherwise, since ids can say what an owner holds",
    )


class BudgetChargeRequest(BaseModel):
    """What the kernel signs; its canonical JSON (sorted keys, no whitespace, UTF-8) is what the signature covers."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(max_length=MAX_DATASET_ID_CHARS, description="the dataset of the path")
    epsilon: float = Field(description="the ε this release spends; finite and greater than 0")
    delta: float = Field(description="the δ this release spends; finite and at least 0")
    plan_digest: str = Field(min_length=1, max_length=MAX_PLAN_DIGEST_CHARS, description="the released plan")
    kernel_key: str = Field(max_length=64, description="base64 of the kernel's raw Ed25519 key named at key release")
    nonce: str = Field(pattern="^[0-9a-f]{32}$", description="32 hex characters, random, never used before")


class BudgetChargeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request: BudgetChargeRequest
    signature: str = Field(max_length=128, description="base64 Ed25519 signature by kernel_key over the request")


class BudgetAcknowledgement(BaseModel):
    charge_id: str
    dataset_id: str
    epsilon: float
    delta: float
    plan_digest: str
    nonce: str
    epsilon_spent: float = Field(description="the dataset's ε spent, this charge included")
    epsilon_remaining: float
    delta_spent: float
    delta_remaining: float
    time: str = Field(description="RFC 3339")


class BudgetChargeReceipt(BaseModel):
    acknowledgement: BudgetAcknowledgement
    signature: str = Field(description="base64 Ed25519 signature by the owner over the acknowledgement's JSON")


class BudgetState(BaseModel):
    dataset_id: str
    mode: str = Field(description="dp, or exact (then no amounts)")
    epsilon: float | None = Field(default=None, description="the owner's ε budget")
    delta: float | None = Field(default=None, description="the owner's δ budget")
    epsilon_spent: float | None = None
    epsilon_remaining: float | None = None
    delta_spent: float | None = None
    delta_remaining: float | None = None
    charges: int = Field(description="how many charges the budget has paid")


_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": Refusal, "description": "the body is larger than the broker accepts"}
}
_RETRY_AFTER: dict[str, Any] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}


def create_app(store: OwnerStore, verifier: Verifier | None = None, limits: BrokerLimits | None = None) -> FastAPI:
    limits = limits or BrokerLimits()
    pools = _Pools(limits)
    tally = _RefusalTally(store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        flusher = asyncio.create_task(_flush_periodically(tally, pools, limits.refusal_tally_s))
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            pools.shutdown()
            tally.flush()  # the refusals counted since the last interval

    app = FastAPI(
        title="confnb key broker",
        version=__version__,
        description="Releases dataset keys only to kernels whose SEV-SNP attestation satisfies the owner's policy.",
        lifespan=lifespan,
    )
    ledger = BudgetLedger(store)
    challenges = ChallengeStore(
        store.database, max_outstanding=limits.max_challenges, max_per_client=limits.max_challenges_per_client
    )
    verifier = verifier or Verifier()

    async def audit_refusal(scope: Scope, status: int, reason: str) -> None:
        dataset_id = key_release_dataset(scope["path"])
        detail = {"reason": reason, "status": status, "path": bounded(scope["path"], 200)}
        await pools.run(pools.refusal, store.audit.append, "denial", _actor(scope.get("client")), dataset_id, detail)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, on_refusal=audit_refusal)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        reason = bounded("request: " + "; ".join(_describe(error) for error in exc.errors()))
        await audit_refusal(request.scope, 400, reason)
        return JSONResponse(status_code=400, content=refusal_body(request.url.path, reason))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own refusals (a body that is not UTF-8, an unknown path) in the broker's documented shape;
        those of a broker operation are audited, a path the broker does not serve is not its business."""
        reason = bounded(f"request: {exc.detail}")
        if exc.status_code == 400 or key_release_dataset(request.url.path) is not None:
            await audit_refusal(request.scope, exc.status_code, reason)
        return JSONResponse(
            status_code=exc.status_code, content=refusal_body(request.url.path, reason), headers=exc.headers
        )

    @app.post(
        "/v1/challenge",
        response_model=ChallengeResponse,
        responses={
            429: {
                "model": Refusal,
                "description": "too many challenges outstanding; retry later",
                "headers": _RETRY_AFTER,
            },
            **_TOO_LARGE,
        },
        summary="Get a fresh single-use nonce",
    )
    async def challenge(request: Request) -> Any:
        host = request.client.host if request.client else "unknown"
        try:
            issued = await pools.run(pools.challenge, _issue, challenges, store, client_key(host), _client(request))
        except ChallengeLimitError as exc:
            tally.count(client_key(host), str(exc))
            return JSONResponse(status_code=429, content={"reason": str(exc)}, headers={"Retry-After": "30"})
        return ChallengeResponse(**issued)

    @app.post(
        "/v1/datasets/{dataset_id}/key-release",
        response_model=KeyReleaseGrant,
        responses={
            403: {"model": KeyReleaseDenial},
            400: {"model": KeyReleaseDenial},
            404: {"model": KeyReleaseDenial},
            413: {"model": KeyReleaseDenial, "description": "the body is larger than the broker accepts"},
        },
        summary="Appraise evidence and release the dataset key sealed to the attested kernel",
    )
    async def key_release(
        dataset_id: Annotated[str, Path(max_length=MAX_DATASET_ID_CHARS)], body: KeyReleaseRequest, request: Request
    ) -> Any:
        status, content = await pools.run(
            pools.release, _release, store, challenges, verifier, dataset_id, body, _client(request)
        )
        return content if status == 200 else JSONResponse(status_code=status, content=content)

    @app.post(
        "/v1/datasets/{dataset_id}/budget-charges",
        response_model=BudgetChargeReceipt,
        responses={
            400: {"model": Refusal, "description": "the request is malformed (the reason names the field)"},
            403: {
                "model": Refusal,
                "description": "refused: not a dp dataset, key not granted, bad signature, "
                "replayed nonce, or the charge would exceed a budget",
            },
            404: {"model": Refusal, "description": "no such dataset"},
            **_TOO_LARGE,
        },
        summary="Charge a release to the dataset's differential-privacy budget (signed by an attested kernel)",
    )
    async def budget_charge(
        dataset_id: Annotated[str, Path(max_length=MAX_DATASET_ID_CHARS)], body: BudgetChargeBody, request: Request
    ) -> Any:
        # The signature covers the JSON values the kernel sent, not the model's coerced copy of them.
        document = await request.json()
        status, content = await pools.run(
            pools.release, _charge, ledger, dataset_id, document.get("request"), body.signature, _client(request)
        )
        return JSONResponse(status_code=status, content=content)

    @app.get(
        "/v1/datasets/{dataset_id}/budget",
        response_model=BudgetState,
        responses={
            403: {"model": Refusal, "description": "the owner's privacy table cannot be read"},
            404: {"model": Refusal, "description": "no such dataset"},
            **_TOO_LARGE,
        },
        summary="The dataset's differential-privacy budget: spent and remaining",
    )
    async def budget(dataset_id: Annotated[str, Path(max_length=MAX_DATASET_ID_CHARS)]) -> Any:
        status, content = await pools.run(pools.challenge, _budget_state, ledger, dataset_id)
        return JSONResponse(status_code=status, content=content)

    @app.get(
        "/v1/owner",
        response_model=OwnerInfo,
        responses=_TOO_LARGE,
        summary="The owner's public key (and dataset ids, if the owner publishes them)",
    )
    async def owner() -> OwnerInfo:
        pem = store.owner_public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        datasets = await pools.run(pools.challenge, store.dataset_ids) if limits.publish_dataset_ids else None
        return OwnerInfo(public_key=pem, datasets=datasets)

    @app.get("/healthz", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def openapi() -> dict[str, Any]:
        """FastAPI documents a 422 for every request it validates; this broker answers those with 400."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _charge(
    ledger: BudgetLedger, dataset_id: str, request: Any, signature: str, actor: str
) -> tuple[int, dict[str, Any]]:
    try:
        return 200, ledger.charge(dataset_id, request, signature, actor)
    except ChargeRefusedError as refusal:
        return refusal.status, {"reason": refusal.reason}


def _budget_state(ledger: BudgetLedger, dataset_id: str) -> tuple[int, dict[str, Any]]:
    try:
        state = ledger.state(dataset_id)
    except PolicyError as exc:
        return 403, {"reason": bounded(f"budget: the owner's privacy table is unusable: {exc}")}
    if state is None:
        return 404, {"reason": f"dataset: no dataset {bounded(dataset_id, MAX_DATASET_ID_CHARS)!r} is registered"}
    return 200, state


def _issue(challenges: ChallengeStore, store: OwnerStore, client: str, actor: str) -> dict[str, str]:
    issued = challenges.issue(client=client)
    store.audit.append("challenge", actor, None, {"nonce": issued.nonce})
    return issued.to_dict()


def _release(
    store: OwnerStore,
    challenges: ChallengeStore,
    verifier: Verifier,
    dataset_id: str,
    body: KeyReleaseRequest,
    actor: str,
) -> tuple[int, dict[str, Any]]:
    """Decide and audit, in a release worker: the entry is durable before the response is built.

    A grant is counted against the owner's ``max_kernels_per_day`` in the same transaction that audits it
    (:meth:`OwnerStore.count_release`); past the cap the sealed key is discarded and the request denied.
    """
    outcome: Grant | Denial
    moment = datetime.now(UTC)
    try:
        record = store.dataset(dataset_id)
    except PolicyError as exc:  # fail closed: an unreadable policy releases nothing
        record, outcome = None, Denial(dataset_id, f"policy: the owner's attestation policy is unusable: {exc}")
    else:
        outcome = Denial(dataset_id, "no such dataset", status=404)
    evidence = body.evidence.model_dump()
    if record is not None:
        outcome = decide(evidence, record, challenges, verifier, store.master_key, moment)
    dataset_id = bounded(dataset_id, MAX_DATASET_ID_CHARS)
    if isinstance(outcome, Grant):
        detail = {
            "key_id": outcome.key_id,
            "evidence": outcome.evidence_digest,
            "simulated": outcome.simulated,
            "nonce": evidence["claims"].get("nonce"),
        }
        try:
            cap = OutputPolicy.from_dict(outcome.output_policy, f"output policy of {dataset_id}").max_kernels_per_day
        except PolicyError as exc:  # fail closed: a cap that cannot be read releases nothing
            outcome = Denial(dataset_id, f"policy: the owner's output policy is unusable: {exc}")
        else:
            counted = store.count_release(
                dataset_id,
                cap,
                moment,
                detail,
                actor,
                kernel_key=outcome.signing_public_key,
                evidence_digest=outcome.evidence_digest,
            )
            if counted is not None:
                return 200, outcome.to_dict()
            outcome = Denial(
                dataset_id,
                f"release.max_kernels_per_day: the key of this dataset was released to {cap} kernels today (UTC), "
                "the most its owner's policy allows; try again after midnight UTC",
            )
    reason = bounded(outcome.reason)
    store.audit.append("denial", actor, dataset_id, {"reason": reason, "status": outcome.status})
    return outcome.status, {**outcome.to_dict(), "dataset_id": dataset_id, "reason": reason}


class _Pools:
    """The broker's bounded thread pools; their queues are bounded by the connection caps in front of them."""

    def __init__(self, limits: BrokerLimits) -> None:
        self.release = ThreadPoolExecutor(limits.release_workers, thread_name_prefix="confnb-release")
        self.challenge = ThreadPoolExecutor(limits.challenge_workers, thread_name_prefix="confnb-challenge")
        self.refusal = ThreadPoolExecutor(limits.refusal_workers, thread_name_prefix="confnb-refusal")

    @staticmethod
    async def run(pool: ThreadPoolExecutor, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(function, *args))

    def shutdown(self) -> None:
        for pool in (self.release, self.challenge, self.refusal):
            pool.shutdown(wait=True)


class _RefusalTally:
    """Challenge refusals per client address since the last flush, audited as one ``denial`` entry each."""

    def __init__(self, store: OwnerStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, str]] = {}

    def count(self, client: str, reason: str) -> None:
        with self._lock:
            seen, _ = self._counts.get(client, (0, ""))
            self._counts[client] = (seen + 1, reason)

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        pending = list(counts.items())
        try:
            while pending:
                client, (refused, reason) = pending[0]
                detail = {"refused": "challenge", "status": 429, "count": refused, "reason": bounded(reason)}
                self.store.audit.append("denial", client, None, detail)
                pending.pop(0)
        finally:  # what could not be written is counted again, not lost
            for client, (refused, reason) in pending:
                with self._lock:
                    seen, _ = self._counts.get(client, (0, ""))
                    self._counts[client] = (seen + refused, reason)


async def _flush_periodically(tally: _RefusalTally, pools: _Pools, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await pools.run(pools.refusal, tally.flush)
        except Exception:  # a busy or broken log must not end the flushing for good; the next interval retries
            log.exception("could not audit the refused challenges")


def _describe(error: Any) -> str:
    """One validation error as "where: what", without the offending input (which may be huge or secret)."""
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    return f"{bounded(where, 100)}: {bounded(str(error.get('msg', 'invalid')), 200)}"


def _actor(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"
