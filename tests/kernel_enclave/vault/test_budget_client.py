"""The vault's side of a privacy-budget charge, against a real broker on loopback (the key obtained first through a
real, simulated-TEE key release): acknowledged charges, refusals, a broker that is down or silent, and answers
altered on the way."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from confnb.attest import Verifier
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.tee.base import TeeBackend
from kernel_enclave.vault.broker_client import BrokerClient
from kernel_enclave.vault.budget_client import BudgetClient, BudgetError, Charge
from kernel_enclave.vault.keys import VaultKeys

PLAN = "sha256:" + "cd" * 32
ATTESTATION = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'


def _policy(ident: str, privacy: str) -> OutputPolicy:
    return OutputPolicy.from_toml(f'[policy]\nid = "{ident}"\n[release]\nallow = ["aggregate"]\n{privacy}')


@dataclass
class Setting:
    url: str
    store: OwnerStore
    keys: VaultKeys

    @property
    def owner_key(self) -> bytes:
        return self.store.owner_public_key.public_bytes_raw()

    def client(self, url: str | None = None, timeout_s: float = 10.0) -> BudgetClient:
        owners = {"dp": self.owner_key, "exact": self.owner_key}
        return BudgetClient(url or self.url, self.keys.signing_key, owners, timeout_s)


@pytest.fixture
def setting(tmp_path: Path, simulated_backend: TeeBackend) -> Iterator[Setting]:
    store = OwnerStore.create(tmp_path / "owner")
    store.register_dataset("dp", _policy("dp-v1", '[privacy]\nmode = "dp"\nepsilon = 0.5\ndelta = 1e-6\n'), ATTESTATION)
    store.register_dataset("exact", _policy("exact-v1", ""), ATTESTATION)
    keys = VaultKeys.generate()
    with serve_locally(store, Verifier()) as url:
        releases = BrokerClient(
            simulated_backend, keys.hpke_private_key, keys.signing_public_key, keys.curve_public_key, url=url
        )
        for dataset in ("dp", "exact"):
            releases.release(dataset, store.owner_public_key.public_bytes_raw())
        yield Setting(url, store, keys)


def test_a_charge_is_acknowledged_by_the_owner_and_names_this_request(setting: Setting) -> None:
    client = setting.client()
    first = client.charge("dp", 0.2, 1e-7, PLAN)
    assert isinstance(first, Charge)
    assert (first.dataset_id, first.epsilon, first.delta, first.plan_digest) == ("dp", 0.2, 1e-7, PLAN)
    assert (first.epsilon_spent, first.epsilon_remaining) == (0.2, 0.3)
    assert first.delta_spent == 1e-7 and first.delta_remaining == pytest.approx(9e-7, abs=1e-18)
    assert len(first.nonce) == 32 and first.time.endswith("Z")
    second = client.charge("dp", 0.3, 0.0, PLAN)
    assert second.nonce != first.nonce and second.charge_id != first.charge_id
    assert (second.epsilon_spent, second.epsilon_remaining) == (0.5, 0.0)
    state = client.budget("dp")
    assert (state["mode"], state["epsilon_spent"], state["epsilon_remaining"], state["charges"]) == ("dp", 0.5, 0.0, 2)


def test_a_refusal_is_a_budget_error_with_the_brokers_reason(setting: Setting) -> None:
    client = setting.client()
    client.charge("dp", 0.5, 0.0, PLAN)
    with pytest.raises(BudgetError, match=r"refused \(403\): budget: charging epsilon 0.1 would exceed"):
        client.charge("dp", 0.1, 0.0, PLAN)
    with pytest.raises(BudgetError, match=r"refused \(403\): budget: the dataset is not in differential-privacy"):
        client.charge("exact", 0.1, 0.0, PLAN)
    # A kernel whose key never received the dataset's key is refused; the twin above was not.
    stranger = BudgetClient(setting.url, VaultKeys.generate().signing_key, {"dp": setting.owner_key})
    with pytest.raises(BudgetError, match=r"refused \(403\): kernel_key: "):
        stranger.charge("dp", 0.0001, 0.0, PLAN)
    with pytest.raises(BudgetError, match="epsilon must be finite and greater than 0"):
        client.charge("dp", float("nan"), 0.0, PLAN)
    with pytest.raises(BudgetError, match="no owner key is known for dataset 'other'"):
        client.charge("other", 0.1, 0.0, PLAN)
    assert client.budget("dp")["charges"] == 1


def test_a_broker_that_is_down_or_silent_fails_the_charge(setting: Setting) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(BudgetError, match=f"broker {closed} unreachable: .*nothing was released"):
        setting.client(closed).charge("dp", 0.1, 0.0, PLAN)
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(BudgetError, match="unreachable: no answer in time"):
            setting.client(url, timeout_s=0.5).charge("dp", 0.1, 0.0, PLAN)
    assert setting.client().charge("dp", 0.1, 0.0, PLAN).epsilon_spent == 0.1  # the twin, through the real broker
    with pytest.raises(BudgetError, match="must be http"):
        BudgetClient("file:///etc/passwd", setting.keys.signing_key, {})


Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


@contextmanager
def _relay(target: str, rewrite: Rewrite) -> Iterator[str]:
    """A host between vault and broker that forwards each charge and alters the broker's answer."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = urllib.request.Request(
                target + self.path, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = rewrite(json.loads(response.read()))
            payload = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_an_altered_acknowledgement_is_refused(setting: Setting) -> None:
    def more_remaining(answer: dict[str, Any]) -> dict[str, Any]:
        answer["acknowledgement"]["epsilon_remaining"] = 0.5
        return answer

    with _relay(setting.url, more_remaining) as url, pytest.raises(BudgetError, match="not signed by the dataset's"):
        setting.client(url).charge("dp", 0.1, 0.0, PLAN)

    earlier = setting.client().charge("dp", 0.1, 0.0, PLAN)
    kept: list[dict[str, Any]] = []

    def replay_the_first(answer: dict[str, Any]) -> dict[str, Any]:
        kept.append(answer)
        return kept[0]  # a genuine, owner-signed acknowledgement, but of the first charge through the relay

    with _relay(setting.url, replay_the_first) as url:
        client = setting.client(url)
        assert client.charge("dp", 0.1, 0.0, PLAN).epsilon_spent == pytest.approx(earlier.epsilon_spent + 0.1)
        with pytest.raises(BudgetError, match="names another nonce than this charge's"):
            client.charge("dp", 0.1, 0.0, PLAN)
    # Someone else's owner key does not vouch for this dataset either.
    stranger = BudgetClient(setting.url, setting.keys.signing_key, {"dp": VaultKeys.generate().signing_public_key})
    with pytest.raises(BudgetError, match="not signed by the dataset's owner"):
        stranger.charge("dp", 0.01, 0.0, PLAN)
