"""Fixtures shared by every suite: the real AMD vectors from ../shared, and the verification clock."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kernel_enclave.tee.simulated import SimulatedBackend

REPO = Path(__file__).resolve().parents[1]
SHARED_VECTORS = REPO.parent / "shared" / "vectors" / "snp"
NO_VECTORS = (
    f"real SEV-SNP vectors not found at {SHARED_VECTORS}: they live in ../shared beside the project "
    "and are never copied into it"
)
REQUIRE_VECTORS = "CONFNB_REQUIRE_VECTORS"  # `make test` sets it to 1: without the vectors the run fails


@dataclass(frozen=True)
class Vector:
    """One real report with its certificates and the outcomes vectors.json promises."""

    id: str
    report: bytes
    vek: bytes
    chain: bytes
    signing_key: str
    product: str
    version: int
    expected: dict[str, Any]
    meta: dict[str, Any]

    @property
    def vek_not_after(self) -> datetime:
        return datetime.fromisoformat(self.expected["vek_not_after"])

    @property
    def inside_validity(self) -> datetime:
        """A moment when every certificate of this vector is valid (VLEKs expire after a year)."""
        return self.vek_not_after - timedelta(days=30)


def _load_vectors() -> list[Vector]:
    index = SHARED_VECTORS / "vectors.json"
    if not index.is_file():
        return []
    vectors = []
    for entry in json.loads(index.read_text()):
        vectors.append(
            Vector(
                id=entry["id"],
                report=(SHARED_VECTORS / entry["report"]).read_bytes(),
                vek=(SHARED_VECTORS / entry["vek"]).read_bytes(),
                chain=(SHARED_VECTORS / entry["chain"]).read_bytes(),
                signing_key=entry["signing_key"],
                product=entry["product"],
                version=entry["version"],
                expected=entry["expected"],
                meta=entry,
            )
        )
    return vectors


VECTORS = _load_vectors()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``CONFNB_REQUIRE_VECTORS=1`` a run without the real vectors fails at once, instead of quietly
    skipping the hundreds of tests that read them (and passing on what is left)."""
    if os.environ.get(REQUIRE_VECTORS) == "1" and not VECTORS:
        raise pytest.UsageError(f"{REQUIRE_VECTORS}=1 requires the real SEV-SNP vectors, but {NO_VECTORS}")


def vector_by_id(identifier: str) -> Vector:
    if not VECTORS:
        pytest.skip(NO_VECTORS)
    return next(vector for vector in VECTORS if vector.id == identifier)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking ``vector`` run once per real report (or skip, saying why, when ../shared is absent)."""
    if "vector" in metafunc.fixturenames:
        if VECTORS:
            metafunc.parametrize("vector", VECTORS, ids=[vector.id for vector in VECTORS])
        else:
            metafunc.parametrize("vector", [pytest.param(None, marks=pytest.mark.skip(reason=NO_VECTORS))])


@pytest.fixture
def shared_vectors() -> Path:
    if not SHARED_VECTORS.is_dir():
        pytest.skip(NO_VECTORS)
    return SHARED_VECTORS


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(autouse=True)
def _offline_kds(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may reach AMD's KDS or read the user's certificate cache."""
    monkeypatch.setenv("CONFNB_OFFLINE", "1")
    monkeypatch.setenv("CONFNB_KDS_CACHE", str(tmp_path_factory.mktemp("kds-cache")))


# -- simulated TEE (kernel_enclave.tee.simulated) ---------------------------------------------------------
# RSA-4096 key generation takes seconds, so the simulated ARK -> ASK -> VCEK chain is generated at most once per
# test session, lazily, into one temporary directory that every test reuses (CONFNB_SIMULATED_TEE_DIR points
# there): no test generates a chain by accident, and none touches the user's ~/.local/share/confnb/simulated-tee.


@pytest.fixture(scope="session")
def _simulated_tee_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simulated-tee")


@pytest.fixture(scope="session")
def simulated_tee_dir(_simulated_tee_path: Path) -> Path:
    """The state directory of the session's simulated chip, generated on first use."""
    from kernel_enclave.tee.simulated import SimulatedBackend

    SimulatedBackend(state_dir=_simulated_tee_path)
    return _simulated_tee_path


@pytest.fixture(scope="session")
def simulated_backend(simulated_tee_dir: Path) -> SimulatedBackend:
    """A simulated backend on the session's chip, measuring the current enclave code."""
    from kernel_enclave.tee.simulated import SimulatedBackend

    return SimulatedBackend(state_dir=simulated_tee_dir)


@pytest.fixture(autouse=True)
def _simulated_tee_env(monkeypatch: pytest.MonkeyPatch, _simulated_tee_path: Path) -> None:
    """Default-constructed simulated backends use the session chip, never the user's."""
    monkeypatch.setenv("CONFNB_SIMULATED_TEE_DIR", str(_simulated_tee_path))


# -- confidential kernels (kernel_enclave launcher/relay/executor, confnb.provisioner) ------------------------
# jupyter_kernel_test starts its kernel in unittest's setUpClass, before any function-scoped fixture runs, so the
# kernel environment is a session fixture that sets os.environ itself: a private Jupyter data/runtime directory
# holding the confnb-snp kernelspec, and the session's simulated chip.


@pytest.fixture(scope="session")
def confnb_kernel_env(tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path) -> Iterator[Path]:
    """Install ``confnb-snp`` (local mode, simulated TEE) into a private Jupyter path; yields the kernelspec dir."""
    from confnb.provisioner.kernelspec import install, private_jupyter_environment

    root = tmp_path_factory.mktemp("jupyter")
    environment = {
        **private_jupyter_environment(root),
        "CONFNB_SIMULATED_TEE_DIR": str(simulated_tee_dir),
        "CONFNB_OFFLINE": "1",
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        yield install(prefix=str(root))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def install_variant(confnb_kernel_env: Path) -> Callable[..., str]:
    """Install another kernelspec next to confnb-snp (same private Jupyter path); returns its name."""
    from confnb.provisioner.kernelspec import install

    prefix = confnb_kernel_env.parents[3]

    def variant(name: str, **options: Any) -> str:
        install(prefix=str(prefix), name=name, **options)
        return name

    return variant


# -- the confidential world (tests/confidential_fixtures.py) -------------------------------------------------------
# Two data owners with encrypted datasets and brokers on loopback, and confnb-snp kernels that reach them, for the
# red-team and end-to-end suites. Loaded under a fixed module name so that test modules can import its helpers
# (with --import-mode=importlib the tests folder is not on sys.path), and registered as a plugin for its fixtures.


def pytest_configure(config: pytest.Config) -> None:
    import importlib.util
    import sys

    name = "confidential_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("confidential_fixtures.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    if not config.pluginmanager.has_plugin(name):
        config.pluginmanager.register(sys.modules[name], name)
    # The plan language's JSON, written by hand in the vault's tests (a module of helpers, no fixtures).
    if "plan_json" not in sys.modules:
        spec = importlib.util.spec_from_file_location("plan_json", Path(__file__).with_name("plan_json.py"))
        assert spec is not None and spec.loader is not None
        sys.modules["plan_json"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["plan_json"])


# -- a real Jupyter server on loopback --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def jupyter_server() -> Callable[..., contextlib.AbstractContextManager[int]]:
    """Start ``python -m jupyter_server`` on a free loopback port as an analyst starts it (token, no browser).

    ``with jupyter_server(root=..., token=..., log=...) as port:`` waits until ``/api`` answers (failing the test
    with the server's log when it does not within a minute) and stops the server afterwards. ``env`` adds or
    replaces environment variables.
    """

    @contextlib.contextmanager
    def launch(*, root: Path, token: str, log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        arguments = ["--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}"]
        arguments += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "jupyter_server", *arguments],
                env={**os.environ, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            deadline = time.monotonic() + 60
            probe_request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api", headers={"Authorization": f"token {token}"}
            )
            while True:
                try:
                    with urllib.request.urlopen(probe_request, timeout=10):
                        break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        pytest.fail(f"jupyter server did not start: {log.read_text()[-3000:]}")
                    time.sleep(0.2)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    return launch
