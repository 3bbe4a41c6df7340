"""``confnb dataset``: encrypt, inspect, verify and (for the owner) decrypt datasets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from confnb.cli.broker import _open as open_store
from confnb.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, paint, print_json


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "dataset",
        help="encrypt, inspect, verify and decrypt datasets",
        description="A dataset is a directory: encrypted Arrow IPC or Parquet files, manifest.json and manifest.sig "
        "(signed by the owner). Its key stays with the owner's broker.",
    )
    commands = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)

    encrypt = commands.add_parser(
        "encrypt",
        help="encrypt a Parquet, CSV or Arrow file into a dataset directory",
        description="Encrypt INPUT (Parquet, CSV or Arrow IPC; read in batches, so it may be larger than memory) "
        "into DIR with a fresh key registered in the owner's broker, under the output policy (and the "
        "[attestation] table, if present) of POLICY.toml. Nothing is left behind on failure.",
    )
    encrypt.add_argument("input", metavar="INPUT")
    encrypt.add_argument(
        "--broker-dir",
        dest="dir",
        metavar="OWNER_DIR",
        required=True,
        type=Path,
        help="the owner store (confnb broker init)",
    )
    encrypt.add_argument("--id", dest="dataset_id", required=True, help="dataset id: letters, digits, . _ -")
    encrypt.add_argument(
        "--policy", required=True, metavar="POLICY.toml", help="output policy, optionally with an [attestation] table"
    )
    encrypt.add_argument("--out", required=True, metavar="DIR", type=Path, help="new dataset directory")
    encrypt.add_argument(
        "--format",
        choices=("arrow", "parquet"),
        default="arrow",
        help="arrow: encrypted Arrow IPC (Tink AES256-GCM-HKDF, 1 MiB segments), the fast load path (default); "
        "parquet: Parquet Modular Encryption (AES_GCM_V1, encrypted footer, 256-bit keys), which Spark, "
        "parquet-java and arrow-rs read too",
    )
    source = encrypt.add_mutually_exclusive_group()
    source.add_argument("--master-key-file", metavar="FILE", type=Path, help="as for confnb broker")
    source.add_argument("--passphrase-env", metavar="VAR", help="as for confnb broker")
    encrypt.add_argument("--json", action="store_true", help="print the manifest as JSON")
    encrypt.set_defaults(handler=_encrypt)

    inspect = commands.add_parser(
        "inspect",
        help="show a dataset's manifest (no key needed)",
        description="Show the manifest: id, schema, files, sizes, policy digest.",
    )
    inspect.add_argument("directory", metavar="DIR", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(handler=_inspect)

    verify = commands.add_parser(
        "verify",
        help="check the owner's signature and every file's digest",
        description="Exit 0 if the signature verifies and every file matches; 1 naming each problem otherwise.",
    )
    verify.add_argument("directory", metavar="DIR", type=Path)
    verify.add_argument(
        "--owner-key",
        metavar="owner.pub",
        type=Path,
        help="require this owner (PEM from the owner's store); without it any owner is accepted",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)

    decrypt = commands.add_parser(
        "decrypt",
        help="the owner's own round trip back to Parquet, CSV or Arrow",
        description="Verify DIR, fetch its key from the owner's store (audited), and write the table to FILE.",
    )
    decrypt.add_argument("directory", metavar="DIR", type=Path)
    decrypt.add_argument("--broker-dir", dest="dir", metavar="OWNER_DIR", required=True, type=Path)
    decrypt.add_argument("--out", required=True, metavar="FILE", type=Path, help=".parquet, .csv or .arrow")
    source = decrypt.add_mutually_exclusive_group()
    source.add_argument("--master-key-file", metavar="FILE", type=Path, help="as for confnb broker")
    source.add_argument("--passphrase-env", metavar="VAR", help="as for confnb broker")
    decrypt.set_defaults(handler=_decrypt)


class _ProgressLine:
    """A single updating line on a terminal's stderr; silent when stderr is not a terminal (scripts, CI)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = 0.0

    def __call__(self, rows: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.shown < 0.2:
            return
        self.shown = now
        share = f" ({100 * rows / total:.0f}%)" if total else ""
        sys.stderr.write(f"\r{self.label}: {rows:,} rows{share}, {now - self.started:.0f} s")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")


def _errors() -> tuple[type[BaseException], ...]:
    from confnb.broker.store import StoreError
    from confnb.datasets.errors import DatasetFormatError, IntegrityError
    from confnb.datasets.inputs import InputError
    from confnb.datasets.manifest import DatasetIntegrityError, ManifestError

    return StoreError, InputError, ManifestError, DatasetIntegrityError, IntegrityError, DatasetFormatError


def _encrypt(args: argparse.Namespace) -> int:
    from confnb.cli.policy import load_policies
    from confnb.datasets.owner import encrypt_dataset
    from confnb.policy.toml import read_policy_text

    attestation, output = load_policies(args.policy)
    if output is None:
        raise UsageError(f"{args.policy}: a dataset needs an output policy ([policy] id, [release], [display])")
    store = open_store(args)
    progress = _ProgressLine(f"encrypting {args.input}")
    try:
        dataset = encrypt_dataset(
            args.input,
            args.out,
            store,
            args.dataset_id,
            output,
            read_policy_text(args.policy) if attestation is not None else None,
            progress=progress,
            format=args.format,
        )
    except _errors() as exc:
        raise UsageError(str(exc)) from None
    finally:
        progress.done()
    manifest = dataset.manifest
    if args.json:
        print_json(manifest.to_dict())
    else:
        entry = manifest.files[0]
        print(
            f"encrypted {entry.rows:,} rows into {dataset.directory} ({entry.size:,} bytes, {args.format}), dataset "
            f"{manifest.dataset_id!r}, key {manifest.key_id} held by {store.directory}"
        )
        if attestation is None:
            print(
                "note: POLICY has no [attestation] table; releases follow OWNER_DIR/attestation.toml, and are all "
                "denied while that file is absent",
                file=sys.stderr,
            )
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from confnb.datasets.manifest import MANIFEST_NAME, Manifest

    try:
        manifest = Manifest.from_json((args.directory / MANIFEST_NAME).read_bytes())
    except OSError as exc:
        raise UsageError(f"{args.directory / MANIFEST_NAME}: {exc.strerror or exc}") from None
    except _errors() as exc:
        raise UsageError(f"{args.directory / MANIFEST_NAME}: {exc}") from None
    if args.json:
        print_json(manifest.to_dict())
        return EXIT_OK
    print(f"dataset {manifest.dataset_id} v{manifest.version} ({manifest.format}), created {manifest.created_at}")
    print(f"  key id {manifest.key_id}; output policy {manifest.output_policy_digest}")
    print(f"  owner {manifest.owner_fingerprint}")
    print("  columns:")
    for column in manifest.schema.fields:
        print(f"    {column.name}: {column.type}{'' if column.nullable else ' (not null)'}")
    print("  files:")
    for entry in manifest.files:
        print(f"    {entry.name}: {entry.rows:,} rows, {entry.size:,} bytes, sha256 {entry.sha256}")
    print(paint("not verified: run 'confnb dataset verify' to check the signature and digests", "dim"))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from confnb.broker.store import load_owner_public_key
    from confnb.datasets.manifest import DatasetIntegrityError, verify_dataset

    owner = None
    if args.owner_key is not None:
        try:
            owner = load_owner_public_key(args.owner_key)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.owner_key}: {exc}") from None
    try:
        verified = verify_dataset(args.directory, owner)
    except DatasetIntegrityError as exc:
        if args.json:
            print_json({"verified": False, "problems": list(exc.problems)})
        else:
            for problem in exc.problems:
                print(paint(f"FAIL  {problem}", "red"))
        return EXIT_REJECTED
    except _errors() as exc:
        raise UsageError(str(exc)) from None
    manifest = verified.manifest
    if args.json:
        print_json(
            {
                "verified": True,
                "dataset_id": manifest.dataset_id,
                "version": manifest.version,
                "owner": verified.owner_fingerprint,
                "files": len(manifest.files),
            }
        )
    else:
        print(
            paint(
                f"verified: {manifest.dataset_id} v{manifest.version}, {len(manifest.files)} file(s), signed by "
                f"{verified.owner_fingerprint}" + ("" if owner else " (owner not pinned: pass --owner-key)"),
                "green",
            )
        )
    return EXIT_OK


def _decrypt(args: argparse.Namespace) -> int:
    from confnb.datasets.owner import decrypt_dataset

    store = open_store(args)
    try:
        rows = decrypt_dataset(args.directory, store, args.out)
    except _errors() as exc:
        raise UsageError(str(exc)) from None
    print(f"decrypted {rows:,} rows into {args.out}")
    return EXIT_OK
