#!/usr/bin/env python3
"""A stand-in for OpenSSH's ``ssh`` client, for tests: the "remote" host is this machine.

It understands the subset of ssh's command line that ``confnb.provisioner.ssh`` uses: ``-T``, ``-N``, ``-o X``,
``-p N``, ``-i F``, ``-l U``, ``-L [bind:]lport:host:rport``, ``--``, the host and a command (the remaining words,
joined with spaces like ssh does). With a command it replaces itself with ``/bin/sh -c command``, inheriting stdio,
so the command's exit status is its own. With ``-N`` it listens on every ``-L`` address and pumps bytes to the
target with threads until SIGTERM; with ``ExitOnForwardFailure=yes`` a port it cannot bind ends it with status 255.

Environment: ``FAKE_SSH_LOG`` (append argv as one JSON line), ``FAKE_SSH_HOST`` (the only host that resolves).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import NoReturn

FLAGS = {"-T", "-N"}
WITH_VALUE = {"-o", "-p", "-i", "-l", "-L"}


@dataclass
class Command:
    flags: set[str] = field(default_factory=set)
    options: list[str] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)
    host: str = ""
    command: list[str] = field(default_factory=list)


def fail(message: str) -> NoReturn:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(255)


def parse(argv: list[str]) -> Command:
    parsed = Command()
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if not arg.startswith("-"):
            break
        if arg in FLAGS:
            parsed.flags.add(arg)
            index += 1
            continue
        letter = arg[:2]
        if letter not in WITH_VALUE:
            fail(f"ssh: unknown option -- {arg[1:]}")
        if len(arg) > 2:
            value = arg[2:]
            index += 1
        elif index + 1 < len(argv):
            value = argv[index + 1]
            index += 2
        else:
            fail(f"ssh: option requires an argument -- {letter[1]}")
        if letter == "-o":
            parsed.options.append(value)
        elif letter == "-L":
            parsed.forwards.append(value)
    if index >= len(argv):
        fail("usage: ssh [-NT] [-i identity_file] [-L address] [-l login_name] [-o option] [-p port] destination")
    parsed.host = argv[index]
    parsed.command = argv[index + 1 :]
    return parsed


def split_forward(spec: str) -> tuple[str, int, str, int]:
    """``[bind:]lport:host:rport``, where an IPv6 host is written in brackets."""
    parts: list[str] = []
    rest = spec
    while rest:
        if rest.startswith("["):
            end = rest.index("]")
            parts.append(rest[1:end])
            rest = rest[end + 1 :].removeprefix(":")
        else:
            head, _, rest = rest.partition(":")
            parts.append(head)
    if len(parts) == 3:
        parts.insert(0, "localhost")
    if len(parts) != 4:
        fail(f"Bad local forwarding specification '{spec}'")
    return parts[0], int(parts[1]), parts[2], int(parts[3])


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(listener: socket.socket, host: str, port: int, channel: list[int]) -> None:
    while True:
        client, _ = listener.accept()
        channel[0] += 1
        try:
            upstream = socket.create_connection((host, port))
        except OSError as exc:
            sys.stderr.write(f"channel {channel[0]}: open failed: connect failed: {exc.strerror}\n")
            sys.stderr.flush()
            client.close()
            continue
        pumps = [
            threading.Thread(target=pump, args=(client, upstream), daemon=True),
            threading.Thread(target=pump, args=(upstream, client), daemon=True),
        ]
        for thread in pumps:
            thread.start()
        threading.Thread(target=close_after, args=(pumps, client, upstream), daemon=True).start()


def close_after(pumps: list[threading.Thread], *sockets: socket.socket) -> None:
    for thread in pumps:
        thread.join()
    for sock in sockets:
        sock.close()


def forward(parsed: Command) -> None:
    exit_on_failure = any(option.lower() == "exitonforwardfailure=yes" for option in parsed.options)
    listeners: list[tuple[socket.socket, str, int]] = []
    for spec in parsed.forwards:
        bind, lport, host, rport = split_forward(spec)
        listener = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((bind, lport))
            listener.listen(16)
        except OSError as exc:
            listener.close()
            sys.stderr.write(f"bind [{bind}]:{lport}: {exc.strerror}\n")
            sys.stderr.write(f"channel_setup_fwd_listener_tcpip: cannot listen to port: {lport}\n")
            if exit_on_failure:
                fail("Could not request local forwarding.")
            sys.stderr.write("Warning: Could not request local forwarding.\n")
            continue
        listeners.append((listener, host, rport))
    channel = [1]
    for listener, host, rport in listeners:
        threading.Thread(target=serve, args=(listener, host, rport, channel), daemon=True).start()
    threading.Event().wait()  # until SIGTERM, whose default action ends the process


def main() -> None:
    argv = sys.argv[1:]
    log = os.environ.get("FAKE_SSH_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(argv) + "\n")
    parsed = parse(argv)
    expected = os.environ.get("FAKE_SSH_HOST")
    if expected is not None and parsed.host != expected:
        fail(f"ssh: Could not resolve hostname {parsed.host}: Name or service not known")
    if "-N" in parsed.flags:
        forward(parsed)
    elif parsed.command:
        os.execv("/bin/sh", ["/bin/sh", "-c", " ".join(parsed.command)])
    else:
        fail("fake ssh: an interactive shell is not supported, give a command or -N")


if __name__ == "__main__":
    main()
