"""Benchmark: key releases by a real ``confnb broker serve`` process on loopback, against baselines from the same run.

One run creates a fresh owner store in a temporary directory with one dataset whose attestation policy accepts the
simulated TEE and pins its measurement, starts ``confnb broker serve`` on 127.0.0.1 as a subprocess, and then, for
each number of concurrent clients (default 1 and 16), over keep-alive HTTP/1.1 connections (one per client thread),
with a bounded number of requests per phase (default 500):

1. ``GET /healthz`` (first half of the baseline): the same server's trivial endpoint, i.e. the floor of any request;
2. ``POST /v1/challenge`` for every release to come (each timed);
3. not timed: one evidence bundle per nonce from the simulated TEE, serialized to the request body, so the client's
   evidence generation is no part of any figure and does not compete with the server for the CPUs meanwhile;
4. ``POST /v1/datasets/bench/key-release`` with each bundle (each timed; every answer must be 200);
5. ``GET /healthz`` again (second half of the baseline, so slow drift of the machine's speed hits both sides).

"Key release" latency is the challenge round trip plus the release round trip of the same request (challenge i is
paired with release i), i.e. what a kernel waits for on the network; its throughput is the number of releases over
the wall time of phases 2 and 4 together. The release call alone is reported too. The cryptographic floor of a
release is one warm in-process ``confnb.attest.verify_evidence`` call on a parsed bundle with the dataset's policy,
timed before the server starts and after it stops (pooled). Ratios: key release p50 / healthz p50 and / floor p50.

The clients run in this process and the server in another, on the same machine: on 2 vCPUs they compete for the CPUs,
and the client threads for this process's GIL, which is part of every figure (both sides of each ratio alike).

At the end the audit log is verified: intact chain, one ``release`` entry for each 200 (by nonce: none missing, none
doubled, none extra) and one ``challenge`` entry per challenge. Exit status 0 when every release succeeded and the
audit matches, 1 otherwise. Nothing leaves loopback (``CONFNB_OFFLINE=1``), every loop is bounded, and the broker is
stopped and the temporary directory removed at the end. Run with::

    python benchmarks/broker_release.py [--clients 1,16] [--requests 500] [--floor-rounds 500] [--json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from confnb.attest import AttestationPolicy, Evidence, verify_evidence
from confnb.broker.audit import verify_log
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee.simulated import SimulatedBackend

HOST = "127.0.0.1"
DATASET = "bench"
CURVE_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # any Z85 text: the broker only binds it, never uses it
JSON_HEADERS = {"Content-Type": "application/json"}
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
PHASE_TIMEOUT_S = 300.0  # a phase that has not finished by then stops taking new requests (and the run fails)
WARMUP = 10


# -- statistics -------------------------------------------------------------------------------------------------------


def summary(latencies_s: Sequence[float], wall_s: float | None = None) -> dict[str, float]:
    """p50/p99/mean in milliseconds and, given the phase's wall time, requests per second."""
    if len(latencies_s) < 2:
        raise RuntimeError(f"only {len(latencies_s)} successful requests: too few to summarise")
    cuts = statistics.quantiles(latencies_s, n=100, method="inclusive")
    figures = {
        "p50_ms": cuts[49] * 1e3,
        "p99_ms": cuts[98] * 1e3,
        "mean_ms": statistics.fmean(latencies_s) * 1e3,
    }
    if wall_s is not None:
        figures["per_s"] = len(latencies_s) / wall_s
    return figures


# -- the broker process -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@contextmanager
def broker_process(owner: Path, log: Path) -> Iterator[int]:
    """``confnb broker serve`` on a free loopback port until the block ends; yields the port."""
    port = _free_port()
    command = [sys.executable, "-m", "confnb", "broker", "serve", "--dir", str(owner), "--host", HOST]
    # Every challenge of a phase is issued before its releases, all from this one address: lift the per-address
    # cap (64 by default, there against floods) above what one phase holds.
    command += ["--challenges-per-client", "1000000"]
    with log.open("wb") as sink:  # a file, not a pipe that nobody reads while the load runs
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if request(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"the broker exited with {process.returncode}: {log.read_text().strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not answer within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        yield port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection (set-up and checks, never timed)."""
    connection = HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=JSON_HEADERS if body is not None else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- load phases ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: bytes | None = None


@dataclass
class Phase:
    """Every request's latency, status and body (in request order), and the phase's wall time."""

    latencies: list[float]
    statuses: list[int]
    bodies: list[bytes]
    wall: float
    errors: list[str] = field(default_factory=list)


def run_phase(port: int, clients: int, calls: Sequence[Call]) -> Phase:
    """Send ``calls`` with ``clients`` threads, each on its own keep-alive connection, as fast as answers come."""
    latencies = [0.0] * len(calls)
    statuses = [0] * len(calls)
    bodies = [b""] * len(calls)
    errors: list[str] = []
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(calls)):
        work.put(index)
    ready = threading.Barrier(clients + 1, timeout=START_TIMEOUT_S)
    finished = [0.0] * clients
    clock = time.perf_counter
    deadline = time.monotonic() + PHASE_TIMEOUT_S

    def client(slot: int) -> None:
        connection = HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        try:
            with contextlib.suppress(OSError):  # outside the timed section; a failure shows in the first request
                connection.connect()
            ready.wait()
            while True:
                try:
                    index = work.get_nowait()
                except queue.Empty:
                    break
                if time.monotonic() > deadline:
                    errors.append(f"the phase took longer than {PHASE_TIMEOUT_S:g} s")
                    break
                call = calls[index]
                headers = JSON_HEADERS if call.body is not None else {}
                start = clock()
                try:
                    connection.request(call.method, call.path, body=call.body, headers=headers)
                    response = connection.getresponse()
                    body = response.read()
                except (OSError, HTTPException) as error:  # recorded; the client carries on, reconnected
                    errors.append(f"{call.method} {call.path}: {error}")
                    connection.close()
                    connection = HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
                    statuses[index] = -1
                    continue
                latencies[index] = clock() - start
                statuses[index], bodies[index] = response.status, body
            finished[slot] = clock()
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(slot,), daemon=True) for slot in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = clock()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S + 5)
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a client thread did not finish")
    return Phase(latencies, statuses, bodies, max(finished) - start, errors)


# -- one concurrency level --------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    """What the benchmark's "kernel" needs to ask for keys: the simulated TEE and its fresh public keys."""

    backend: SimulatedBackend
    hpke_key: ec.EllipticCurvePrivateKey
    hpke_public: bytes
    signing_public: bytes

    @classmethod
    def new(cls, backend: SimulatedBackend) -> Kernel:
        hpke_key = ec.generate_private_key(ec.SECP256R1())
        return cls(
            backend,
            hpke_key,
            hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
            ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )

    def evidence(self, nonce: bytes) -> Evidence:
        return issue_evidence(
            self.backend,
            nonce,
            hpke_public_key=self.hpke_public,
            signing_public_key=self.signing_public,
            curve_public_key=CURVE_KEY,
        )


@dataclass
class Tally:
    """Everything the audit log must show at the end."""

    challenges: int = 0
    granted: list[str] = field(default_factory=list)  # nonces of every 200 release
    failures: list[str] = field(default_factory=list)


def challenge_and_release(port: int, kernel: Kernel, clients: int, count: int, tally: Tally) -> tuple[Phase, Phase]:
    """Phases 2 to 4: ``count`` challenges, their evidence (untimed), then ``count`` releases."""
    challenges = run_phase(port, clients, [Call("POST", "/v1/challenge", b"{}")] * count)
    tally.challenges += sum(status == 200 for status in challenges.statuses)
    tally.failures += challenges.errors
    nonces: list[str] = []
    for status, body in zip(challenges.statuses, challenges.bodies, strict=True):
        if status != 200:
            raise RuntimeError(f"a challenge was answered {status}: {body[:200]!r}")
        nonces.append(json.loads(body)["nonce"])
    path = f"/v1/datasets/{DATASET}/key-release"
    calls = [
        Call("POST", path, json.dumps({"evidence": kernel.evidence(bytes.fromhex(nonce)).to_dict()}).encode())
        for nonce in nonces
    ]
    releases = run_phase(port, clients, calls)
    tally.failures += releases.errors
    for nonce, status, body in zip(nonces, releases.statuses, releases.bodies, strict=True):
        if status == 200:
            tally.granted.append(nonce)
        else:
            tally.failures.append(f"release answered {status}: {body[:200]!r}")
    return challenges, releases


def bench_level(
    port: int, kernel: Kernel, clients: int, requests: int, dataset_key: bytes, tally: Tally
) -> dict[str, Any]:
    health = [Call("GET", "/healthz")]
    first = run_phase(port, clients, health * (requests // 2))
    challenges, releases = challenge_and_release(port, kernel, clients, requests, tally)
    second = run_phase(port, clients, health * (requests - requests // 2))
    tally.failures += first.errors + second.errors
    if any(status != 200 for status in first.statuses + second.statuses):
        tally.failures.append("a /healthz request was not answered 200")

    ok = [i for i, status in enumerate(releases.statuses) if status == 200]
    # The keys really are released: a grant opens, with the kernel's HPKE key, to the dataset key.
    grant = json.loads(releases.bodies[ok[0]]) if ok else {}
    if not grant or dataset_key != hpke.open_sealed(
        kernel.hpke_key, base64.b64decode(grant["sealed_key"]), grant["hpke_info"].encode()
    ):
        tally.failures.append("no sealed key opened to the dataset key")

    key_release = [challenges.latencies[i] + releases.latencies[i] for i in ok]
    healthz = [
        latency
        for phase in (first, second)
        for latency, status in zip(phase.latencies, phase.statuses, strict=True)
        if status == 200
    ]
    return {
        "clients": clients,
        "requests": requests,
        "healthz": summary(healthz, first.wall + second.wall),
        "challenge": summary(challenges.latencies, challenges.wall),
        "release_call": summary([releases.latencies[i] for i in ok], releases.wall),
        "key_release": summary(key_release, challenges.wall + releases.wall),
    }


# -- the cryptographic floor ------------------------------------------------------------------------------------------


def verify_floor(kernel: Kernel, policy: AttestationPolicy, rounds: int) -> list[float]:
    """Seconds per warm in-process ``verify_evidence`` call, over distinct bundles (as the broker sees them)."""
    bundles = [kernel.evidence(os.urandom(32)) for _ in range(min(rounds, 100))]
    nonces = [bytes.fromhex(bundle.claims["nonce"]) for bundle in bundles]
    for bundle, nonce in zip(bundles, nonces, strict=True):  # warm every memo, and check the floor is a pass
        result = verify_evidence(bundle, policy, nonce=nonce)
        if not result.ok:
            raise RuntimeError(f"the simulated evidence does not pass the policy: {result.summary()}")
    clock = time.perf_counter
    times = []
    for index in range(rounds):
        bundle, nonce = bundles[index % len(bundles)], nonces[index % len(nonces)]
        start = clock()
        verify_evidence(bundle, policy, nonce=nonce)
        times.append(clock() - start)
    return times


# -- the audit check --------------------------------------------------------------------------------------------------


def audit_check(store: OwnerStore, tally: Tally) -> dict[str, Any]:
    verification = verify_log(store.directory / "audit.sqlite", store.owner_public_key)
    kinds = Counter(entry.kind.value for entry in verification.entries)
    logged = Counter(entry.detail.get("nonce") for entry in verification.entries if entry.kind == "release")
    granted = Counter(tally.granted)
    return {
        "intact": verification.ok,
        "entries": len(verification.entries),
        "releases_granted": len(tally.granted),
        "release_entries": kinds["release"],
        "each_grant_logged_once": logged == granted and max(granted.values(), default=1) == 1,
        "challenges_issued": tally.challenges,
        "challenge_entries": kinds["challenge"],
        "denial_entries": kinds["denial"],
        "problems": verification.problems[:5],
    }


# -- main -------------------------------------------------------------------------------------------------------------


def run(
    clients: Sequence[int], requests: int, floor_rounds: int, tee_dir: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="confnb-broker-bench-") as scratch:
        root = Path(scratch)
        log("simulated TEE: " + ("using " + str(tee_dir) if tee_dir else "generating a chip in a temporary directory"))
        backend = SimulatedBackend(state_dir=tee_dir or root / "tee")
        attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{backend.measurement.hex()}"]\n'
        store = OwnerStore.create(root / "owner")
        try:
            _, dataset_key = store.register_dataset(
                DATASET, OutputPolicy.from_toml('[policy]\nid = "bench"\n'), attestation
            )
            kernel = Kernel.new(backend)
            policy = AttestationPolicy.from_toml(attestation)
            tally = Tally()
            log("verify floor (before the server starts)")
            floor = verify_floor(kernel, policy, floor_rounds // 2)
            levels = []
            with broker_process(store.directory, root / "broker.log") as port:
                challenge_and_release(port, kernel, 1, WARMUP, tally)  # first requests pay imports and cold caches
                for count in clients:
                    log(f"{count} client{'s' if count != 1 else ''}: {requests} requests per phase")
                    levels.append(bench_level(port, kernel, count, requests, dataset_key, tally))
            log("verify floor (after the server stopped)")
            floor += verify_floor(kernel, policy, floor_rounds - floor_rounds // 2)
            audit = audit_check(store, tally)
        finally:
            store.audit.close()
    floor_figures = summary(floor)
    for level in levels:
        level["ratios"] = {
            "key_release_p50_vs_healthz_p50": level["key_release"]["p50_ms"] / level["healthz"]["p50_ms"],
            "key_release_p50_vs_verify_floor_p50": level["key_release"]["p50_ms"] / floor_figures["p50_ms"],
            "release_call_p50_vs_healthz_p50": level["release_call"]["p50_ms"] / level["healthz"]["p50_ms"],
            "release_call_p50_vs_verify_floor_p50": level["release_call"]["p50_ms"] / floor_figures["p50_ms"],
        }
    ok = (
        not tally.failures
        and audit["intact"]
        and audit["each_grant_logged_once"]
        and audit["challenge_entries"] == audit["challenges_issued"]
    )
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": None,
        },
        "settings": {"clients": list(clients), "requests_per_phase": requests, "floor_rounds": floor_rounds},
        "verify_floor": floor_figures,
        "levels": levels,
        "audit": audit,
        "failures": tally.failures[:10],
        "ok": ok,
    }


def summary_of(figures: dict[str, Any]) -> dict[str, Any]:
    """The README row: no target, only the ratios of the first client level (and a failure if the audit failed)."""
    level = figures["levels"][0]
    ratios = level["ratios"]
    times = "\N{MULTIPLICATION SIGN}"
    return {
        "figure": f"key release p50 vs `GET /healthz` / vs `verify_evidence` ({level['clients']} client(s))",
        "result": f"{ratios['key_release_p50_vs_healthz_p50']:.1f}{times} / "
        f"{ratios['key_release_p50_vs_verify_floor_p50']:.1f}{times}",
        "target": "reported",
        "met": None if figures["ok"] else False,
    }


def print_table(figures: dict[str, Any]) -> None:
    floor = figures["verify_floor"]
    machine = figures["machine"]
    print(
        f"confnb broker on loopback: {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{figures['settings']['requests_per_phase']} requests per phase, keep-alive connections"
    )
    print(f"verify floor (in-process verify_evidence): p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms\n")
    print(f"{'clients':>7}  {'what':<32} {'p50 ms':>8} {'p99 ms':>8} {'per s':>8}")
    rows = (
        ("healthz", "GET /healthz"),
        ("challenge", "POST challenge"),
        ("release_call", "POST key-release"),
        ("key_release", "key release (challenge+release)"),
    )
    for level in figures["levels"]:
        for key, label in rows:
            row = level[key]
            print(f"{level['clients']:>7}  {label:<32} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['per_s']:8.0f}")
        ratios = level["ratios"]
        print(
            f"{'':>7}  key release p50 = {ratios['key_release_p50_vs_healthz_p50']:.1f}x healthz p50, "
            f"{ratios['key_release_p50_vs_verify_floor_p50']:.1f}x the verify floor "
            f"(release call alone: {ratios['release_call_p50_vs_healthz_p50']:.1f}x, "
            f"{ratios['release_call_p50_vs_verify_floor_p50']:.1f}x)"
        )
    audit = figures["audit"]
    verdict = "OK" if figures["ok"] else "FAILED"
    print(
        f"\naudit {verdict}: {audit['releases_granted']} releases answered 200, {audit['release_entries']} release "
        f"entries, each grant logged {'exactly once' if audit['each_grant_logged_once'] else 'NOT exactly once'}; "
        f"{audit['challenge_entries']}/{audit['challenges_issued']} challenges logged; "
        f"chain of {audit['entries']} entries {'intact' if audit['intact'] else 'NOT intact'}"
    )
    for failure in figures["failures"]:
        print(f"  failure: {failure}")


def main() -> int:
    from _provenance import Provenance, add_output_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--clients",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16],
        help="comma-separated numbers of concurrent clients (default 1,16)",
    )
    parser.add_argument("--requests", type=int, default=500, help="requests per phase and level (default 500)")
    parser.add_argument("--floor-rounds", type=int, default=500, help="timed verify_evidence calls (default 500)")
    parser.add_argument("--tee-dir", type=Path, help="reuse this simulated TEE state (default: a fresh temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "broker_release")
    args = parser.parse_args()
    provenance = Provenance("broker_release")
    if args.requests < 2 or args.floor_rounds < 2 or not args.clients or min(args.clients) < 1:
        parser.error("--requests and --floor-rounds must be at least 2, and every client count at least 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    # Read at every KDS lookup, here and (inherited) in the broker: neither may ever reach AMD's KDS.
    os.environ["CONFNB_OFFLINE"] = "1"

    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete with the broker and its clients")
    started = time.monotonic()
    figures = run(args.clients, args.requests, args.floor_rounds, args.tee_dir, log)
    figures["machine"]["load_average_at_start"] = load
    figures["seconds"] = time.monotonic() - started
    figures = provenance.record(figures, summary_of(figures), args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
