"""``[release] max_releases`` in a real vault, and the readable plans of its audit log.

Every request that lets a number leave (a released value, a row count, a preview, model metrics, scores or
parameters, predictions, an export) counts one release per dataset for the kernel's lifetime, released or withheld;
past the owner's limit it is refused, naming the rule, and the refusal is audited. Each test also checks the
legitimate twin: a dataset without a limit, in the same kernel, keeps releasing correct values.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pytest
from sklearn.linear_model import LinearRegression  # type: ignore[import-untyped]

from confnb.analyst.estimators import encode_estimator
from confnb.policy.output import OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.audit import MAX_ENTRY_BYTES, MAX_PLAN_TEXT, verify_kernel_log
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.vault import Vault, ipc_bytes

ROWS = 200
KINDS = frozenset({"schema", "row_count", "aggregate", "model_metrics", "model_parameters", "predict_public"})


def _policy(ident: str, max_releases: int | None) -> OutputPolicy:
    return OutputPolicy(id=ident, allow=KINDS, min_group_size=10, max_releases=max_releases)


def _table() -> pa.Table:
    x = [float(i % 50) for i in range(ROWS)]
    return pa.table(
        {
            "x": x,
            "y": [2.0 * value + 1.0 for value in x],
            "g": ["a" if i % 2 else "b" for i in range(ROWS)],
            "id": list(range(ROWS)),
        }
    )


class Kernel:
    """A vault serving ``limited`` (max_releases ``limit``) and ``free`` (no limit), same rows."""

    def __init__(self, backend: SimulatedBackend, limit: int) -> None:
        self.vault = Vault(backend=backend, keys=VaultKeys.generate())
        self.limited = {"node": "source", "handle": self.vault.add_table("limited", _table(), _policy("lim", limit))}
        self.free = {"node": "source", "handle": self.vault.add_table("free", _table(), _policy("free", None))}

    def ask(self, header: dict[str, Any], buffers: list[bytes] | None = None) -> tuple[dict[str, Any], list[bytes]]:
        return self.vault.handle(header, buffers or [])

    def count(self, source: dict[str, Any]) -> dict[str, Any]:
        return self.ask({"op": "release", "plan": {"node": "count", "input": source}})[0]

    def entries(self, event: str) -> list[dict[str, Any]]:
        return [entry["fields"] for entry in self.vault.audit.entries() if entry["event"] == event]


def _refused_by_limit(reply: dict[str, Any], datasets: list[str]) -> bool:
    error = reply.get("error", {})
    return (
        reply["ok"] is False
        and error.get("type") == "PolicyViolation"
        and error.get("rule") == "release.max_releases"
        and error.get("datasets") == datasets
        and "value" not in reply
    )


def test_releases_beyond_the_limit_are_refused_naming_the_rule_and_audited(simulated_backend: SimulatedBackend) -> None:
    kernel = Kernel(simulated_backend, limit=3)
    for _ in range(3):
        reply = kernel.count(kernel.limited)
        assert reply["ok"] and reply["value"] == ROWS
    refused = kernel.count(kernel.limited)
    assert _refused_by_limit(refused, ["limited"])
    assert "3 releases" in refused["error"]["message"] and str(ROWS) not in refused["error"]["message"]
    # The twin without a limit, in the same kernel, keeps releasing the right value.
    for _ in range(5):
        reply = kernel.count(kernel.free)
        assert reply["ok"] and reply["value"] == ROWS
    refusals = kernel.entries("refusal")
    assert [r["rule"] for r in refusals] == ["release.max_releases"]
    assert refusals[0]["datasets"] == ["limited"] and refusals[0]["plan"] == "limited | count()"
    assert len([r for r in kernel.entries("release") if r["datasets"] == ["limited"]]) == 3
    keys = kernel.vault._keys.signing_public_key
    assert verify_kernel_log(kernel.vault.audit.entries(), keys).ok


def test_every_kind_that_lets_a_number_leave_counts(simulated_backend: SimulatedBackend) -> None:
    """Twelve requests of eight kinds against a limit of twelve: the thirteenth, whatever its kind, is refused."""
    kernel = Kernel(simulated_backend, limit=12)
    source = kernel.limited
    fit = {
        "op": "fit",
        "plan": source,
        "estimator": encode_estimator(LinearRegression()),
        "target": "y",
        "features": ["x"],
        "test_size": 0.25,
        "random_state": 0,
    }
    reply, _ = kernel.ask(fit)  # a fit releases nothing: not counted
    assert reply["ok"], reply
    model = reply["model"]
    kernel.ask({"op": "schema", "plan": source})  # names and types only: not counted
    public = pa.table({"x": [1.0, 2.0, 3.0]})
    counted = [
        ({"op": "release", "plan": {"node": "count", "input": source}}, []),
        (
            {
                "op": "release",
                "plan": {
                    "node": "aggregate",
                    "input": source,
                    "by": ["g"],
                    "aggs": [{"name": "m", "func": "mean", "column": "x"}],
                },
            },
            [],
        ),
        ({"op": "release", "plan": {"node": "value_counts", "input": source, "column": "g"}}, []),
        ({"op": "release", "plan": {"node": "describe", "input": source, "columns": ["x"]}}, []),
        ({"op": "preview", "plan": source}, []),
        ({"op": "model_metrics", "model": model}, []),
        ({"op": "model_score", "model": model}, []),
        ({"op": "model_params", "model": model}, []),
        ({"op": "predict", "model": model}, [ipc_bytes(public)]),
        # withheld by min_group_size (two records): counted all the same
        (
            {
                "op": "release",
                "plan": {
                    "node": "count",
                    "input": {
                        "node": "filter",
                        "input": source,
                        "predicate": {"fn": "lt", "args": [{"col": "id"}, {"lit": 2}]},
                    },
                },
            },
            [],
        ),
    ]
    replies = [kernel.ask(header, buffers) for header, buffers in counted]
    assert [r["ok"] for r, _ in replies] == [True] * 9 + [False], [r.get("error") for r, _ in replies]
    assert replies[-1][0]["error"]["rule"] == "release.min_group_size"
    assert replies[0][0]["value"] == ROWS and replies[4][0]["preview"]["rows"] == ROWS
    params = replies[7][0]["value"]  # the rows lie on y = 2x + 1, and the released parameters say so
    assert params["coef_"]["x"] == pytest.approx(2.0) and params["intercept_"] == pytest.approx(1.0)
    predictions = pa.ipc.open_stream(io.BytesIO(replies[8][1][0])).read_all()
    assert predictions.column(0).to_pylist() == pytest.approx([3.0, 5.0, 7.0])
    exported, _ = kernel.ask({"op": "export", "result": replies[0][0]["result"], "format": "json"})
    assert exported["ok"], exported
    exported, _ = kernel.ask({"op": "export", "model": model, "format": "skops"})
    assert exported["ok"], exported  # twelve
    for header, buffers in counted[:5] + counted[5:9]:
        assert _refused_by_limit(kernel.ask(header, buffers)[0], ["limited"]), header["op"]
    assert _refused_by_limit(
        kernel.ask({"op": "export", "result": replies[0][0]["result"], "format": "json"})[0], ["limited"]
    )
    # Nothing counted here: a new fit and the schema still answer.
    assert kernel.ask(fit)[0]["ok"] and kernel.ask({"op": "schema", "plan": source})[0]["ok"]


def test_a_release_over_two_datasets_counts_against_both_and_names_the_spent_one(
    simulated_backend: SimulatedBackend,
) -> None:
    kernel = Kernel(simulated_backend, limit=1)
    joined = {
        "node": "join",
        "left": kernel.limited,
        "right": kernel.free,
        "on": ["id"],
        "how": "inner",
        "suffixes": ["", "_r"],
    }
    reply = kernel.count(joined)
    assert reply["ok"] and reply["value"] == ROWS
    assert _refused_by_limit(kernel.count(joined), ["limited"])
    assert _refused_by_limit(kernel.count(kernel.limited), ["limited"])
    assert kernel.count(kernel.free)["value"] == ROWS
    assert kernel.vault._releases == {"limited": 1, "free": 2}


def test_the_audit_log_shows_each_plan_readably_and_bounded(simulated_backend: SimulatedBackend) -> None:
    kernel = Kernel(simulated_backend, limit=100)
    plan = {
        "node": "aggregate",
        "input": {
            "node": "filter",
            "input": kernel.limited,
            "predicate": {"fn": "gt", "args": [{"col": "x"}, {"lit": 10}]},
        },
        "by": ["g"],
        "aggs": [{"name": "mean_y", "func": "mean", "column": "y"}, {"name": "n", "func": "count", "column": None}],
    }
    reply, _ = kernel.ask({"op": "release", "plan": plan})
    assert reply["ok"]
    release = kernel.entries("release")[-1]
    assert release["plan"] == "limited | filter(x > 10) | group_by(g) | agg(mean_y = mean(y), n = count())"
    assert release["operation"].startswith("sha256:")  # the digest stays, beside the readable form

    # A hostile name cannot end the line, fake a step or reorder the text: it is quoted and escaped.
    hostile = "y\n| agg(fake) \u202e"
    renamed = {"node": "assign", "input": kernel.limited, "columns": [[hostile, {"col": "y"}]]}
    masked = {
        "node": "aggregate",
        "input": renamed,
        "by": [],
        "aggs": [{"name": "s", "func": "sum", "column": hostile}],
    }
    assert kernel.ask({"op": "release", "plan": masked})[0]["ok"]
    text = kernel.entries("release")[-1]["plan"]
    assert "\n" not in text and "\u202e" not in text
    assert text == ('limited | assign("y\\n| agg(fake) \\u202e" = y) | agg(s = sum("y\\n| agg(fake) \\u202e"))')

    # A huge plan is recorded within bounds (and its digest is what names it exactly).
    many = {"fn": "isin", "args": [{"col": "id"}], "values": list(range(50_000))}
    wide = {"node": "count", "input": {"node": "filter", "input": kernel.limited, "predicate": many}}
    assert kernel.ask({"op": "release", "plan": wide})[0]["ok"]
    text = kernel.entries("release")[-1]["plan"]
    assert text == "limited | filter(isin(id, values=[0, 1, 2, 3, 4, ... 49995 more])) | count()"
    long_names = {"node": "select", "input": kernel.limited, "columns": [f"c{i}" * 300 for i in range(200)]}
    kernel.ask({"op": "release", "plan": {"node": "count", "input": long_names}})  # fails: unknown columns
    failed = [e for e in kernel.vault.audit.entries() if e["event"] in ("error", "refusal")][-1]
    assert len(failed["fields"]["plan"]) <= MAX_PLAN_TEXT + 40
    assert len(json.dumps(failed)) < MAX_ENTRY_BYTES
