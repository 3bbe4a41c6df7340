"""The analyst's entry points: open a dataset, get a sealed table or model back, export and audit.

These are the functions ``import confnb as cn`` exposes inside a confidential kernel. Each is one request to the
vault; what the vault refuses arrives as :class:`~confnb.PolicyViolation` or :class:`~confnb.VaultError`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

from confnb.analyst.errors import VaultError, short_traceback
from confnb.analyst.model import SealedModel
from confnb.analyst.results import result_id_of
from confnb.analyst.session import VaultSession, current_session
from confnb.analyst.table import SealedResult, SealedTable

__all__ = ["EXPORT_FORMATS", "audit", "export", "kernel_info", "open", "unseal"]

BROKER_URL_VARIABLE: Final = "CONFNB_BROKER_URL"
EXPORT_FORMATS: Final = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".skops": "skops"}
MAX_SEALED_BYTES: Final = 8 * 1024 * 1024 * 1024
WARMUP_NOTICE_AFTER_S: Final = 1.0  # a wait shorter than this goes unmentioned
WARMUP_POLL_S: Final = 10.0
WARMUP_LIMIT_S: Final = 600.0
_warm_vaults: set[str] = set()  # sockets of vaults known to have loaded their libraries


@short_traceback
def open(  # cn.open is the name analysts expect (as xarray.open_dataset)
    source: str | os.PathLike[str], broker: str | None = None
) -> SealedTable:
    """Open a dataset by id (looked up in the kernel's dataset path) or by directory; its key comes from the broker.

    ``broker`` is the owner's key broker URL; by default the kernel's configured one (``CONFNB_BROKER_URL``). The
    vault obtains the dataset key after attesting this kernel to the broker, and returns a handle: the table's
    schema and output policy are visible, its rows never are.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise TypeError("cn.open takes a dataset id or the path of a dataset directory")
    if os.sep in source or source.startswith(("~", ".")) or os.path.isdir(source):
        source = os.path.abspath(os.path.expanduser(source))  # the vault's working directory is not the notebook's
    if broker is not None and not isinstance(broker, str):
        raise TypeError("broker is the key broker's URL")
    url = broker or os.environ.get(BROKER_URL_VARIABLE) or None
    session = current_session()
    wait_until_loaded(session)
    reply, _ = session.request({"op": "open", "source": source, "broker": url})
    return SealedTable._from_reply(session, reply)


@short_traceback
def unseal(path: str | os.PathLike[str]) -> SealedTable | SealedModel:
    """The table or model that ``t.seal(path)`` / ``m.seal(path)`` wrote, in a kernel with the same measurement."""
    target = Path(path).expanduser()
    size = target.stat().st_size
    if size > MAX_SEALED_BYTES:
        raise ValueError(f"{target} is larger than any sealed file this kernel wrote")
    data = target.read_bytes()
    session = current_session()
    wait_until_loaded(session)
    reply, _ = session.request({"op": "unseal"}, [data])
    if isinstance(reply.get("model"), str):
        return SealedModel(session, reply)
    return SealedTable._from_reply(session, reply)


@short_traceback
def export(
    value: Any,
    path: str | os.PathLike[str],
    recipient: Any = None,
    *,
    format: str | None = None,
) -> Path:
    """Write a released value with a receipt signed by the kernel's attested key; returns the path written.

    ``value`` is what ``.release()``, ``m.metrics()``, ``m.params()``, ``m.score()`` or ``m.predict()`` returned in
    this kernel (the vault exports *its* copy, so the receipt covers exactly what was released), a
    :class:`SealedResult` (released now), or a :class:`SealedModel` (as ``.skops``, if the policy releases model
    parameters). The payload format comes from ``path``'s suffix (``.csv``, ``.parquet``, ``.json``, ``.skops``) or
    ``format``; the file holds a ``confnb-export/1`` bundle (``confnb receipt verify`` checks it offline).
    ``recipient`` (a P-256 public key: PEM text or bytes, a PEM file's path, or a cryptography key) seals the payload
    so only its holder can read it.
    """
    target = Path(path).expanduser()
    chosen = _export_format(target, format)
    header: dict[str, Any] = {"op": "export", "result": None, "model": None, "format": chosen}
    if isinstance(value, SealedModel):
        if chosen != "skops":
            raise ValueError("a model is exported as .skops (scikit-learn's safe format)")
        header["model"] = value._id
        session = value._session
    else:
        if chosen == "skops":
            raise ValueError(".skops is for models; a released value is exported as .csv, .parquet or .json")
        if isinstance(value, SealedResult):
            value = value.release()
        header["result"] = result_id_of(value)
        session = current_session()
    header["recipient"] = recipient_hex(recipient) if recipient is not None else None
    _, buffers = session.request(header)
    if len(buffers) != 1:
        raise VaultError("the vault's export reply carries no bundle")
    from confnb.fileio import write_atomically

    write_atomically(target, buffers[0])
    return target


@short_traceback
def audit(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The kernel's signed, hash-chained audit log so far (and, with ``path``, written there as JSON Lines)."""
    reply, _ = current_session().request({"op": "audit"})
    entries = reply.get("entries")
    if not isinstance(entries, list):
        raise VaultError("the vault's audit reply carries no entries")
    if path is not None:
        from confnb.fileio import write_atomically

        lines = "".join(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n" for entry in entries)
        write_atomically(Path(path).expanduser(), lines.encode())
    return entries


@short_traceback
def kernel_info() -> dict[str, Any]:
    """This kernel as the vault reports it: TEE kind, launch measurement (hex) and export-signing public key."""
    return current_session().kernel()


def wait_until_loaded(session: VaultSession) -> None:
    """Wait for the vault to finish loading its query engine, saying so on stderr if that takes a while.

    The vault loads them in the background once the kernel has started, so that the kernel is ready at once; only
    a ``cn.open`` in the first seconds of a kernel's life can find them still loading.
    """
    if session.path in _warm_vaults:
        return
    status, _ = session.request({"op": "warmup", "wait": WARMUP_NOTICE_AFTER_S})
    started = time.monotonic()
    if status.get("state") not in ("ready", "failed"):
        print(
            "confnb: the vault is still loading its query engine (once per kernel); waiting...",
            file=sys.stderr,
            flush=True,
        )
        while status.get("state") not in ("ready", "failed"):
            if time.monotonic() - started > WARMUP_LIMIT_S:
                raise VaultError(f"the vault did not finish loading its libraries within {WARMUP_LIMIT_S:g} s")
            status, _ = session.request({"op": "warmup", "wait": WARMUP_POLL_S})
    if status.get("state") == "failed":
        raise VaultError(f"the vault could not load its libraries ({status.get('error', 'no reason given')})")
    _warm_vaults.add(session.path)


def _export_format(target: Path, chosen: str | None) -> str:
    if chosen is not None:
        wanted = chosen.lower().lstrip(".")
        if wanted not in EXPORT_FORMATS.values():
            raise ValueError(f"format is one of {', '.join(EXPORT_FORMATS.values())}")
        return wanted
    for suffix in reversed(target.suffixes):
        found = EXPORT_FORMATS.get(suffix.lower())
        if found is not None:
            return found
    raise ValueError(
        f"cannot tell the export format from {target.name!r}: end the name with "
        f"{', '.join(EXPORT_FORMATS)} or pass format=..."
    )


def recipient_hex(recipient: Any) -> str:
    """A recipient's P-256 public key as the uncompressed point in hex (what the vault's export op takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    problem = "the recipient is a P-256 public key: PEM text or bytes, the path of a PEM file, or a key object"
    key: object
    if isinstance(recipient, ec.EllipticCurvePublicKey):
        key = recipient
    else:
        data: bytes
        if isinstance(recipient, bytes | bytearray | memoryview):
            data = bytes(recipient)
        elif isinstance(recipient, str) and recipient.lstrip().startswith("-----BEGIN"):
            data = recipient.encode()
        elif isinstance(recipient, str | os.PathLike):
            try:
                data = Path(recipient).expanduser().read_bytes()
            except OSError as exc:
                raise ValueError(f"{problem}; cannot read {os.fspath(recipient)!r} ({exc.strerror})") from None
        else:
            raise TypeError(problem)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(data)
            elif len(data) == 65 and data[0] == 0x04:
                key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
            else:
                key = serialization.load_der_public_key(data)
        except ValueError:
            raise ValueError(problem) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{problem} (this key is not on P-256)")
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return point.hex()
