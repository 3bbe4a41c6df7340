"""Every name a policy file may use, at every level, and the one check that refuses any other name.

The typed readers (:mod:`confnb.attest.policy`, :mod:`confnb.policy.output`) each validate the values they use, and
each reads only its own half of a file. A name nobody reads would be silently ignored, and an owner who wrote
``[relese]`` or ``[privacy] epsilons = 1`` would believe in a rule that nothing enforces. So every way in (``policy
check``, ``dataset encrypt``, the broker, the vault, uploads) checks the *whole* document against this schema before
it reads any half of it. The typed readers rely on that and do not check names again.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from confnb.attest.errors import PolicyError
from confnb.attest.report import Product
from confnb.attest.tcb import COMPONENTS


@dataclass(frozen=True)
class Table:
    """The names allowed in one table: a child is a table itself, or None for a value its typed reader checks."""

    children: Mapping[str, Table | None]
    noun: str = "key"  # what an unknown child is called in an error


# Policy-file names of the guest POLICY and PLATFORM_INFO bits, and the report attributes they read.
GUEST_POLICY_BITS = {
    "smt_allowed": "smt_allowed",
    "single_socket": "single_socket",
    "cxl_allowed": "cxl_allowed",
    "mem_aes_256_xts": "mem_aes_256_xts",
    "rapl_disabled": "rapl_disabled",
    "ciphertext_hiding": "ciphertext_hiding",
    "page_swap_disabled": "page_swap_disabled",
}
PLATFORM_INFO_BITS = {
    "smt_enabled": "smt_enabled",
    "tsme_enabled": "tsme_enabled",
    "ecc_enabled": "ecc_enabled",
    "rapl_disabled": "rapl_disabled",
    "ciphertext_hiding_enabled": "ciphertext_hiding_enabled",
    "alias_check_complete": "alias_check_complete",
    "tio_enabled": "tio_enabled",
}

_TCB = Table(dict.fromkeys(COMPONENTS), "TCB component")
# A floor applies to every product, or to one product in a sub-table named after it ([attestation.min_tcb.Turin]).
_MIN_TCB = Table({**dict.fromkeys(COMPONENTS), **{p.value: _TCB for p in Product}}, "TCB component or product")

ATTESTATION = Table(
    {
        **dict.fromkeys(
            (
                "allow_simulated",
                "simulated_roots",
                "measurements",
                "host_data",
                "family_ids",
                "image_ids",
                "chip_ids",
                "id_key_digests",
                "author_key_digests",
                "require_author_key",
                "reject_debug",
                "reject_migration_agent",
                "max_vmpl",
                "max_evidence_age_s",
                "signing_keys",
                "products",
                "min_guest_svn",
                "min_firmware",
                "permit_provisional_firmware",
                "check_revocation",
                "min_abi",
                "required_launch_mitigations",
                "required_current_mitigations",
            )
        ),
        "min_tcb": _MIN_TCB,
        "min_launch_tcb": _MIN_TCB,
        "guest_policy": Table(dict.fromkeys(GUEST_POLICY_BITS), "flag"),
        "platform_info": Table(dict.fromkeys(PLATFORM_INFO_BITS), "flag"),
    }
)
OUTPUT = {
    "policy": Table(dict.fromkeys(("id",))),
    "release": Table(
        dict.fromkeys(
            (
                "allow",
                "min_group_size",
                "never_release",
                "max_rows",
                "max_releases",
                "max_kernels_per_day",
                "difference_checks",
            )
        )
    ),
    "display": Table(dict.fromkeys(("mime", "max_output_bytes", "tracebacks"))),
    # bounds and keys are tables too, but their names are the dataset's columns: the typed reader checks them.
    "privacy": Table(
        dict.fromkeys(
            (
                "mode",
                "epsilon",
                "delta",
                "epsilon_per_kernel",
                "unit",
                "max_contributions",
                "public",
                "bounds",
                "keys",
            )
        )
    ),
}
OUTPUT_TABLES = tuple(OUTPUT)
POLICY_TABLES = ("attestation", *OUTPUT_TABLES)
POLICY_FILE = Table({"attestation": ATTESTATION, **OUTPUT}, "table")

# Tables the design plans and this version does not enforce: refused with their own reason, never ignored.
NOT_YET_SUPPORTED: dict[str, str] = {}

_BARE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_names(
    document: Mapping[str, Any],
    source: str,
    *,
    tables: Collection[str] = POLICY_TABLES,
    locate: Callable[[tuple[str, ...]], int | None] | None = None,
) -> None:
    """Refuse the first name, at any depth, that the schema does not know: ``source:line: path: why``.

    ``tables`` narrows the top-level tables a caller accepts (an upload's policy has no attestation half);
    ``locate`` maps a key path to its line, when there is a text to point into.
    """
    if not isinstance(document, Mapping):
        raise PolicyError(f"{source}: a policy must be a table, not {type(document).__name__}")
    for name, value in document.items():
        path = (str(name),)
        if name in NOT_YET_SUPPORTED:
            raise _error(source, locate, path, NOT_YET_SUPPORTED[name])
        schema = POLICY_FILE.children.get(name)
        if schema is None:
            hint = _hint(str(name), tables, top=True)
            if not isinstance(value, Mapping):
                raise _error(source, locate, path, f"unknown top-level key ({hint})", table=False)
            raise _error(source, locate, path, f"unknown table ({hint})")
        if name not in tables:
            shown = ", ".join(f"[{table}]" for table in tables)
            raise _error(source, locate, path, f"has no effect here (this policy may hold only {shown})")
        if not isinstance(value, Mapping):
            raise _error(source, locate, path, f"must be a table, not {_kind(value)}")
        _check_table(value, schema, path, source, locate)


def _check_table(
    value: Mapping[str, Any],
    schema: Table,
    path: tuple[str, ...],
    source: str,
    locate: Callable[[tuple[str, ...]], int | None] | None,
) -> None:
    """Names only: a sub-table given as another type is its typed reader's to refuse, with an example."""
    for name, child in value.items():
        here = (*path, str(name))
        if name not in schema.children:
            known = tuple(schema.children)
            raise _error(source, locate, here, f"unknown {schema.noun} ({_hint(str(name), known)})")
        child_schema = schema.children[name]
        if child_schema is not None and isinstance(child, Mapping):
            _check_table(child, child_schema, here, source, locate)


def _hint(name: str, known: Collection[str], *, top: bool = False) -> str:
    """A "did you mean" when a known name is close (case aside, or by difflib's ratio), else the known names."""
    wrap = (lambda n: f"[{n}]") if top else repr
    probe = name[:100]
    same_case = [candidate for candidate in known if candidate.lower() == probe.lower()]
    close = same_case or difflib.get_close_matches(probe, list(known), n=1)
    if close:
        return f"did you mean {wrap(close[0])}?"
    if top:
        return "a policy file holds only " + ", ".join(wrap(table) for table in known)
    return "known: " + ", ".join(sorted(known))


def _error(
    source: str,
    locate: Callable[[tuple[str, ...]], int | None] | None,
    path: tuple[str, ...],
    message: str,
    *,
    table: bool = True,
) -> PolicyError:
    line = locate(path) if locate is not None else None
    where = f"{source}:{line}" if line else source
    label = ".".join(_shown(part) for part in path)
    return PolicyError(f"{where}: {f'[{label}]' if table and len(path) == 1 else label}: {message}")


def _shown(name: str) -> str:
    """A name as written when it is a plain word; quoted, escaped and bounded otherwise, so errors stay one line."""
    return name if _BARE_NAME.fullmatch(name) else json.dumps(name[:64] + ("..." if len(name) > 64 else ""))


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )
