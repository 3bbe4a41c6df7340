"""``confnb attest measure`` as an operator runs it: real processes and files, sev-snp-measure's CLI as referee."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.confnb.attest.snp_firmware import ovmf_image


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)


def confnb(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "confnb", "attest", "measure", *args)


def upstream(*args: str) -> subprocess.CompletedProcess[str]:
    """The sev-snp-measure command itself, whose flags confnb's mirror."""
    return run(sys.executable, "-m", "sevsnpmeasure.cli", "--mode", "snp", *args)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("confnb: error: ") and fragment in lines[0], lines[0]


@pytest.fixture
def boot(tmp_path: Path) -> dict[str, str]:
    paths = {"ovmf": tmp_path / "OVMF.fd", "kernel": tmp_path / "vmlinuz", "initrd": tmp_path / "initrd.img"}
    paths["ovmf"].write_bytes(ovmf_image())
    paths["kernel"].write_bytes(b"MZ kernel " * 1000)
    paths["initrd"].write_bytes(b"070701 initrd " * 1000)
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize(
    "flags",
    [
        ["--vcpus", "2", "--vcpu-type", "EPYC-v4"],
        ["--vcpus", "4", "--vcpu-type", "EPYC-Milan", "--guest-features", "0x21", "KERNEL", "INITRD", "APPEND"],
        ["--vcpus", "1", "--vcpu-sig", "0xa10f10", "KERNEL", "APPEND"],
        ["--vcpus", "3", "--vcpu-family", "25", "--vcpu-model", "17", "--vcpu-stepping", "1"],
        ["--vcpus", "2", "--vmm-type", "ec2", "KERNEL", "INITRD"],
    ],
    ids=["plain", "direct-boot", "signature", "family-model-stepping", "ec2"],
)
def test_matches_sev_snp_measure(boot, flags):
    expanded = ["--ovmf", boot["ovmf"]]
    for flag in flags:
        if flag == "KERNEL":
            expanded += ["--kernel", boot["kernel"]]
        elif flag == "INITRD":
            expanded += ["--initrd", boot["initrd"]]
        elif flag == "APPEND":
            expanded += ["--append", "console=ttyS0 root=/dev/vda1 ro"]
        else:
            expanded.append(flag)
    ours = confnb(*expanded)
    assert ours.returncode == 0, ours.stderr
    theirs = upstream(*expanded)
    assert theirs.returncode == 0, theirs.stderr
    assert len(ours.stdout.strip()) == 96
    assert ours.stdout == theirs.stdout


def test_json_carries_inputs_and_a_policy_line(tmp_path, boot):
    result = confnb(
        "--ovmf", boot["ovmf"], "--vcpus", "2", "--vcpu-type", "EPYC-v4", "--kernel", boot["kernel"], "--append", "ro"
    )
    as_json = confnb(
        "--ovmf",
        boot["ovmf"],
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-v4",
        "--kernel",
        boot["kernel"],
        "--append",
        "ro",
        "--json",
    )
    assert result.returncode == as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    measurement = result.stdout.strip()
    assert document["tee"] == "sev-snp"
    assert document["measurement"] == measurement
    assert document["inputs"]["vcpus"] == 2
    assert document["inputs"]["ovmf"]["path"] == boot["ovmf"]
    assert document["inputs"]["append"] == "ro"
    assert document["calculator"].startswith("sev-snp-measure ")
    assert document["policy"] == f'measurements = ["{measurement}"]'
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[attestation]\n{document['policy']}\n")
    checked = run(sys.executable, "-m", "confnb", "policy", "check", str(policy), "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert measurement in checked.stdout


def test_simulated_still_measures_the_enclave_code():
    from kernel_enclave.measurement import simulated_measurement

    plain = confnb("--simulated")
    as_json = confnb("--simulated", "--json")
    assert plain.returncode == as_json.returncode == 0
    assert plain.stdout.strip() == simulated_measurement().hex()
    assert json.loads(as_json.stdout) == {"tee": "simulated", "measurement": simulated_measurement().hex()}


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("nothing", "nothing to measure"),
        ("simulated-and-ovmf", "--simulated measures the installed enclave code; --ovmf"),
        ("missing-ovmf", "no such file"),
        ("no-sev-metadata", "no SEV metadata"),
        ("bad-vcpu-type", "unknown --vcpu-type 'EPYC-v99'"),
        ("no-vcpus", "--vcpus N is required"),
        ("vcpus-not-a-number", "--vcpus 'two' is not a decimal integer"),
        ("bad-guest-features", "--guest-features 'SNP' is not an integer"),
        ("bad-vmm", "unknown VMM type 'xen'"),
        ("missing-kernel", "kernel"),
    ],
)
def test_errors_are_one_line(tmp_path, boot, case, fragment):
    vm = ["--ovmf", boot["ovmf"], "--vcpus", "2", "--vcpu-type", "EPYC-v4"]
    plain = tmp_path / "plain.fd"
    plain.write_bytes(ovmf_image(metadata=False))
    arguments = {
        "nothing": [],
        "simulated-and-ovmf": ["--simulated", "--ovmf", boot["ovmf"]],
        "missing-ovmf": ["--ovmf", str(tmp_path / "absent.fd"), "--vcpus", "2", "--vcpu-type", "EPYC-v4"],
        "no-sev-metadata": ["--ovmf", str(plain), "--vcpus", "2", "--vcpu-type", "EPYC-v4"],
        "bad-vcpu-type": ["--ovmf", boot["ovmf"], "--vcpus", "2", "--vcpu-type", "EPYC-v99"],
        "no-vcpus": ["--ovmf", boot["ovmf"], "--vcpu-type", "EPYC-v4"],
        "vcpus-not-a-number": ["--ovmf", boot["ovmf"], "--vcpus", "two", "--vcpu-type", "EPYC-v4"],
        "bad-guest-features": [*vm, "--guest-features", "SNP"],
        "bad-vmm": [*vm, "--vmm-type", "xen"],
        "missing-kernel": [*vm, "--kernel", str(tmp_path / "vmlinuz-absent")],
    }[case]
    assert_one_line_error(confnb(*arguments), fragment)
