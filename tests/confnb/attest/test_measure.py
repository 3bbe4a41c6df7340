"""Launch measurements of real SEV-SNP VMs: confnb's inputs reach sev-snp-measure intact, and bad inputs fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from sevsnpmeasure import guest, vcpu_types, vmm_types
from sevsnpmeasure.sev_mode import SevMode

from confnb.attest.errors import AttestInputError
from confnb.attest.measure import LaunchConfig, MeasureInputError, snp_launch_measurement, vcpu_signature
from confnb.attest.policy import AttestationPolicy
from tests.confnb.attest.snp_firmware import CPUID, SNP_SEC_MEM, SNP_SECRETS, ovmf_image

EPYC_V4 = vcpu_types.CPU_SIGS["EPYC-v4"]
# The synthetic image's measurement with 2 EPYC-v4 vCPUs under QEMU, no kernel. Pinned so that a sev-snp-measure
# release that computes another value for the same inputs (and so invalidates operators' pinned values) is noticed.
KNOWN_ANSWER = "bfe9265a592446736931decb9118335b0e6631d02c5e485a25a7e9165bb5cfe14bce7f2f11a7d334cc5453f956984858"


@pytest.fixture
def boot(tmp_path: Path) -> dict[str, Path]:
    files = {
        "ovmf": tmp_path / "OVMF.fd",
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.img",
    }
    files["ovmf"].write_bytes(ovmf_image())
    files["kernel"].write_bytes(b"MZ kernel " * 1000)
    files["initrd"].write_bytes(b"070701 initrd " * 1000)
    return files


def reference(config: LaunchConfig) -> str:
    """sev-snp-measure called directly, the way its own tests call it."""
    return bytes(
        guest.calc_launch_digest(
            SevMode.SEV_SNP,
            config.vcpus,
            config.vcpu_signature,
            str(config.ovmf),
            str(config.kernel) if config.kernel else None,
            str(config.initrd) if config.initrd else None,
            config.append,
            config.guest_features,
            vmm_type=vmm_types.VMMType.ec2 if config.vmm_type == "ec2" else vmm_types.VMMType.QEMU,
        )
    ).hex()


def test_known_answer(boot):
    result = snp_launch_measurement(LaunchConfig(boot["ovmf"], 2, EPYC_V4))
    assert result.measurement.hex() == KNOWN_ANSWER
    assert result.calculator.startswith("sev-snp-measure ")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"vcpus": 1},
        {"vcpus": 8},
        {"vcpu_signature": vcpu_types.CPU_SIGS["EPYC-Milan"]},
        {"guest_features": 0x21},
        {"kernel": "kernel"},
        {"kernel": "kernel", "initrd": "initrd"},
        {"kernel": "kernel", "initrd": "initrd", "append": "console=ttyS0 root=/dev/vda"},
        {"kernel": "kernel", "append": "console=ttyS0 root=/dev/vda "},
        {"vmm_type": "ec2", "vcpu_signature": None},
        {"vmm_type": "ec2", "vcpu_signature": None, "kernel": "kernel", "append": "quiet"},
    ],
    ids=repr,
)
def test_equals_sev_snp_measure_and_every_input_counts(boot, changes):
    def config(**overrides: object) -> LaunchConfig:
        values: dict[str, object] = {"ovmf": boot["ovmf"], "vcpus": 4, "vcpu_signature": EPYC_V4}
        values.update(overrides)
        for name in ("kernel", "initrd"):
            if isinstance(values.get(name), str):
                values[name] = boot[str(values[name])]
        return LaunchConfig(**values)  # type: ignore[arg-type]

    baseline = snp_launch_measurement(config()).measurement.hex()
    changed = config(**changes)
    measured = snp_launch_measurement(changed).measurement.hex()
    assert measured == reference(changed)
    if changes:
        assert measured != baseline, f"{changes} did not change the measurement"


def test_firmware_bytes_count(tmp_path, boot):
    other = tmp_path / "other.fd"
    other.write_bytes(ovmf_image(fill=b"OVMG"))
    first = snp_launch_measurement(LaunchConfig(boot["ovmf"], 2, EPYC_V4)).measurement
    second = snp_launch_measurement(LaunchConfig(other, 2, EPYC_V4)).measurement
    assert first != second


def test_policy_line_pins_the_measurement(tmp_path, boot):
    result = snp_launch_measurement(LaunchConfig(boot["ovmf"], 2, EPYC_V4, kernel=boot["kernel"], append="quiet"))
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[attestation]\n{result.policy_line()}\n")
    assert AttestationPolicy.load(policy).measurements == (result.measurement.hex(),)


def test_json_names_the_inputs_and_their_digests(boot):
    import hashlib

    result = snp_launch_measurement(LaunchConfig(boot["ovmf"], 2, EPYC_V4, kernel=boot["kernel"], append="quiet"))
    document = result.to_dict()
    assert document["measurement"] == result.measurement.hex()
    inputs = document["inputs"]
    assert inputs["ovmf"]["sha256"] == hashlib.sha256(boot["ovmf"].read_bytes()).hexdigest()
    assert inputs["kernel"]["sha256"] == hashlib.sha256(boot["kernel"].read_bytes()).hexdigest()
    assert inputs["initrd"] is None
    assert inputs["vcpu_signature"] == "0x00800f12"
    assert inputs["append"] == "quiet"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"vcpu_type": "EPYC-v4"}, 0x00800F12),
        ({"vcpu_type": "EPYC-Milan"}, 0x00A00F11),
        ({"signature": 0x00A10F10}, 0x00A10F10),
        ({"family": 25, "model": 17, "stepping": 0}, 0x00A10F10),  # Genoa
        ({}, None),
    ],
)
def test_vcpu_signature(arguments, expected):
    assert vcpu_signature(**arguments) == expected


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"vcpu_type": "EPYC-v9"}, "unknown --vcpu-type 'EPYC-v9'"),
        ({"vcpu_type": "epyc-v4"}, "unknown --vcpu-type"),
        ({"vcpu_type": "EPYC-v4", "signature": 1}, "not --vcpu-type and --vcpu-sig"),
        ({"family": 25, "model": 1}, "go together"),
        ({"family": 25, "model": 256, "stepping": 0}, "--vcpu-model 256 is outside"),
        ({"signature": 1 << 32}, "does not fit CPUID(1).EAX"),
    ],
)
def test_vcpu_signature_rejects(arguments, fragment):
    with pytest.raises(MeasureInputError) as caught:
        vcpu_signature(**arguments)
    assert fragment in str(caught.value)


def _image(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "no such file"),
        ("directory", "not a regular file"),
        ("empty", "not a whole number of 4 KiB pages"),
        ("ragged", "not a whole number of 4 KiB pages"),
        ("no-footer", "no SEV metadata"),
        ("no-metadata", "no SEV metadata"),
        ("bad-signature", "SEV metadata does not parse"),
        ("unaligned-section", "is not page-aligned"),
        ("kernel-without-hashes-section", "no SNP kernel-hashes section"),
        ("hash-table-crosses-page", "crosses a page"),
        ("zero-vcpus", "--vcpus 0 is outside"),
        ("no-signature", "give --vcpu-type"),
        ("ec2-with-signature", "EC2 fixes the vCPU signature"),
        ("no-snp-active", "lacks bit 0 (SNPActive)"),
        ("initrd-without-kernel", "only with --kernel"),
        ("missing-kernel", "kernel"),
        ("nul-in-append", "NUL byte"),
        ("unknown-vmm", "unknown VMM type 'gce'"),
    ],
)
def test_rejects(tmp_path, boot, case, fragment):
    config = LaunchConfig(boot["ovmf"], 2, EPYC_V4)
    if case == "missing":
        config = LaunchConfig(tmp_path / "absent.fd", 2, EPYC_V4)
    elif case == "directory":
        config = LaunchConfig(tmp_path, 2, EPYC_V4)
    elif case == "empty":
        config = LaunchConfig(_image(tmp_path, "empty.fd", b""), 2, EPYC_V4)
    elif case == "ragged":
        config = LaunchConfig(_image(tmp_path, "ragged.fd", ovmf_image()[1:]), 2, EPYC_V4)
    elif case == "no-footer":
        config = LaunchConfig(_image(tmp_path, "plain.fd", ovmf_image(footer=False)), 2, EPYC_V4)
    elif case == "no-metadata":
        config = LaunchConfig(_image(tmp_path, "nosev.fd", ovmf_image(metadata=False)), 2, EPYC_V4)
    elif case == "bad-signature":
        data = ovmf_image().replace(b"ASEV", b"XSEV")
        config = LaunchConfig(_image(tmp_path, "sig.fd", data), 2, EPYC_V4)
    elif case == "unaligned-section":
        data = ovmf_image(((0x800000, 0x800, SNP_SEC_MEM), (0x809000, 0x1000, SNP_SECRETS)))
        config = LaunchConfig(_image(tmp_path, "unaligned.fd", data), 2, EPYC_V4)
    elif case == "kernel-without-hashes-section":
        data = ovmf_image(((0x800000, 0x9000, SNP_SEC_MEM), (0x809000, 0x1000, SNP_SECRETS), (0x80A000, 0x1000, CPUID)))
        config = LaunchConfig(_image(tmp_path, "nohashes.fd", data), 2, EPYC_V4, kernel=boot["kernel"])
    elif case == "hash-table-crosses-page":
        data = ovmf_image(hash_table_gpa=0x80BFC0)
        config = LaunchConfig(_image(tmp_path, "crossing.fd", data), 2, EPYC_V4, kernel=boot["kernel"])
    elif case == "zero-vcpus":
        config = LaunchConfig(boot["ovmf"], 0, EPYC_V4)
    elif case == "no-signature":
        config = LaunchConfig(boot["ovmf"], 2, None)
    elif case == "ec2-with-signature":
        config = LaunchConfig(boot["ovmf"], 2, EPYC_V4, vmm_type="ec2")
    elif case == "no-snp-active":
        config = LaunchConfig(boot["ovmf"], 2, EPYC_V4, guest_features=0x20)
    elif case == "initrd-without-kernel":
        config = LaunchConfig(boot["ovmf"], 2, EPYC_V4, initrd=boot["initrd"])
    elif case == "missing-kernel":
        config = LaunchConfig(boot["ovmf"], 2, EPYC_V4, kernel=tmp_path / "vmlinuz-absent")
    elif case == "nul-in-append":
        config = LaunchConfig(boot["ovmf"], 2, EPYC_V4, kernel=boot["kernel"], append="a\x00b")
    elif case == "unknown-vmm":
        config = LaunchConfig(boot["ovmf"], 2, EPYC_V4, vmm_type="gce")
    with pytest.raises(MeasureInputError) as caught:
        snp_launch_measurement(config)
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message
    assert isinstance(caught.value, AttestInputError)  # so the CLI reports it in one line with exit code 2
