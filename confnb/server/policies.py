"""The rules in force in a running kernel, as its relay reports them: the display gate and every dataset's policy.

The relay answers ``confnb_gate_request`` itself (the executor runs the analyst's code and could say anything), so
what the panel shows is what the gate enforces. Each dataset's entry carries the owner's output policy as the vault
parsed it; its plain-language explanation is made here, outside the VM.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.manager import AsyncKernelManager

from confnb.attest.errors import PolicyError
from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy
from confnb.server.attestation import GATE_REQUEST, control_request, is_confidential


async def kernel_policies(manager: AsyncKernelManager, kernel_id: str, *, timeout: float) -> dict[str, Any]:
    """The policies endpoint's answer; raises ``KernelRequestError`` when the kernel does not answer properly."""
    if not is_confidential(manager):
        # An ordinary kernel has no gate: everything it prints is shown, and it holds no sealed datasets.
        return {"kernel_id": kernel_id, "confidential": False, "display": None, "withheld": {}, "datasets": []}
    answer = await control_request(manager, GATE_REQUEST, {}, timeout)
    datasets = answer.get("datasets")
    withheld = answer.get("withheld")
    return {
        "kernel_id": kernel_id,
        "confidential": True,
        "display": answer.get("policy"),
        "withheld": withheld if isinstance(withheld, dict) else {},
        "datasets": [_explained(entry) for entry in datasets if isinstance(entry, dict)]
        if isinstance(datasets, list)
        else [],
    }


def _explained(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its policy in plain language and its privacy mode, or a line saying why it cannot be put into
    words (and no privacy view: the panel then says the mode is unknown rather than guess one)."""
    try:
        policy = OutputPolicy.from_dict(entry.get("policy") or {}, source="the kernel's report")
    except (PolicyError, TypeError, ValueError) as exc:
        return {**entry, "explanation": [f"the kernel reported a policy that does not parse: {exc}"], "privacy": None}
    return {**entry, "explanation": explain_output(policy), "privacy": privacy_view(policy)}


def privacy_view(policy: OutputPolicy) -> dict[str, Any]:
    """What the panel's privacy section shows: the canonical ``[privacy]`` table under DP; under exact mode the
    release rules that protect exact numbers instead (their defaults applied, so "on" is said when unwritten)."""
    if policy.privacy is not None and policy.privacy.is_dp:
        return policy.privacy.to_dict()
    return {
        "mode": "exact",
        "min_group_size": policy.min_group_size,
        "difference_checks": policy.checks_differences,
    }
