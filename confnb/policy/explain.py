"""Policies in plain language, for the people who must agree to them (``confnb policy explain``).

A data owner signs an output policy and an analyst lives by it; neither should have to read TOML to know what it
permits. Every sentence here is derived from the parsed policy, so the explanation cannot drift from what the
vault and the verifier enforce.
"""

from __future__ import annotations

import json
import re

from confnb.attest.policy import AttestationPolicy
from confnb.policy.output import OutputPolicy
from confnb.policy.privacy import PrivacyPolicy

_KIND_TEXT = {
    "schema": "the dataset's column names and types",
    "row_count": "how many rows a table has",
    "aggregate": "aggregates (counts, sums, means, quantiles, group-by results)",
    "model_metrics": "the quality metrics of models trained on the data (accuracy, ROC AUC, RMSE, ...)",
    "model_parameters": "the parameters of trained models (coefficients, feature importances)",
    "predict_public": "predictions of trained models on data the analyst supplies",
    "window": "results computed with window functions (a rank or a group statistic on every row)",
}
_BARE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def explain_output(policy: OutputPolicy) -> list[str]:
    lines = [f"Output policy {policy.id!r}: nothing leaves the kernel unless a rule below allows it."]
    if policy.allow:
        lines.append("May be released: " + "; ".join(_KIND_TEXT[kind] for kind in sorted(policy.allow)) + ".")
    else:
        lines.append("No results of any kind may be released.")
    dp = policy.privacy is not None and policy.privacy.is_dp
    if policy.privacy is not None and dp:
        lines.append(_explain_privacy(policy.privacy, policy.allow))
    if "aggregate" in policy.allow and not dp:  # under DP the noise, not a group size, protects a released number
        if policy.min_group_size > 1:
            lines.append(
                f"Every released aggregate row must be computed from at least {policy.min_group_size} records; "
                "smaller groups are suppressed."
            )
        else:
            lines.append("Aggregates over groups of any size may be released, even single records (min_group_size 1).")
    if "window" in policy.allow and not dp:
        lines.append(
            "Window functions are allowed: a rank or a group statistic on every row carries other records' values "
            "onto each row, so the rules below no longer bound what one release reveals about one record (a "
            "difference of two group sums, or a filter on one, can give one person's value)."
        )
    if "row_count" in policy.allow and policy.min_group_size > 1:
        lines.append(f"A row count is released only when it counts at least {policy.min_group_size} records.")
    if policy.never_release:
        lines.append(
            "These columns appear in no released result, not even as group keys or through derived columns: "
            + ", ".join(sorted(policy.never_release))
            + "."
        )
    if policy.max_rows is not None:
        lines.append(f"No released table may have more than {policy.max_rows} rows.")
    lines.extend(_explain_limits(policy))
    lines.append(
        f"Notebook output may use {', '.join(policy.mime) or 'no MIME type at all'}, at most "
        f"{policy.max_output_bytes} bytes per cell (all of its outputs together)."
    )
    lines.append(
        "Tracebacks show only the exception type and the cell line."
        if policy.tracebacks == "redacted"
        else "Tracebacks are shown in full (they can carry data values)."
    )
    return lines


def _explain_limits(policy: OutputPolicy) -> list[str]:
    """The two counts that bound how many exact releases an analyst can draw, and what their absence means."""
    if not policy.allow - {"schema"}:
        return []
    lines = []
    if policy.max_releases is not None:
        lines.append(
            f"One kernel may make at most {policy.max_releases} releases from this dataset: each request for an "
            "aggregate, a row count, a preview, a model's metrics or parameters, predictions or an export counts "
            "one, whether it is released or withheld; later requests are refused (release.max_releases)."
        )
    elif not (policy.privacy is not None and policy.privacy.is_dp):  # under DP the budget bounds them
        lines.append(
            "A kernel may make any number of releases (no max_releases): many overlapping releases can together "
            "reveal more than any one of them."
        )
    if policy.max_kernels_per_day is not None:
        lines.append(
            f"The broker releases the dataset's key to at most {policy.max_kernels_per_day} kernels per UTC day "
            "(release.max_kernels_per_day)."
        )
        if policy.max_releases is not None:
            total = policy.max_releases * policy.max_kernels_per_day
            lines.append(f"So the kernels given the key on one day can draw at most {total} releases in all.")
    else:
        lines.append("Any number of kernels per day may be given the dataset's key (no max_kernels_per_day).")
    if policy.privacy is not None and policy.privacy.is_dp:
        return lines  # no exact number but the public row count: nothing to subtract
    if policy.checks_differences:
        lines.append(
            f"Difference checks are on{' (the default)' if policy.difference_checks is None else ''}: a number whose "
            "records differ from those of a number released earlier by the same kernel (or of the same result) by "
            f"1 to {policy.min_group_size - 1} records is refused when both measure the same column, or both count "
            "records (release.difference)."
        )
    else:
        lines.append(
            "Difference checks are OFF (difference_checks = false): two releases whose records differ by one "
            "person, such as a sum over everyone and over everyone but them, reveal that person's value."
        )
    return lines


def _explain_privacy(privacy: PrivacyPolicy, allow: frozenset[str]) -> str:
    """One sentence with every number the owner chose: the budget, who a person is, and the public facts."""
    epsilon = _number(privacy.epsilon if privacy.epsilon is not None else 0.0)
    budget = f"the dataset's total budget is ε = {epsilon} (δ = {_number(privacy.delta)})"
    if privacy.epsilon_per_kernel is not None:
        budget += f", at most ε = {_number(privacy.epsilon_per_kernel)} per kernel"
    else:
        budget += ", all of which one kernel may spend"
    count = privacy.max_contributions
    rows = f"{count} row{'' if count == 1 else 's'}"
    if privacy.unit is not None:
        person = f"one person is identified by {_name(privacy.unit)} and may contribute up to {rows}"
    elif count == 1:
        person = "one row is one person"
    else:
        person = f"one person may contribute up to {rows} (no column identifies them)"
    parts = [budget, person]
    if privacy.bounds:
        shown = (f"{_name(column)} {_number(low)}..{_number(high)}" for column, (low, high) in privacy.bounds.items())
        parts.append("public bounds: " + ", ".join(shown))
    if privacy.keys:
        shown = (
            f"{_name(column)} ({len(values)} value{'' if len(values) == 1 else 's'})"
            for column, values in privacy.keys.items()
        )
        parts.append("public group keys: " + ", ".join(shown))
    exact = [kind for kind in ("schema", *privacy.public) if kind in allow]  # [release] allow still decides
    parts.append("exact releases: only " + " and ".join(exact) if exact else "no release is exact")
    return "Differential privacy: every released number is noisy; " + "; ".join(parts) + "."


def _number(value: float) -> str:
    """A number as an owner would write it: 1 rather than 1.0, 1e-7 rather than 1e-07, and never rounded."""
    text = repr(float(value))
    if text.endswith(".0"):
        text = text[:-2]
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _name(column: str) -> str:
    """A column name as written when it is a plain word; quoted otherwise, so the sentence stays one line."""
    return column if _BARE_NAME.fullmatch(column) else json.dumps(column[:64] + ("..." if len(column) > 64 else ""))


def explain_attestation(policy: AttestationPolicy) -> list[str]:
    lines = ["Attestation policy: which confidential VMs are trusted (with a key, or with data)."]
    lines.append(
        "Simulated TEEs are ACCEPTED: this proves nothing about hardware and is for demos and tests only."
        if policy.allow_simulated
        else "Only genuine AMD SEV-SNP hardware is accepted (AMD's pinned roots; simulated TEEs are refused)."
    )
    if policy.allow_simulated:
        lines.append(
            "Any simulated chip is accepted: anyone can make one. Pin yours with simulated_roots."
            if policy.simulated_roots is None
            else f"Only {len(policy.simulated_roots)} pinned simulated chip(s) (simulated_roots)."
        )
    if policy.measurements is None:
        lines.append("Any launch measurement is accepted: ANY software in a genuine VM passes. Pin measurements.")
    elif not policy.measurements:
        lines.append("The measurement allowlist is empty, so every VM is refused.")
    else:
        count = len(policy.measurements)
        lines.append(f"The VM must run one of {count} pinned image{'s' if count > 1 else ''} (launch measurement).")
    if policy.reject_debug:
        lines.append("VMs that allow debugging (the host could read their memory) are refused.")
    else:
        lines.append("VMs that allow DEBUGGING are accepted: the host can read and change their memory.")
    if policy.reject_migration_agent:
        lines.append("VMs that allow a migration agent are refused.")
    lines.append(f"The report must come from VMPL {policy.max_vmpl} or more privileged.")
    lines.append(f"Reports may be signed by: {', '.join(policy.signing_keys)}.")
    if policy.min_tcb or policy.min_tcb_by_product:
        floors = [f"{', '.join(f'{k} {v}' for k, v in policy.min_tcb.items())}"] if policy.min_tcb else []
        floors += [
            f"{product}: {', '.join(f'{k} {v}' for k, v in table.items())}"
            for product, table in policy.min_tcb_by_product.items()
        ]
        lines.append("Firmware must be at least: " + "; ".join(floors) + ".")
    if policy.max_evidence_age_s is not None:
        lines.append(f"Evidence older than {policy.max_evidence_age_s} seconds is refused.")
    if not policy.permit_provisional_firmware:
        lines.append("Provisional (uncommitted) firmware is refused.")
    if policy.check_revocation:
        lines.append("AMD's certificate revocation list is checked.")
    return lines
