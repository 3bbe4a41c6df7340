"""The owner's differential-privacy budget: a ledger in the broker's database that attested kernels charge.

Why the owner's broker keeps it, not the vault: a dataset's ε is spent by every kernel that ever analyses it, over
months, and a vault ends with its kernel. Only the broker sees all of them. A vault charges *before* it releases a
noisy result and releases nothing without the owner-signed acknowledgement, so every release the analyst sees is
paid for in this ledger, and the ledger never accepts more than the owner's ``[privacy]`` table allows.

Who may charge: only a kernel whose attested signing key received the dataset's key (recorded at key release, see
:meth:`confnb.broker.store.OwnerStore.count_release`), proven by its Ed25519 signature over the request. The
request's nonce, chosen by the vault, is kept with the charge, so a replayed request charges nothing twice.

Why integers: amounts are kept in units of 10⁻¹² (a charge rounded up, a budget rounded down, both from the
shortest decimal that names the float), so ten charges of 0.1 spend a budget of 1.0 exactly and an eleventh is
refused, where summing floats would drift either way. The budget is read from the owner's signed output-policy
dict (its ``"privacy"`` table), the form the broker stores.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from confnb.attest.errors import PolicyError
from confnb.attest.evidence import rfc3339
from confnb.broker.audit import AuditKind
from confnb.broker.db import transaction
from confnb.broker.limits import MAX_DATASET_ID_CHARS, bounded

if TYPE_CHECKING:
    from confnb.broker.store import OwnerStore

UNITS: Final = 10**12  # one ε (or δ) in ledger units
MAX_PLAN_DIGEST_CHARS: Final = 256
REQUEST_FIELDS: Final = frozenset({"dataset_id", "epsilon", "delta", "plan_digest", "kernel_key", "nonce"})
# The log's kinds name key releases, challenges, denials and owner actions; a charge is recorded as an "admin"
# entry whose action is "budget-charge" (a refused charge is a "denial", as every refusal).
CHARGE_AUDIT_KIND: Final = AuditKind.CHARGE
CHARGE_ACTION: Final = "budget-charge"
_NONCE = re.compile(r"[0-9a-f]{32}")


class ChargeRefusedError(Exception):
    """A charge the broker will not make: ``status`` is the HTTP status, the message names the check and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class PrivacyBudget:
    """The owner's budget of one dataset, in ledger units."""

    epsilon: int
    delta: int
    epsilon_per_kernel: int | None


@dataclass(frozen=True)
class Spent:
    epsilon: int
    delta: int
    charges: int


def to_units(value: float, *, up: bool) -> int:
    """``value`` in units of 10⁻¹², from the shortest decimal that names it (so 0.1 is exactly 10¹¹ units)."""
    exact = Decimal(repr(value)) * UNITS
    return int(exact.to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR))


def from_units(units: int) -> float:
    return units / UNITS


def canonical_json(value: object) -> bytes:
    """The bytes that signatures cover: sorted keys, no whitespace, UTF-8 (as the owner signs output policies)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_fingerprint(raw_public_key: bytes) -> str:
    """``sha256:<hex>`` of a raw Ed25519 key, as the audit log names keys."""
    return "sha256:" + hashlib.sha256(raw_public_key).hexdigest()


def privacy_budget(output_policy: Mapping[str, Any]) -> PrivacyBudget | None:
    """The budget of a signed output-policy dict; None when the dataset is in exact mode (no table, or "exact").

    Raises :class:`PolicyError` for a ``dp`` table that cannot be a budget: the broker then charges nothing.
    """
    table = output_policy.get("privacy")
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise PolicyError("privacy: must be a table")
    mode = table.get("mode", "exact")
    if mode == "exact":
        return None
    if mode != "dp":
        raise PolicyError(f"privacy.mode: must be exact or dp, not {bounded(repr(mode), 40)}")
    if "epsilon" not in table:
        raise PolicyError("privacy.epsilon: required in dp mode")
    epsilon = _number(table["epsilon"], "privacy.epsilon")
    if not 0 < epsilon <= 100:
        raise PolicyError(f"privacy.epsilon: must be in (0, 100], not {epsilon!r}")
    delta = _number(table.get("delta", 0.0), "privacy.delta")
    if not 0 <= delta < 1e-3:
        raise PolicyError(f"privacy.delta: must be in [0, 0.001), not {delta!r}")
    per_kernel = None
    if "epsilon_per_kernel" in table:
        per_kernel = _number(table["epsilon_per_kernel"], "privacy.epsilon_per_kernel")
        if not 0 < per_kernel <= epsilon:
            raise PolicyError(f"privacy.epsilon_per_kernel: must be in (0, epsilon], not {per_kernel!r}")
    return PrivacyBudget(
        epsilon=to_units(epsilon, up=False),
        delta=to_units(delta, up=False),
        epsilon_per_kernel=None if per_kernel is None else to_units(per_kernel, up=False),
    )


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"{name}: must be a finite number, not {bounded(repr(value), 40)}")
    return float(value)


@dataclass(frozen=True)
class _Request:
    """A charge request whose shape has been checked; ``raw`` is what the kernel signed."""

    raw: Mapping[str, Any]
    dataset_id: str
    epsilon: float
    delta: float
    plan_digest: str
    kernel_key: bytes
    nonce: str
    signature: bytes

    @property
    def kernel_key_text(self) -> str:
        """The canonical base64 of the raw key, as key releases record it."""
        return base64.b64encode(self.kernel_key).decode()


class BudgetLedger:
    """Charges and reads the budgets kept in an owner store's database; safe to share between threads."""

    def __init__(self, store: OwnerStore) -> None:
        self.store = store

    def charge(self, dataset_id: str, request: object, signature: object, actor: str) -> dict[str, Any]:
        """``{"acknowledgement": ..., "signature": ...}`` signed by the owner key, or :class:`ChargeRefusedError`.

        Either outcome is in the audit log before this returns: the charge in the same transaction that records it,
        a refusal right after the decision.
        """
        try:
            return self._charge(dataset_id, request, signature, actor)
        except ChargeRefusedError as refusal:
            reason = bounded(refusal.reason)
            detail: dict[str, Any] = {"refused": CHARGE_ACTION, "reason": reason, "status": refusal.status}
            nonce = request.get("nonce") if isinstance(request, Mapping) else None
            if isinstance(nonce, str) and _NONCE.fullmatch(nonce):
                detail["nonce"] = nonce
            self.store.audit.append("denial", actor, bounded(dataset_id, MAX_DATASET_ID_CHARS) or "-", detail)
            raise ChargeRefusedError(refusal.status, reason) from None

    def _charge(self, dataset_id: str, request: object, signature: object, actor: str) -> dict[str, Any]:
        charge = _shape(dataset_id, request, signature)
        try:
            record = self.store.dataset(dataset_id)
        except PolicyError as exc:  # fail closed: a dataset whose policy cannot be read spends nothing
            raise ChargeRefusedError(403, f"budget: the dataset's policy is unusable: {exc}") from None
        if record is None:
            raise ChargeRefusedError(404, f"dataset: no dataset {dataset_id!r} is registered with this broker")
        try:
            budget = privacy_budget(record.output_policy)
        except PolicyError as exc:
            raise ChargeRefusedError(403, f"budget: the owner's privacy table is unusable: {exc}") from None
        if budget is None:
            raise ChargeRefusedError(403, "budget: the dataset is not in differential-privacy mode")
        with transaction(self.store.database, write=False) as db:
            granted = db.execute(
                "SELECT 1 FROM kernel_keys WHERE dataset_id = ? AND kernel_key = ?",
                (dataset_id, charge.kernel_key_text),
            ).fetchone()
            seen = _nonce_seen(db, charge.nonce)
        if granted is None:
            raise ChargeRefusedError(
                403,
                "kernel_key: this key never received the dataset's key; only a kernel the broker released it to "
                "may charge its budget",
            )
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(charge.kernel_key).verify(
                charge.signature, canonical_json(dict(charge.raw))
            )
        except (InvalidSignature, ValueError):
            raise ChargeRefusedError(403, "signature: the request is not signed by its kernel_key") from None
        if seen:
            raise ChargeRefusedError(
                403, "nonce: already used by an earlier charge; a replayed request charges nothing"
            )
        if not (math.isfinite(charge.epsilon) and charge.epsilon > 0):
            raise ChargeRefusedError(400, f"epsilon: must be finite and greater than 0, not {charge.epsilon!r}")
        if not (math.isfinite(charge.delta) and charge.delta >= 0):
            raise ChargeRefusedError(400, f"delta: must be finite and at least 0, not {charge.delta!r}")
        return self._commit(charge, budget, actor)

    def _commit(self, charge: _Request, budget: PrivacyBudget, actor: str) -> dict[str, Any]:
        """Check and record the charge under SQLite's write lock, so concurrent charges never overspend."""
        epsilon, delta = to_units(charge.epsilon, up=True), to_units(charge.delta, up=True)
        charge_id = secrets.token_hex(16)
        moment = rfc3339(datetime.now(UTC))
        with transaction(self.store.database) as db:
            if _nonce_seen(db, charge.nonce):  # a concurrent twin of this request was charged meanwhile
                raise ChargeRefusedError(
                    403, "nonce: already used by an earlier charge; a replayed request charges nothing"
                )
            spent = _spent(db, charge.dataset_id)
            _within("the dataset's epsilon budget", "epsilon", epsilon, spent.epsilon, budget.epsilon)
            _within("the dataset's delta budget", "delta", delta, spent.delta, budget.delta)
            if budget.epsilon_per_kernel is not None:
                mine = _spent(db, charge.dataset_id, charge.kernel_key_text)
                _within(
                    "this kernel's epsilon budget (epsilon_per_kernel)",
                    "epsilon",
                    epsilon,
                    mine.epsilon,
                    budget.epsilon_per_kernel,
                )
            db.execute(
                "INSERT INTO budget_charges VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    charge_id,
                    charge.dataset_id,
                    charge.kernel_key_text,
                    epsilon,
                    delta,
                    charge.plan_digest,
                    charge.nonce,
                    moment,
                ),
            )
            acknowledgement = {
                "charge_id": charge_id,
                "dataset_id": charge.dataset_id,
                "epsilon": charge.epsilon,
                "delta": charge.delta,
                "plan_digest": charge.plan_digest,
                "nonce": charge.nonce,
                "epsilon_spent": from_units(spent.epsilon + epsilon),
                "epsilon_remaining": from_units(budget.epsilon - spent.epsilon - epsilon),
                "delta_spent": from_units(spent.delta + delta),
                "delta_remaining": from_units(budget.delta - spent.delta - delta),
                "time": moment,
            }
            # Durable before the charge commits: a charge the log does not show never happened.
            detail = {
                "action": CHARGE_ACTION,
                "kernel_key": key_fingerprint(charge.kernel_key),
                **{name: value for name, value in acknowledgement.items() if name not in ("dataset_id", "time")},
            }
            self.store.audit.append(CHARGE_AUDIT_KIND, actor, charge.dataset_id, detail)
        signature = self.store.owner_key.sign(canonical_json(acknowledgement))
        return {"acknowledgement": acknowledgement, "signature": base64.b64encode(signature).decode()}

    def state(self, dataset_id: str) -> dict[str, Any] | None:
        """What ``GET /v1/datasets/{id}/budget`` shows; None for an unknown dataset. Raises PolicyError for a budget
        that cannot be read."""
        record = self.store.dataset(dataset_id)
        if record is None:
            return None
        budget = privacy_budget(record.output_policy)
        with transaction(self.store.database, write=False) as db:
            spent = _spent(db, dataset_id)
        if budget is None:
            return {"dataset_id": dataset_id, "mode": "exact", "charges": spent.charges}
        return {
            "dataset_id": dataset_id,
            "mode": "dp",
            "epsilon": from_units(budget.epsilon),
            "delta": from_units(budget.delta),
            "epsilon_spent": from_units(spent.epsilon),
            "epsilon_remaining": from_units(max(0, budget.epsilon - spent.epsilon)),
            "delta_spent": from_units(spent.delta),
            "delta_remaining": from_units(max(0, budget.delta - spent.delta)),
            "charges": spent.charges,
        }


def _shape(dataset_id: str, request: object, signature: object) -> _Request:
    """The request's fields, typed; a 400 naming the first field that is not what the protocol says."""
    if not isinstance(request, Mapping):
        raise ChargeRefusedError(400, "request: request: must be a JSON object")
    names = set(request)
    if names != REQUEST_FIELDS:
        missing, extra = sorted(REQUEST_FIELDS - names), sorted(str(name) for name in names - REQUEST_FIELDS)
        problem = f"missing {', '.join(missing)}" if missing else f"unexpected {bounded(', '.join(extra), 200)}"
        raise ChargeRefusedError(400, f"request: request: {problem}")
    for name in ("dataset_id", "plan_digest", "kernel_key", "nonce"):
        if not isinstance(request[name], str):
            raise ChargeRefusedError(400, f"request: request.{name}: must be a string")
    for name in ("epsilon", "delta"):
        value = request[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ChargeRefusedError(400, f"request: request.{name}: must be a number")
    if request["dataset_id"] != dataset_id:
        raise ChargeRefusedError(400, "request: request.dataset_id: names another dataset than the path")
    if not 0 < len(request["plan_digest"]) <= MAX_PLAN_DIGEST_CHARS:
        raise ChargeRefusedError(400, f"request: request.plan_digest: must be 1 to {MAX_PLAN_DIGEST_CHARS} characters")
    if not _NONCE.fullmatch(request["nonce"]):
        raise ChargeRefusedError(400, "request: request.nonce: must be 32 lowercase hex characters")
    kernel_key = _base64(
        request["kernel_key"], 32, "request: request.kernel_key: must be base64 of a raw 32-byte Ed25519 key"
    )
    if not isinstance(signature, str):
        raise ChargeRefusedError(400, "request: signature: must be a string")
    raw_signature = _base64(signature, 64, "request: signature: must be base64 of a 64-byte Ed25519 signature")
    return _Request(
        raw=request,
        dataset_id=dataset_id,
        epsilon=_float(request["epsilon"]),
        delta=_float(request["delta"]),
        plan_digest=request["plan_digest"],
        kernel_key=kernel_key,
        nonce=request["nonce"],
        signature=raw_signature,
    )


def _float(value: float) -> float:
    """An integer too large for a float (JSON allows it) is infinite here, and refused as such."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _base64(text: str, size: int, problem: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ChargeRefusedError(400, problem) from None
    if len(raw) != size:
        raise ChargeRefusedError(400, problem)
    return raw


def _nonce_seen(db: sqlite3.Connection, nonce: str) -> bool:
    return db.execute("SELECT 1 FROM budget_charges WHERE nonce = ?", (nonce,)).fetchone() is not None


def _spent(db: sqlite3.Connection, dataset_id: str, kernel_key: str | None = None) -> Spent:
    query = (
        "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0), COUNT(*) FROM budget_charges WHERE dataset_id = ?"
    )
    if kernel_key is None:
        row = db.execute(query, (dataset_id,)).fetchone()
    else:
        row = db.execute(query + " AND kernel_key = ?", (dataset_id, kernel_key)).fetchone()
    return Spent(int(row[0]), int(row[1]), int(row[2]))


def _within(budget: str, amount: str, charge: int, spent: int, limit: int) -> None:
    if spent + charge > limit:
        raise ChargeRefusedError(
            403,
            f"budget: charging {amount} {from_units(charge)!r} would exceed {budget} of {from_units(limit)!r} "
            f"(spent {from_units(spent)!r}, remaining {from_units(max(0, limit - spent))!r})",
        )
