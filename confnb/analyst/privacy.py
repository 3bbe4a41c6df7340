"""The analyst's side of differential-privacy mode: the ε a release spends, and what a noisy result says of itself.

Under an owner's ``[privacy] mode = "dp"`` the vault releases only noisy results, each charged to the dataset's
budget at the owner's broker before it leaves. The analyst chooses how much of the budget a release spends:
``result.release(epsilon=0.1)``, or once for the session with :func:`set_epsilon`. A noisy result carries its
account in ``attrs["confnb_dp"]`` (ε and δ spent, budget left per dataset, the noise distribution and scale, and a
95% accuracy interval per column) and shows it in its repr, so that a noisy number is never mistaken for an
exact one. :func:`budget` asks the owners' brokers what is spent and left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from confnb.analyst.errors import short_traceback
from confnb.analyst.session import current_session

if TYPE_CHECKING:
    from confnb.analyst.table import SealedTable

__all__ = ["NoisyFloat", "budget", "noisy", "requested_loss", "set_epsilon"]

ATTRS_KEY: Final = "confnb_dp"
_session: dict[str, float] = {}  # the session's default ε, under "epsilon"


@short_traceback
def set_epsilon(epsilon: float | None) -> None:
    """The ε every ``.release()`` without its own spends on a dataset in differential-privacy mode (None: none, so
    such a release must name its ε). Exact-mode datasets ignore it."""
    if epsilon is None:
        _session.pop("epsilon", None)
    else:
        _session["epsilon"] = _positive("epsilon", epsilon)


def requested_loss(epsilon: float | None, delta: float | None) -> dict[str, float]:
    """The privacy-loss fields of a release request: the ε asked for (or the session's), and δ if given."""
    chosen = epsilon if epsilon is not None else _session.get("epsilon")
    fields: dict[str, float] = {}
    if chosen is not None:
        fields["epsilon"] = _positive("epsilon", chosen)
    if delta is not None:
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1 or math.isnan(delta):
            raise ValueError("delta must be a number in [0, 1)")
        fields["delta"] = float(delta)
    return fields


@short_traceback
def budget(table: SealedTable) -> dict[str, dict[str, Any]]:
    """Per dataset of ``table`` in differential-privacy mode: its owner's budget, spent and remaining, as the
    owner's broker keeps it (datasets in exact mode are listed with ``mode: "exact"``)."""
    reply, _ = current_session().request({"op": "budget", "datasets": list(table.datasets)})
    found = reply.get("budgets")
    return {str(name): dict(value) for name, value in found.items()} if isinstance(found, dict) else {}


class NoisyFloat(float):
    """A released noisy number: a float, with its differential-privacy account in :attr:`dp` and its repr."""

    dp: dict[str, Any]

    def __new__(cls, value: float, account: Mapping[str, Any]) -> NoisyFloat:
        made = super().__new__(cls, value)
        made.dp = dict(account)
        return made

    def __repr__(self) -> str:
        return f"{float(self)!r} ({describe(self.dp)})"


def noisy(value: Any, account: Mapping[str, Any]) -> Any:
    """``value`` as released under differential privacy, carrying ``account``: pandas objects in ``attrs`` and a
    footer in their repr, a number as a :class:`NoisyFloat`."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return NoisyFloat(float(value), account)
    attrs = getattr(value, "attrs", None)
    if isinstance(attrs, dict):
        attrs[ATTRS_KEY] = dict(account)
        return _with_footer(value)
    return value


def describe(account: Mapping[str, Any]) -> str:
    """One line: what the release spent, what is left, and how noisy it is."""
    parts = [f"noisy: ε = {account.get('epsilon', '?'):g}" if _is_number(account.get("epsilon")) else "noisy"]
    if _is_number(account.get("delta")) and account["delta"]:
        parts.append(f"δ = {account['delta']:g}")
    remaining = account.get("epsilon_remaining")
    if isinstance(remaining, Mapping) and remaining:
        parts.append("budget left " + ", ".join(f"{name} ε = {left:g}" for name, left in remaining.items()))
    noise = account.get("noise")
    if isinstance(noise, list) and noise:
        shown = [
            f"{item.get('column')} ±{item['interval_95']:.3g}"
            for item in noise
            if isinstance(item, Mapping) and _is_number(item.get("interval_95"))
        ]
        if shown:
            parts.append("95% within " + ", ".join(shown))
    return "; ".join(parts)


def _with_footer(value: Any) -> Any:
    """The pandas object, of a subclass whose repr ends with the account (derived objects are plain pandas)."""
    import pandas as pd  # type: ignore[import-untyped]

    base = pd.DataFrame if isinstance(value, pd.DataFrame) else pd.Series if isinstance(value, pd.Series) else None
    if base is None:
        return value
    kind = _NOISY_TYPES.get(base)
    if kind is None:

        def __repr__(self: Any) -> str:  # noqa: N807 - the dunder of the subclass made here
            return str(base.__repr__(self)) + "\n" + describe(self.attrs.get(ATTRS_KEY, {}))

        def _repr_html_(self: Any) -> str | None:
            shown = base._repr_html_(self) if hasattr(base, "_repr_html_") else None
            if not isinstance(shown, str):
                return None
            import html

            return shown + f"<p><small>{html.escape(describe(self.attrs.get(ATTRS_KEY, {})))}</small></p>"

        kind = type(
            f"Noisy{base.__name__}",
            (base,),
            {
                "__repr__": __repr__,
                "_repr_html_": _repr_html_,
                "_constructor": property(lambda self: base),
                "__module__": __name__,
            },
        )
        _NOISY_TYPES[base] = kind
    made = kind(value)
    made.attrs = dict(value.attrs)
    return made


_NOISY_TYPES: dict[type, type] = {}


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number")
    return float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
