"""confnb-provisioner: a kernel reaches Jupyter only after its evidence verifies, and the channel is the attested one.

Kernels are started by kernelspec name through jupyter_client, as JupyterLab starts them. The adversary here is
the host: it may replay an old launch response, substitute its own channel keys, or run a VM that does not
satisfy the analyst's policy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager
from traitlets import TraitType

from confnb.attest.verifier import verify_evidence
from confnb.cli import main as cli
from confnb.provisioner import ConfidentialProvisioner, KernelLaunchError
from confnb.provisioner.kernelspec import KERNEL_NAME, local_policy

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
_ATTESTATION_RELATED = (KernelLaunchError, RuntimeError)


def _start(kernel_name: str, **kwargs: Any) -> KernelManager:
    manager = KernelManager(kernel_name=kernel_name)
    manager.start_kernel(**kwargs)
    return manager


def _refusal(kernel_name: str, **kwargs: Any) -> str:
    manager = KernelManager(kernel_name=kernel_name)
    with pytest.raises(KernelLaunchError) as refused:
        manager.start_kernel(**kwargs)
    provisioner = manager.provisioner
    assert provisioner is None or not provisioner.has_process  # nothing left running
    return str(refused.value)


def _run(manager: KernelManager, code: str) -> str:
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        outputs: list[str] = []
        reply = client.execute_interactive(
            code, timeout=30, output_hook=lambda m: outputs.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] in ("ok", "error")
        return "".join(outputs)
    finally:
        client.stop_channels()


def test_a_verified_kernel_starts_with_the_environment_it_was_given(confnb_kernel_env: Path) -> None:
    manager = _start(KERNEL_NAME, env={**os.environ, "CONFNB_BROKER_URL": "http://127.0.0.1:9/broker"})
    try:
        provisioner = manager.provisioner
        assert isinstance(provisioner, ConfidentialProvisioner)
        assert provisioner.verification is not None and provisioner.verification.ok
        assert provisioner.evidence is not None and provisioner.evidence.simulated
        assert provisioner.evidence.claims["curve_public_key"] == manager.curve_publickey.decode()
        policy = Path(manager.kernel_spec.resource_dir) / "attestation.toml"  # type: ignore[union-attr]
        assert verify_evidence(provisioner.evidence, policy).ok
        assert _run(manager, "import os; print(os.environ['CONFNB_BROKER_URL'])") == "http://127.0.0.1:9/broker\n"
    finally:
        manager.shutdown_kernel()
    assert not manager.provisioner or not manager.provisioner.has_process


def test_interrupt_and_restart(confnb_kernel_env: Path) -> None:
    manager = _start(KERNEL_NAME)
    try:
        client = manager.client()
        # No heartbeat channel: this test does not use it, and its thread can block in a send while the kernel is
        # interrupted, which leaves stop_channels() waiting for it.
        client.start_channels(hb=False)
        client.wait_for_ready(timeout=60)
        msg_id = client.execute("import time; time.sleep(60)")
        time.sleep(1)
        started = time.monotonic()
        manager.interrupt_kernel()
        reply = client.get_shell_msg(timeout=20)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10
        client.stop_channels()
        first_key = manager.curve_publickey
        manager.restart_kernel()
        assert manager.curve_publickey != first_key  # a restart is a fresh, freshly attested launch
        assert _run(manager, "print('after restart')") == "after restart\n"
    finally:
        manager.shutdown_kernel()


def test_wrong_measurement_never_starts(install_variant: Callable[..., str]) -> None:
    wrong = re.sub(r"measurements = \[.*\]", f'measurements = ["{"11" * 48}"]', local_policy())
    message = _refusal(install_variant("confnb-wrong-measurement", policy_text=wrong))
    assert "attestation failed" in message and "measurement" in message


def test_simulated_hardware_is_refused_without_allow_simulated(install_variant: Callable[..., str]) -> None:
    strict = local_policy().replace("allow_simulated = true", "allow_simulated = false")
    message = _refusal(install_variant("confnb-no-simulated", policy_text=strict))
    assert "attestation failed" in message and "ark_pinned" in message


def test_a_debug_guest_never_starts(confnb_kernel_env: Path) -> None:
    message = _refusal(KERNEL_NAME, env={**os.environ, "CONFNB_SIMULATED_DEBUG": "1"})
    assert "attestation failed" in message and "debug" in message


def test_no_policy_no_kernel(install_variant: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONFNB_ATTESTATION_POLICY", raising=False)
    message = _refusal(install_variant("confnb-no-policy", config={"attestation_policy": ""}))
    assert "no attestation policy" in message


def test_the_policy_environment_variable_overrides_the_kernelspec(confnb_kernel_env: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text(local_policy().replace("allow_simulated = true", "allow_simulated = false"))
    message = _refusal(KERNEL_NAME, env={**os.environ, "CONFNB_ATTESTATION_POLICY": str(strict)})
    assert "ark_pinned" in message


@pytest.fixture(scope="module")
def host_in_the_middle(
    install_variant: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], str]:
    record = tmp_path_factory.mktemp("mitm") / "response.line"

    def kernelspec(mode: str) -> str:
        wrapper = [sys.executable, str(HERE / "host_in_the_middle.py"), mode, str(record), "--"]
        return install_variant(f"confnb-mitm-{mode}", config={"launcher_wrapper": wrapper})

    return kernelspec


def test_a_replayed_launch_response_is_refused(host_in_the_middle: Callable[[str], str]) -> None:
    manager = _start(host_in_the_middle("record"))  # an honest launch the host keeps a copy of
    manager.shutdown_kernel()
    message = _refusal(host_in_the_middle("replay"))
    assert "nonce" in message


def test_channel_keys_substituted_by_the_host_are_refused(host_in_the_middle: Callable[[str], str]) -> None:
    assert "not the attested curve_public_key" in _refusal(host_in_the_middle("swap-secrets"))


def test_claims_changed_by_the_host_are_refused(host_in_the_middle: Callable[[str], str]) -> None:
    message = _refusal(host_in_the_middle("tamper-claims"))
    assert "attestation failed" in message and "report_data" in message


def test_a_launcher_that_cannot_start_reports_why(install_variant: Callable[..., str]) -> None:
    name = install_variant("confnb-bad-tee", tee="sev-snp", policy_text=local_policy())
    message = _refusal(name)
    assert "did not start" in message and "SEV-SNP" in message


def test_every_setting_is_documented() -> None:
    traits: dict[str, TraitType[Any, Any]] = ConfidentialProvisioner.class_traits(config=True)
    assert len(traits) >= 10
    assert all(trait.help for trait in traits.values()), [name for name, t in traits.items() if not t.help]


def test_kernel_install_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["kernel", "install", "--prefix", str(tmp_path), "--json"]) == 0
    spec = tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME
    assert (spec / "kernel.json").exists() and (spec / "attestation.toml").exists()
    assert '"installed": "confnb-snp"' in capsys.readouterr().out
    assert cli(["kernel", "install", "--prefix", str(tmp_path), "--tee", "sev-snp"]) == 2
    assert "needs --policy" in capsys.readouterr().err
    assert cli(["kernel", "install", "--prefix", str(tmp_path), "--mode", "ssh"]) == 2
    broken = tmp_path / "broken.toml"
    broken.write_text("[attestation]\nallow_simulated = 3\n")
    assert cli(["kernel", "install", "--prefix", str(tmp_path), "--policy", str(broken)]) == 2
    assert "allow_simulated" in capsys.readouterr().err


def test_the_launcher_rejects_a_malformed_request() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kernel_enclave.launcher"], input=b"{}\n", capture_output=True, check=False, timeout=30
    )
    assert result.returncode == 1
    assert b"launch request" in result.stdout and b"Traceback" not in result.stdout + result.stderr


def test_ssh_mode_starts_a_remote_kernel_through_tunnels(
    install_variant: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole ssh path (launcher over ssh, five tunnels, env forwarded in the request) with a stand-in ssh that
    runs the remote command on this machine and forwards ports for real."""
    monkeypatch.setenv("FAKE_SSH_HOST", "cvm.example")
    name = install_variant(
        "confnb-ssh",
        mode="ssh",
        config={
            "ssh_host": "cvm.example",
            "ssh_command": [sys.executable, str(HERE / "fake_ssh.py")],
            "remote_argv": [sys.executable, "-m", "kernel_enclave.launcher"],
        },
    )
    manager = _start(name, env={**os.environ, "CONFNB_BROKER_URL": "http://broker.example", "UNRELATED": "x"})
    try:
        provisioner = manager.provisioner
        assert isinstance(provisioner, ConfidentialProvisioner)
        assert provisioner.verification is not None and provisioner.verification.ok
        output = _run(manager, "import os; print(os.environ.get('CONFNB_BROKER_URL'), os.environ.get('UNRELATED'))")
        assert output == "http://broker.example None\n"  # only the forwarded variables travel
    finally:
        manager.shutdown_kernel()


def test_the_launcher_stops_when_its_provisioner_goes_away(simulated_tee_dir: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from kernel_enclave.handshake import LaunchRequest, LaunchResponse

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    request = LaunchRequest(
        nonce=os.urandom(16),
        response_public_key=key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
        tee="simulated",
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "kernel_enclave.launcher"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "CONFNB_SIMULATED_TEE_DIR": str(simulated_tee_dir)},
    )
    assert launcher.stdin is not None and launcher.stdout is not None
    try:
        launcher.stdin.write(request.to_line())
        launcher.stdin.flush()
        response = LaunchResponse.from_line(launcher.stdout.readline())
        assert response.evidence["tee"] == "simulated"
        launcher.stdin.close()  # the provisioner (or the ssh session) is gone
        assert launcher.wait(timeout=15) == 0
        assert launcher.stdout.read() == b""  # nothing after the response, ever
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stdout.close()


def test_a_dead_executor_takes_the_whole_kernel_down(confnb_kernel_env: Path) -> None:
    """No half-alive kernel: when the analyst's process dies, the launcher (and with it the relay) exits, so
    Jupyter sees a dead kernel and its restarter makes a fresh, freshly attested launch."""
    manager = _start(KERNEL_NAME)
    try:
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        client.execute("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        deadline = time.monotonic() + 20
        while manager.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not manager.is_alive()
        client.stop_channels()
    finally:
        manager.shutdown_kernel(now=True)
