"""Obtaining a dataset key from its owner's broker: challenge, fresh evidence, sealed key, signed policy.

The vault asks the broker for a nonce, has the TEE bind it (with the vault's HPKE public key) into a report, and
presents that evidence; the broker answers with the dataset key sealed to that HPKE key, so only this VM can open
it. The broker's address comes from confnb's configuration (an argument, else ``CONFNB_BROKER_URL``), never from
a dataset file: a file chosen by the host must not be able to send the kernel's evidence to a server of its choice.
The owner's signature over the output policy is checked against the owner key the dataset's manifest pins.

A broker that is down, restarting or slow is retried a bounded number of times with a growing pause (a fresh
challenge each time: a nonce is good for one request only), then the release fails with one line naming the
broker's URL and the cause. A refusal (403, 404, 400) is an answer, not a fault, and is never retried.

Each attempt is journaled for the kernel's audit log so that it can be reconciled with the broker's (see
:func:`kernel_enclave.vault.audit.key_release_outcomes`): ``key-request`` with the nonce *before* the evidence
leaves the vault, then ``key-received`` once the sealed key opened, or ``key-request-failed`` with the cause. A
journal that cannot write (a full disk) stops the attempt before the broker sees the evidence.
"""

from __future__ import annotations

import base64
import binascii
import errno
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee.base import TeeBackend

BROKER_URL_VARIABLE = "CONFNB_BROKER_URL"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})  # the broker is busy or failing, not refusing

#: ``journal(event, fields)``: records one step of a release in the kernel's audit log; raising stops the release.
Journal = Callable[[str, Mapping[str, Any]], object]


class KeyReleaseError(RuntimeError):
    """The broker refused the key (the message carries its reason) or could not be reached."""


class _TransientError(KeyReleaseError):
    """A fault worth another attempt: the broker did not answer, or answered that it cannot serve now."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long a release keeps trying a broker that does not answer: bounded in attempts and in time.

    The defaults ride out a broker restart (pauses of about 0.5, 1, 2 and 4 s: a restart has 7.5 s to come back)
    and give up on a broker that is down within about 8 s, on one that accepts connections but never answers within
    about 40 s (``timeout_s`` per request, and no new attempt after ``total_s``).
    """

    attempts: int = 5
    first_pause_s: float = 0.5
    max_pause_s: float = 4.0
    timeout_s: float = 10.0  # per HTTP request
    total_s: float = 30.0  # no new attempt starts after this

    def pause(self, attempt: int) -> float:
        """Exponential, with jitter so that kernels refused together do not come back together."""
        base: float = min(self.max_pause_s, self.first_pause_s * 2.0 ** (attempt - 1))
        return base * (0.75 + random.random() / 2)  # noqa: S311 - spacing retries, not secrets


@dataclass(frozen=True)
class ReleasedKey:
    dataset_id: str
    key_id: str
    key: bytes
    output_policy: dict[str, Any]  # verified: signed by the dataset owner's key
    nonce: str = ""  # the broker's challenge, hex: the broker's audit log records it with the release
    evidence_digest: str = ""  # the evidence this kernel presented (``Evidence.digest``)

    def __repr__(self) -> str:  # the key never appears in logs or tracebacks
        return f"ReleasedKey(dataset_id={self.dataset_id!r}, key_id={self.key_id!r}, key=<secret>)"


def broker_url(explicit: str | None = None) -> str:
    url = explicit or os.environ.get(BROKER_URL_VARIABLE, "")
    if not url:
        raise KeyReleaseError(f"no broker configured: pass broker=... or set {BROKER_URL_VARIABLE}")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise KeyReleaseError(f"broker URL must be http(s), not {scheme or 'schemeless'}: {url!r}")
    return url.rstrip("/")


class BrokerClient:
    """Key releases for one kernel: its TEE, its HPKE key pair and its public signing and CurveZMQ keys."""

    def __init__(
        self,
        backend: TeeBackend,
        hpke_private_key: ec.EllipticCurvePrivateKey,
        signing_public_key: bytes,
        curve_public_key: str,
        url: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = broker_url(url)
        self.retry = retry or RetryPolicy()
        self._backend = backend
        self._hpke_key = hpke_private_key
        self._hpke_public = hpke_private_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        self._signing_public = signing_public_key
        self._curve_public = curve_public_key

    def release(self, dataset_id: str, owner_public_key: bytes, journal: Journal | None = None) -> ReleasedKey:
        """The key of ``dataset_id``, if the owner's broker accepts this kernel's attestation.

        Transient faults are retried under :attr:`retry`; the final error names the broker, the attempts and the
        last cause. ``journal`` receives each attempt's steps (see the module's docstring).
        """
        record: Journal = journal or (lambda event, fields: None)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(dataset_id, owner_public_key, record, attempt)
            except _TransientError as exc:
                elapsed = time.monotonic() - started
                pause = self.retry.pause(attempt)
                if attempt >= self.retry.attempts or elapsed + pause >= self.retry.total_s:
                    tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
                    raise KeyReleaseError(f"{exc} (gave up after {tries} in {elapsed:.1f} s)") from None
                time.sleep(pause)

    def _attempt(self, dataset_id: str, owner_public_key: bytes, journal: Journal, attempt: int) -> ReleasedKey:
        challenge = self._post("/v1/challenge", {})
        try:
            nonce = bytes.fromhex(str(challenge["nonce"]))
        except (KeyError, ValueError):
            raise KeyReleaseError("the broker's challenge carries no hex nonce") from None
        evidence = issue_evidence(
            self._backend,
            nonce,
            hpke_public_key=self._hpke_public,
            signing_public_key=self._signing_public,
            curve_public_key=self._curve_public,
        )
        path = f"/v1/datasets/{urllib.parse.quote(dataset_id, safe='')}/key-release"
        step = {"dataset": dataset_id, "broker": self.url, "nonce": nonce.hex(), "attempt": attempt}
        journal("key-request", step)  # durable before the evidence leaves: a broker's release always has its twin
        try:
            released = self._open_grant(self._post(path, {"evidence": evidence.to_dict()}), dataset_id, nonce)
        except KeyReleaseError as exc:
            journal("key-request-failed", {**step, "cause": str(exc)[:500]})
            raise
        key_id, key, policy, signature = released
        journal("key-received", {**step, "key_id": key_id})
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(owner_public_key).verify(
                signature, json.dumps(policy, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            )
        except (InvalidSignature, ValueError):
            raise KeyReleaseError(f"the output policy of {dataset_id!r} is not signed by the dataset's owner") from None
        return ReleasedKey(dataset_id, key_id, key, policy, nonce.hex(), evidence.digest())

    def _open_grant(
        self, grant: dict[str, Any], dataset_id: str, nonce: bytes
    ) -> tuple[str, bytes, dict[str, Any], bytes]:
        """The key, its id and the signed policy from a grant made for this request and this kernel."""
        try:
            sealed = base64.b64decode(grant["sealed_key"], validate=True)
            info = str(grant["hpke_info"]).encode()
            policy = grant["output_policy"]
            signature = base64.b64decode(grant["output_policy_signature"], validate=True)
            key_id = str(grant["key_id"])
        except (KeyError, TypeError, binascii.Error):
            raise KeyReleaseError("the broker's answer is not a key release") from None
        expected_info = json.dumps(["confnb-key-release/1", dataset_id, key_id, nonce.hex()], separators=(",", ":"))
        if info != expected_info.encode():
            raise KeyReleaseError("the sealed key was made for another dataset or request")
        if not isinstance(policy, dict):
            raise KeyReleaseError("the broker's answer is not a key release")
        try:
            key = hpke.open_sealed(self._hpke_key, sealed, info)
        except hpke.HpkeError:
            raise KeyReleaseError("the sealed key does not open with this kernel's attested key") from None
        return key_id, key, policy, signature

    def _post(self, path: str, body: object) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked in broker_url
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.retry.timeout_s) as response:  # noqa: S310
                document = json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:  # it holds the connection's socket
                try:
                    reason = json.loads(error.read()).get("reason", error.reason)
                except (ValueError, AttributeError, OSError, http.client.HTTPException):
                    reason = error.reason
            problem = f"broker {self.url} refused ({error.code}): {reason}"
            raise (_TransientError if error.code in RETRYABLE_STATUS else KeyReleaseError)(problem) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _TransientError(f"broker {self.url} unreachable: {_cause(error)}") from None
        except ValueError:
            raise KeyReleaseError(f"broker {self.url} answered with something that is not JSON") from None
        if not isinstance(document, dict):
            raise KeyReleaseError("the broker's answer is not a JSON object")
        return document


def _cause(error: BaseException) -> str:
    """The cause of a failed request in a few words, not urllib's nested reprs."""
    reason: object = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError | socket.timeout):
        return "no answer in time (timed out)"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the connection closed before an answer"
    if isinstance(reason, http.client.IncompleteRead):
        return "the answer was cut off"
    if isinstance(reason, OSError) and reason.errno is not None:
        return f"{reason.strerror or errno.errorcode.get(reason.errno, reason.errno)}".lower()
    return str(reason) or type(reason).__name__
