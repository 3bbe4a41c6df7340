"""``confnb attest`` as users and scripts run it: a real process, real files, and the exit-code contract."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from confnb.attest.certs import load_certificates
from confnb.attest.certtable import ARK_GUID, ASK_GUID, VCEK_GUID, build_cert_table
from tests.conftest import vector_by_id


def confnb(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("confnb: error: ") and fragment in lines[0], lines[0]


@pytest.fixture
def files(tmp_path, shared_vectors):
    """Paths of one real Turin report and its certificates, as a user would pass them."""
    return {
        "report": shared_vectors / "openanolis-trustee/turin-report.bin",
        "vek": shared_vectors / "openanolis-trustee/turin-vcek.der",
        "chain": shared_vectors / "go-sev-guest/verify_trust_ask_ark_turin_vcek.pem",
    }


def test_verify_a_real_report(files):
    run = confnb(
        "attest", "verify", "--report", str(files["report"]), "--vek", str(files["vek"]), "--chain", str(files["chain"])
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("verified: genuine AMD SEV-SNP Turin")
    assert "chip_binding" in run.stdout


def test_verify_json_follows_the_contract(files):
    run = confnb(
        "attest",
        "verify",
        "--report",
        str(files["report"]),
        "--vek",
        str(files["vek"]),
        "--chain",
        str(files["chain"]),
        "--json",
    )
    document = json.loads(run.stdout)
    assert run.returncode == 0 and document["verified"] is True
    assert all({"name", "ok", "detail"} <= set(check) for check in document["checks"])
    assert document["report"]["reported_tcb"] == {
        "fmc": 1,
        "bootloader": 3,
        "tee": 2,
        "snp": 5,
        "microcode": 97,
        "raw": "0103020500000061",
    }


def test_expired_vlek_is_rejected_now_and_accepted_at_a_pinned_time(shared_vectors):
    vector = vector_by_id("R15")
    report = shared_vectors / vector.meta["report"]
    args = [
        "attest",
        "verify",
        "--report",
        str(report),
        "--vek",
        str(shared_vectors / vector.meta["vek"]),
        "--chain",
        str(shared_vectors / vector.meta["chain"]),
    ]
    now = confnb(*args)
    assert now.returncode == 1
    assert "FAIL  cert_validity" in now.stdout and "rejected by: cert_validity" in now.stderr
    assert confnb(*args, "--at", "2025-01-01T00:00:00Z").returncode == 0


def test_policy_rejection_exits_1_and_names_the_check(tmp_path, shared_vectors):
    vector = vector_by_id("R1")
    policy = tmp_path / "policy.toml"
    policy.write_text("[attestation]\nreject_debug = true\n")
    run = confnb(
        "attest",
        "verify",
        "--report",
        str(shared_vectors / vector.meta["report"]),
        "--vek",
        str(shared_vectors / vector.meta["vek"]),
        "--chain",
        str(shared_vectors / vector.meta["chain"]),
        "--policy",
        str(policy),
        "--json",
    )
    assert run.returncode == 1
    failing = [check["name"] for check in json.loads(run.stdout)["checks"] if not check["ok"]]
    assert failing == ["debug"]


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda f, t: ["--report", str(t / "missing.bin")], "no such file"),
        (
            lambda f, t: ["--report", str(f["report"].parent.parent / "lit-sev-snp-utils/guest_report_corrupt.bin")],
            "793 bytes",
        ),
        (
            lambda f, t: ["--report", str(f["report"]), "--vek", str(f["chain"]), "--chain", str(t / "bad.pem")],
            "bad PEM",
        ),
        (
            lambda f, t: ["--report", str(f["report"]), "--policy", str(t / "bad.toml")],
            "bad.toml:2: attestation.max_vmpl",
        ),
        (lambda f, t: ["--report", str(f["report"]), "--at", "yesterday"], "RFC 3339"),
        (lambda f, t: ["--report", str(f["report"]), "--nonce", "xyz"], "nonce must be hex"),
        (lambda f, t: [str(f["report"])], "not a confnb evidence bundle"),
        (lambda f, t: [str(t / "bad.json")], "evidence format"),
        (lambda f, t: [str(f["report"]), "--report", str(f["report"])], "not both"),
        (lambda f, t: [], "nothing to verify"),
        (lambda f, t: ["--report", str(t / "report.b64")], "neither hex nor base64"),
        (lambda f, t: ["--report", str(f["report"]), "--vek", str(t / "bad.pem")[:-3] + "b64"], "neither PEM, DER"),
        (
            lambda f, t: ["--report", str(f["report"]), "--crl-url", "https://kdsintf.amd.com/vcek/v1/Turin/crl"],
            "--crl",
        ),
    ],
    ids=[
        "missing",
        "truncated",
        "bad-pem",
        "bad-policy",
        "bad-time",
        "bad-nonce",
        "not-evidence",
        "bad-evidence",
        "both",
        "nothing",
        "bad-base64",
        "vek-neither",
        "crl-url-alone",
    ],
)
def test_unusable_input_is_one_line_and_exit_2(files, tmp_path, make_args, fragment):
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "bad.toml").write_text("[attestation]\nmax_vmpl = 9\n")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    (tmp_path / "report.b64").write_text(base64.b64encode(files["report"].read_bytes()).decode()[:-8] + "\n")
    (tmp_path / "bad.b64").write_bytes(b"\x01" * 100)
    assert_one_line_error(confnb("attest", "verify", *make_args(files, tmp_path)), fragment)


def test_show_decodes_every_field(files):
    run = confnb("attest", "show", str(files["report"]))
    assert run.returncode == 0
    for field in ("measurement", "chip_id", "reported_tcb", "launch_mit_vector", "fmc", "signing_key"):
        assert field in run.stdout
    document = json.loads(confnb("attest", "show", str(files["report"]), "--json").stdout)
    assert document["report"]["cpuid"] == {"family": 0x1A, "model": 2, "stepping": 1}
    assert document["container"] == "raw"


def test_show_unwraps_containers(shared_vectors):
    run = confnb("attest", "show", str(shared_vectors / "lit-sev-snp-utils/snp_report_msg_resp.bin"), "--json")
    assert json.loads(run.stdout)["container"] == "sev-guest-response"


def test_other_tools_forms_verify_offline_with_only_the_vek(files, tmp_path):
    """A base64 report (AWS's guides, Constellation) and a DER VCEK: AMD's ASK and ARK come with confnb."""
    report = files["report"].read_bytes()
    (tmp_path / "report.b64").write_bytes(base64.b64encode(report) + b"\n")
    run = confnb("attest", "verify", "--report", str(tmp_path / "report.b64"), "--vek", str(files["vek"]), "--offline")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "shipped with confnb" in run.stdout
    (tmp_path / "report.hex").write_text("0x" + report.hex() + "\n")
    assert (
        confnb("attest", "verify", "--report", str(tmp_path / "report.hex"), "--vek", str(files["vek"])).returncode == 0
    )


def test_a_report_with_its_certificate_table_verifies_alone(files, tmp_path):
    """What SNP_GET_EXT_REPORT returns, saved as one file: the report, then the host's certificate table."""
    vek = files["vek"].read_bytes()
    ask, ark = (cert.der for cert in load_certificates(files["chain"].read_bytes()))
    table = build_cert_table({VCEK_GUID: vek, ASK_GUID: ask, ARK_GUID: ark})
    (tmp_path / "ext-report.bin").write_bytes(files["report"].read_bytes() + table + bytes(-len(table) % 4096))
    run = confnb("attest", "verify", "--report", str(tmp_path / "ext-report.bin"), "--offline")
    assert run.returncode == 0, run.stdout + run.stderr
    shown = json.loads(confnb("attest", "show", str(tmp_path / "ext-report.bin"), "--json").stdout)
    assert shown["container"] == "report+cert-table" and len(shown["certificates"]) == 3
    (tmp_path / "certs.bin").write_bytes(table)  # the table alone, as --vek
    (tmp_path / "chain.der").write_bytes(ask + ark)  # and a chain of concatenated DER certificates
    by_table = confnb("attest", "verify", "--report", str(files["report"]), "--vek", str(tmp_path / "certs.bin"))
    assert by_table.returncode == 0, by_table.stdout + by_table.stderr
    by_der = confnb(
        "attest", "verify", "--report", str(files["report"]), "--vek", str(files["vek"]),
        "--chain", str(tmp_path / "chain.der"),
    )  # fmt: skip
    assert by_der.returncode == 0 and "chain given" in by_der.stdout, by_der.stdout + by_der.stderr


def test_a_lookalike_with_a_certificate_table_is_unusable_input(files, tmp_path):
    """A table whose VCEK slot holds the ARK is refused as input, not verified and not guessed around."""
    vek = files["vek"].read_bytes()
    ask, ark = (cert.der for cert in load_certificates(files["chain"].read_bytes()))
    table = build_cert_table({VCEK_GUID: ark, ASK_GUID: ask, ARK_GUID: vek})
    (tmp_path / "ext-report.bin").write_bytes(files["report"].read_bytes() + table)
    run = confnb("attest", "verify", "--report", str(tmp_path / "ext-report.bin"), "--offline")
    assert_one_line_error(run, "entry VCEK holds 'ARK-Turin'")


def test_simulated_round_trip_through_files(tmp_path):
    nonce = "a1" * 32
    evidence = tmp_path / "evidence.json"
    issued = confnb("attest", "report", "--simulated", "--nonce", nonce, "--out", str(evidence))
    assert issued.returncode == 0, issued.stderr
    assert "SIMULATED" in issued.stderr
    measurement = confnb("attest", "measure", "--simulated").stdout.strip()
    assert len(measurement) == 96 and int(measurement, 16) >= 0
    policy = tmp_path / "analyst.toml"
    policy.write_text(
        f'[attestation]\nallow_simulated = true\nmeasurements = ["{measurement}"]\nmax_evidence_age_s = 300\n'
    )
    accepted = confnb("attest", "verify", str(evidence), "--policy", str(policy), "--nonce", nonce)
    assert accepted.returncode == 0, accepted.stdout
    assert "SIMULATED TEE - NOT A CONFIDENTIAL VM" in accepted.stdout
    replayed = confnb("attest", "verify", str(evidence), "--policy", str(policy), "--nonce", "b2" * 32)
    assert replayed.returncode == 1 and "FAIL  nonce" in replayed.stdout
    strict = confnb("attest", "verify", str(evidence), "--json")
    assert strict.returncode == 1
    assert [c["name"] for c in json.loads(strict.stdout)["checks"] if not c["ok"]] == ["ark_pinned"]


def test_report_without_hardware_says_how_to_simulate(tmp_path):
    run = confnb("attest", "report", "--nonce", "00")
    if run.returncode == 0:
        pytest.skip("this machine is a real SEV-SNP guest")
    assert_one_line_error(run, "simulated")
    assert not any(tmp_path.iterdir())


def test_help_explains_every_action():
    run = confnb("attest", "verify", "--help")
    assert run.returncode == 0
    for option in ("--report", "--vek", "--chain", "--policy", "--nonce", "--at", "--json", "--offline", "--crl"):
        assert option in run.stdout
    assert "Exit codes" in run.stdout


def test_demo_runs_end_to_end(tmp_path):
    run = confnb("demo", "--attestation-only", "--dir", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("  ok  ") == 10 and "UNEXPECTED" not in run.stdout
    assert "confnb kernel refused: attestation failed (measurement" in run.stdout
    assert "decrypted 20,000 rows" in run.stdout and "HTTP 403" in run.stdout
    assert (tmp_path / "evidence.json").is_file() and (tmp_path / "analyst-policy.toml").is_file()
