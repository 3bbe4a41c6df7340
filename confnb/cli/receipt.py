"""``confnb receipt``: verify export bundles and kernel audit logs offline."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from confnb.attest.result import Outcome
from confnb.cli.attest import SIMULATED_BANNER
from confnb.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, paint, print_json, read_bytes, write_output

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_HEAD = re.compile(r"(\d+):([0-9a-f]{64})")


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "receipt",
        help="verify export receipts and kernel audit logs",
        description="Verify, offline, what a confidential kernel released: export bundles with their signed "
        "receipts, and the kernel's signed audit log.",
    )
    commands = parser.add_subparsers(dest="receipt_command", metavar="ACTION", required=True)

    verify = commands.add_parser(
        "verify",
        help="verify an export bundle: evidence, receipt, signature, payload",
        description="Verify a confnb-export/1 bundle: the kernel's attestation evidence (authenticity, then the "
        "attestation policy; strict defaults without --policy), that it binds the kernel's signing key and this "
        "receipt, the receipt's signature, and the payload's digest. With --open, also open a payload sealed to "
        "you and check the result's digest; with --out, write the verified result.",
        epilog="Exit codes: 0 verified, 1 a check failed (named in the output), 2 unreadable input.",
    )
    verify.add_argument("bundle", metavar="FILE", help="the export bundle")
    verify.add_argument(
        "--allow-simulated",
        action="store_true",
        help="accept evidence from the simulated TEE (testing only: it is not a confidential VM)",
    )
    verify.add_argument("--policy", metavar="POLICY.toml", help="attestation policy (an [attestation] table)")
    verify.add_argument("--open", metavar="KEY.pem", help="the recipient's P-256 private key (PEM, unencrypted)")
    verify.add_argument("--out", metavar="OUT", help="write the verified result here (nothing is written on failure)")
    verify.add_argument("--json", action="store_true", help='print {"verified", "simulated", "checks", "receipt"}')
    verify.set_defaults(handler=_verify)

    audit = commands.add_parser(
        "audit",
        help="verify an exported kernel audit log (JSONL)",
        description="Verify a kernel audit log exported as JSON lines: every entry's hash, its link to the "
        "previous entry, the sequence, and the kernel's signature. Take --key from the kernel's verified "
        "evidence (its signing_public_key claim), never from the log.",
        epilog="Exit codes: 0 intact, 1 a problem was found (named by seq), 2 unreadable input.",
    )
    audit.add_argument("log", metavar="FILE", help="the audit log, one JSON entry per line")
    audit.add_argument("--key", metavar="HEX", required=True, help="the kernel's Ed25519 public key (64 hex digits)")
    audit.add_argument(
        "--head", metavar="SEQ:HASH", help="a head seen earlier: detects removed newest entries and rewrites"
    )
    audit.add_argument("--json", action="store_true", help='print {"verified", "problems", "head", "entries"}')
    audit.set_defaults(handler=_audit)


# -- verify -------------------------------------------------------------------------------------------------


def _load_recipient_key(path: str) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = read_bytes(path, "recipient key")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"recipient key {path}: the key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"recipient key {path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UsageError(f"recipient key {path}: not a P-256 (secp256r1) private key")
    return key


def _verify(args: argparse.Namespace) -> int:
    from confnb.receipts import verify_export

    data = read_bytes(args.bundle, "export bundle")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise UsageError(f"export bundle {args.bundle}: not JSON (not a confnb export bundle)") from None
    if not isinstance(document, dict):
        raise UsageError(f"export bundle {args.bundle}: not a JSON object (not a confnb export bundle)")
    recipient = _load_recipient_key(args.open) if args.open else None
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"cannot write {args.out}: is a directory")
    result = verify_export(
        data, attestation_policy=args.policy, allow_simulated=args.allow_simulated, recipient_private_key=recipient
    )
    written = None
    if result.ok and args.out:
        if result.payload is None:
            sealed_to = (result.receipt or {}).get("sealed_to")
            raise UsageError(f"the payload is sealed to {sealed_to}; give --open KEY.pem to write it")
        write_output(args.out, result.payload, 0o600)
        written = args.out
    if args.json:
        print_json({**result.to_dict(), "out": written})
    else:
        _print(result, written)
    return EXIT_OK if result.ok else EXIT_REJECTED


def _print(result: Any, written: str | None) -> None:
    if result.simulated:
        print(paint(SIMULATED_BANNER, "inverse-yellow"))
    print(paint(result.summary() if result.ok else "REJECTED", "green" if result.ok else "red"))
    marks = {
        Outcome.PASS: paint("pass", "green"),
        Outcome.FAIL: paint("FAIL", "red"),
        Outcome.SKIP: paint("skip", "dim"),
    }
    width = max((len(check.name) for check in result.checks), default=0)
    for check in result.checks:
        print(f"  {marks[check.outcome]}  {check.name.ljust(width)}  {check.detail}")
    receipt = result.receipt
    if isinstance(receipt, dict):
        print("receipt:" if result.ok else "receipt (NOT verified):")
        for name in ("file_name", "media_type", "policy_id", "datasets", "operation_digest", "result_digest", "time"):
            value = receipt.get(name)
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"  {name.ljust(16)}  {'-' if shown is None else shown}")
        print(f"  {'sealed_to'.ljust(16)}  {receipt.get('sealed_to') or 'not sealed'}")
    if written:
        print(f"wrote {written}", file=sys.stderr)
    if not result.ok:
        failing = [check.name for check in result.failures] or ["(required checks did not run)"]
        print(paint(f"rejected by: {', '.join(failing)}", "red"), file=sys.stderr)


# -- audit --------------------------------------------------------------------------------------------------


def _audit(args: argparse.Namespace) -> int:
    from kernel_enclave.vault.audit import parse_jsonl, verify_kernel_log

    if not _HEX_KEY.fullmatch(args.key.strip()):
        raise UsageError("--key must be the kernel's Ed25519 public key as 64 hex digits")
    key = bytes.fromhex(args.key.strip())
    head = None
    if args.head:
        match = _HEAD.fullmatch(args.head.strip())
        if not match:
            raise UsageError("--head must be SEQ:HASH (a number, a colon, 64 lowercase hex digits)")
        head = (int(match.group(1)), match.group(2))
    data = read_bytes(args.log, "audit log")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"audit log {args.log}: not UTF-8 text (expected JSON lines)") from None
    entries = parse_jsonl(data)
    try:
        verification = verify_kernel_log(entries, key, expected_head=head)
    except ValueError as exc:
        raise UsageError(f"--key: {exc}") from None
    if args.json:
        print_json(
            {
                "verified": verification.ok,
                "entries": verification.entries,
                "problems": verification.problems,
                "head": list(verification.head) if verification.head else None,
                "first_bad_seq": verification.first_bad_seq,
            }
        )
    elif verification.ok:
        seq, entry_hash = verification.head or (0, "")
        print(paint(f"verified: {verification.entries} entries, chain and signatures intact", "green"))
        print(f"head: {seq}:{entry_hash}  (keep it; pass it as --head next time to detect removed entries)")
    else:
        print(paint(f"REJECTED: {len(verification.problems)} problem(s)", "red"))
        for problem in verification.problems:
            print(f"  {problem}")
    return EXIT_OK if verification.ok else EXIT_REJECTED
