"""The vault: the only process in the VM that holds dataset keys and plaintext, and the judge of what leaves.

The executor (the analyst's process) sends it requests over :mod:`kernel_enclave.vault.protocol`; the vault answers
with handles (``d1``, ``m1``), released values and refusals. Every request goes through :meth:`Vault.handle`, which
does three things for every operation, in this order: decide with the data owners' output policies, write the
decision to the kernel's audit log, and only then reply. A result that has not been released never leaves this
object: raw tables and trained models stay in ``_sources`` and ``_models`` and are referred to by handle only.

Errors are the analyst's business but never carry data: anything raised below that is not a :class:`VaultError`
(whose messages this package writes) is reported by its type alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confnb.attest.errors import PolicyError
from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.manifest import DatasetIntegrityError, verify_dataset
from confnb.policy.output import OutputPolicy, strictest
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee.base import TeeBackend, TeeError
from kernel_enclave.vault import sealing, stoppable, warmup
from kernel_enclave.vault.audit import KernelAuditLog, describe_plan
from kernel_enclave.vault.broker_client import BrokerClient, KeyReleaseError
from kernel_enclave.vault.budget_client import BudgetClient, BudgetError
from kernel_enclave.vault.keys import DATASET_PATH_VARIABLE, VaultKeys
from kernel_enclave.vault.protocol import PROTOCOL, Cancelled, PolicyViolation, ProtocolError, VaultError, error_reply
from kernel_enclave.vault.warmup import VAULT_WARMUP, Deferred, deferred_function

# Arrow, scikit-learn, pandas and Parquet take seconds to import: the vault answers before they are loaded, and its
# requests wait for them (see warmup).
if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa  # type: ignore[import-untyped]

    from confnb.datasets.reader import read_verified
    from kernel_enclave.vault import differences, dp, dp_models, earlier_values, export, models, plan, release, scan
else:
    pa = Deferred("pyarrow")
    differences = Deferred("kernel_enclave.vault.differences")
    dp = Deferred("kernel_enclave.vault.dp")
    dp_models = Deferred("kernel_enclave.vault.dp_models")
    earlier_values = Deferred("kernel_enclave.vault.earlier_values")
    export = Deferred("kernel_enclave.vault.export")
    models = Deferred("kernel_enclave.vault.models")
    plan = Deferred("kernel_enclave.vault.plan")
    release = Deferred("kernel_enclave.vault.release")
    scan = Deferred("kernel_enclave.vault.scan")
    read_verified = deferred_function("confnb.datasets.reader", "read_verified")

REMEMBERED_RESULTS = 256  # released values kept for export; older ones must be released again
MAX_PUBLIC_ROWS = 10_000_000

Reply = tuple[dict[str, Any], list[bytes]]
# Told (dataset id, where its policy came from: "broker", "upload" or "sealed", the policy) before a dataset's data
# becomes reachable; raising refuses the dataset. The vault process tightens the relay's gate with it.
PolicyListener = Callable[..., None]  # (dataset id, source, policy, broker=URL or None)
# Requests whose handlers write no audit entry of their own (they release nothing): recorded as plain requests.
_UNRECORDED_BY_HANDLER = frozenset({"hello", "warmup", "audit", "drop"})


@dataclass(frozen=True)
class _Result:
    """A released value kept for :func:`cn.export`: what was released, under which policy, from what."""

    kind: str
    table: pa.Table | None
    value: Any
    policy_id: str
    datasets: tuple[str, ...]
    operation_digest: str


def digest_of(value: object) -> str:
    return "sha256:" + hashlib.sha256(_canonical(value)).hexdigest()


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def release_recipe(
    tree: dict[str, Any], sources: Mapping[str, plan.SourceTable], policies: Mapping[str, OutputPolicy]
) -> differences.Recipe:
    """How the difference checks list a release's record sets again: the same plan over the same source tables
    under the same policies (the objects it ran on, kept; the tables never change), which also makes its
    fingerprint."""

    def listed() -> Sequence[differences.RecordSet]:
        return release.release(tree, sources, policies, record_sets=True).record_sets

    fingerprint = (
        _canonical(tree),
        tuple(sorted((name, id(table)) for name, table in sources.items())),
        tuple(sorted((name, id(policy)) for name, policy in policies.items())),
    )
    return differences.Recipe(listed, fingerprint)


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def read_ipc(data: bytes, what: str, *, public: bool = False) -> pa.Table:
    """Arrow from outside the vault (the executor's public data, a sealed file), checked before any compute by
    :mod:`kernel_enclave.vault.untrusted`: framing, declared sizes, schema limits, full validation."""
    from kernel_enclave.vault import untrusted

    return untrusted.read_ipc(data, what, untrusted.PUBLIC_LIMITS if public else untrusted.SEALED_LIMITS)


class Vault:
    """One kernel's data plane. Thread-safe: one lock serializes requests (they are CPU-bound anyway)."""

    def __init__(
        self,
        *,
        backend: TeeBackend,
        keys: VaultKeys,
        broker_url: str | None = None,
        on_policy: PolicyListener | None = None,
        audit_path: Path | None = None,
        dataset_path: str | None = None,
    ) -> None:
        self._backend = backend
        self._keys = keys
        self._broker_url = broker_url
        self._on_policy = on_policy
        self._dataset_path = dataset_path if dataset_path is not None else os.environ.get(DATASET_PATH_VARIABLE, "")
        self._lock = threading.Lock()
        self._sources: dict[str, plan.SourceTable] = {}
        self._scans: dict[str, scan.ScanFacts] = {}  # what reads of each scanned dataset have shown
        self._opened: dict[str, str] = {}  # dataset id -> handle
        self._policies: dict[str, OutputPolicy] = {}
        self._models: dict[str, models.TrainedModel | dp_models.DpModel] = {}
        self._results: OrderedDict[str, _Result] = OrderedDict()
        self._counter = 0
        self._releases: dict[str, int] = {}  # dataset id -> requests counted against its max_releases
        # dataset id -> (its broker's URL, its owner's Ed25519 public key): where a DP release is charged
        self._owners: dict[str, tuple[str, bytes]] = {}
        # The record sets behind every released number, for the difference checks; made by the first release
        # (it needs NumPy), kept for the kernel's lifetime.
        self._difference_memory: differences.ReleaseMemory | None = None
        self._earlier_values: earlier_values.EarlierValues | None = None
        self.audit = KernelAuditLog(keys.signing_key, audit_path)
        self._handlers: dict[str, Callable[[dict[str, Any], list[bytes]], Reply]] = {
            "hello": self._hello,
            "warmup": self._warmup,
            "open": self._open,
            "schema": self._schema,
            "release": self._release,
            "preview": self._preview,
            "fit": self._fit,
            "model_metrics": self._model_release,
            "model_score": self._model_release,
            "model_params": self._model_release,
            "predict": self._predict,
            "seal": self._seal,
            "unseal": self._unseal,
            "export": self._export,
            "audit": self._audit,
            "budget": self._budget,
            "drop": self._drop,
        }

    # -- entry point ------------------------------------------------------------------------------------------

    def handle(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        """Answer one request. Never raises: every failure becomes an error reply without data values."""
        op = header.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            shown = op if isinstance(op, str) and op.isidentifier() and len(op) < 40 else "?"
            return error_reply(ProtocolError(f"unknown vault operation {shown!r}")), []
        with self._lock:
            failed_reads = self._failed_reads()
            try:
                stoppable.check()  # interrupted while it waited for its turn: it does not start
                if op in _UNRECORDED_BY_HANDLER:
                    self.audit.append("request", op=op, operation=digest_of(_operation(header)))
                return handler(header, buffers)
            except Cancelled as cancelled:  # the analyst interrupted: stopped, recorded, answered (and discarded)
                self.audit.append("cancelled", op=op, operation=digest_of(_operation(header)), **self._asked(header))
                return error_reply(cancelled), []
            except PolicyViolation as violation:
                self.audit.append(
                    "refusal",
                    op=op,
                    rule=violation.rule,
                    datasets=list(violation.datasets),
                    operation=digest_of(_operation(header)),
                    **self._asked(header),
                )
                return error_reply(violation), []
            except Exception as exc:
                # A scanned dataset's file found altered while this request read it: say which check failed.
                altered = self._altered_since(failed_reads)
                integrity = {} if altered is None else {"integrity": altered}
                operation = digest_of(_operation(header))
                self.audit.append("error", op=op, operation=operation, **integrity, **self._asked(header))
                if altered is not None:
                    return error_reply(VaultError(altered)), []
                if isinstance(exc, VaultError):
                    return error_reply(exc), []
                return error_reply(VaultError(f"{op} failed inside the vault ({type(exc).__name__})")), []

    # -- datasets ---------------------------------------------------------------------------------------------

    def add_table(
        self,
        dataset_id: str,
        table: pa.Table,
        policy: OutputPolicy,
        *,
        source: str = "upload",
        record: Mapping[str, Any] | None = None,
    ) -> str:
        """Register a plaintext table as an opened dataset (an upload decrypted in the vault, or a test).

        A name already open is refused: a second table under it would change what the analyst's handles mean.
        ``record`` (fields of an ``upload`` audit entry) is logged under the same lock; if it cannot be, the
        table is taken out again, so nothing is reachable that the log does not show.
        """
        with self._lock:
            if dataset_id in self._opened:
                raise VaultError(f"the dataset name {dataset_id!r} is already taken in this kernel")
            frame = plan.SourceTable.from_dataset(dataset_id, table, coded=source != "upload")
            handle = self._register(dataset_id, frame, policy, source)
            if record is not None:
                try:
                    self.audit.append("upload", dataset=dataset_id, handle=handle, **record)
                except Exception:
                    self._opened.pop(dataset_id, None)
                    self._sources.pop(handle, None)
                    self._policies.pop(dataset_id, None)
                    raise
            return handle

    def has_dataset(self, dataset_id: str) -> bool:
        """Whether the name is taken (advisory: :meth:`add_table` checks again under the lock)."""
        return dataset_id in self._opened

    def _failed_reads(self) -> dict[str, int]:
        return {dataset: facts.failures() for dataset, facts in self._scans.items()}

    def _altered_since(self, failed_reads: dict[str, int]) -> str | None:
        """Why a read failed since ``failed_reads`` were counted: a file of a scanned dataset this request read
        found altered (the reads are this request's, made under the request lock)."""
        for dataset, facts in self._scans.items():
            if facts.failures() > failed_reads.get(dataset, 0):
                return facts.failure()
        return None

    def _register(
        self, dataset_id: str, frame: plan.SourceTable, policy: OutputPolicy, source: str, broker: str | None = None
    ) -> str:
        if self._on_policy is not None:
            # The relay's gate tightens before any handle exists; the broker that released the key is where the
            # lab asks for a DP dataset's budget.
            self._on_policy(dataset_id, source, policy, broker=broker)
        self._policies[dataset_id] = policy
        handle = self._new_id("d")
        self._sources[handle] = frame
        self._opened[dataset_id] = handle
        return handle

    def _hello(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        return {
            "ok": True,
            "protocol": PROTOCOL,
            "kernel": {
                "tee": self._backend.name,
                "measurement": sealing.current_measurement(self._backend).hex(),
                "signing_public_key": self._keys.signing_public_key.hex(),
            },
        }, []

    def _warmup(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        """How far the heavy imports are; with ``wait``, after starting them and waiting up to that many seconds
        (``cn.open`` asks first, to say why it waits)."""
        wait = header.get("wait")
        if wait is not None:
            if not warmup.valid_wait(wait):
                raise ProtocolError(f"warmup: wait is a number of seconds from 0 to {warmup.MAX_WAIT_S:g}")
            VAULT_WARMUP.wait(wait)
        return {"ok": True, **VAULT_WARMUP.status()}, []

    def _open(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        source = _text(header, "source")
        broker = header.get("broker")
        if broker is not None and not isinstance(broker, str):
            raise ProtocolError("open: broker must be a URL string or null")
        if source in self._opened:  # opened already (or uploaded): the same handle, no second key release
            return self._opened_reply(self._opened[source], source), []
        directory = self._locate(source)
        try:
            verified = verify_dataset(directory)
        except DatasetIntegrityError as exc:
            raise VaultError(f"dataset {source!r} failed verification: {exc}") from None
        manifest = verified.manifest
        dataset_id = manifest.dataset_id
        if dataset_id in self._opened:
            handle = self._opened[dataset_id]
            return self._opened_reply(handle, dataset_id), []
        client = self._broker_client(broker)
        try:
            released = client.release(
                dataset_id, manifest.owner_public_key, lambda event, fields: self.audit.append(event, **fields)
            )
        except KeyReleaseError as exc:
            self.audit.append("key-refused", dataset=dataset_id, broker=client.url, reason=str(exc))
            raise VaultError(f"no key for {dataset_id!r}: {exc}") from None
        if released.key_id != manifest.key_id:
            raise VaultError(f"{dataset_id!r}: the broker released key {released.key_id}, the manifest names another")
        try:
            policy = OutputPolicy.from_dict(released.output_policy, source=f"output policy of {dataset_id}")
        except PolicyError as exc:
            raise VaultError(f"{dataset_id!r}: the owner's output policy is unusable: {exc}") from None
        if policy.digest() != manifest.output_policy_digest:
            raise VaultError(f"{dataset_id!r}: the released output policy is not the one the signed manifest names")
        if scan.should_scan(verified):  # larger than the vault's memory budget: read segment by segment per query
            key = released.key
            facts = self._scans[dataset_id] = scan.ScanFacts(dataset_id)

            def scanned(record: str, weight: tuple[str, int] | None) -> pl.LazyFrame:
                numbering = scan.Numbering(record, *(weight or (None, None)))
                return scan.scan_dataset(verified, key, numbering, facts)

            rows = sum(entry.rows for entry in manifest.files)
            schema = manifest.schema.to_arrow()
            frame = plan.SourceTable.from_scan(dataset_id, scanned, schema, rows, facts.nan_free)
        else:
            try:
                table = read_verified(verified, released.key)
            except (IntegrityError, DatasetFormatError) as exc:
                raise VaultError(f"{dataset_id!r}: {exc}") from None
            frame = plan.SourceTable.from_dataset(dataset_id, table)
            del table
        handle = self._register(dataset_id, frame, policy, "broker", client.url)
        self._owners[dataset_id] = (client.url, manifest.owner_public_key)  # where its DP budget is charged
        self.audit.append(
            "open",
            dataset=dataset_id,
            key_id=released.key_id,
            nonce=released.nonce,
            evidence=released.evidence_digest,
            manifest=verified.manifest_digest,
            policy=policy.digest(),
            broker=client.url,
        )
        return self._opened_reply(handle, dataset_id), []

    def _opened_reply(self, handle: str, dataset_id: str) -> dict[str, Any]:
        policy = self._policies[dataset_id]
        columns = plan.schema_of(self._sources[handle]) if policy.allows("schema") else None
        return {
            "ok": True,
            "handle": handle,
            "dataset": dataset_id,
            "datasets": [dataset_id],
            "columns": columns,
            "policy": policy.to_dict(),
        }

    def _locate(self, source: str) -> Path:
        candidate = Path(source).expanduser()
        if os.sep in source or candidate.is_dir():
            if not candidate.is_dir():
                raise VaultError(f"{source}: no dataset directory there")
            return candidate
        for folder in filter(None, self._dataset_path.split(os.pathsep)):
            if (Path(folder) / source / "manifest.json").is_file():
                return Path(folder) / source
        where = self._dataset_path or f"{DATASET_PATH_VARIABLE} is not set"
        raise VaultError(f"no dataset {source!r}: not a directory, and not found in the dataset path ({where})")

    def _broker_client(self, url: str | None) -> BrokerClient:
        try:
            return BrokerClient(
                self._backend,
                self._keys.hpke_private_key,
                self._keys.signing_public_key,
                self._keys.curve_public_key,
                url or self._broker_url,
            )
        except KeyReleaseError as exc:
            raise VaultError(str(exc)) from None

    # -- tables -----------------------------------------------------------------------------------------------

    def _schema(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        """Names and types; with ``"arrow": true`` also the schema as a zero-row Arrow table (for mock data)."""
        tree = _plan(header)
        columns = release.schema(tree, self._sources, self._policies)
        out = [ipc_bytes(release.schema_table(tree, self._sources, self._policies))] if header.get("arrow") else []
        self.audit.append("release", kind="schema", operation=digest_of(tree), plan=self._plan_text(tree))
        return {"ok": True, "columns": columns}, out

    def _preview(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        tree = _plan(header)
        datasets = plan.plan_datasets(tree, self._sources)
        release.require_windows_allowed(tree, datasets, self._policies, "preview")
        # Under DP the public row count is the whole dataset's: a preview of a filtered table counts nothing.
        policies = self._exact_view() if _whole_dataset(tree) else self._exact_view(row_count=False)
        if all(name in policies and policies[name].allows("row_count") for name in datasets):
            self._count_release(datasets, "preview")  # it may release a row count
        preview = release.preview(tree, self._sources, policies)
        checking = {name for name in datasets if name in policies and policies[name].checks_differences}
        if "rows" in preview and checking:
            # A preview's row count is a count like t.count().release(): it meets the same difference checks, or
            # counts of a table with and without one person would say whether they pass its filter.
            counted = release.release({"node": "count", "input": tree}, self._sources, policies, record_sets=True)
            k = {name: found.min_group_size for name, found in policies.items()}
            try:
                checked = self._memory().check((s for s in counted.record_sets if s[0] in checking), k)
            except PolicyViolation as refused:
                del preview["rows"]
                preview["withheld"]["rows"] = str(refused)
            else:
                self._memory().remember(checked)
        self.audit.append(
            "preview",
            operation=digest_of(tree),
            shown=sorted(k for k in preview if k != "withheld"),
            plan=self._plan_text(tree),
        )
        return {"ok": True, "preview": preview}, []

    def _release(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        tree = _plan(header)
        datasets = plan.plan_datasets(tree, self._sources)
        noisy = self._dp_datasets(datasets)
        if noisy and "epsilon" in header:
            return self._dp_release(tree, header, datasets)
        if noisy:
            public = (
                tree.get("node") == "count"
                and _whole_dataset(tree.get("input"))
                and all(self._public_under_dp(name, "row_count") for name in noisy)
            )
            if not public:
                raise PolicyViolation(
                    "privacy.mode",
                    noisy,
                    "release: the owner releases this dataset only with differential privacy; pass the privacy "
                    "loss to spend, e.g. .release(epsilon=0.1) or cn.set_epsilon(0.1)",
                )
        release.require_windows_allowed(tree, datasets, self._policies, "release")
        self._count_release(datasets, "release")
        checking = {name for name, policy in self._policies.items() if policy.checks_differences}
        sources = plan.plan_sources(tree, self._sources)
        policies = {name: self._policies[name] for name in datasets if name in self._policies}
        released = release.release(
            tree,
            sources,
            policies,
            record_sets=bool(checking & datasets),
            sketches=True,
        )
        # Refuses a number (or a group-by's groups added up) a few records away from one released before, for the
        # datasets whose owners turned the checks on.
        k = {name: policy.min_group_size for name, policy in policies.items()}
        grouped = tree.get("node") == "value_counts" or (tree.get("node") == "aggregate" and bool(tree.get("by")))
        recipe = release_recipe(tree, sources, policies)
        checked = self._memory().check_release(
            released.sketches,
            released.record_sets,
            checking,
            k,
            grouped=grouped,
            recipe=recipe,
            rows=self._dataset_rows(policies),
        )

        def again() -> Sequence[tuple[str, Any]]:
            return release.release(tree, sources, policies, values=True).values

        # Refuses numbers that, with an earlier release's, rest on a few records (see .earlier_values).
        combined = self._earlier().check(
            checking & set(released.datasets) if released.adds_up else set(),
            released.reads_computed,
            # A release the rule on combinations searched kept its records' values; another is run again for them.
            (lambda: released.values) if released.reads_computed else again,
            recipe.fingerprint,
            k,
            again=again,
        )
        operation = digest_of(tree)
        reply: dict[str, Any] = {
            "ok": True,
            "kind": released.kind,
            "index": list(released.index),
            "series": released.series,
            "suppressed": released.suppressed,
            "policy": released.policy_id,
            "datasets": list(released.datasets),
        }
        out: list[bytes] = []
        if released.table is not None:
            payload = ipc_bytes(released.table)
            reply["shape"] = "table"
            out.append(payload)
            result_digest = "sha256:" + hashlib.sha256(payload).hexdigest()
        else:
            reply["shape"] = "scalar"
            reply["value"] = released.value
            result_digest = digest_of(released.value)
        result = _Result(
            released.kind, released.table, released.value, released.policy_id, released.datasets, operation
        )
        self._memory().remember(checked)  # released from here on: later releases are compared with it
        reply["result"] = self._remember(result)
        self._earlier().remember(combined, f"result {reply['result']}")
        self.audit.append(
            "release",
            kind=released.kind,
            result=reply["result"],
            digest=result_digest,
            datasets=list(released.datasets),
            policy=released.policy_id,
            operation=operation,
            suppressed=released.suppressed,
            plan=self._plan_text(tree),
        )
        return reply, out

    def _remember(self, result: _Result) -> str:
        result_id = self._new_id("r")
        self._results[result_id] = result
        while len(self._results) > REMEMBERED_RESULTS:
            self._results.popitem(last=False)
        return result_id

    # -- models -----------------------------------------------------------------------------------------------

    def _fit(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        tree = _plan(header)
        target = header.get("target")
        features = header.get("features")
        test_size = header.get("test_size")
        random_state = header.get("random_state")
        if target is not None and not isinstance(target, str):
            raise ProtocolError("fit: target must be a column name or null")
        if features is not None and (
            not isinstance(features, list) or not all(isinstance(name, str) for name in features)
        ):
            raise ProtocolError("fit: features must be a list of column names or null")
        if test_size is not None and (isinstance(test_size, bool) or not isinstance(test_size, int | float)):
            raise ProtocolError("fit: test_size must be a number or null")
        if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int)):
            raise ProtocolError("fit: random_state must be an integer or null")
        used = plan.plan_datasets(tree, self._sources)
        if self._dp_datasets(used):
            return self._dp_fit(tree, header, used)
        release.require_windows_allowed(tree, used, self._policies, "fit")
        fit_args = (header.get("estimator"), target, features, test_size, random_state, self._policies)
        # The plan's queries run here (cancellable in Polars); the training itself in a worker (models.fit).
        source = plan.evaluate(tree, self._sources)
        model = models.fit(source, *fit_args)
        combined = self._regression_combined(tree, source, model)
        operation = digest_of({"plan": tree, "estimator": header.get("estimator"), "target": target})
        reply = self._fitted(model, tree, operation, n_train=model.n_train, n_test=model.n_test)
        self._earlier().remember(combined, f"model {reply[0]['model']}")
        return reply

    def _regression_combined(
        self, tree: dict[str, Any], source: plan.SourceTable, model: models.TrainedModel
    ) -> earlier_values.Checked:
        """Refuses a regression whose target combines with an earlier release's numbers to rest on a few records
        (its coefficients are sums over the target: see :mod:`.earlier_values`), and how to compare it with later
        releases. Fitted here, before anything of it is released: a refused fit keeps nothing."""
        checking = {name for name, policy in self._policies.items() if policy.checks_differences}
        target = model.target
        if target is None or model.task != "regression":
            return earlier_values.Checked(None)
        features = list(model.features)
        sources = plan.plan_sources(tree, self._sources)
        computed = any(name not in source.arrow_types or name in source.masks for name in (target, *features))

        def values() -> Sequence[tuple[str, Any]]:
            return models.target_values(plan.evaluate(tree, sources), target, features)

        fingerprint = ("fit", release_recipe(tree, sources, self._policies).fingerprint, target, tuple(features))
        k = {name: policy.min_group_size for name, policy in self._policies.items()}
        return self._earlier().check(checking & set(model.datasets), computed, values, fingerprint, k)

    def _fitted(
        self, model: models.TrainedModel | dp_models.DpModel, tree: dict[str, Any], operation: str, **facts: Any
    ) -> Reply:
        """Keep a fitted model, log its fit (with ``facts``) and describe it to the executor."""
        model_id = self._new_id("m")
        self._models[model_id] = model
        self.audit.append(
            "fit",
            model=model_id,
            estimator=model.estimator_name,
            features=list(model.features),
            target=model.target,
            datasets=sorted(model.datasets),
            operation=operation,
            plan=self._plan_text(tree),
            **facts,
        )
        return self._model_reply(model_id, model), []

    def _dp_fit(self, tree: dict[str, Any], header: Mapping[str, Any], datasets: Iterable[str]) -> Reply:
        """A differentially private model: decided and priced from the request, charged at the owner's broker, then
        fitted by diffprivlib on one dataset (see :mod:`.dp_models`)."""
        names = sorted(set(datasets))
        exact = [name for name in names if not self._policies[name].is_dp]
        if exact or len(names) != 1:
            raise PolicyViolation(
                "privacy.mode", exact or names, "fit: a differentially private model trains on one DP dataset"
            )
        if header.get("test_size") is not None:
            raise PolicyViolation(
                "privacy.mode",
                names,
                "fit: under differential privacy nothing is evaluated on the sealed data; leave test_size unset",
            )
        (name,) = names
        prepared = dp_models.prepare(
            tree,
            self._sources,
            header.get("estimator"),
            header.get("target"),
            header.get("features"),
            _privacy_of(self._policies[name]),
            name,
        )
        release.check_columns(prepared.lineage, self._policies, "model features and target")
        remaining = self._charge(prepared.datasets, prepared.epsilon, 0.0, prepared.plan_digest, "fit")
        model = replace(prepared.run(), epsilon_remaining=remaining)
        return self._fitted(model, tree, prepared.plan_digest, epsilon=repr(model.epsilon))

    @staticmethod
    def _model_reply(model_id: str, model: models.TrainedModel | dp_models.DpModel) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "ok": True,
            "model": model_id,
            "estimator": model.estimator_name,
            "task": model.task,
            "features": list(model.features),
            "target": model.target,
            "datasets": sorted(model.datasets),
        }
        if isinstance(model, dp_models.DpModel):
            reply["dp"] = {"epsilon": model.epsilon, "delta": 0.0, "epsilon_remaining": dict(model.epsilon_remaining)}
        return reply

    def _model(self, header: dict[str, Any]) -> tuple[str, models.TrainedModel | dp_models.DpModel]:
        model_id = _text(header, "model")
        model = self._models.get(model_id)
        if model is None:
            raise VaultError(f"no model {model_id!r} in this kernel (dropped, or from another kernel)")
        return model_id, model

    def _model_release(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        model_id, model = self._model(header)
        op = header["op"]
        kind = "model_parameters" if op == "model_params" else "model_metrics"
        self._count_release(model.datasets, op)
        value: Any
        if isinstance(model, dp_models.DpModel):
            if op != "model_params":
                raise PolicyViolation(
                    "privacy.mode",
                    sorted(model.datasets),
                    f"{op}: metrics on the sealed data are exact; a differentially private model releases only its "
                    "parameters and predictions on public data",
                )
            value = dp_models.params(model)
        elif op == "model_metrics":  # predictions over the evaluation set: as stoppable as the fit
            value = stoppable.run(models.metrics, model, self._policies, openmp=True)
        elif op == "model_score":
            value = stoppable.run(models.score, model, self._policies, openmp=True)
        else:
            value = models.params(model, self._policies)
        datasets = tuple(sorted(model.datasets))
        policy_id = release.require_kind(kind, datasets, self._policies)
        operation = digest_of({"op": op, "model": model_id})
        result_id = self._remember(_Result(kind, None, value, policy_id, datasets, operation))
        self.audit.append(
            "release",
            kind=kind,
            result=result_id,
            digest=digest_of(value),
            datasets=list(datasets),
            policy=policy_id,
            operation=operation,
            plan=f"{model_id} | {op}()",
        )
        return {"ok": True, "result": result_id, "kind": kind, "value": value, "policy": policy_id}, []

    def _predict(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        model_id, model = self._model(header)
        if len(buffers) != 1:
            raise ProtocolError("predict: send the public data as one Arrow IPC buffer")
        public = read_ipc(buffers[0], "predict: the public data", public=True)
        if public.num_rows > MAX_PUBLIC_ROWS:
            raise VaultError(f"predict: at most {MAX_PUBLIC_ROWS} rows of public data per request")
        self._count_release(model.datasets, "predict")
        datasets = tuple(sorted(model.datasets))
        if isinstance(model, dp_models.DpModel):
            release.require_kind("predict_public", datasets, self._policies)
            limits = [limit for name in datasets if (limit := self._policies[name].max_rows) is not None]
            predictions = dp_models.predict(model, public, min(limits, default=None))
        else:
            predictions = stoppable.run(models.predict, model, public, self._policies, openmp=True)
        policy_id = release.require_kind("predict_public", datasets, self._policies)
        payload = ipc_bytes(predictions)
        operation = digest_of({"op": "predict", "model": model_id, "input": hashlib.sha256(buffers[0]).hexdigest()})
        result_id = self._remember(_Result("predict_public", predictions, None, policy_id, datasets, operation))
        self.audit.append(
            "release",
            kind="predict_public",
            result=result_id,
            digest="sha256:" + hashlib.sha256(payload).hexdigest(),
            datasets=list(datasets),
            policy=policy_id,
            operation=operation,
            plan=f"{model_id} | predict({public.num_rows} public rows)",
        )
        return {"ok": True, "result": result_id, "kind": "predict_public", "policy": policy_id}, [payload]

    # -- sealing ----------------------------------------------------------------------------------------------

    def _seal(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        if header.get("model") is not None:
            model_id, model = self._model(header)
            if isinstance(model, dp_models.DpModel):
                raise VaultError("seal: a differentially private model is not sealed; release its parameters")
            datasets = sorted(model.datasets)
            metadata: dict[str, Any] = {
                "policies": {name: self._policies[name].to_dict() for name in datasets},
                "model": models.describe(model),
            }
            blob = sealing.seal(self._backend, "model", models.to_skops(model, facts=True), metadata)
            self.audit.append("seal", model=model_id, datasets=datasets, digest=_bytes_digest(blob))
            return {"ok": True}, [blob]
        tree = _plan(header)
        release.require_windows_allowed(tree, plan.plan_datasets(tree, self._sources), self._policies, "seal")
        source = plan.evaluate(tree, self._sources)
        datasets = sorted(source.datasets)
        # Which source record each row came from, and where each column's value came from a record (not from a
        # literal), decide what min_group_size counts; both are sealed along.
        table, records, masks = source.sealed_form()
        record_columns = [[name, dataset] for name, dataset in records]
        mask_columns = [[name, column] for name, column in masks]
        metadata = {
            "policies": {name: self._policies[name].to_dict() for name in datasets},
            "lineage": {column: sorted(map(list, origins)) for column, origins in source.lineage.items()},
            "datasets": datasets,
            "record_columns": record_columns,
            "mask_columns": mask_columns,
        }
        blob = sealing.seal(self._backend, "table", ipc_bytes(table), metadata)
        self.audit.append(
            "seal", operation=digest_of(tree), datasets=datasets, digest=_bytes_digest(blob), plan=self._plan_text(tree)
        )
        return {"ok": True}, [blob]

    def _unseal(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        if len(buffers) != 1:
            raise ProtocolError("unseal: send the sealed file as one buffer")
        try:
            sealed = sealing.unseal(self._backend, buffers[0])
        except sealing.SealingError as exc:
            self.audit.append("unseal-refused", digest=_bytes_digest(buffers[0]), reason=str(exc))
            raise VaultError(str(exc)) from None
        policies = {
            name: OutputPolicy.from_dict(document, source=f"sealed policy of {name}")
            for name, document in sealed.metadata["policies"].items()
        }
        for name, policy in policies.items():
            # A dataset open in this kernel under another version of its policy: both versions bind.
            known = self._policies.get(name)
            combined = policy if known is None or known == policy else strictest([known, policy])
            if self._on_policy is not None:
                self._on_policy(name, "sealed", combined, broker=None)
            self._policies[name] = combined
        if sealed.kind == "model":
            model = models.from_skops(sealed.payload, sealed.metadata["model"])
            model_id = self._new_id("m")
            self._models[model_id] = model
            self.audit.append("unseal", model=model_id, datasets=sorted(policies), digest=_bytes_digest(buffers[0]))
            return self._model_reply(model_id, model), []
        table = read_ipc(sealed.payload, "the sealed table")
        lineage = {
            column: frozenset((str(pair[0]), str(pair[1])) for pair in origins)
            for column, origins in sealed.metadata["lineage"].items()
        }
        record_columns = [(str(name), str(dataset)) for name, dataset in sealed.metadata.get("record_columns", [])]
        mask_columns = [(str(name), str(column)) for name, column in sealed.metadata.get("mask_columns", [])]
        if any(name not in table.column_names for name, _ in (*record_columns, *mask_columns)):
            raise VaultError("the sealed table lacks the record-id or mask columns its metadata names")
        frame = plan.SourceTable.from_arrow(
            table, lineage, frozenset(sealed.metadata["datasets"]), record_columns, mask_columns
        )
        handle = self._new_id("d")
        self._sources[handle] = frame
        self.audit.append("unseal", handle=handle, datasets=sorted(policies), digest=_bytes_digest(buffers[0]))
        datasets = sorted(policies)
        shown = all(self._policies[name].allows("schema") for name in datasets)
        return {
            "ok": True,
            "handle": handle,
            "dataset": "+".join(datasets),
            "datasets": datasets,
            "columns": plan.schema_of(frame) if shown else None,
            "policy": strictest(self._policies[name] for name in datasets).to_dict(),
        }, []

    # -- export and audit -------------------------------------------------------------------------------------

    def _export(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        recipient = header.get("recipient")
        if recipient is not None and not isinstance(recipient, str):
            raise ProtocolError("export: recipient must be a hex public key or null")
        try:
            recipient_key = bytes.fromhex(recipient) if recipient else None
        except ValueError:
            raise ProtocolError("export: recipient must be a hex public key") from None
        export_format = _text(header, "format")
        if header.get("model") is not None:
            model_id, model = self._model(header)
            if isinstance(model, dp_models.DpModel):
                raise PolicyViolation(
                    "privacy.mode",
                    sorted(model.datasets),
                    "export: a differentially private model leaves as its parameters (m.params()), not as a file "
                    "whose fitted state would include exact facts of the training data",
                )
            if export_format != "skops":
                raise VaultError("export: a model is exported as .skops")
            datasets = tuple(sorted(model.datasets))
            self._count_release(datasets, "export")
            policy_id = release.require_kind("model_parameters", datasets, self._policies)
            models.params(model, self._policies)  # the same checks as releasing its parameters
            refusal = models.export_refusal(model, self._policies)
            if refusal is not None:
                raise PolicyViolation("release.min_group_size", datasets, f"export: {refusal}")
            payload, media_type = models.to_skops(model), "application/x-skops"
            operation = digest_of({"op": "export", "model": model_id})
            name = f"{model_id}.skops"
        else:
            result_id = _text(header, "result")
            result = self._results.get(result_id)
            if result is None:
                raise VaultError(f"export: no released result {result_id!r} (release it again, then export)")
            self._count_release(result.datasets, "export")
            payload, media_type = _serialize(result, export_format)
            policy_id, datasets, operation = result.policy_id, result.datasets, result.operation_digest
            name = f"{result_id}.{export_format}"

        def evidence_for(nonce: bytes) -> dict[str, Any]:
            return issue_evidence(
                self._backend,
                nonce,
                hpke_public_key=self._keys.hpke_public_key,
                signing_public_key=self._keys.signing_public_key,
                curve_public_key=self._keys.curve_public_key,
            ).to_dict()

        try:
            bundle = export.make_export(
                signing_key=self._keys.signing_key,
                evidence_for=evidence_for,
                payload=payload,
                media_type=media_type,
                file_name=name,
                policy_id=policy_id,
                datasets=list(datasets),
                operation_digest=operation,
                recipient_public_key=recipient_key,
            )
        except TeeError as exc:
            raise VaultError(f"export: no evidence for the receipt: {exc}") from None
        self.audit.append(
            "export",
            media_type=media_type,
            digest=_bytes_digest(payload),
            datasets=list(datasets),
            policy=policy_id,
            operation=operation,
            sealed_to=_bytes_digest(recipient_key) if recipient_key else None,
            plan=f"{name} | export({export_format})",
        )
        return {"ok": True, "media_type": media_type}, [bundle]

    def _audit(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        return {
            "ok": True,
            "entries": self.audit.entries(),
            "signing_public_key": self._keys.signing_public_key.hex(),
        }, []

    def _drop(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        if isinstance(header.get("model"), str):
            self._models.pop(header["model"], None)
        elif isinstance(header.get("handle"), str):
            handle = header["handle"]
            if handle not in self._opened.values():  # an opened dataset stays: other handles' plans name it
                self._sources.pop(handle, None)
        return {"ok": True}, []

    # -- release limits and readable plans --------------------------------------------------------------------

    def _count_release(self, datasets: Iterable[str], what: str) -> None:
        """Count one release against each dataset's ``max_releases``, or refuse the request beyond a limit.

        Called by every request that lets a number leave (a released value, a row count, model results,
        predictions, an export), before it reads a row, and counted whatever its outcome: a withheld result says
        something too (a group was small), and a count that depends only on how many requests were made cannot
        itself carry anything about the data. A refusal here is a PolicyViolation, audited by :meth:`handle`.
        """
        names = sorted(set(datasets))
        limits: dict[str, int] = {}
        for name in names:
            policy = self._policies.get(name)
            if policy is not None and policy.max_releases is not None:
                limits[name] = policy.max_releases
        spent = [name for name, limit in limits.items() if self._releases.get(name, 0) >= limit]
        if spent:
            shown = min(limits[name] for name in spent)
            raise PolicyViolation(
                "release.max_releases", spent, f"{what}: this kernel has made the {shown} releases the policy allows"
            )
        for name in names:
            self._releases[name] = self._releases.get(name, 0) + 1

    def _dataset_rows(self, datasets: Iterable[str]) -> dict[str, int]:
        """The row counts of the opened datasets among ``datasets`` (their record ids are row positions), which fix
        the field width of their record weights in the difference checks."""
        return {name: self._sources[self._opened[name]].row_bound().rows() for name in datasets if name in self._opened}

    def _memory(self) -> differences.ReleaseMemory:
        """The record sets behind the numbers released so far (made by the first release: it needs NumPy)."""
        if self._difference_memory is None:
            self._difference_memory = differences.ReleaseMemory()
        return self._difference_memory

    def _earlier(self) -> earlier_values.EarlierValues:
        """The releases so far, to combine a later one's numbers with (made by the first release, as the memory)."""
        if self._earlier_values is None:
            self._earlier_values = earlier_values.EarlierValues()
        return self._earlier_values

    # -- differential privacy ---------------------------------------------------------------------------------

    def _dp_datasets(self, datasets: Iterable[str]) -> list[str]:
        """The datasets among ``datasets`` whose owners chose differential privacy."""
        return sorted({name for name in datasets if (found := self._policies.get(name)) is not None and found.is_dp})

    def _public_under_dp(self, name: str, kind: str) -> bool:
        privacy = self._policies[name].privacy
        return privacy is not None and kind in privacy.public and self._policies[name].allows(kind)

    def _exact_view(self, row_count: bool = True) -> dict[str, OutputPolicy]:
        """The policies as exact releases see them: under differential privacy only the schema and the kinds the
        owner lists as public (``[privacy] public``: the whole dataset's row count) may leave exactly."""
        view = dict(self._policies)
        for name, found in self._policies.items():
            if found.is_dp:
                public = {"schema"} | {k for k in ("row_count",) if row_count and self._public_under_dp(name, k)}
                view[name] = replace(found, allow=found.allow & frozenset(public))
        return view

    def _budget(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        """Each named dataset's privacy budget as its owner's broker keeps it (exact-mode datasets say so)."""
        names = header.get("datasets")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ProtocolError("budget: datasets must be a list of dataset ids")
        budgets: dict[str, Any] = {}
        for name in sorted(set(names)):
            found = self._policies.get(name)
            if found is None:
                raise VaultError(f"budget: no dataset {name!r} is open in this kernel")
            owner = self._owners.get(name)
            if not found.is_dp:
                budgets[name] = {"dataset_id": name, "mode": "exact"}
            elif owner is None:
                raise VaultError(f"budget: {name!r} has no broker keeping its privacy budget")
            else:
                try:
                    budgets[name] = BudgetClient(owner[0], self._keys.signing_key, {name: owner[1]}).budget(name)
                except BudgetError as exc:
                    raise VaultError(f"budget: {exc}") from None
        return {"ok": True, "budgets": budgets}, []

    def _dp_release(self, tree: dict[str, Any], header: Mapping[str, Any], datasets: Iterable[str]) -> Reply:
        """A noisy release: prepared from the plan and the schemas, charged to every owner's budget at their broker
        (no acknowledgement, no release), then run by OpenDP."""
        names = sorted(set(datasets))
        exact = [name for name in names if not self._policies[name].is_dp]
        if exact:
            raise PolicyViolation(
                "privacy.mode", exact, "release: a noisy release cannot combine datasets in exact mode"
            )
        epsilon, delta = _loss(header)
        self._count_release(names, "release")
        kind = "row_count" if tree.get("node") == "count" else "aggregate"
        policy_id = release.require_kind(kind, names, self._policies)
        prepared = dp.prepare(
            tree,
            self._sources,
            {name: _privacy_of(self._policies[name]) for name in names},
            epsilon,
            delta,
            never_release={name: self._policies[name].never_release for name in names},
        )
        limits = [self._policies[n].max_rows for n in names]
        max_rows = min((limit for limit in limits if limit is not None), default=None)
        groups = _public_groups(tree, [self._policies[n] for n in names])
        if max_rows is not None and groups is not None and groups > max_rows:  # known before anything is spent
            raise PolicyViolation(
                "release.max_rows", names, f"release: {groups} groups of public keys exceed the {max_rows} rows allowed"
            )
        remaining = self._charge(prepared.datasets, prepared.epsilon, prepared.delta, prepared.plan_digest, "release")
        released = prepared.run()
        if max_rows is not None and released.table.num_rows > max_rows:  # groups chosen by OpenDP's threshold
            raise PolicyViolation(
                "release.max_rows", names, f"release: the result has more than the {max_rows} rows allowed"
            )
        payload = ipc_bytes(released.table)
        account = {
            "epsilon": released.epsilon,
            "delta": released.delta,
            "epsilon_remaining": remaining,
            "noise": [_noise(item) for item in released.accuracy],
        }
        if released.threshold is not None:
            account["threshold"] = released.threshold
        operation = digest_of(tree)
        result = _Result(kind, released.table, None, policy_id, tuple(names), operation)
        reply: dict[str, Any] = {
            "ok": True,
            "kind": kind,
            "index": ["statistic"] if tree.get("node") == "describe" else [],
            "series": False,
            "suppressed": 0,
            "policy": policy_id,
            "datasets": names,
            "shape": "table",
            "dp": account,
            "result": self._remember(result),
        }
        self.audit.append(
            "release",
            kind=kind,
            result=reply["result"],
            digest="sha256:" + hashlib.sha256(payload).hexdigest(),
            datasets=names,
            policy=policy_id,
            operation=operation,
            plan=self._plan_text(tree),
            epsilon=repr(released.epsilon),
            delta=repr(released.delta),
        )
        return reply, [payload]

    def _charge(
        self, datasets: Iterable[str], epsilon: float, delta: float, plan_digest: str, what: str
    ) -> dict[str, float]:
        """Charge ε (and δ) to each dataset's budget at its owner's broker; the budget left per dataset. No broker,
        or no acknowledgement, and nothing is computed."""
        remaining: dict[str, float] = {}
        for name in datasets:
            owner = self._owners.get(name)
            if owner is None:
                raise VaultError(f"{what}: {name!r} has no broker to keep its privacy budget, so nothing is released")
            client = BudgetClient(owner[0], self._keys.signing_key, {name: owner[1]})
            try:
                charge = client.charge(name, epsilon, delta, plan_digest)
            except BudgetError as exc:
                self.audit.append("budget-refused", dataset=name, epsilon=repr(epsilon), reason=str(exc))
                raise PolicyViolation("privacy.budget", [name], f"{what}: {exc}") from None
            self.audit.append(
                "budget-charge",
                dataset=name,
                charge=charge.charge_id,
                epsilon=repr(charge.epsilon),  # as text: the log holds no floats (their JSON form is not canonical)
                delta=repr(charge.delta),
                epsilon_remaining=repr(charge.epsilon_remaining),
                plan_digest=plan_digest,
            )
            remaining[name] = charge.epsilon_remaining
        return remaining

    def _plan_text(self, tree: object) -> str:
        """The plan as the owner reads it in the audit log, its sources named by dataset where they are one."""
        return describe_plan(tree, {handle: dataset for dataset, handle in self._opened.items()})

    def _asked(self, header: Mapping[str, Any]) -> dict[str, Any]:
        """The readable plan of a refused or failed request, when it carried one (``plan``)."""
        tree = header.get("plan")
        return {"plan": self._plan_text(tree)} if tree is not None else {}

    def _new_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"


def _text(header: Mapping[str, Any], key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise ProtocolError(f"{header.get('op', 'request')}: {key} must be a non-empty string")
    return value


def _plan(header: Mapping[str, Any]) -> dict[str, Any]:
    tree = header.get("plan")
    if not isinstance(tree, dict):
        raise ProtocolError(f"{header.get('op', 'request')}: plan must be a JSON object")
    return tree


def _noise(accuracy: Any) -> dict[str, Any]:
    """One released column's noise as the analyst reads it: distribution, scale, and the widest 95% half-width
    over its rows (a mean's depends on its group's noisy count; None where OpenDP gives none, as for quantiles)."""
    # A mean over a group whose noisy count is within its own error has no finite interval: null, as JSON has no
    # infinity (the reply must still go out: the release is already paid for).
    widths = [w if w is not None and math.isfinite(w) else None for w in accuracy.half_width]
    finite = [w for w in widths if w is not None]
    return {
        "column": accuracy.column,
        "statistic": accuracy.statistic,
        "distribution": accuracy.distribution,
        "scale": accuracy.scale if math.isfinite(accuracy.scale) else None,
        "interval_95": max(finite) if finite and len(finite) == len(widths) else None,
        "half_widths": widths,
    }


def _public_groups(tree: Mapping[str, Any], policies: Iterable[OutputPolicy]) -> int | None:
    """How many groups a noisy group-by over public keys has (every key appears), or None when OpenDP's threshold
    chooses them."""
    by = tree.get("by") if tree.get("node") == "aggregate" else [tree.get("column")]
    if tree.get("node") not in ("aggregate", "value_counts") or not isinstance(by, list) or not by:
        return None
    keys: dict[str, int] = {}
    for policy in policies:
        if policy.privacy is not None:
            keys.update({column: len(values) for column, values in policy.privacy.keys.items()})
    if not all(isinstance(column, str) and column in keys for column in by):
        return None
    return math.prod(keys[column] for column in by)


def _whole_dataset(tree: object) -> bool:
    """Whether a plan is a dataset as opened, or a choice of its columns: rows neither filtered nor joined."""
    while isinstance(tree, dict) and tree.get("node") == "select":
        tree = tree.get("input")
    return isinstance(tree, dict) and tree.get("node") == "source"


def _privacy_of(policy: OutputPolicy) -> dict[str, Any]:
    if policy.privacy is None:
        raise PolicyViolation("privacy.mode", list(policy.sources), "release: the dataset is not in DP mode")
    return policy.privacy.to_dict()


def _loss(header: Mapping[str, Any]) -> tuple[float, float | None]:
    """The ε (and δ) a noisy release asks to spend: finite, ε positive, δ in [0, 1)."""
    epsilon, delta = header.get("epsilon"), header.get("delta")
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 < epsilon < float("inf"):
        raise ProtocolError("release: epsilon must be a positive finite number")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1):
        raise ProtocolError("release: delta must be a number in [0, 1)")
    return float(epsilon), None if delta is None else float(delta)


def _operation(header: Mapping[str, Any]) -> dict[str, Any]:
    """What an audit entry records of a request: its shape, never the buffers that came with it."""
    return {key: value for key, value in header.items() if key not in ("recipient",)}


def _bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _serialize(result: _Result, export_format: str) -> tuple[bytes, str]:
    if result.table is not None:
        if export_format == "csv":
            import pyarrow.csv as pacsv  # type: ignore[import-untyped]

            sink = io.BytesIO()
            pacsv.write_csv(result.table, sink)
            return sink.getvalue(), "text/csv"
        if export_format == "parquet":
            import pyarrow.parquet as pq  # type: ignore[import-untyped]

            buffer = pa.BufferOutputStream()
            pq.write_table(result.table, buffer)
            return bytes(buffer.getvalue().to_pybytes()), "application/vnd.apache.parquet"
        if export_format == "json":
            return _canonical(result.table.to_pylist()), "application/json"
        raise VaultError(f"export: a table is exported as .csv, .parquet or .json, not .{export_format}")
    if export_format != "json":
        raise VaultError(f"export: a {result.kind} value is exported as .json, not .{export_format}")
    return _canonical(result.value), "application/json"
