"""The launch handshake between the provisioner (analyst's side) and the launcher (inside the VM).

One JSON line each way over whatever carries the launcher's stdio (a local pipe, or SSH):

- request (provisioner → launcher): a fresh nonce, the provisioner's one-launch HPKE public key, the address to
  bind, the kernel's environment and optionally a display policy that can only *tighten* the default;
- response (launcher → provisioner): evidence binding the nonce and the kernel's public keys (CurveZMQ server key
  included), the ports, and the secrets a Jupyter client needs (HMAC session key, CurveZMQ key pair) HPKE-sealed
  to the provisioner's key with the evidence's claims in the HPKE ``info``.

So the host that relays these lines learns only public values, cannot move the sealed secrets onto other evidence,
and cannot replay an old response to a new request (the nonce). Nothing here is trusted until the provisioner has
verified the evidence.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confnb.attest.evidence import MAX_NONCE_BYTES, canonical_claims

REQUEST_FORMAT = "confnb-launch/1"
RESPONSE_FORMAT = "confnb-launch-response/1"
SECRETS_FORMAT = "confnb-launch-secrets/1"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# A response carries a report and up to three PEM certificates; a request carries an environment.
MAX_LINE_BYTES = 1 << 20
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_IP = re.compile(r"[0-9A-Za-z.:\-]{1,255}")


class HandshakeError(ValueError):
    """A launch request or response that is not what the other side must send; one line naming the field."""


def secrets_info(claims: Mapping[str, str]) -> bytes:
    """HPKE ``info`` for the sealed secrets: names the purpose and binds them to exactly these claims."""
    return SECRETS_FORMAT.encode() + b"\0" + hashlib.sha256(canonical_claims(claims)).digest()


@dataclass(frozen=True)
class LaunchRequest:
    nonce: bytes
    response_public_key: bytes  # uncompressed P-256 point, the provisioner's key for this launch only
    ip: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=dict)
    display: Mapping[str, Any] | None = None
    tee: str = "auto"

    def to_line(self) -> bytes:
        document: dict[str, Any] = {
            "format": REQUEST_FORMAT,
            "nonce": self.nonce.hex(),
            "response_public_key": base64.b64encode(self.response_public_key).decode("ascii"),
            "ip": self.ip,
            "env": dict(self.env),
            "tee": self.tee,
        }
        if self.display is not None:
            document["display"] = dict(self.display)
        return json.dumps(document, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> LaunchRequest:
        document = _document(line, REQUEST_FORMAT, "launch request")
        nonce = _hex(document, "nonce", "launch request")
        if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
            raise HandshakeError(f"launch request: nonce must be 1 to {MAX_NONCE_BYTES} bytes")
        key = _b64(document, "response_public_key", "launch request")
        ip = document.get("ip", "127.0.0.1")
        if not isinstance(ip, str) or not _IP.fullmatch(ip):
            raise HandshakeError("launch request: ip must be an IP address or host name")
        env = document.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(name, str) and _ENV_NAME.fullmatch(name) and isinstance(value, str) and "\0" not in value
            for name, value in env.items()
        ):
            raise HandshakeError("launch request: env must map variable names to strings")
        display = document.get("display")
        if display is not None and not isinstance(display, dict):
            raise HandshakeError("launch request: display must be an object")
        tee = document.get("tee", "auto")
        if not isinstance(tee, str):
            raise HandshakeError("launch request: tee must be a backend name")
        return cls(nonce=nonce, response_public_key=key, ip=ip, env=env, display=display, tee=tee)


@dataclass(frozen=True)
class LaunchSecrets:
    """What a Jupyter client needs besides public values; both halves of the CurveZMQ pair (jupyter_client's
    clients reuse the server pair for their own sockets, and the relay admits no other client key)."""

    key: bytes
    curve_publickey: bytes  # Z85
    curve_secretkey: bytes  # Z85

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": SECRETS_FORMAT,
                "key": self.key.decode("ascii"),
                "curve_publickey": self.curve_publickey.decode("ascii"),
                "curve_secretkey": self.curve_secretkey.decode("ascii"),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LaunchSecrets:
        document = _document(data, SECRETS_FORMAT, "launch secrets")
        values = []
        for name in ("key", "curve_publickey", "curve_secretkey"):
            value = document.get(name)
            if not isinstance(value, str) or not value.isascii() or not value:
                raise HandshakeError(f"launch secrets: {name} must be ASCII text")
            values.append(value.encode("ascii"))
        return cls(key=values[0], curve_publickey=values[1], curve_secretkey=values[2])


@dataclass(frozen=True)
class LaunchResponse:
    evidence: Mapping[str, Any]  # the confnb-evidence/1 bundle as a JSON object
    ip: str
    ports: Mapping[str, int]
    sealed_secrets: bytes
    transport: str = "tcp"
    signature_scheme: str = "hmac-sha256"

    def to_line(self) -> bytes:
        document = {
            "format": RESPONSE_FORMAT,
            "evidence": dict(self.evidence),
            "ip": self.ip,
            "transport": self.transport,
            "signature_scheme": self.signature_scheme,
            "ports": dict(self.ports),
            "sealed_secrets": base64.b64encode(self.sealed_secrets).decode("ascii"),
        }
        return json.dumps(document, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> LaunchResponse:
        document = _document(line, RESPONSE_FORMAT, "launch response")
        evidence = document.get("evidence")
        if not isinstance(evidence, dict):
            raise HandshakeError("launch response: evidence must be an object")
        ip = document.get("ip")
        if not isinstance(ip, str) or not _IP.fullmatch(ip):
            raise HandshakeError("launch response: ip must be an IP address or host name")
        if document.get("transport") != "tcp":
            raise HandshakeError("launch response: transport must be tcp")
        if document.get("signature_scheme") != "hmac-sha256":
            raise HandshakeError("launch response: signature_scheme must be hmac-sha256")
        ports = document.get("ports")
        if (
            not isinstance(ports, dict)
            or set(ports) != set(CHANNELS)
            or not all(type(port) is int and 0 < port < 65536 for port in ports.values())
        ):
            raise HandshakeError(f"launch response: ports must give a TCP port for each of {', '.join(CHANNELS)}")
        return cls(
            evidence=evidence,
            ip=ip,
            ports=ports,
            sealed_secrets=_b64(document, "sealed_secrets", "launch response"),
        )


def error_line(message: str) -> bytes:
    """What a launcher that cannot start says instead of a response (the provisioner shows it)."""
    return json.dumps({"format": RESPONSE_FORMAT, "error": message}, separators=(",", ":")).encode() + b"\n"


def launch_error(line: bytes) -> str | None:
    """The launcher's one-line error, if ``line`` is an error response."""
    try:
        document = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(document, dict) and document.get("format") == RESPONSE_FORMAT:
        error = document.get("error")
        if isinstance(error, str):
            return " ".join(error.split())[:500]
    return None


def _document(data: bytes, expected_format: str, what: str) -> dict[str, Any]:
    if len(data) > MAX_LINE_BYTES:
        raise HandshakeError(f"{what}: larger than {MAX_LINE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HandshakeError(f"{what}: not a JSON line") from None
    if not isinstance(document, dict) or document.get("format") != expected_format:
        raise HandshakeError(f"{what}: format is not {expected_format!r}")
    return document


def _hex(document: Mapping[str, Any], name: str, what: str) -> bytes:
    value = document.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        return bytes.fromhex(value)
    except ValueError:
        raise HandshakeError(f"{what}: {name} must be hex") from None


def _b64(document: Mapping[str, Any], name: str, what: str) -> bytes:
    value = document.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HandshakeError(f"{what}: {name} must be base64") from None
