"""The data owner's output policy: what may leave the kernel, and in what form (default deny).

The vault enforces it on facts it computed itself (a released aggregate row *was* computed from at least
``min_group_size`` records), never on the text of a result. When one computation touches several datasets, their
policies combine into the strictest of each rule (:func:`strictest`). The ``[privacy]`` table
(:mod:`confnb.policy.privacy`) chooses between exact numbers under these rules and differential privacy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confnb.attest.errors import PolicyError
from confnb.policy.privacy import PrivacyPolicy, read_privacy
from confnb.policy.schema import OUTPUT_TABLES, POLICY_TABLES, check_names
from confnb.policy.toml import KeyLines, TableReader, brief, parse_policy, read_policy_text

RELEASE_KINDS = (
    "schema",
    "row_count",
    "aggregate",
    "model_metrics",
    "model_parameters",
    "predict_public",
    # Not a result of its own: window functions (a rank or a group statistic on every row) in what is released. They
    # let one record's value reach other rows, so exact mode's rules no longer bound what one release says about it.
    "window",
)
TRACEBACK_MODES = ("full", "redacted")  # redacted: exception type and cell line only
_STRICTNESS = {"full": 0, "redacted": 1}
DEFAULT_MIME = ("text/plain",)
DEFAULT_MAX_OUTPUT_BYTES = 1_000_000
# A policy that does not say how many records a released number needs gets a safe floor, never "a single record":
# an owner who allows aggregates and forgets the rule must not release one patient's value. Writing 1 still works.
DEFAULT_MIN_GROUP_SIZE = 10
# Release limits have no default: how many releases an analysis needs depends on the analysis, and a number chosen
# here would either stop real work or mean nothing. An absent limit is "none", said so by `policy explain`, and
# `policy init` writes both out so that an owner decides. Absent limits stay out of the canonical form, so policies
# signed before they existed keep their digests.
MAX_LIMIT = 10**9
_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"


@dataclass(frozen=True)
class OutputPolicy:
    """One owner's rules. Defaults deny every release kind, set min_group_size 10, check differences, show only plain
    text, and redact tracebacks."""

    id: str
    allow: frozenset[str] = frozenset()
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    never_release: frozenset[str] = frozenset()
    max_rows: int | None = None
    max_releases: int | None = None  # releases one kernel may draw from the dataset; None: no limit
    max_kernels_per_day: int | None = None  # key releases the broker makes per UTC day; None: no limit
    # Refuse a number whose records differ from an earlier released number's by 1 to min_group_size - 1 records.
    # None: the owner did not say, which means on (see checks_differences); only an explicit false turns them off.
    difference_checks: bool | None = None
    mime: tuple[str, ...] = DEFAULT_MIME
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    tracebacks: str = "redacted"
    privacy: PrivacyPolicy | None = None  # None: no [privacy] table, which is exact mode
    sources: tuple[str, ...] = field(default=(), compare=False)  # the policy ids this one was combined from

    def allows(self, kind: str) -> bool:
        return kind in self.allow

    @property
    def checks_differences(self) -> bool:
        return self.difference_checks is not False

    @property
    def is_dp(self) -> bool:
        return self.privacy is not None and self.privacy.is_dp

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": {"id": self.id},
            "release": {
                "allow": sorted(self.allow),
                "min_group_size": self.min_group_size,
                "never_release": sorted(self.never_release),
                **({"max_rows": self.max_rows} if self.max_rows is not None else {}),
                **({"max_releases": self.max_releases} if self.max_releases is not None else {}),
                **({"max_kernels_per_day": self.max_kernels_per_day} if self.max_kernels_per_day is not None else {}),
                **({"difference_checks": self.difference_checks} if self.difference_checks is not None else {}),
            },
            "display": {
                "mime": list(self.mime),
                "max_output_bytes": self.max_output_bytes,
                "tracebacks": self.tracebacks,
            },
            **({"privacy": self.privacy.to_dict()} if self.privacy is not None else {}),
        }

    def canonical_json(self) -> bytes:
        """The bytes an owner signs and a digest names: sorted keys, no whitespace, UTF-8."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json()).hexdigest()

    # -- loading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> OutputPolicy:
        return cls.from_toml(read_policy_text(path), source=str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<policy>", *, tables: Collection[str] = POLICY_TABLES) -> OutputPolicy:
        """Read the output half of a policy file; every other table must be one ``tables`` names, and known.

        An upload's policy passes ``tables=OUTPUT_TABLES``: an ``[attestation]`` table there would bind nothing.
        """
        document = parse_policy(text, source, tables=tables)
        if not has_output_policy(document):
            raise PolicyError(f"{source}: no output policy ([policy], [release], [display] tables)")
        policy = _read(KeyLines(text), source, document)
        if "attestation" not in tables and policy.max_kernels_per_day is not None:
            # No broker stands behind this file (an upload), so nothing would count key releases.
            raise TableReader(KeyLines(text), source, "release").fail(
                "max_kernels_per_day", "has no effect here: only a broker releasing the dataset's key enforces it"
            )
        if "attestation" not in tables and policy.is_dp:
            # The budget lives in the owner's broker, which charges before every release; an upload has none.
            raise TableReader(KeyLines(text), source, "privacy").fail(
                "mode", 'cannot be "dp" here: only a broker keeping the dataset\'s budget can charge a release to it'
            )
        return policy

    @classmethod
    def from_dict(cls, document: dict[str, Any], source: str = "<policy>") -> OutputPolicy:
        """The inverse of :meth:`to_dict`, validated as strictly as a file (the vault gets policies as JSON)."""
        check_names(document, source, tables=OUTPUT_TABLES)
        if not has_output_policy(document):
            raise PolicyError(f"{source}: no output policy ([policy], [release], [display] tables)")
        return _read(KeyLines(""), source, document)


def has_output_policy(document: dict[str, Any]) -> bool:
    return any(table in document for table in OUTPUT_TABLES)


def _read(lines: KeyLines, source: str, document: dict[str, Any]) -> OutputPolicy:
    """Typed values of the output tables, whose names :func:`check_names` has already checked."""
    values: dict[str, Any] = {}
    identity = TableReader(lines, source, "policy")
    table = identity.table_of("", document.get("policy", {}), '{ id = "claims-2026-v1" }')
    if "id" not in table:
        raise PolicyError(f'{source}: [policy] needs an id, e.g. id = "claims-2026-v1"')
    values["id"] = identity.string("id", table["id"], _ID_PATTERN, "1-128 letters, digits or . _ : -")

    release = TableReader(lines, source, "release")
    table = release.table_of("", document.get("release", {}), '{ allow = ["aggregate"] }')
    if "allow" in table:
        values["allow"] = frozenset(release.choices("allow", table["allow"], RELEASE_KINDS, allow_empty=True))
    if "min_group_size" in table:
        values["min_group_size"] = release.integer("min_group_size", table["min_group_size"], 1, 10**9)
    if "never_release" in table:
        values["never_release"] = frozenset(release.strings("never_release", table["never_release"]))
    if "max_rows" in table:
        values["max_rows"] = release.integer("max_rows", table["max_rows"], 0, 10**12)
    for limit in ("max_releases", "max_kernels_per_day"):
        if limit in table:
            values[limit] = release.integer(limit, table[limit], 1, MAX_LIMIT)
    if "difference_checks" in table:
        values["difference_checks"] = release.boolean("difference_checks", table["difference_checks"])

    display = TableReader(lines, source, "display")
    table = display.table_of("", document.get("display", {}), '{ mime = ["text/plain"] }')
    if "mime" in table:
        mime = display.strings("mime", table["mime"])
        for item in mime:
            if "/" not in item or item.count("/") != 1 or " " in item:
                raise display.fail("mime", f"{brief(item)} is not a MIME type such as text/plain")
        values["mime"] = mime
    if "max_output_bytes" in table:
        values["max_output_bytes"] = display.integer("max_output_bytes", table["max_output_bytes"], 0, 10**10)
    if "tracebacks" in table:
        mode = table["tracebacks"]
        if mode not in TRACEBACK_MODES:
            raise display.fail("tracebacks", f"must be one of {', '.join(TRACEBACK_MODES)}, not {brief(mode)}")
        values["tracebacks"] = mode
    if "privacy" in document:
        values["privacy"] = read_privacy(lines, source, document["privacy"])
    return OutputPolicy(**values, sources=(values["id"],))


def strictest(policies: Iterable[OutputPolicy]) -> OutputPolicy:
    """Combine the policies of every dataset in one computation: each rule takes its strictest value."""
    chosen = list(policies)
    if not chosen:
        raise ValueError("no policies to combine")
    if len(chosen) == 1:
        return chosen[0]
    max_rows = [p.max_rows for p in chosen if p.max_rows is not None]
    max_releases = [p.max_releases for p in chosen if p.max_releases is not None]
    max_kernels = [p.max_kernels_per_day for p in chosen if p.max_kernels_per_day is not None]
    mime = [m for m in chosen[0].mime if all(m in p.mime for p in chosen[1:])]
    sources = tuple(dict.fromkeys(source for p in chosen for source in p.sources))
    return OutputPolicy(
        id="+".join(sources),
        allow=frozenset.intersection(*(p.allow for p in chosen)),
        min_group_size=max(p.min_group_size for p in chosen),
        never_release=frozenset.union(*(p.never_release for p in chosen)),
        max_rows=min(max_rows) if max_rows else None,
        max_releases=min(max_releases) if max_releases else None,
        max_kernels_per_day=min(max_kernels) if max_kernels else None,
        difference_checks=None if any(p.checks_differences for p in chosen) else False,
        mime=tuple(mime),
        max_output_bytes=min(p.max_output_bytes for p in chosen),
        tracebacks=max((p.tracebacks for p in chosen), key=_STRICTNESS.__getitem__),
        # The vault applies each dataset's own privacy policy; this only marks the combination as DP.
        privacy=next((p.privacy for p in chosen if p.is_dp), None),
        sources=sources,
    )
