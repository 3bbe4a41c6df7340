"""Fresh evidence from a running kernel, verified in the analyst's own Jupyter server.

The browser chooses the nonce, so a verdict it receives cannot be a replay of an older one; the server asks the
kernel on its control channel (the relay answers there, even while a cell runs), through the kernel manager's own
connection: the CurveZMQ keys the provisioner obtained from the attested launcher, so the answer comes from the
kernel that was verified at launch. Verification runs in a worker thread (certificates may come from AMD's KDS,
and signature checks cost milliseconds the tornado loop should spend serving other requests), against the policy
the kernel was launched under, unless the server's own configuration names another one.

Every failure to obtain or verify evidence becomes a ``failed`` verdict with a check that names the reason; nothing
here turns a failure into success, and nothing reports ``verified`` without the verifier's own ``ok``.
"""

from __future__ import annotations

import asyncio
import hmac
import queue
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from confnb.attest.errors import AttestInputError, KdsError, PolicyError
from confnb.attest.evidence import Evidence, rfc3339
from confnb.attest.policy import AttestationPolicy
from confnb.attest.result import Check, Outcome, VerificationResult
from confnb.provisioner import ConfidentialProvisioner

ATTESTATION_REQUEST = "confnb_attestation_request"
GATE_REQUEST = "confnb_gate_request"
NOT_CONFIDENTIAL = "not a confidential kernel"
TCB_FIELDS = {"tcb_current": "current_tcb", "tcb_reported": "reported_tcb", "tcb_committed": "committed_tcb"}


class KernelRequestError(Exception):
    """The kernel did not answer a control request in time, or answered with an error; the message says which."""


def is_confidential(manager: AsyncKernelManager) -> bool:
    """Only kernels started by ``confnb-provisioner`` were attested at launch and have a relay to ask."""
    return isinstance(manager.provisioner, ConfidentialProvisioner)


async def control_request(
    manager: AsyncKernelManager, msg_type: str, content: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Send one control request and return the content of its reply (matched by parent msg_id).

    Each request gets a control socket of its own on the manager's ZMQ context, so concurrent requests for one
    kernel (two browser tabs, "Verify again" twice) each receive their own reply, and the kernel's websocket
    clients never see ours. The socket's routing identity is its session id (jupyter_client's choice), so each
    request also gets a session id of its own: sockets sharing the manager's would share one identity, and the
    kernel's ROUTER would deliver every reply to just one of them. Raises :class:`KernelRequestError` on silence
    or an error reply.
    """
    session = manager.session.clone()
    session.session = str(uuid.uuid4())
    client = manager.client(context=manager.context, session=session)
    client.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
    try:
        request = client.session.msg(msg_type, content)
        client.control_channel.send(request)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KernelRequestError(f"the kernel did not answer {msg_type} within {timeout:g} s")
            try:
                reply: dict[str, Any] = await client.control_channel.get_msg(timeout=remaining)
            except queue.Empty:
                continue
            except ValueError as exc:  # a reply whose signature does not verify: not from the kernel's relay
                raise KernelRequestError(f"the kernel's answer to {msg_type} is unusable: {exc}") from None
            if reply.get("parent_header", {}).get("msg_id") == request["header"]["msg_id"]:
                break
    finally:
        client.stop_channels()
    answer = reply.get("content")
    if not isinstance(answer, dict):
        raise KernelRequestError(f"the kernel's answer to {msg_type} has no content")
    if answer.get("status") != "ok":
        reason = answer.get("evalue") or answer.get("ename") or "no reason given"
        raise KernelRequestError(f"the kernel answered {msg_type} with an error: {' '.join(str(reason).split())}")
    return answer


@dataclass(frozen=True)
class PolicyChoice:
    """The attestation policy in force for one verification, or why there is none (then nothing verifies)."""

    policy: AttestationPolicy | None
    problem: str = ""


def policy_for(manager: AsyncKernelManager, override: str) -> PolicyChoice:
    """The policy the kernel was launched under, or ``override`` (a path) when the server is configured with one.

    The provisioner records the verified launch's policy (its file and digest). The file is read again here and
    must still have that digest: a policy edited since the launch is not the one the kernel was admitted under,
    and silently appraising with it would show the analyst a verdict against rules nobody checked at launch.
    """
    if override:
        try:
            return PolicyChoice(AttestationPolicy.load(override))
        except PolicyError as exc:
            return PolicyChoice(None, f"ConfnbServerApp.attestation_policy: {exc}")
    provisioner = manager.provisioner
    launch = getattr(provisioner, "verification", None)
    recorded = launch.policy if isinstance(launch, VerificationResult) else None
    if not recorded or not recorded.get("source") or not recorded.get("digest"):
        return PolicyChoice(None, "the kernel's provisioner holds no verified launch to take the policy from")
    try:
        policy = AttestationPolicy.load(str(recorded["source"]))
    except PolicyError as exc:
        return PolicyChoice(None, str(exc))
    if not hmac.compare_digest(policy.digest(), str(recorded["digest"])):
        return PolicyChoice(
            None,
            f"{recorded['source']} changed since the kernel started (now {policy.digest()}, launched under "
            f"{recorded['digest']}); restart the kernel, or set ConfnbServerApp.attestation_policy",
        )
    return PolicyChoice(policy)


async def attest_kernel(
    manager: AsyncKernelManager, kernel_id: str, nonce: str, *, override_policy: str, timeout: float
) -> dict[str, Any]:
    """The attestation endpoint's answer for one kernel and one (validated, lowercase hex) browser nonce."""
    if not is_confidential(manager):
        return {"kernel_id": kernel_id, "confidential": False, "status": "failed", "summary": NOT_CONFIDENTIAL}
    choice = await asyncio.to_thread(policy_for, manager, override_policy)
    if choice.policy is None:
        return _failed(kernel_id, nonce, "attestation_policy", choice.problem, None)
    try:
        answer = await control_request(manager, ATTESTATION_REQUEST, {"nonce": nonce}, timeout)
    except KernelRequestError as exc:
        return _failed(kernel_id, nonce, "evidence", str(exc), choice.policy)
    bundle = answer.get("evidence")
    if not isinstance(bundle, dict):
        return _failed(kernel_id, nonce, "evidence", "the kernel's reply carries no evidence bundle", choice.policy)
    curve_key = manager.curve_publickey
    return await asyncio.to_thread(_verify, kernel_id, nonce, bundle, choice.policy, curve_key)


def _verify(
    kernel_id: str, nonce: str, bundle: dict[str, Any], policy: AttestationPolicy, curve_key: bytes | None
) -> dict[str, Any]:
    from confnb.attest.verifier import default_verifier

    try:
        evidence = Evidence.from_dict(bundle)
        result = default_verifier().verify_evidence(evidence, policy, nonce=bytes.fromhex(nonce))
    except (AttestInputError, KdsError) as exc:
        return _failed(kernel_id, nonce, "evidence", f"the evidence is unusable: {exc}", policy, bundle)
    result.checks.append(_channel_binding(evidence, curve_key))
    return {
        "kernel_id": kernel_id,
        "confidential": True,
        "status": "verified" if result.ok else "failed",
        "simulated": result.simulated,
        "nonce": nonce,
        "summary": result.summary(),
        "checks": [check.to_dict() for check in result.checks],
        "claims": flatten_claims(result, evidence),
        "attestation_policy": policy_view(policy),
        "evidence": bundle,
        "verified_at": rfc3339(datetime.now(UTC)),
    }


def _channel_binding(evidence: Evidence, curve_key: bytes | None) -> Check:
    """The evidence must name the CurveZMQ key of the connection it came over: otherwise it describes another VM
    (a host relaying a genuine kernel's answers), not the kernel this notebook talks to."""
    attested = evidence.claims.get("curve_public_key", "").encode("ascii", "replace")
    if curve_key and attested and hmac.compare_digest(attested, curve_key):
        return Check("channel_binding", Outcome.PASS, "the evidence binds this connection's CurveZMQ server key")
    return Check(
        "channel_binding", Outcome.FAIL, "the evidence's curve_public_key is not the key of this kernel's connection"
    )


def flatten_claims(result: VerificationResult, evidence: Evidence) -> dict[str, Any]:
    """What the attestation panel shows, from the verifier's decoded report (never re-parsed here)."""
    report = result.to_dict()["report"]
    if not isinstance(report, dict):
        return {"tee": evidence.tee, "report_time": evidence.claims.get("issued_at")}
    policy_bits = dict(report.get("policy") or {})
    if "smt_allowed" in policy_bits:
        policy_bits["smt"] = policy_bits["smt_allowed"]
    claims: dict[str, Any] = {
        "product": result.product.value if result.product else report.get("product"),
        "measurement": report.get("measurement"),
        **{name: report.get(field) for name, field in TCB_FIELDS.items()},
        "tcb_launch": report.get("launch_tcb"),
        "policy_bits": policy_bits,
        "chip_id": report.get("chip_id"),
        "vmpl": report.get("vmpl"),
        "report_time": evidence.claims.get("issued_at"),
        "signing_key": result.signing_key,
        "report_version": report.get("version"),
        "tee": evidence.tee,
        "host_data": report.get("host_data"),
        "guest_svn": report.get("guest_svn"),
        "firmware": report.get("current_firmware"),
    }
    return claims


def policy_view(policy: AttestationPolicy) -> dict[str, Any]:
    return {**policy.to_dict(), "source": policy.source, "digest": policy.digest()}


def _failed(
    kernel_id: str,
    nonce: str,
    check: str,
    detail: str,
    policy: AttestationPolicy | None,
    bundle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A verdict without a verification: same shape as a verified one, so a client has one thing to render."""
    return {
        "kernel_id": kernel_id,
        "confidential": True,
        "status": "failed",
        "simulated": False,
        "nonce": nonce,
        "summary": f"rejected: {check}: {detail}",
        "checks": [{"name": check, "ok": False, "outcome": "fail", "detail": detail}],
        "claims": {},
        "attestation_policy": policy_view(policy) if policy is not None else None,
        "evidence": bundle,
        "verified_at": rfc3339(datetime.now(UTC)),
    }
