"""Each open dataset's differential-privacy budget, as its owner's broker reports it, for the lab's policy view.

Why here and not in the kernel: the broker's ``GET /v1/datasets/{id}/budget`` is public and carries no secret, so
the analyst's own Jupyter server may ask it; asking the kernel would mean running code in the analyst's executor,
or a relay request that does not exist. The list of datasets, and which of them are in DP mode, still comes from
the kernel's relay (``confnb_gate_request``), so only datasets that are really open are asked about.

Which broker: the one the relay names for the dataset when it names one, otherwise the broker the kernel was
started with (``CONFNB_BROKER_URL`` from its kernelspec's env, else this server's environment, as the launcher
reads it). A broker that knows another dataset under the same id, or an owner who changed the table since, would
show numbers about another budget, so the answer must name the dataset asked about and the same total ε and δ as
the policy the kernel enforces; otherwise the budget is shown as unavailable, saying why.

Fail-soft by design: this is display, not enforcement (the vault charges the broker itself and releases nothing
without its signed acknowledgement). Every failure, an unset broker, a timeout, a refusal, an answer of the wrong
shape, becomes ``{"status": "unavailable", "reason": ...}`` for that dataset and never an error for the others.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import urllib.parse
from collections.abc import Mapping
from string import Template
from typing import Any, Final

from jupyter_client.manager import AsyncKernelManager
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse
from tornado.httputil import HTTPInputError
from tornado.simple_httpclient import HTTPTimeoutError

from confnb.server.attestation import GATE_REQUEST, control_request, is_confidential

BROKER_URL_VARIABLE: Final = "CONFNB_BROKER_URL"
MAX_ANSWER_BYTES: Final = 16 * 1024  # a budget state is a few hundred bytes
_AMOUNTS: Final = ("epsilon", "delta", "epsilon_spent", "epsilon_remaining", "delta_spent", "delta_remaining")
_TOLERANCE: Final = 1e-12  # the broker keeps amounts in units of 10⁻¹²


def configured_broker(manager: AsyncKernelManager) -> str:
    """The broker the kernel was started with ("" when none): its kernelspec's env first, then this server's."""
    spec = getattr(manager, "kernel_spec", None)
    env = getattr(spec, "env", None)
    if isinstance(env, Mapping) and isinstance(env.get(BROKER_URL_VARIABLE), str) and env[BROKER_URL_VARIABLE]:
        # jupyter_client substitutes ${VAR} in kernelspec env values from the launch environment.
        return Template(str(env[BROKER_URL_VARIABLE])).safe_substitute(os.environ)
    return os.environ.get(BROKER_URL_VARIABLE, "")


def budget_url(broker: str, dataset_id: str) -> str:
    """``{broker}/v1/datasets/{id}/budget``; raises ValueError for a broker URL that is not http(s)."""
    parts = urllib.parse.urlsplit(broker)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the broker URL must be http(s) with a host, not {broker[:80]!r}")
    return f"{broker.rstrip('/')}/v1/datasets/{urllib.parse.quote(dataset_id, safe='')}/budget"


def unavailable(dataset_id: str, broker: str, reason: str) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "status": "unavailable",
        "broker": broker or None,
        "reason": " ".join(reason.split()),
    }


async def fetch_budget(broker: str, dataset_id: str, privacy: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """The dataset's budget at ``broker``, checked against its ``[privacy]`` table (canonical dict); never raises."""
    if not broker:
        return unavailable(
            dataset_id, broker, f"no broker is known for this dataset ({BROKER_URL_VARIABLE} is not set)"
        )
    try:
        url = budget_url(broker, dataset_id)
    except ValueError as exc:
        return unavailable(dataset_id, broker, str(exc))
    client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_ANSWER_BYTES)
    try:
        response = await client.fetch(
            url,
            method="GET",
            headers={"Accept": "application/json"},
            connect_timeout=timeout,
            request_timeout=timeout,
            follow_redirects=False,
            raise_error=False,
        )
    except HTTPTimeoutError:
        return unavailable(dataset_id, broker, f"the broker did not answer within {timeout:g} s")
    except (HTTPClientError, HTTPInputError, OSError) as exc:  # refused, unreachable, reset, a body too large
        return unavailable(dataset_id, broker, f"the broker cannot be reached: {exc}")
    finally:
        client.close()
    return _read(dataset_id, broker, response, privacy)


def _read(dataset_id: str, broker: str, response: HTTPResponse, privacy: Mapping[str, Any]) -> dict[str, Any]:
    try:
        document = json.loads(response.body or b"")
    except ValueError:
        document = None
    if response.code != 200:
        reason = document.get("reason") if isinstance(document, dict) else None
        said = f": {str(reason)[:200]}" if isinstance(reason, str) and reason else ""
        return unavailable(dataset_id, broker, f"the broker answered HTTP {response.code}{said}")
    if not isinstance(document, dict):
        return unavailable(dataset_id, broker, "the broker's answer is not a JSON object")
    problem = _mismatch(dataset_id, document, privacy)
    if problem:
        return unavailable(dataset_id, broker, problem)
    state: dict[str, Any] = {"dataset_id": dataset_id, "status": "ok", "broker": broker}
    state.update({name: float(document[name]) for name in _AMOUNTS})
    state["charges"] = int(document["charges"])
    return state


def _mismatch(dataset_id: str, document: Mapping[str, Any], privacy: Mapping[str, Any]) -> str:
    """Why the broker's answer is not about this dataset's budget ("" when it is)."""
    if document.get("dataset_id") != dataset_id:
        return "the broker answered about another dataset"
    if document.get("mode") != "dp":
        return f"the broker keeps no privacy budget for it (mode {str(document.get('mode'))[:20]!r})"
    for name in _AMOUNTS:
        value = document.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            return f"the broker's {name} is not a non-negative number"
    charges = document.get("charges")
    if isinstance(charges, bool) or not isinstance(charges, int) or charges < 0:
        return "the broker's charges is not a non-negative integer"
    for name in ("epsilon", "delta"):
        expected = privacy.get(name, 0.0)
        if not isinstance(expected, int | float) or not math.isclose(
            float(document[name]), float(expected), rel_tol=1e-9, abs_tol=_TOLERANCE
        ):
            return (
                f"the broker's total {name} ({document[name]}) is not the policy's ({expected}): "
                "its numbers are about another budget"
            )
    return ""


def dp_datasets(datasets: object) -> list[dict[str, Any]]:
    """The relay's entries whose policy is in DP mode (uploads cannot be, so they never appear here)."""
    if not isinstance(datasets, list):
        return []
    found = []
    for entry in datasets:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        policy = entry.get("policy")
        privacy = policy.get("privacy") if isinstance(policy, dict) else None
        if isinstance(privacy, dict) and privacy.get("mode") == "dp":
            found.append(entry)
    return found


async def kernel_budgets(
    manager: AsyncKernelManager, kernel_id: str, *, timeout: float, broker_timeout: float
) -> dict[str, Any]:
    """The budgets endpoint's answer; raises ``KernelRequestError`` when the kernel does not answer properly.

    The brokers are asked concurrently, each within ``broker_timeout``, so the answer takes at most about one
    kernel round trip plus ``broker_timeout``, whatever the number of datasets.
    """
    if not is_confidential(manager):
        return {"kernel_id": kernel_id, "confidential": False, "budgets": {}}
    answer = await control_request(manager, GATE_REQUEST, {}, timeout)
    entries = dp_datasets(answer.get("datasets"))
    default = configured_broker(manager)

    async def one(entry: dict[str, Any]) -> dict[str, Any]:
        named = entry.get("broker")
        broker = named if isinstance(named, str) and named else default
        return await fetch_budget(broker, entry["id"], entry["policy"]["privacy"], timeout=broker_timeout)

    states = await asyncio.gather(*(one(entry) for entry in entries))
    return {"kernel_id": kernel_id, "confidential": True, "budgets": {state["dataset_id"]: state for state in states}}
