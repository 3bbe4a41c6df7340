"""Red team: a hostile analyst inside a real confidential kernel tries to get one patient's record out.

Every test runs attack code in the executor of a ``confnb-snp`` kernel (launcher, relay, executor and vault as real
processes, simulated TEE, the data owners' real brokers on loopback) and then checks two things:

(a) the attempt failed the way it must: a :class:`PolicyViolation` naming the rule and the datasets whose policy
    imposed it, an error that names no value, a refused system call, or a result with the small groups removed;
(b) no canary of the hidden patient record (its id, zip code, diagnosis and cost, in every textual and binary form,
    see ``confidential_fixtures.canary_patterns``) and no dataset key is in any message the client received while
    the attempt ran, on any channel: replies, stdout, display data, tracebacks.

The patients' owner shows full tracebacks (``[display] tracebacks = "full"``), so the gate passes every error message
unchanged: what is tested is what the vault and the analyst API put into them. The literals an attacker already
knows (the id and zip of the person they target) are computed in the kernel rather than typed, so that the echo of
the cell (``execute_input``) does not count as a leak; the diagnosis and the cost are never in any cell at all, so
finding them in the executor's memory would mean they came out of the vault.

One kernel serves the module (attacks do not disturb each other: every handle is re-derived from ``t``); the attacks
whose success would put a secret into the executor (a forged attestation, a model export, the table's extremes) get
kernels of their own, so that a success there cannot taint the other tests' evidence.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import sys
import textwrap
from ast import literal_eval
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confidential_fixtures import (
    CANARY_COST,
    CANARY_DIAGNOSIS,
    KNOWN_CANARIES_PRELUDE,
    ConfidentialWorld,
    drain,
    find_canaries,
    received,
    start_confidential_kernel,
    stop_confidential_kernel,
)

ATTEMPT_TIMEOUT = 120

# Defined in the executor once: runs an attack, prints its outcome as one JSON line (the returned value's repr,
# or the exception with its full formatted traceback, so both travel to the client and are searched too).
HARNESS = textwrap.dedent(
    """
    import json as _json, os, sys, traceback as _traceback
    import confnb as cn

    def _attempt(fn, limit=20000):
        try:
            value = fn()
        except Exception as exc:
            outcome = {
                "outcome": "raised", "type": type(exc).__name__, "message": str(exc)[:4000],
                "rule": getattr(exc, "rule", None), "datasets": list(getattr(exc, "datasets", ()) or ()),
                "errno": getattr(exc, "errno", None),
                "traceback": "".join(_traceback.format_exception(exc))[-8000:],
            }
        else:
            outcome = {"outcome": "returned", "type": type(value).__name__, "repr": repr(value)[:limit]}
        print("ATTEMPT " + _json.dumps(outcome, default=repr))

    def _vault_pid():
        # The vault is the launcher's other child: the process whose command line names kernel_enclave.vault and
        # whose parent is this executor's parent (other kernels on the machine have vaults of their own).
        parent = os.getppid()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    cmdline = handle.read()
                with open(f"/proc/{name}/status") as handle:
                    status = handle.read()
            except OSError:
                continue
            if b"kernel_enclave.vault" in cmdline and f"\\nPPid:\\t{parent}\\n" in status:
                return int(name)
        raise LookupError("no vault process beside this executor")

    VAULT_PID = _vault_pid()
    RELAY_PID = os.getppid()

    import socket as _socket, struct as _struct
    from kernel_enclave.vault.protocol import recv_message as _recv, send_message as _send

    def _raw(header=None, frame=None):
        # A second connection to the vault, speaking the wire protocol by hand.
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(os.environ["CONFNB_VAULT_SOCKET"])
        try:
            if frame is not None:
                sock.sendall(frame)
            else:
                _send(sock, header)
            return _recv(sock)
        finally:
            sock.close()

    def _deep_plan(depth):
        plan = {"node": "source", "handle": t.plan["handle"]}
        for _ in range(depth):
            plan = {"node": "filter", "input": plan, "predicate": {"lit": True}}
        return {"node": "count", "input": plan}

    def _deep_expression(depth):
        expression = {"col": "cost"}
        for _ in range(depth):
            expression = {"fn": "neg", "args": [expression]}
        return {"node": "count", "input": {"node": "filter", "input": t.plan, "predicate": expression}}
    """
)


@dataclass(frozen=True)
class Outcome:
    """What an attack did in the executor, as the harness reported it."""

    raised: str | None
    message: str
    rule: str | None
    datasets: tuple[str, ...]
    errno: int | None
    value: str

    @classmethod
    def parse(cls, stdout: str) -> Outcome:
        lines = [line for line in stdout.splitlines() if line.startswith("ATTEMPT ")]
        assert len(lines) == 1, f"the attack printed no outcome: {stdout[-2000:]!r}"
        data = json.loads(lines[0][len("ATTEMPT ") :])
        if data["outcome"] == "raised":
            return cls(
                data["type"], data["message"], data["rule"], tuple(data["datasets"]), data["errno"], data["traceback"]
            )
        return cls(None, "", None, (), None, data["repr"])

    def violation(self, rule: str, datasets: tuple[str, ...]) -> None:
        assert self.raised == "PolicyViolation", f"expected {rule}, got {self}"
        assert (self.rule, self.datasets) == (rule, datasets), self
        assert f"rule {rule}" in self.message

    def refused(self, *types: str, errno: int | None = None) -> None:
        assert self.raised in types, f"expected {types}, got {self}"
        if errno is not None:
            assert self.errno == errno, self


class Hostile:
    """The analyst's side of a kernel: runs attacks and checks every message the client received meanwhile."""

    def __init__(self, kernel: Any, world: ConfidentialWorld) -> None:
        self.kernel = kernel
        self.world = world

    def run(self, code: str) -> tuple[dict[str, Any], str]:
        """Run a cell; its reply content and stdout. The canary check covers every message of the cell."""
        start = len(self.kernel.seen)
        reply, outputs = self.kernel.execute(code, timeout=ATTEMPT_TIMEOUT)
        drain(self.kernel, 0.05)
        self.assert_clean(start)
        stdout = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        return reply["content"], stdout

    def attempt(self, code: str, *, limit: int = 20000) -> Outcome:
        """``code`` is an expression, or statements defining ``attack()``; the attempt's outcome."""
        body = code if "def attack" in code else f"def attack():\n    return ({code})\n"
        content, stdout = self.run(f"{body}\n_attempt(attack, limit={limit})\n")
        assert content["status"] == "ok", content
        return Outcome.parse(stdout)

    def assert_clean(self, start: int = 0) -> None:
        window = _Window(self.kernel.seen[start:])
        found = find_canaries(received(window), self.world)
        assert not found, f"canaries reached the client: {json.dumps(found)}"


@dataclass
class _Window:
    """A slice of a kernel's received messages, shaped like the Kernel helper for ``received``."""

    seen: list[dict[str, Any]]

    def everything_received(self) -> str:
        return json.dumps(self.seen, default=str)


def _setup(kernel: Any, world: ConfidentialWorld) -> Hostile:
    hostile = Hostile(kernel, world)
    paths = {
        "CLAIMS_BROKER": world.insurer.broker_url,
        "CLINIC_STORE": str(world.clinic.store.directory),
        "INSURER_STORE": str(world.insurer.store.directory),
    }
    setup = HARNESS + "".join(f"{name} = {value!r}\n" for name, value in paths.items())
    setup += 't = cn.open("patients")\nc = cn.open("claims", broker=CLAIMS_BROKER)\nj = t.join(c, on="patient_id")\n'
    content, _ = hostile.run(setup)
    assert content["status"] == "ok", content
    return hostile


@pytest.fixture(scope="module")
def hostile(confidential_kernel: Any, confidential_world: ConfidentialWorld) -> Hostile:
    return _setup(confidential_kernel, confidential_world)


@pytest.fixture
def own_hostile(confnb_kernel_env: Path, confidential_world: ConfidentialWorld) -> Iterator[Hostile]:
    """A kernel of its own, for attacks whose success would put secrets into the shared kernel."""
    kernel = start_confidential_kernel(confidential_world)
    try:
        content, _ = Hostile(kernel, confidential_world).run(KNOWN_CANARIES_PRELUDE)
        assert content["status"] == "ok", content
        yield _setup(kernel, confidential_world)
    finally:
        stop_confidential_kernel(kernel)


needs_separate_user = pytest.mark.skipif(
    os.geteuid() != 0, reason="the executor runs as another user only when the kernel starts as root"
)

# -- display paths: nothing a handle shows comes from rows --------------------------------------------------------

DISPLAYS = {
    "display() of the table": "display(t)",
    "print() of the table": "print(t)",
    "displayhook of a filtered table": "t[t['zip'] == ZIP]",
    "column display and repr": "display(t['cost']); print(repr(t['diagnosis']))",
    "f-string of a filtered table and a column": "print(f\"{t.filter(t['patient_id'] == PID)} {t['zip']} {t}\")",
    "str() of a pending result": "print(str(t[t['zip'] == ZIP]['cost'].max()), repr(t['cost'].mean()))",
    "_repr_html_ and _repr_markdown_": (
        "f = t.filter(t['patient_id'] == PID)\nprint(f._repr_html_(), f._repr_markdown_())\n"
        "from IPython.display import HTML, Markdown\ndisplay(HTML(f._repr_html_()), Markdown(f._repr_markdown_()))"
    ),
    "group-by and join handles": "print(t.group_by('zip'), j, j.group_by('tier'), j[j['zip'] == ZIP])",
    "schema, dtypes, policy and columns": "print(t.schema, t.dtypes, t.policy, t.columns, j.columns)",
    "preview of the isolated record": "print(t[t['patient_id'] == PID].preview())",
}


@pytest.mark.parametrize("code", DISPLAYS.values(), ids=DISPLAYS.keys())
def test_display_paths_show_no_rows(hostile: Hostile, code: str) -> None:
    content, stdout = hostile.run(code)
    assert content["status"] == "ok", content
    if "preview" in code:
        assert "release.min_group_size" in stdout  # the row count of one record is withheld too


# -- rows through Python's and pandas' conversion protocols --------------------------------------------------------

CONVERSIONS = {
    "list(t)": ("list(t)", ("TypeError",)),
    "len(t)": ("len(t)", ("TypeError",)),
    "dict(t)": ("dict(t)", ("TypeError",)),
    "numpy.asarray(t)": ("__import__('numpy').asarray(t)", ("TypeError",)),
    "pandas.DataFrame(t)": ("__import__('pandas').DataFrame(t)", ("TypeError",)),
    "pandas.Series(column)": ("__import__('pandas').Series(t['cost'])", ("TypeError",)),
    "list(column)": ("list(t['zip'])", ("TypeError",)),
    "sum(column)": ("sum(t['cost'])", ("TypeError",)),
    "t.to_pandas()": ("t.to_pandas()", ("AttributeError",)),
    "t.head()": ("t.head()", ("AttributeError",)),
    "t.iloc[0]": ("t.iloc[0]", ("AttributeError",)),
    "column.values": ("t['cost'].values", ("AttributeError",)),
    "float(pending max)": ("float(t['cost'].max())", ("TypeError",)),
    "int(pending count)": ("int(t[t['zip'] == ZIP].count())", ("TypeError",)),
    "pickle of a handle": ("__import__('pickle').dumps(t)", ("TypeError",)),
    "t[0] positional access": ("t[0]", ("TypeError",)),
}


@pytest.mark.parametrize(("code", "errors"), CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_conversions_to_rows_are_refused(hostile: Hostile, code: str, errors: tuple[str, ...]) -> None:
    hostile.attempt(code).refused(*errors)


def test_numpy_array_of_a_column_holds_only_the_handle(hostile: Hostile) -> None:
    outcome = hostile.attempt("__import__('numpy').asarray(t['cost'])")
    # numpy wraps an object it cannot convert in a 0-d object array: the handle, not values.
    assert outcome.raised is None
    assert outcome.value == "array(<Column 'cost'>, dtype=object)"


# -- tracebacks: vault errors on values that do not convert name columns and types only -----------------------------

BAD_CASTS = {  # type errors, found on the schema before any row is read
    "diagnosis as bool": "t.assign(x=t['diagnosis'].astype('bool')).agg(m=('x', 'mean')).release()",
    "arithmetic on a string": "t.assign(x=t['diagnosis'] * 2 + 1).agg(m=('x', 'max')).release()",
}
# Casts are total: a value that does not convert becomes null (as SQL's TRY_CAST), so these fail on no value; what
# is left has no contributing records, and the policy withholds it.
TOTAL_CASTS = {
    "zip as int64": "t.assign(x=t['zip'].astype('int64')).agg(m=('x', 'mean')).release()",
    "diagnosis as float64": "t.assign(x=t['diagnosis'].astype('float64')).agg(m=('x', 'sum')).release()",
    "cast in a filter": "t.filter(t['zip'].astype('int64') > 0).count().release()",
}


@pytest.mark.parametrize("code", BAD_CASTS.values(), ids=BAD_CASTS.keys())
@pytest.mark.parametrize("mode", ["Context", "Verbose"])
def test_vault_errors_on_canary_strings_carry_no_value(hostile: Hostile, code: str, mode: str) -> None:
    # Uncaught, so the error travels as IPython formats it; Verbose mode also prints every frame's locals.
    restore = "get_ipython().run_line_magic('xmode', 'Context')"
    content, _ = hostile.run(f"%xmode {mode}\ntry:\n    {code}\nfinally:\n    {restore}")
    assert content["status"] == "error"
    assert content["ename"] == "VaultError", content
    assert re.search(r"column '(zip|diagnosis)' \(large_string\)", content["evalue"]), content["evalue"]
    assert content["traceback"], "the owner's policy shows full tracebacks; the gate must not have hidden this one"


@pytest.mark.parametrize("code", TOTAL_CASTS.values(), ids=TOTAL_CASTS.keys())
@pytest.mark.parametrize("mode", ["Context", "Verbose"])
def test_casts_of_canary_strings_fail_on_no_value(hostile: Hostile, code: str, mode: str) -> None:
    restore = "get_ipython().run_line_magic('xmode', 'Context')"
    content, _ = hostile.run(f"%xmode {mode}\ntry:\n    {code}\nfinally:\n    {restore}")
    assert content["status"] == "error"
    assert content["ename"] == "PolicyViolation", content
    assert "rule release.min_group_size of 'patients'" in content["evalue"], content["evalue"]
    assert content["traceback"], "the owner's policy shows full tracebacks; the gate must not have hidden this one"
    # The legitimate twin: the same cast of a column whose values do convert is released, and equals pandas'.
    twin = hostile.attempt("t['age'].astype('float64').sum().release()")
    assert twin.raised is None, twin
    assert float(twin.value) == pytest.approx(float(hostile.world.frames["patients"]["age"].sum()))


# -- isolating one record, then aggregating it ----------------------------------------------------------------------

ISOLATING = {
    "count of patient_id == canary": "t[t['patient_id'] == PID].count().release()",
    "mean cost of the canary zip": "t[t['zip'] == ZIP]['cost'].mean().release()",
    "describe the canary diagnosis": "t[t['diagnosis'].str.startswith('CANARY')].describe().release()",
    "median cost above a million": "t[t['cost'] > 1_000_000]['cost'].median().release()",
    "quantiles of the canary zip": "t[t['zip'] == ZIP]['cost'].quantile([0.5, 1.0]).release()",
    "max and min of patient_id == canary": (
        "t[t['patient_id'] == PID].agg(c=('cost', 'max'), a=('age', 'min'), d=('diagnosis', 'nunique')).release()"
    ),
    "std by isin": "t[t['patient_id'].isin([PID])]['cost'].std().release()",
    "sum of an or-padded filter": "t[(t['zip'] == ZIP) | (t['age'] > 1000)]['cost'].sum().release()",
}


@pytest.mark.parametrize("code", ISOLATING.values(), ids=ISOLATING.keys())
def test_one_record_never_aggregates_alone(hostile: Hostile, code: str) -> None:
    hostile.attempt(code).violation("release.min_group_size", ("patients",))


def test_value_counts_of_one_record_come_back_empty(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    counts = t[t['zip'] == ZIP]['diagnosis'].value_counts().release()\n"
        "    return len(counts), counts.attrs['confnb_suppressed']\n"
    )
    assert (
        outcome.value == "(0, {'groups': 1, 'cells': {}})"
    )  # the one value's count is withheld, nothing else is there


# -- never_release columns, directly or derived ------------------------------------------------------------------------

NEVER_RELEASED = {
    "group by patient_id": "t.group_by('patient_id').agg(n=('cost', 'count')).release()",
    "group by sex and patient_id": "t.group_by(['sex', 'patient_id']).agg(n=('age', 'count')).release()",
    "value_counts of patient_id": "t['patient_id'].value_counts().release()",
    "max of patient_id": "t['patient_id'].max().release()",
    "describe patient_id": "t.describe(['patient_id']).release()",
    "derived: patient_id % 1000": "t.assign(k=t['patient_id'] % 1000).group_by('k').agg(n=('age', 'count')).release()",
    "derived: is the canary": "t.assign(k=t['patient_id'] == PID).group_by('k').agg(m=('cost', 'mean')).release()",
    "derived: where()": (
        "t.assign(k=cn.where(t['age'] > 0, t['patient_id'], 0)).group_by('k').agg(n=('age', 'count')).release()"
    ),
    "derived: string length": "t.assign(k=t['patient_id'].astype('string').str.len()).value_counts('k').release()",
    "derived: hidden in a numeric column": "t.assign(age=t['age'] + t['patient_id'] * 0).describe(['age']).release()",
    "join key grouped": "j.group_by('patient_id').agg(n=('amount', 'count')).release()",
}


@pytest.mark.parametrize("code", NEVER_RELEASED.values(), ids=NEVER_RELEASED.keys())
def test_never_release_columns_and_their_derivatives_stay_in(hostile: Hostile, code: str) -> None:
    hostile.attempt(code).violation("release.never_release", ("patients",))


# -- small cells -------------------------------------------------------------------------------------------------------


def test_value_counts_of_zip_suppress_small_cells(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    counts = t['zip'].value_counts().release()\n"
        "    return sorted(counts.index), int(counts.min()), counts.attrs['confnb_suppressed']\n"
    )
    names, smallest, suppressed = literal_eval(outcome.value)
    assert len(names) == 20 and all(name.startswith("Z-100") for name in names)
    assert smallest >= 10
    assert suppressed == {"groups": 6, "cells": {}}  # five rare zips of three patients, and the canary's zip


@pytest.mark.parametrize("key", ["zip", "diagnosis"])
def test_extremes_of_small_groups_are_suppressed(hostile: Hostile, key: str) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        f"    g = t.group_by('{key}').agg(mx=('cost', 'max'), mn=('cost', 'min'), md=('cost', 'median'),"
        " q=('cost', 'quantile', 0.99), n=('age', 'count')).release()\n"
        "    nulled = {c: sorted(g.index[g[c].isna()]) for c in g.columns if g[c].isna().any()}\n"
        "    return g.to_string(), int(g['n'].min()), g.attrs['confnb_suppressed'], nulled\n"
    )
    _, smallest, suppressed, nulled = literal_eval(outcome.value)
    assert smallest >= 10
    # The canary's group, and the rare zips (or R99), are dropped; lone extremes may be withheld on top: exactly the
    # null cells, named by column and group.
    assert suppressed["groups"] >= (6 if key == "zip" else 2)
    assert {column: sorted(labels) for column, labels in suppressed["cells"].items()} == nulled
    assert set(nulled) <= {"mx", "mn"}  # the medians and quantiles are block means of k records: released


# -- joins: several owners, the strictest rule wins and is named -------------------------------------------------------


def test_join_group_of_15_fails_the_second_owners_minimum(hostile: Hostile) -> None:
    # 15 platinum members: enough for the clinic (10), not for the insurer (25), so only the insurer is named.
    hostile.attempt("j[j['tier'] == 'platinum']['cost'].mean().release()").violation(
        "release.min_group_size", ("claims",)
    )


def test_join_repeating_one_patient_40_times_still_counts_one_record(hostile: Hostile) -> None:
    # The canary patient has 40 claims: 40 joined rows, 40 claim records, but one patient record.
    hostile.attempt("j[j['zip'] == ZIP].agg(a=('amount', 'mean'), c=('cost', 'mean')).release()").violation(
        "release.min_group_size", ("patients",)
    )


def test_join_groups_below_the_second_owners_minimum_are_suppressed(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    g = j.group_by('tier').agg(n=('amount', 'count'), m=('cost', 'mean')).release()\n"
        "    return sorted(g.index), g.attrs['confnb_suppressed']\n"
    )
    assert outcome.value == "(['bronze', 'gold', 'silver'], {'groups': 1, 'cells': {}})"  # platinum (15) withheld


@pytest.mark.parametrize(
    "code",
    ["c.group_by('provider').agg(n=('amount', 'count')).release()", "j['provider'].value_counts().release()"],
    ids=["claims alone", "joined"],
)
def test_max_rows_of_the_second_owner(hostile: Hostile, code: str) -> None:
    # 30 providers of >= 40 claims each: every group is large enough, but the insurer releases at most 20 rows.
    hostile.attempt(code).violation("release.max_rows", ("claims",))


# -- models ------------------------------------------------------------------------------------------------------------

MODEL = "from sklearn.linear_model import LogisticRegression\n"

REFUSED_MODELS = {
    "never_release feature": (
        "cn.fit(LogisticRegression(), t, target='readmitted', features=['age', 'patient_id']).params()",
        "release.never_release",
    ),
    "never_release target": (
        "cn.fit(__import__('sklearn.linear_model').linear_model.LinearRegression(), t, target='patient_id',"
        " features=['age']).params()",
        "release.never_release",
    ),
    "feature derived from patient_id": (
        "cn.fit(LogisticRegression(), t.assign(a=t['age'] + t['patient_id'] % 2), target='readmitted',"
        " features=['a', 'cost']).params()",
        "release.never_release",
    ),
    "trained on six patients": (
        "cn.fit(LogisticRegression(), t[t['diagnosis'] == 'R99'], target='readmitted',"
        " features=['age', 'cost']).params()",
        "release.min_group_size",
    ),
    "trained on the canary alone": (
        "cn.fit(LogisticRegression(), t[t['zip'] == ZIP], target='readmitted', features=['age']).metrics()",
        "release.min_group_size",
    ),
    "a class of one patient": (
        "cn.fit(LogisticRegression(), t.assign(y=t['diagnosis'].str.startswith('CANARY')), target='y',"
        " features=['age', 'cost'], test_size=0.25, random_state=0).params()",
        "release.min_group_size",
    ),
    "300 clusters": (
        "cn.fit(__import__('sklearn.cluster').cluster.KMeans(n_clusters=300, n_init=1, random_state=0), t,"
        " features=['age', 'cost']).params()",
        "release.min_group_size",
    ),
}


@pytest.mark.parametrize(("code", "rule"), REFUSED_MODELS.values(), ids=REFUSED_MODELS.keys())
def test_models_do_not_carry_records_out(hostile: Hostile, code: str, rule: str) -> None:
    hostile.run(MODEL)
    hostile.attempt(code).violation(rule, ("patients",))


def test_predict_on_public_data_is_not_a_release_the_clinic_allows(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    import pandas as pd\n"
        "    m = cn.fit(LogisticRegression(), t, target='readmitted', features=['age', 'cost'], test_size=0.25,"
        " random_state=0)\n"
        "    return m.predict(pd.DataFrame({'age': [40, 80], 'cost': [1000.0, 7e6]}))\n"
    )
    outcome.violation("release.allow", ("patients",))


# -- the vault's process, from the executor ----------------------------------------------------------------------------

PROC_ENTRIES = {
    "mem": "open(f'/proc/{VAULT_PID}/mem', 'rb').read(4096)",
    "task mem": "open(f'/proc/{VAULT_PID}/task/{VAULT_PID}/mem', 'rb').read(4096)",
    "environ": "open(f'/proc/{VAULT_PID}/environ', 'rb').read()",
    "maps": "open(f'/proc/{VAULT_PID}/maps').read()",
    "smaps": "open(f'/proc/{VAULT_PID}/smaps').read()",
    "pagemap": "open(f'/proc/{VAULT_PID}/pagemap', 'rb').read(64)",
    "stack": "open(f'/proc/{VAULT_PID}/stack').read()",
    "open files": "os.listdir(f'/proc/{VAULT_PID}/fd')",
    "cwd": "os.readlink(f'/proc/{VAULT_PID}/cwd')",
    "root": "os.listdir(f'/proc/{VAULT_PID}/root/')",
    "relay's environ": "open(f'/proc/{RELAY_PID}/environ', 'rb').read()",
}


@pytest.mark.parametrize("code", PROC_ENTRIES.values(), ids=PROC_ENTRIES.keys())
def test_vault_memory_and_proc_entries_are_refused(hostile: Hostile, code: str) -> None:
    hostile.attempt(code).refused("PermissionError", errno=13)


def test_the_vault_is_found_and_its_cmdline_is_all_there_is(hostile: Hostile) -> None:
    outcome = hostile.attempt("open(f'/proc/{VAULT_PID}/cmdline', 'rb').read()")
    assert outcome.raised is None and outcome.value.endswith("-m\\x00kernel_enclave.vault\\x00'")


PTRACE = {
    "PTRACE_ATTACH": "libc.ptrace(16, VAULT_PID, None, None)",
    "PTRACE_SEIZE": "libc.ptrace(0x4206, VAULT_PID, None, None)",
    "process_vm_readv": "libc.process_vm_readv(VAULT_PID, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)",
}


@pytest.mark.parametrize("call", PTRACE.values(), ids=PTRACE.keys())
def test_ptrace_and_process_vm_readv_via_ctypes_are_refused(hostile: Hostile, call: str) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    import ctypes\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\n"
        "    class iovec(ctypes.Structure):\n"
        "        _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n"
        "    buffer = ctypes.create_string_buffer(4096)\n"
        "    local = iovec(ctypes.cast(buffer, ctypes.c_void_p), 4096)\n"
        "    remote = iovec(0x400000, 4096)\n"
        f"    result = {call}\n"
        "    if result == -1:\n"
        "        errno = ctypes.get_errno()\n"
        "        raise OSError(errno, os.strerror(errno))\n"
        "    libc.ptrace(17, VAULT_PID, None, None)  # attached after all: let go of it (PTRACE_DETACH)\n"
        "    return result, buffer.raw[:64]\n"
    )
    outcome.refused("PermissionError", errno=1)


# -- the TEE, the kernel's directories, other users' files ----------------------------------------------------------

FILES = {
    "SEV guest device": ("open('/dev/sev-guest', 'rb')", ("FileNotFoundError", "PermissionError")),
    "configfs-tsm report": (
        "os.mkdir('/sys/kernel/config/tsm/report/confnb-attack')",
        ("FileNotFoundError", "PermissionError", "OSError"),
    ),
    "the vault socket's directory": (
        "os.listdir(os.path.dirname(os.environ['CONFNB_VAULT_SOCKET']))",
        ("PermissionError",),
    ),
    "the kernel's run directory": (
        "os.listdir(os.path.dirname(os.path.dirname(os.environ['CONFNB_VAULT_SOCKET'])))",
        ("PermissionError",),
    ),
    "root's home": ("os.listdir('/root')", ("PermissionError",)),
    "the clinic's key store": ("os.listdir(CLINIC_STORE)", ("PermissionError",)),
    "the insurer's key database": ("open(INSURER_STORE + '/broker.sqlite', 'rb').read(64)", ("PermissionError",)),
}


@needs_separate_user
@pytest.mark.parametrize(("code", "errors"), FILES.values(), ids=FILES.keys())
def test_devices_directories_and_other_users_files_are_refused(
    hostile: Hostile, code: str, errors: tuple[str, ...]
) -> None:
    hostile.attempt(code).refused(*errors)


@needs_separate_user
def test_the_simulated_chip_cannot_be_used_from_the_executor(hostile: Hostile) -> None:
    # With the chip's keys the executor could sign reports of its own, or derive the vault's sealing key.
    outcome = hostile.attempt(
        "def attack():\n"
        "    from kernel_enclave.tee import get_backend\n"
        "    return get_backend('simulated').derive_sealing_key(b'vault/seal/1').hex()\n"
    )
    assert outcome.raised is not None, "the executor derived the vault's sealing key"
    assert "Permission denied" in outcome.message or outcome.raised == "PermissionError", outcome


@needs_separate_user
def test_a_vault_of_the_analysts_own_cannot_open_the_dataset(hostile: Hostile) -> None:
    # The session's chip is the kernel's alone: the executor cannot even load it.
    hostile.attempt(
        "def attack():\n"
        "    from kernel_enclave.tee import get_backend\n"
        "    return get_backend('simulated').ark_sha256()\n"
    ).refused("PermissionError")
    # A chip of the analyst's own runs the same code, so its evidence carries the pinned measurement: only the
    # owner's pin on the chip (simulated_roots) keeps the broker from releasing the key to this vault.
    outcome = hostile.attempt(
        "def attack():\n"
        "    import tempfile\n"
        "    from kernel_enclave.tee.simulated import SimulatedBackend\n"
        "    from kernel_enclave.vault.keys import VaultKeys\n"
        "    from kernel_enclave.vault.vault import Vault\n"
        "    chip = SimulatedBackend(state_dir=tempfile.mkdtemp())\n"
        "    vault = Vault(backend=chip, keys=VaultKeys.generate(), broker_url=os.environ['CONFNB_BROKER_URL'])\n"
        "    reply, buffers = vault.handle({'op': 'open', 'source': 'patients', 'broker': None}, [])\n"
        "    return reply, len(buffers)\n",
        limit=100_000,
    )
    assert outcome.raised is None, outcome  # Vault.handle ran and answered
    assert "'ok': False" in outcome.value, outcome
    assert "simulated_root" in outcome.value and "someone else's" in outcome.value, outcome


def test_the_environment_holds_no_keys(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "(dict(os.environ), open('/proc/self/environ', 'rb').read(), open('/proc/self/cmdline', 'rb').read())",
        limit=500_000,
    )
    assert outcome.raised is None and "CONFNB_VAULT_SOCKET" in outcome.value
    for marker in ("PRIVATE KEY", "MIGHAgEAMBMGByqGSM49", "MC4CAQAwBQYDK2Vw", "MIIEvQIBADANBgkqhkiG9w0B"):
        assert marker not in outcome.value, f"key material in the executor's environment: {marker}"


# -- the vault's socket, by hand ---------------------------------------------------------------------------------------

_DEEP_JSON = (
    "def attack():\n"
    '    body = \'{"op":"release","plan":\' + \'{"node":"filter","predicate":{"lit":true},"input":\' * 5000'
    ' + \'{"node":"source","handle":"d1"}\' + \'}\' * 5001\n'
    "    data = body.encode()\n"
    "    try:\n"
    "        answer = _raw(frame=_struct.pack('>I', len(data)) + data + _struct.pack('>I', 0))\n"
    "    except (ConnectionError, EOFError) as exc:\n"
    "        answer = ('connection closed', type(exc).__name__)\n"
    "    return answer, _raw({'op': 'hello'})[0]['ok']\n"
)


RAW_REQUESTS = {
    "raw rows: the source itself": ("{'op': 'release', 'plan': t.plan}", "release.allow"),
    "raw rows: a selected column": (
        "{'op': 'release', 'plan': t[t['zip'] == ZIP][['cost', 'diagnosis']].plan}",
        "release.allow",
    ),
    "unknown plan node": ("{'op': 'release', 'plan': {'node': 'rows', 'input': t.plan}}", "unknown plan node"),
    "unknown function": (
        "{'op': 'release', 'plan': {'node': 'count', 'input': {'node': 'filter', 'input': t.plan,"
        " 'predicate': {'fn': '__import__', 'args': [{'lit': 'os'}]}}}}",
        "__import__",
    ),
    "unknown aggregation": (
        "{'op': 'release', 'plan': {'node': 'aggregate', 'input': t[t['zip'] == ZIP].plan, 'by': [],"
        " 'aggs': [{'name': 'x', 'column': 'diagnosis', 'func': 'first'}]}}",
        "func must be one of",
    ),
    "plan nested 200 deep": ("{'op': 'release', 'plan': _deep_plan(200)}", "deeper than"),
    "expression nested 200 deep": ("{'op': 'release', 'plan': _deep_expression(200)}", "deeper than"),
    "unknown operation": ("{'op': 'dump_table', 'handle': 'd1'}", "unknown vault operation"),
    "a handle never opened": (
        "{'op': 'release', 'plan': {'node': 'count', 'input': {'node': 'source', 'handle': 'd9999'}}}",
        "d9999",
    ),
    "an export of a result never released": (
        "{'op': 'export', 'result': 'r424242', 'model': None, 'format': 'csv', 'recipient': None}",
        "no released result",
    ),
}


@pytest.mark.parametrize(("header", "expected"), RAW_REQUESTS.values(), ids=RAW_REQUESTS.keys())
def test_hand_made_requests_on_a_second_socket_are_refused(hostile: Hostile, header: str, expected: str) -> None:
    outcome = hostile.attempt(f"def attack():\n    return _raw({header}), _raw({{'op': 'hello'}})[0]['ok']\n")
    assert outcome.raised is None, outcome
    reply, still_there = literal_eval(outcome.value)
    assert still_there is True
    header_reply, buffers = reply
    assert header_reply["ok"] is False and buffers == [], header_reply
    error = header_reply["error"]
    assert expected in (error.get("rule") or "") + error["message"], error


@pytest.mark.parametrize(
    "frame",
    [
        "b'\\xff\\xff\\xff\\xff garbage'",
        "_struct.pack('>I', 2) + b'[]' + _struct.pack('>I', 0)",
        "_struct.pack('>I', 2) + b'{}' + _struct.pack('>I', 10**6)",
    ],
    ids=["oversized header", "header not an object", "too many buffers"],
)
def test_malformed_frames_get_a_protocol_error(hostile: Hostile, frame: str) -> None:
    outcome = hostile.attempt(f"def attack():\n    return _raw(frame={frame}), _raw({{'op': 'hello'}})[0]['ok']\n")
    reply, still_there = literal_eval(outcome.value)
    assert still_there is True
    assert reply[0]["ok"] is False and reply[0]["error"]["type"] == "ProtocolError", reply


def test_json_nested_5000_deep_does_not_bring_the_vault_down(hostile: Hostile) -> None:
    outcome = hostile.attempt(_DEEP_JSON)
    assert outcome.raised is None, outcome
    answer, still_there = literal_eval(outcome.value)
    assert still_there is True
    assert answer[0] == "connection closed" or answer[0]["ok"] is False, answer


# -- the analyst API patched by the analyst: the vault decides, not the client --------------------------------------

PATCHES = {
    "raw rows through the session": (
        "def attack():\n"
        "    from confnb.analyst.session import current_session\n"
        "    return current_session().request({'op': 'release', 'plan': t[t['zip'] == ZIP].plan})\n",
        "release.allow",
    ),
    "an aggregation the client does not offer": (
        "def attack():\n"
        "    import confnb.analyst.table as table\n"
        "    saved = table.AGG_FUNCS\n"
        "    table.AGG_FUNCS = (*saved, 'first', 'list')\n"
        "    try:\n"
        "        return t[t['zip'] == ZIP].agg(d=('diagnosis', 'first'), c=('cost', 'list')).release()\n"
        "    finally:\n"
        "        table.AGG_FUNCS = saved\n",
        "func must be one of",
    ),
    "the client's column checks removed": (
        "def attack():\n"
        "    import confnb.analyst.table as table\n"
        "    saved = table.SealedTable._require\n"
        "    table.SealedTable._require = lambda self, names, what: None\n"
        "    try:\n"
        "        return t.group_by(['__index_level_0__']).agg(n=('age', 'count')).release()\n"
        "    finally:\n"
        "        table.SealedTable._require = saved\n",
        "__index_level_0__",
    ),
}


@pytest.mark.parametrize(("code", "expected"), PATCHES.values(), ids=PATCHES.keys())
def test_patching_the_client_changes_nothing(hostile: Hostile, code: str, expected: str) -> None:
    outcome = hostile.attempt(code)
    assert outcome.raised in ("PolicyViolation", "VaultError"), outcome
    assert expected in (outcome.rule or "") + outcome.message, outcome


def test_the_client_sees_only_what_survived_the_policy_even_undecoded(hostile: Hostile) -> None:
    # Replace the client's decoding with the raw reply and buffers: the small groups were never sent.
    outcome = hostile.attempt(
        "def attack():\n"
        "    import pyarrow as pa\n"
        "    import confnb.analyst.table as table\n"
        "    saved = table._decode\n"
        "    table._decode = lambda reply, buffers, shape: (dict(reply),\n"
        "        [pa.ipc.open_stream(pa.py_buffer(b)).read_all().to_pylist() for b in buffers])\n"
        "    try:\n"
        "        return t[t['zip'] == ZIP].group_by('diagnosis').agg(m=('cost', 'mean')).release()\n"
        "    finally:\n"
        "        table._decode = saved\n"
    )
    assert outcome.raised is None, outcome
    reply, rows = literal_eval(outcome.value)
    assert reply["suppressed"] == 1 and rows == [[]]


def test_a_forged_release_cannot_be_exported_with_a_receipt(hostile: Hostile) -> None:
    # The analyst's own session answers "ok" to a refused release; the vault still exports only what it released.
    outcome = hostile.attempt(
        "def attack():\n"
        "    from confnb.analyst import session as S\n"
        "    real = S.VaultSession.request\n"
        "    def forged(self, header, buffers=()):\n"
        "        try:\n"
        "            return real(self, header, buffers)\n"
        "        except cn.PolicyViolation:\n"
        "            return {'ok': True, 'result': 'r424242', 'kind': 'aggregate', 'shape': 'scalar',\n"
        "                    'value': 1234.5, 'index': [], 'series': False, 'suppressed': 0}, []\n"
        "    S.VaultSession.request = forged\n"
        "    try:\n"
        "        value = t[t['patient_id'] == PID]['cost'].mean().release()\n"
        "        assert value == 1234.5\n"
        "        return cn.export(value, os.path.expanduser('~/forged.json'))\n"
        "    finally:\n"
        "        S.VaultSession.request = real\n"
    )
    outcome.refused("VaultError")
    assert "no released result 'r424242'" in outcome.message


EXPORTS = {
    "a table handle": ("cn.export(t, os.path.expanduser('~/t.csv'))", "ValueError", "not released"),
    "a pending result of one record": (
        "cn.export(t[t['zip'] == ZIP]['cost'].mean(), os.path.expanduser('~/x.json'))",
        "PolicyViolation",
        "release.min_group_size",
    ),
    "a value computed from a release": (
        "cn.export(t['age'].mean().release() * 1.0, os.path.expanduser('~/x.json'))",
        "ValueError",
        "not released",
    ),
}


@pytest.mark.parametrize(("code", "error", "expected"), EXPORTS.values(), ids=EXPORTS.keys())
def test_only_released_values_are_exported(hostile: Hostile, code: str, error: str, expected: str) -> None:
    outcome = hostile.attempt(code)
    outcome.refused(error)
    assert expected in (outcome.rule or "") + outcome.message, outcome


# -- sealed files ------------------------------------------------------------------------------------------------------


def test_a_sealed_table_is_ciphertext_to_the_analyst(hostile: Hostile, confidential_world: ConfidentialWorld) -> None:
    # The analyst reads the sealed file's bytes and prints them all: they reach the client and are searched.
    outcome = hostile.attempt(
        "def attack():\n"
        "    path = t.seal(os.path.expanduser('~/patients.sealed'))\n"
        "    data = path.read_bytes()\n"
        "    print(data.hex())\n"
        "    return str(path), len(data)\n"
    )
    path, size = literal_eval(outcome.value)
    assert size > 50_000  # the whole table is in there, encrypted
    sealed = Path(path).read_bytes()  # the test's own look, as root, at the raw bytes
    header_end = sealed.index(b"\n", len(b"confnb-sealed/1\n"))
    header = json.loads(sealed[len(b"confnb-sealed/1\n") : header_end])
    assert header["kind"] == "table" and header["metadata"]["datasets"] == ["patients"]
    needles = [*_needles(confidential_world), struct.pack("<q", 987654321), b"CANARY-ZIP-5F3A"]
    assert not [needle for needle in needles if needle in sealed]


TAMPERING = {
    "one ciphertext bit": "data[len(data) - 100] ^= 1",
    "truncated": "del data[len(data) // 2 :]",
    "policy loosened in the header": (
        "magic, header, body = bytes(data).split(b'\\n', 2)\n"
        "    document = _json.loads(header)\n"
        "    release = document['metadata']['policies']['patients']['release']\n"
        "    release['min_group_size'] = 1\n"
        "    release['never_release'] = []\n"
        "    header = _json.dumps(document, sort_keys=True, separators=(',', ':')).encode()\n"
        "    data = bytearray(magic + b'\\n' + header + b'\\n' + body)"
    ),
}


@pytest.mark.parametrize("change", TAMPERING.values(), ids=TAMPERING.keys())
def test_a_tampered_sealed_file_does_not_unseal(hostile: Hostile, change: str) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    path = t.seal(os.path.expanduser('~/tamper.sealed'))\n"
        "    data = bytearray(path.read_bytes())\n"
        f"    {change}\n"
        "    path.write_bytes(bytes(data))\n"
        "    u = cn.unseal(path)\n"
        "    return u[u['patient_id'] == PID].agg(c=('cost', 'max'), d=('diagnosis', 'nunique')).release()\n"
    )
    outcome.refused("VaultError")
    assert "seal" in outcome.message or "authentic" in outcome.message, outcome


# -- the executor itself holds nothing ---------------------------------------------------------------------------------


def test_tracing_every_frame_during_releases_sees_no_record(hostile: Hostile) -> None:
    # sys.settrace records the locals of every frame of the analyst API, the vault client and the wire (socket,
    # json) while a refused and an allowed release run, and prints them all: the repr of every request, reply,
    # buffer, Arrow table and decoded frame the executor handled.
    outcome = hostile.attempt(
        "def attack():\n"
        "    seen = []\n"
        "    def tracer(frame, event, arg):\n"
        "        wanted = ('confnb', 'kernel_enclave', 'socket', 'json')\n"
        "        if event in ('call', 'return') and any(w in frame.f_code.co_filename for w in wanted):\n"
        "            values = list(frame.f_locals.items())\n"
        "            if event == 'return':\n"
        "                values.append(('<returned>', arg))\n"
        "            for name, value in values:\n"
        "                try:\n"
        "                    seen.append(f'{frame.f_code.co_name}:{name}={value!r}'[:2000])\n"
        "                except Exception as exc:  # objects under construction may not have a repr yet\n"
        "                    seen.append(f'{frame.f_code.co_name}:{name}=<{type(exc).__name__}>')\n"
        "        return tracer\n"
        "    sys.settrace(tracer)\n"
        "    try:\n"
        "        try:\n"
        "            t[t['diagnosis'].str.startswith('CANARY')].agg(m=('cost', 'mean'), d=('diagnosis', 'nunique'))"
        ".release()\n"
        "        except cn.PolicyViolation as exc:\n"
        "            seen.append(f'refused: {exc.rule}')\n"
        "        seen.append(repr(t.group_by('diagnosis').agg(m=('cost', 'mean')).release()))\n"
        "    finally:\n"
        "        sys.settrace(None)\n"
        "    print('\\n'.join(dict.fromkeys(seen)))\n"
        "    return len(seen)\n"
    )
    assert outcome.raised is None and int(outcome.value) > 100  # the tracer saw the whole request machinery


def test_no_dataset_sized_arrow_or_pandas_object_lives_in_the_executor(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    import gc, numpy as np, pandas as pd, pyarrow as pa\n"
        "    gc.collect()\n"
        "    found = []\n"
        "    for obj in gc.get_objects():\n"
        "        module = getattr(type(obj), '__module__', None)\n"
        "        if not isinstance(module, str):\n"
        "            continue\n"
        "        if module.partition('.')[0] in ('pyarrow', 'pandas', 'numpy') and hasattr(obj, '__len__'):\n"
        "            try:\n"
        "                found.append((type(obj).__name__, len(obj), repr(obj)[:2000]))\n"
        "            except Exception:\n"
        "                pass\n"
        "    print(found)\n"
        "    return pa.total_allocated_bytes(), max((n for _, n, _ in found), default=0), len(found)\n",
        limit=100,
    )
    assert outcome.raised is None, outcome
    allocated, largest, _ = literal_eval(outcome.value)
    assert allocated < 1 << 20, f"Arrow's memory pool holds {allocated} bytes in the executor"
    assert largest < 1000, "an object with as many rows as a dataset lives in the executor"


def test_the_executors_memory_holds_no_secret_value(hostile: Hostile, confidential_world: ConfidentialWorld) -> None:
    # After everything above, read the executor's whole address space from outside (as root, or as its
    # ancestor): neither the secret canaries (never in any cell) nor a dataset key may be anywhere in it.
    _, stdout = hostile.run("print(os.getpid())")
    pid = int(stdout.split()[0])
    try:
        regions = _memory_regions(pid)
    except PermissionError:
        pytest.skip("reading the executor's memory needs root or ptrace rights over it")
    needles = _needles(confidential_world)
    hits = {needle: sum(data.count(needle) for data in regions) for needle in needles}
    assert sum(len(data) for data in regions) > 50_000_000  # a real Python process was scanned
    assert not any(hits.values()), {needle.hex(): count for needle, count in hits.items() if count}


# -- attacks that reach past the vault (each in a kernel of its own) -------------------------------------------------


def test_evidence_from_an_export_receipt_does_not_release_a_key(hostile: Hostile) -> None:
    outcome = hostile.attempt(
        "def attack():\n"
        "    import urllib.request, urllib.error\n"
        "    value = t.group_by('sex').agg(m=('age', 'mean')).release()\n"
        "    evidence = _json.loads(cn.export(value, os.path.expanduser('~/r.json')).read_text())['evidence']\n"
        "    request = urllib.request.Request(os.environ['CONFNB_BROKER_URL'] + '/v1/datasets/patients/key-release',\n"
        "        data=_json.dumps({'evidence': evidence}).encode(), headers={'Content-Type': 'application/json'})\n"
        "    try:\n"
        "        return urllib.request.urlopen(request, timeout=30).read()\n"
        "    except urllib.error.HTTPError as error:\n"
        "        raise PermissionError(error.code, error.read().decode()) from None\n"
    )
    outcome.refused("PermissionError", errno=403)
    assert "nonce" in outcome.message


FORGED_CHIP = textwrap.dedent(
    """
    def attack():
        # Make a simulated chip of one's own, claiming this kernel's measurement, and attest to the broker with a
        # key pair of one's own; with the key, decrypt the dataset's ciphertext, which any process may read.
        import base64, tempfile, urllib.request, urllib.error
        from pathlib import Path
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        import confnb.analyst
        from confnb import hpke
        from kernel_enclave.attestation import issue_evidence
        from kernel_enclave.tee.simulated import SimulatedBackend

        measurement = bytes.fromhex(confnb.analyst.kernel_info()['measurement'])
        state = tempfile.TemporaryDirectory()
        chip = SimulatedBackend(state_dir=Path(state.name), measurement=measurement)
        mine = ec.generate_private_key(ec.SECP256R1())
        url = os.environ['CONFNB_BROKER_URL']

        def post(path, body):
            request = urllib.request.Request(url + path, data=_json.dumps(body).encode(),
                                             headers={'Content-Type': 'application/json'})
            try:
                return _json.loads(urllib.request.urlopen(request, timeout=30).read())
            except urllib.error.HTTPError as error:
                raise PermissionError(error.code, error.read().decode()) from None

        nonce = bytes.fromhex(post('/v1/challenge', {})['nonce'])
        evidence = issue_evidence(
            chip, nonce,
            hpke_public_key=mine.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
            signing_public_key=ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw(),
            curve_public_key='x' * 40,
        )
        grant = post('/v1/datasets/patients/key-release', {'evidence': evidence.to_dict()})
        key = hpke.open_sealed(mine, base64.b64decode(grant['sealed_key']), grant['hpke_info'].encode())
        print('dataset key', key.hex())
        from confnb.datasets.manifest import verify_dataset
        from confnb.datasets.reader import read_verified
        folder = next(Path(p) for p in os.environ['CONFNB_DATASET_PATH'].split(os.pathsep)
                      if (Path(p) / 'patients').is_dir())
        table = read_verified(verify_dataset(folder / 'patients'), key).to_pandas()
        print(table.sort_values('cost').tail(1).to_string())
        return len(table)
    """
)


def test_a_self_made_simulated_chip_gets_no_dataset_key(own_hostile: Hostile) -> None:
    outcome = own_hostile.attempt(FORGED_CHIP)
    outcome.refused("PermissionError", errno=403)


def test_an_exported_model_carries_no_single_record(own_hostile: Hostile) -> None:
    # A regression tree grown to single-record leaves, exported as .skops with a receipt: its leaves would be
    # individual patients' values. The export must be refused, or carry nothing built from fewer than 10 records.
    outcome = own_hostile.attempt(
        "def attack():\n"
        "    import base64\n"
        "    import skops.io as sio\n"
        "    from sklearn.tree import DecisionTreeRegressor\n"
        "    m = cn.fit(DecisionTreeRegressor(random_state=0), t.assign(c=t['cost'] * 1), target='cost',"
        " features=['c'])\n"
        "    bundle = _json.loads(cn.export(m, os.path.expanduser('~/tree.skops')).read_text())\n"
        "    payload = base64.b64decode(bundle['payload'])\n"
        "    tree = sio.loads(payload, trusted=sio.get_untrusted_types(data=payload)).tree_\n"
        "    leaves = tree.children_left == -1\n"
        "    print('largest leaf value', float(tree.value[leaves].max()))\n"
        "    return int(tree.n_node_samples[leaves].min())\n"
    )
    if outcome.raised is None:
        assert int(outcome.value) >= 10, "the exported model has leaves built from single records"
    else:
        outcome.refused("PolicyViolation", "VaultError")


def test_extremes_of_the_whole_table_do_not_name_the_outlier(own_hostile: Hostile) -> None:
    # A maximum over 2,000 patients is still one patient's cost. Every spelling of "the largest value" is tried;
    # each must come back hidden or refused, never as the outlier's exact cost.
    outcome = own_hostile.attempt(
        "def attack():\n"
        "    found = {}\n"
        "    tries = {\n"
        "        'max': lambda: t['cost'].max().release(),\n"
        "        'min of the negated cost': lambda: (-t['cost']).min().release(),\n"
        "        'describe': lambda: t.describe(['cost']).release().to_dict(),\n"
        "        'quantile 1.0': lambda: t['cost'].quantile([1.0]).release().to_dict(),\n"
        "        'quantile 0.0 of the negated cost': lambda: (-t['cost']).quantile([0.0]).release().to_dict(),\n"
        "        'max by sex': lambda: t.group_by('sex')['cost'].max().release().to_dict(),\n"
        "    }\n"
        "    for name, attempt in tries.items():\n"
        "        try:\n"
        "            found[name] = attempt()\n"
        "        except cn.VaultError as exc:\n"
        "            found[name] = f'refused: {exc}'\n"
        "    print(found)\n"
        "    return sorted(found)\n"
    )
    assert outcome.raised is None, outcome


def test_no_canary_reached_the_client_during_the_whole_session(
    hostile: Hostile, confidential_world: ConfidentialWorld
) -> None:
    """Last: every message of the module's kernel, including any that arrived after their cell went idle."""
    drain(hostile.kernel, 1.0)
    hostile.assert_clean(0)
    assert len(hostile.kernel.seen) > 500  # the search covered the whole hostile session


# -- helpers -----------------------------------------------------------------------------------------------------------


def _needles(world: ConfidentialWorld) -> list[bytes]:
    """Byte patterns of the secret canaries as Arrow, NumPy and Python hold them, and the raw dataset keys."""
    return [struct.pack("<d", CANARY_COST), CANARY_DIAGNOSIS.encode(), *world.dataset_keys.values()]


def _memory_regions(pid: int) -> list[bytes]:
    """Every readable mapping of a process (skipping the kernel's special ones and reservations above 4 GiB)."""
    regions = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            fields = line.split()
            start, end = (int(value, 16) for value in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if "r" not in fields[1] or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]") or end - start > 1 << 32:
                continue
            try:
                memory.seek(start)
                regions.append(memory.read(end - start))
            except OSError:
                continue
    return regions


def test_the_canary_search_finds_every_form_it_claims_to(confidential_world: ConfidentialWorld) -> None:
    """The search itself can fail: each canary form, planted in a message-like text, is found."""
    cost_bytes = struct.pack("<d", CANARY_COST)
    key = confidential_world.dataset_keys["patients"]
    samples = {
        "patient_id": ["987654321", "9.87654321e+08", "987654321.0"],
        "patient_id hex": ["0x3ade68b1", struct.pack("<q", 987654321).hex()],
        "cost": ["7777777.77", "7777778", "7.777778e+06", "7,777,777.77", "max    7.777778e+06"],
        "cost bytes": [cost_bytes.hex(), float.hex(CANARY_COST)],
        "zip": ["CANARY-ZIP-5F3A", "canary-zip-5f3a", b"CANARY-ZIP-5F3A".hex()],
        "diagnosis": ["CANARY-DIAG-91", b"CANARY-DIAG-91".hex()],
        "patients dataset key": [key.hex(), base64.b64encode(key).decode()],
    }
    for name, forms in samples.items():
        for form in forms:
            assert name in find_canaries(f'{{"text": "x {form} y"}}', confidential_world), (name, form)
    for harmless in ("45.7777777778", "0.17777778", "987654320", "17777777.0", "Z-10001", "CANARY"):
        assert not find_canaries(harmless, confidential_world), harmless
    assert sys.byteorder == "little"  # the binary needles are little-endian, as Arrow's buffers are
