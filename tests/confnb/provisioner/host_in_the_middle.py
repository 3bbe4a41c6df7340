#!/usr/bin/env python3
"""A hostile host between the provisioner and a real launcher: it relays the handshake but may change it.

Usage: host_in_the_middle.py MODE RECORD_FILE -- LAUNCHER_ARGV...

Modes: ``record`` passes everything through and saves the launcher's response line to RECORD_FILE; ``replay``
answers with the recorded (old, genuinely signed) response instead of the new one; ``swap-secrets`` seals the
host's own channel keys to the provisioner's public key (which it saw in the request) in place of the
launcher's; ``tamper-claims`` replaces the attested CurveZMQ key in the evidence claims with the host's.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading

import zmq

from confnb import hpke
from kernel_enclave.handshake import LaunchRequest, LaunchSecrets, secrets_info


def main() -> int:
    mode, record, separator, *argv = sys.argv[1:]
    assert separator == "--"
    request_line = sys.stdin.buffer.readline()
    request = LaunchRequest.from_line(request_line)
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(request_line)
    child.stdin.flush()
    line = child.stdout.readline()
    if mode == "record":
        with open(record, "wb") as handle:
            handle.write(line)
    elif mode == "replay":
        with open(record, "rb") as handle:
            line = handle.read()
    else:
        response = json.loads(line)
        public, secret = zmq.curve_keypair()
        claims = response["evidence"]["claims"]
        if mode == "tamper-claims":
            claims["curve_public_key"] = public.decode()
        fake = LaunchSecrets(key=b"host-chosen-key", curve_publickey=public, curve_secretkey=secret)
        sealed = hpke.seal(request.response_public_key, fake.to_bytes(), secrets_info(claims))
        response["sealed_secrets"] = base64.b64encode(sealed).decode()
        line = json.dumps(response).encode() + b"\n"
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()

    def pump_stdin() -> None:
        shutil.copyfileobj(sys.stdin.buffer, child.stdin)  # type: ignore[misc]
        child.stdin.close()  # type: ignore[union-attr]

    threading.Thread(target=pump_stdin, daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
