"""``confnb broker``, ``confnb keys`` and ``confnb audit``: the data owner's key broker and its records."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from confnb.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, paint, print_json, read_bytes

DEFAULT_PORT = 8723


def register(subcommands: Any) -> None:
    broker = subcommands.add_parser(
        "broker",
        help="the data owner's key broker",
        description="Create an owner store and serve key releases to attested kernels over HTTP.",
    )
    commands = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    init = commands.add_parser(
        "init",
        help="create an owner store (keys, database, audit log)",
        description="Create OWNER_DIR with a new Ed25519 owner key, an empty dataset database and an audit log. "
        "The master key that wraps every dataset key is generated into OWNER_DIR/master.key unless you name a key "
        "file elsewhere or derive it from a passphrase.",
    )
    _store_options(init)
    init.set_defaults(handler=_init)

    serve = commands.add_parser(
        "serve",
        help="serve challenges and key releases over HTTP",
        description="Serve the broker API (OpenAPI document at /openapi.json, interactive docs at /docs).",
    )
    _store_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (and --tls-key)")
    serve.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    serve.add_argument(
        "--publish-dataset-ids",
        action="store_true",
        help="list the registered dataset ids in GET /v1/owner (default: only the owner's public key)",
    )
    serve.add_argument(
        "--challenges-per-client",
        type=_positive,
        metavar="N",
        help="unused challenges one client address may hold (default 64; raise it behind a proxy)",
    )
    serve.add_argument(
        "--connections-per-client",
        type=_positive,
        metavar="N",
        help="open connections one client address may hold (default 64; raise it behind a proxy)",
    )
    serve.set_defaults(handler=_serve)

    budget = commands.add_parser(
        "budget",
        help="show each dataset's differential-privacy budget: spent and remaining",
        description="Per dataset: its privacy mode and, under dp, the epsilon and delta its owner's policy allows, "
        "how much the charges of attested kernels have spent and what remains.",
    )
    _store_options(budget)
    budget.add_argument("--json", action="store_true", help="print one JSON document")
    budget.set_defaults(handler=_budget)

    keys = subcommands.add_parser(
        "keys",
        help="manage the broker's master key",
        description="Manage the master key that wraps every dataset key at rest.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    rotate = key_commands.add_parser(
        "rotate",
        help="re-wrap every dataset key under a new master key",
        description="Generate a new master key (or derive one from --new-passphrase-env) and re-wrap every dataset "
        "key and the owner key under it. Encrypted data is untouched.",
    )
    _store_options(rotate, flag="--broker-dir")
    rotate.add_argument(
        "--new-master-key-file",
        metavar="FILE",
        type=Path,
        help="where to write the new key (default: replace the store's key file)",
    )
    rotate.add_argument("--new-passphrase-env", metavar="VAR", help="derive the new key from this variable")
    rotate.set_defaults(handler=_rotate)

    audit = subcommands.add_parser(
        "audit",
        help="read and verify the audit log",
        description="The owner's hash-chained, signed log of every broker decision.",
    )
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    show = audit_commands.add_parser(
        "show",
        help="print the log",
        description="Print every entry of the broker's log (--broker-dir), or of a kernel's exported audit log "
        "(--kernel-log, verified with the kernel's --key): what each release asked, as a readable plan.",
        epilog="Exit codes: 0 intact, 1 the log is not intact (problems named), 2 unreadable input.",
    )
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--broker-dir", metavar="OWNER_DIR", type=Path, help="the owner store whose log to print")
    which.add_argument("--kernel-log", metavar="FILE", type=Path, help="a kernel audit log (JSON lines)")
    show.add_argument(
        "--key", metavar="HEX", help="with --kernel-log: the kernel's Ed25519 public key from its verified evidence"
    )
    show.add_argument("--json", action="store_true", help="one JSON document with every entry")
    show.set_defaults(handler=_audit_show)
    check = audit_commands.add_parser(
        "verify",
        help="prove the log intact",
        description="Recompute every hash, link and signature. Exit 0 intact, 1 tampered (first bad entry named).",
    )
    check.add_argument("--broker-dir", metavar="OWNER_DIR", required=True, type=Path)
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(handler=_audit_verify)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _store_options(parser: argparse.ArgumentParser, flag: str = "--dir") -> None:
    parser.add_argument(
        flag, dest="dir", metavar="OWNER_DIR", required=True, type=Path, help="the owner store directory"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--master-key-file",
        metavar="FILE",
        type=Path,
        help="master key file (32 bytes, mode 600); default OWNER_DIR/master.key",
    )
    source.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="derive the master key from the passphrase in this environment variable (Argon2id)",
    )


def _source(args: argparse.Namespace) -> Any:
    from confnb.broker.store import MasterKeySource

    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if not passphrase:
            raise UsageError(f"environment variable {args.passphrase_env} is empty or unset")
    return MasterKeySource(key_file=args.master_key_file, passphrase=passphrase)


def _open(args: argparse.Namespace) -> Any:
    from confnb.broker.keys import MasterKeyError
    from confnb.broker.store import OwnerStore, StoreError

    try:
        return OwnerStore.open(args.dir, _source(args))
    except (StoreError, MasterKeyError) as exc:
        raise UsageError(str(exc)) from None


def _init(args: argparse.Namespace) -> int:
    from confnb.broker.store import OwnerStore, StoreError

    try:
        store = OwnerStore.create(args.dir, _source(args))
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    print(f"created owner store {store.directory}")
    print(f"  owner public key: {store.directory / 'owner.pub'} (give it to analysts; it signs policies and the log)")
    print("  next: write OWNER_DIR/attestation.toml (confnb policy init --kind attestation), then")
    print(f"        confnb broker serve --dir {store.directory}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        _check_tls(args.tls_cert, args.tls_key)

    import dataclasses

    import uvicorn

    from confnb.attest.kds import KdsClient
    from confnb.attest.verifier import Verifier
    from confnb.broker.app import create_app
    from confnb.broker.limits import BrokerLimits
    from confnb.broker.server import uvicorn_config

    store = _open(args)
    limits = BrokerLimits(publish_dataset_ids=args.publish_dataset_ids)
    if args.challenges_per_client:
        limits = dataclasses.replace(limits, max_challenges_per_client=args.challenges_per_client)
    if args.connections_per_client:
        limits = dataclasses.replace(limits, max_connections_per_client=args.connections_per_client)
    # The server's KDS client never makes a request wait on AMD (single-flight, bounded, short deadline).
    app = create_app(store, Verifier(KdsClient.for_server()), limits)
    scheme = "https" if args.tls_cert else "http"
    print(f"confnb broker for {store.directory} on {scheme}://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
    config = uvicorn_config(
        app, limits, args.host, args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, log_level="warning"
    )
    server = uvicorn.Server(config)
    try:
        server.run()
        if not server.started:  # what uvicorn.run turns into its exit code 3
            raise SystemExit(3)
    except SystemExit as exc:
        # uvicorn exits with its own code 3 when it cannot start (address in use, say), after logging why; the
        # CLI's contract is 2 for that.
        if exc.code not in (None, 0):
            raise UsageError(f"the broker could not start on {args.host}:{args.port} (see above)") from None
        raise
    except KeyboardInterrupt:  # Ctrl-C is how a broker is meant to stop, as uvicorn.run treats it
        pass
    return EXIT_OK


class _EncryptedKeyError(Exception):
    pass


def _budget(args: argparse.Namespace) -> int:
    from confnb.attest.errors import PolicyError
    from confnb.broker.budget import BudgetLedger

    store = _open(args)
    ledger = BudgetLedger(store)
    states: list[dict[str, Any]] = []
    for dataset_id in store.dataset_ids():
        try:
            state = ledger.state(dataset_id)
        except PolicyError as exc:  # shown, not hidden: the broker charges nothing to such a dataset
            state = {"dataset_id": dataset_id, "mode": "unusable", "problem": str(exc)}
        if state is not None:
            states.append(state)
    if args.json:
        print_json({"datasets": states})
        return EXIT_OK
    if not states:
        print("no datasets registered")
    for state in states:
        name = state["dataset_id"]
        if state["mode"] == "dp":
            print(
                f"{name:<24}  dp     epsilon {state['epsilon_spent']:g} of {state['epsilon']:g} spent, "
                f"{state['epsilon_remaining']:g} left; delta {state['delta_spent']:g} of {state['delta']:g} spent, "
                f"{state['delta_remaining']:g} left; {state['charges']} charges"
            )
        elif state["mode"] == "exact":
            print(f"{name:<24}  exact  no budget (exact mode)")
        else:
            print(f"{name:<24}  " + paint(f"unusable privacy table: {state['problem']}", "red"))
    return EXIT_OK


def _check_tls(cert: str, key: str) -> None:
    """Load the pair once before anything starts: a missing, unreadable or mismatched file is then a one-line usage
    error, not an internal error after the "serving on" line. An encrypted key is left to OpenSSL's passphrase prompt,
    as before."""
    import ssl

    read_bytes(cert, "--tls-cert")
    read_bytes(key, "--tls-key")

    def encrypted() -> str:
        raise _EncryptedKeyError

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=encrypted)
    except _EncryptedKeyError:
        return
    except ssl.SSLError as exc:
        reason = (
            "the key does not belong to the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else f"not a PEM certificate and private key ({exc.reason or exc})"
        )
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: {reason}") from None


def _rotate(args: argparse.Namespace) -> int:
    from confnb.broker.store import MasterKeySource

    store = _open(args)
    passphrase = None
    if args.new_passphrase_env:
        passphrase = os.environ.get(args.new_passphrase_env)
        if not passphrase:
            raise UsageError(f"environment variable {args.new_passphrase_env} is empty or unset")
    count = store.rotate_master_key(MasterKeySource(key_file=args.new_master_key_file, passphrase=passphrase))
    print(f"re-wrapped {count} dataset key{'s' if count != 1 else ''} and the owner key under a new master key")
    return EXIT_OK


def _owner_key(directory: Path) -> Any:
    from confnb.broker.store import StoreError, load_owner_public_key

    try:
        return load_owner_public_key(directory / "owner.pub")
    except (OSError, StoreError, ValueError) as exc:
        raise UsageError(f"{directory}: cannot read the owner's public key: {exc}") from None


def _audit_show(args: argparse.Namespace) -> int:
    from confnb.broker.audit import verify_log

    if args.kernel_log is not None:
        return _kernel_log_show(args)
    if args.key is not None:
        raise UsageError("--key goes with --kernel-log (the broker's log is checked with the owner's key)")
    log = args.broker_dir / "audit.sqlite"
    if not log.exists():
        raise UsageError(f"{log}: no audit log")
    verification = verify_log(log, _owner_key(args.broker_dir))
    entries = [entry.to_dict() for entry in verification.entries]
    if args.json:
        print_json({"intact": verification.ok, "problems": verification.problems, "entries": entries})
    else:
        for entry in entries:
            detail = json.dumps(entry.get("detail", {}), sort_keys=True)
            print(
                f"{entry['seq']:>6}  {entry['time']}  {entry['kind']:<9}  {entry.get('dataset_id') or '-':<16}  "
                f"{entry['actor']}  {detail}"
            )
        if not verification.ok:
            print(paint("log NOT intact: " + "; ".join(verification.problems), "red"), file=sys.stderr)
    return EXIT_OK if verification.ok else EXIT_REJECTED


# What a kernel entry shows after its time and event, in this order (the rest is in --json).
_KERNEL_FIELDS = ("op", "kind", "rule", "datasets", "dataset", "result", "model", "suppressed")


def _kernel_log_show(args: argparse.Namespace) -> int:
    """A kernel's log, verified first: one line per entry, then its readable plan, indented, when it has one."""
    from kernel_enclave.vault.audit import parse_jsonl, verify_kernel_log

    key_text = (args.key or "").strip()
    if len(key_text) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in key_text):
        raise UsageError("--kernel-log needs --key: the kernel's Ed25519 public key as 64 hex digits")
    data = read_bytes(str(args.kernel_log), "kernel audit log")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"kernel audit log {args.kernel_log}: not UTF-8 text (expected JSON lines)") from None
    entries = parse_jsonl(data)
    verification = verify_kernel_log(entries, bytes.fromhex(key_text))
    if args.json:
        print_json({"intact": verification.ok, "problems": verification.problems, "entries": entries})
        return EXIT_OK if verification.ok else EXIT_REJECTED
    for entry in entries:
        if not isinstance(entry, dict):
            print(f"{'?':>6}  {_printable(entry)}")
            continue
        found = entry.get("fields")
        fields: dict[str, Any] = found if isinstance(found, dict) else {}
        shown = [f"{name}={_printable(fields[name])}" for name in _KERNEL_FIELDS if fields.get(name) is not None]
        print(
            f"{_printable(entry.get('seq')):>6}  {_printable(entry.get('time'))}  "
            f"{_printable(entry.get('event')):<11}  {'  '.join(shown)}".rstrip()
        )
        if fields.get("plan") is not None:
            print(f"        plan: {_printable(fields['plan'])}")
    if not verification.ok:
        print(paint("log NOT intact: " + "; ".join(verification.problems), "red"), file=sys.stderr)
    return EXIT_OK if verification.ok else EXIT_REJECTED


def _printable(value: object) -> str:
    """A logged value as one inert line: printable ASCII as is, anything else (a tampered log's escapes) quoted."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if text.isascii() and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=True)


def _audit_verify(args: argparse.Namespace) -> int:
    from confnb.broker.audit import verify_log

    log = args.broker_dir / "audit.sqlite"
    if not log.exists():
        raise UsageError(f"{log}: no audit log")
    verification = verify_log(log, _owner_key(args.broker_dir))
    if args.json:
        print_json({"intact": verification.ok, "entries": len(verification.entries), "problems": verification.problems})
    elif verification.ok:
        print(paint(f"intact: {len(verification.entries)} entries, every hash, link and signature verified", "green"))
    else:
        print(paint("TAMPERED: " + "; ".join(verification.problems), "red"))
    return EXIT_OK if verification.ok else EXIT_REJECTED
