"""``confnb policy``: write, check and explain policy files (attestation and output policies alike)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from confnb.attest.policy import AttestationPolicy
from confnb.cli.common import EXIT_OK, UsageError, print_json, write_output
from confnb.policy.explain import explain_attestation, explain_output
from confnb.policy.output import OutputPolicy, has_output_policy
from confnb.policy.toml import parse_policy, read_policy_text

TEMPLATES = {
    "attestation": """\
# Which confidential VMs may receive data or keys. Every key is explained by `confnb policy explain`.
[attestation]
allow_simulated = false                 # true only for demos and tests
measurements = []                       # the launch measurements you trust (96 hex characters each)
reject_debug = true
reject_migration_agent = true
max_vmpl = 0
max_evidence_age_s = 300
signing_keys = ["VCEK", "VLEK"]
""",
    "output": """\
# What may leave the kernel. Default deny: only what is listed under [release] is ever released.
[policy]
id = "my-dataset-v1"                    # names this policy in audit logs and receipts

[release]
allow = ["schema", "row_count", "aggregate"]   # also: model_metrics, model_parameters, predict_public, window
min_group_size = 10                     # every released aggregate row comes from at least this many records
never_release = []                      # columns that appear in no released result
max_rows = 1000
max_releases = 1000                     # requests for results one kernel may make (released or withheld)
max_kernels_per_day = 10                # kernels per UTC day the broker gives the key; delete a line for no limit
difference_checks = true                # refuse a number a few records away from one released before

[display]
mime = ["text/plain", "text/markdown", "image/png"]
max_output_bytes = 1000000
tracebacks = "redacted"                 # "redacted" (type and cell line) or "full"

[privacy]
mode = "exact"                          # numbers as computed, under the rules above; or "dp", as below
# Differential privacy instead: every released number is noisy and charged to a budget your broker keeps.
# mode = "dp"
# epsilon = 1.0                         # the dataset's total budget (at most 100)
# delta = 1e-7                          # optional, below 0.001
# epsilon_per_kernel = 0.5              # optional: what one kernel may spend
# unit = "patient_id"                   # optional: the column naming a person (else one row is one person)
# max_contributions = 1                 # rows one person may contribute
# public = ["row_count"]                # exact releases still allowed besides the schema
# [privacy.bounds]                      # public clipping bounds of numeric columns
# age = [0, 120]
# [privacy.keys]                        # public group keys
# diagnosis = ["cardiac", "respiratory"]
""",
}


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "policy",
        help="write, check and explain policy files",
        description="Policy files hold an [attestation] table (which VMs are trusted), an output policy ([policy], "
        "[release], [display]: what may leave the kernel), or both.",
    )
    commands = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    init = commands.add_parser(
        "init", help="write a commented starting policy", description="Write a strict, commented policy to start from."
    )
    init.add_argument(
        "--kind",
        choices=("both", "attestation", "output"),
        default="both",
        help="which halves to write (default: both)",
    )
    init.add_argument("--out", metavar="FILE", help="write here (default: standard output); never overwrites")
    init.set_defaults(handler=_init)

    check = commands.add_parser(
        "check",
        help="validate a policy file",
        description="Validate every table of a policy file. Exit 0 valid, 2 invalid.",
    )
    check.add_argument("policy", metavar="POLICY.toml")
    check.add_argument("--json", action="store_true", help="print the normalised policies and their digests")
    check.set_defaults(handler=_check)

    explain = commands.add_parser(
        "explain",
        help="say in plain language what a policy permits",
        description="Explain each half of a policy file in plain language.",
    )
    explain.add_argument("policy", metavar="POLICY.toml")
    explain.set_defaults(handler=_explain)


def load_policies(path: str) -> tuple[AttestationPolicy | None, OutputPolicy | None]:
    """Both halves of a policy file (either may be absent, not both); any name, at any level, must be known."""
    text = read_policy_text(path)
    document = parse_policy(text, path)
    attestation = AttestationPolicy.from_toml(text, path) if "attestation" in document else None
    output = OutputPolicy.from_toml(text, path) if has_output_policy(document) else None
    if attestation is None and output is None:
        raise UsageError(
            f"{path}: neither an [attestation] table nor an output policy ([policy], [release], [display])"
        )
    return attestation, output


def _init(args: argparse.Namespace) -> int:
    kinds = ("attestation", "output") if args.kind == "both" else (args.kind,)
    text = "\n".join(TEMPLATES[kind] for kind in kinds)
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    if Path(args.out).exists():
        raise UsageError(f"{args.out} exists; choose another name (policy init never overwrites)")
    write_output(args.out, text.encode())
    print(f"wrote {args.out}; check it with 'confnb policy explain {args.out}'", file=sys.stderr)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    attestation, output = load_policies(args.policy)
    if args.json:
        print_json(
            {
                "attestation": None
                if attestation is None
                else {**attestation.to_dict(), "digest": attestation.digest()},
                "output": None if output is None else {**output.to_dict(), "digest": output.digest()},
            }
        )
    else:
        halves = [name for name, half in (("attestation", attestation), ("output", output)) if half is not None]
        print(f"{args.policy}: valid ({' and '.join(halves)} policy)")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    attestation, output = load_policies(args.policy)
    sections = []
    if output is not None:
        sections.append(explain_output(output))
    if attestation is not None:
        sections.append(explain_attestation(attestation))
    print(
        "\n\n".join(
            "\n".join(f"- {line}" if index else line for index, line in enumerate(section)) for section in sections
        )
    )
    return EXIT_OK
