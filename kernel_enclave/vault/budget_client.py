"""Charging a release to the dataset owner's differential-privacy budget, before the release leaves the vault.

The budget lives in the owner's broker (``POST /v1/datasets/{id}/budget-charges``): the vault signs each charge with
its attested Ed25519 key (the one its evidence bound when the broker released the dataset's key) and releases only
once it holds the acknowledgement, signed by the owner's key that the dataset's manifest pins, naming this dataset,
this request's nonce, amounts and plan. Anything else, an unreachable broker, a refusal, a bad signature, an answer
about another request, is a :class:`BudgetError`: no acknowledgement, no release.

A charge is never retried. If the broker does not answer in time it may still have committed the charge; sending
the same request again is refused as a replay (its nonce is spent) and sending a new one would pay twice. So a
timeout fails the release, and the budget it may have spent is lost to the analyst, never overspent for the owner.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import math
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kernel_enclave.vault.broker_client import KeyReleaseError, _cause, broker_url

MAX_ANSWER_BYTES = 64 * 1024  # an acknowledgement is a few hundred bytes


class BudgetError(RuntimeError):
    """The owner's broker did not acknowledge the charge; the message says why, in one line."""


@dataclass(frozen=True)
class Charge:
    """The owner-signed acknowledgement of one charge, verified."""

    charge_id: str
    dataset_id: str
    epsilon: float
    delta: float
    plan_digest: str
    nonce: str
    epsilon_spent: float
    epsilon_remaining: float
    delta_spent: float
    delta_remaining: float
    time: str


_TEXT_FIELDS = ("charge_id", "dataset_id", "plan_digest", "nonce", "time")
_NUMBER_FIELDS = ("epsilon", "delta", "epsilon_spent", "epsilon_remaining", "delta_spent", "delta_remaining")


def canonical_json(value: object) -> bytes:
    """What signatures cover: sorted keys, no whitespace, UTF-8 (the broker's convention for policies and charges)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class BudgetClient:
    """Budget charges for one kernel: its signing key and the owner key of each dataset it holds."""

    def __init__(
        self,
        url: str | None,
        signing_key: ed25519.Ed25519PrivateKey,
        owner_keys: Mapping[str, bytes],
        timeout_s: float = 10.0,
    ) -> None:
        try:
            self.url = broker_url(url)
        except KeyReleaseError as exc:
            raise BudgetError(str(exc)) from None
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        self.timeout_s = timeout_s
        self._signing_key = signing_key
        self._kernel_key = base64.b64encode(signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        self._owner_keys = dict(owner_keys)

    def charge(self, dataset_id: str, epsilon: float, delta: float, plan_digest: str) -> Charge:
        """Spend ``epsilon`` and ``delta`` of ``dataset_id``'s budget for the release of ``plan_digest``."""
        owner = self._owner_key(dataset_id)
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, int | float)
            or not math.isfinite(epsilon)
            or epsilon <= 0
        ):
            raise BudgetError(f"budget: epsilon must be finite and greater than 0, not {epsilon!r}")
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not math.isfinite(delta) or delta < 0:
            raise BudgetError(f"budget: delta must be finite and at least 0, not {delta!r}")
        request = {
            "dataset_id": dataset_id,
            "epsilon": float(epsilon),
            "delta": float(delta),
            "plan_digest": plan_digest,
            "kernel_key": self._kernel_key.decode(),
            "nonce": secrets.token_hex(16),
        }
        signature = base64.b64encode(self._signing_key.sign(canonical_json(request))).decode()
        answer = self._call("POST", _path(dataset_id, "budget-charges"), {"request": request, "signature": signature})
        return _verified(answer, request, owner, self.url)

    def budget(self, dataset_id: str) -> dict[str, Any]:
        """The dataset's budget as its broker reports it (spent, remaining, charges); unsigned, for display."""
        return self._call("GET", _path(dataset_id, "budget"), None)

    def _owner_key(self, dataset_id: str) -> ed25519.Ed25519PublicKey:
        raw = self._owner_keys.get(dataset_id)
        if raw is None:
            raise BudgetError(
                f"budget: no owner key is known for dataset {dataset_id!r}, so no charge could be trusted"
            )
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise BudgetError(f"budget: the owner key of dataset {dataset_id!r} is not a raw Ed25519 key") from None

    def _call(self, method: str, path: str, body: object) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked in broker_url
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                text = response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as error:
            with error:  # it holds the connection's socket
                try:
                    reason = str(json.loads(error.read(MAX_ANSWER_BYTES)).get("reason", error.reason))
                except (ValueError, AttributeError, OSError, http.client.HTTPException):
                    reason = str(error.reason)
            raise BudgetError(f"broker {self.url} refused ({error.code}): {_line(reason)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise BudgetError(f"broker {self.url} unreachable: {_cause(error)}; nothing was released") from None
        if len(text) > MAX_ANSWER_BYTES:
            raise BudgetError(f"broker {self.url} answered with more than {MAX_ANSWER_BYTES} bytes")
        try:
            document = json.loads(text)
        except ValueError:
            raise BudgetError(f"broker {self.url} answered with something that is not JSON") from None
        if not isinstance(document, dict):
            raise BudgetError(f"broker {self.url} answered with something that is not a JSON object")
        return document


def _path(dataset_id: str, action: str) -> str:
    return f"/v1/datasets/{urllib.parse.quote(dataset_id, safe='')}/{action}"


def _verified(
    answer: Mapping[str, Any], request: Mapping[str, Any], owner: ed25519.Ed25519PublicKey, url: str
) -> Charge:
    """The acknowledgement, if the owner signed it and it acknowledges exactly this request."""
    acknowledgement, signature = answer.get("acknowledgement"), answer.get("signature")
    if not isinstance(acknowledgement, dict) or not isinstance(signature, str):
        raise BudgetError(f"broker {url} answered without an acknowledgement and its signature")
    try:
        owner.verify(base64.b64decode(signature, validate=True), canonical_json(acknowledgement))
    except (InvalidSignature, binascii.Error, ValueError):
        raise BudgetError(f"the acknowledgement from {url} is not signed by the dataset's owner") from None
    for name in _TEXT_FIELDS:
        if not isinstance(acknowledgement.get(name), str):
            raise BudgetError(f"the owner's acknowledgement has no {name}")
    for name in _NUMBER_FIELDS:
        value = acknowledgement.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BudgetError(f"the owner's acknowledgement has no finite {name}")
    for name in ("dataset_id", "nonce", "epsilon", "delta", "plan_digest"):
        if acknowledgement[name] != request[name]:
            raise BudgetError(f"the owner's acknowledgement names another {name} than this charge's")
    text = {name: str(acknowledgement[name]) for name in _TEXT_FIELDS}
    number = {name: float(acknowledgement[name]) for name in _NUMBER_FIELDS}
    return Charge(
        charge_id=text["charge_id"],
        dataset_id=text["dataset_id"],
        epsilon=number["epsilon"],
        delta=number["delta"],
        plan_digest=text["plan_digest"],
        nonce=text["nonce"],
        epsilon_spent=number["epsilon_spent"],
        epsilon_remaining=number["epsilon_remaining"],
        delta_spent=number["delta_spent"],
        delta_remaining=number["delta_remaining"],
        time=text["time"],
    )


def _line(text: str, limit: int = 500) -> str:
    """A broker's reason as one bounded line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"
