"""``[release] difference_checks``: the owner's switch for the vault's difference checks, in a real vault.

The same pair of releases (a sum over everyone, then over everyone but one record) is asked of two datasets with the
same rows in one kernel: the one whose owner turned the checks on refuses the second sum, so the record's value
cannot be computed; the one whose owner did not releases both, and the difference is that record's value (the
exposure the owner guide describes for policies without the setting).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]

from confnb.policy.output import OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.vault import Vault

ROWS = 200
TARGET = 17


def _table() -> pa.Table:
    return pa.table({"id": list(range(ROWS)), "cost": [100.0 + 3.5 * i for i in range(ROWS)]})


def _sum(source: dict[str, Any], without: int | None = None) -> dict[str, Any]:
    rows = source
    if without is not None:
        predicate = {"fn": "ne", "args": [{"col": "id"}, {"lit": without}]}
        rows = {"node": "filter", "input": source, "predicate": predicate}
    return {"node": "aggregate", "input": rows, "by": [], "aggs": [{"name": "s", "func": "sum", "column": "cost"}]}


def _value(reply: dict[str, Any], vault: Vault) -> float:
    assert reply["ok"], reply
    table = vault._results[reply["result"]].table  # the released table, as the client rebuilds it
    return float(table.column("s")[0].as_py())


def test_the_owner_s_switch_decides_whether_a_difference_of_one_record_comes_out(
    simulated_backend: SimulatedBackend,
) -> None:
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    kinds = frozenset({"aggregate", "row_count", "schema"})
    checked = OutputPolicy(id="checked", allow=kinds, min_group_size=10, difference_checks=True)
    unchecked = OutputPolicy(id="unchecked", allow=kinds, min_group_size=10, difference_checks=False)
    sources = {
        name: {"node": "source", "handle": vault.add_table(name, _table(), policy)}
        for name, policy in (("checked", checked), ("unchecked", unchecked))
    }
    secret = 100.0 + 3.5 * TARGET

    everyone = _value(vault.handle({"op": "release", "plan": _sum(sources["checked"])}, [])[0], vault)
    refused, _ = vault.handle({"op": "release", "plan": _sum(sources["checked"], without=TARGET)}, [])
    assert refused["ok"] is False and refused["error"]["rule"] == "release.difference"
    assert refused["error"]["datasets"] == ["checked"]
    assert "value" not in refused and "result" not in refused
    assert everyone == sum(100.0 + 3.5 * i for i in range(ROWS))  # the first sum itself is released, exactly

    first = _value(vault.handle({"op": "release", "plan": _sum(sources["unchecked"])}, [])[0], vault)
    second = _value(vault.handle({"op": "release", "plan": _sum(sources["unchecked"], without=TARGET)}, [])[0], vault)
    assert abs((first - second) - secret) < 1e-9  # without the setting the pair gives the record away
