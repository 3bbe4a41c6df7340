"""``confnb attest``: show, verify, issue and measure SEV-SNP attestations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from confnb.attest.certtable import der_to_pem
from confnb.attest.errors import EvidenceError
from confnb.attest.evidence import Evidence, parse_nonce, parse_rfc3339
from confnb.attest.inputs import ReportInput, decode_report
from confnb.attest.kds import KdsClient
from confnb.attest.report import AttestationReport
from confnb.attest.result import Outcome, VerificationResult
from confnb.attest.verifier import Verifier
from confnb.cli.common import (
    EXIT_OK,
    EXIT_REJECTED,
    UsageError,
    paint,
    print_json,
    read_bytes,
    write_output,
)

SIMULATED_BANNER = "SIMULATED TEE - NOT A CONFIDENTIAL VM: these keys and reports prove nothing about hardware"


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "attest",
        help="show, verify, issue and measure SEV-SNP attestation reports",
        description="Inspect and verify AMD SEV-SNP attestation reports and confnb evidence bundles.",
    )
    commands = parser.add_subparsers(dest="attest_command", metavar="ACTION", required=True)

    show = commands.add_parser(
        "show",
        help="decode every field of a report",
        description="Decode every field of an ATTESTATION_REPORT (raw 1184 bytes, with a trailing newline, hex with "
        "or without 0x, base64 or base64url, a /dev/sev-guest response, an Azure HCL report or a report cut from "
        "one with its runtime-data header, a report followed by its certificate table, or a confnb evidence "
        "bundle). Decoding is not verification.",
    )
    show.add_argument("report", metavar="REPORT", help="report or evidence file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)

    verify = commands.add_parser(
        "verify",
        help="verify a report or evidence bundle (authenticity, then policy)",
        description="Without --policy: authenticity only (format, AMD's pinned root, chain, validity, signature, "
        "TCB and chip binding, key type). With --policy: authenticity plus the policy's appraisal.",
        epilog="Exit codes: 0 verified, 1 rejected (failing checks printed), 2 unusable input.",
    )
    verify.add_argument("evidence", nargs="?", metavar="EVIDENCE.json", help="a confnb-evidence/1 bundle")
    verify.add_argument(
        "--report",
        metavar="FILE",
        help="a bare report, in any form 'attest show' reads (instead of an evidence bundle); "
        "certificates appended to it in a certificate table are used when --vek is not given",
    )
    verify.add_argument(
        "--vek",
        metavar="FILE",
        help="VCEK or VLEK certificate: PEM or DER, or a /dev/sev-guest certificate table (which carries the chain)",
    )
    verify.add_argument(
        "--chain",
        metavar="FILE",
        help="ASK/ASVK and ARK certificates: PEM or DER, several concatenated (default: the ones confnb ships)",
    )
    verify.add_argument("--policy", metavar="FILE", help="appraisal policy (TOML with an [attestation] table)")
    verify.add_argument("--nonce", metavar="HEX", help="the nonce the evidence must carry (freshness)")
    verify.add_argument("--at", metavar="RFC3339", help="verify as of this time (default: now)")
    verify.add_argument("--crl", metavar="FILE", help="check revocation against this ARK-signed CRL")
    verify.add_argument(
        "--crl-url",
        metavar="URL",
        help="where the --crl file was downloaded from (…/vcek/v1/<Product>/crl or …/vlek/…), which shows the "
        "certificates it covers when the CRL does not name its distribution point itself",
    )
    verify.add_argument(
        "--offline", action="store_true", help="never contact AMD KDS; use only the input and the local cache"
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help='print {"verified", "checks": [{"name", "ok", "detail"}], "report"}',
    )
    verify.set_defaults(handler=_verify)

    report = commands.add_parser(
        "report",
        help="ask the TEE for fresh evidence bound to a nonce",
        description="Obtain a report from this VM's TEE (or the simulated one) bound to NONCE and to freshly "
        "generated keys, and write a confnb-evidence/1 bundle. The keys' private halves are discarded: "
        "the bundle shows what a kernel's evidence looks like; kernels bind their own keys.",
    )
    source = report.add_mutually_exclusive_group()
    source.add_argument("--simulated", action="store_true", help="use the simulated TEE (no hardware needed)")
    source.add_argument(
        "--tee",
        choices=("auto", "sev-snp", "simulated"),
        default="auto",
        help="which TEE backend (default: auto-detect SEV-SNP)",
    )
    report.add_argument("--nonce", metavar="HEX", required=True, help="the verifier's nonce, 1-64 bytes of hex")
    report.add_argument("--vmpl", type=int, default=0, choices=range(4), help="VMPL to request (default 0)")
    report.add_argument("--out", metavar="FILE", help="write the bundle here (default: standard output)")
    report.set_defaults(handler=_report)

    measure = commands.add_parser(
        "measure",
        help="print the launch measurement policies should pin",
        description="Print the expected MEASUREMENT as 96 hex characters. For a real SEV-SNP VM it is computed "
        "from the launch inputs (OVMF, and for a measured direct boot the kernel, initrd and command line, which "
        "QEMU hashes with kernel-hashes=on) by sev-snp-measure. For the simulated TEE it is the SHA-384 of the "
        "installed enclave code (kernel_enclave and the confnb modules it uses), so it changes whenever that code "
        "changes.",
        epilog="Every input must be exactly what the VMM is given: another OVMF build, vCPU count or model, or one "
        "more space in --append yields another measurement. Exit codes: 0 printed, 2 unusable input.",
    )
    measure.add_argument("--simulated", action="store_true", help="measure the simulated TEE instead of a real VM")
    measure.add_argument("--ovmf", metavar="OVMF.fd", help="the firmware image the VM boots (an SEV-SNP build)")
    measure.add_argument("--kernel", metavar="FILE", help="kernel of a measured direct boot (QEMU -kernel)")
    measure.add_argument("--initrd", metavar="FILE", help="initrd of a measured direct boot (QEMU -initrd)")
    measure.add_argument("--append", metavar="CMDLINE", help="kernel command line, byte for byte (QEMU -append)")
    measure.add_argument("--vcpus", metavar="N", help="number of vCPUs (QEMU -smp); each one's VMSA is measured")
    measure.add_argument("--vcpu-type", metavar="MODEL", help="QEMU -cpu model, e.g. EPYC-v4 or EPYC-Milan")
    measure.add_argument("--vcpu-sig", metavar="VALUE", help="or the vCPU's CPUID(1).EAX signature, e.g. 0x800f12")
    measure.add_argument("--vcpu-family", metavar="N", help="or its family (with --vcpu-model and --vcpu-stepping)")
    measure.add_argument("--vcpu-model", metavar="N", help="vCPU model number")
    measure.add_argument("--vcpu-stepping", metavar="N", help="vCPU stepping")
    measure.add_argument(
        "--vmm-type", metavar="qemu|ec2", default="qemu", help="the VMM that launches the VM (default: qemu)"
    )
    measure.add_argument(
        "--guest-features",
        metavar="VALUE",
        default="0x1",
        help="SEV_FEATURES of every vCPU (default 0x1, SNPActive, as KVM sets it; Linux 6.6 and 6.7 hosts set 0x21, "
        "adding DebugSwap)",
    )
    measure.add_argument(
        "--json", action="store_true", help="print JSON (for a real VM: the inputs, their SHA-256 and a policy line)"
    )
    measure.set_defaults(handler=_measure)


# -- show ---------------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    data = read_bytes(args.report, "report")
    evidence = _maybe_evidence(data)
    if evidence is not None:
        report, container = evidence.report, "confnb-evidence/1"
        attached: tuple[bytes, ...] = ()
    else:
        found = decode_report(data)
        report, container, attached = found.report, found.container, found.certificates
    parsed = AttestationReport.parse(report)
    document = parsed.to_dict()
    if args.json:
        print_json(
            {
                "container": container,
                "certificates": [_describe_certificate(der) for der in attached],
                "report": document,
                "claims": evidence.claims if evidence else None,
                "tee": evidence.tee if evidence else None,
            }
        )
        return EXIT_OK
    if evidence is not None and evidence.simulated:
        print(paint(SIMULATED_BANNER, "inverse-yellow"))
    print(f"ATTESTATION_REPORT v{parsed.version} ({container})")
    _print_tree(document, indent=1)
    if attached:
        print("certificates attached to the report:")
        for der in attached:
            print(f"  {_describe_certificate(der)}")
    if evidence is not None:
        print("claims (bound by REPORT_DATA; verify to trust them):")
        _print_tree(evidence.claims, indent=1)
    problems = [*parsed.reserved_problems(), *parsed.signature_padding_problems()]
    if problems:
        print(paint("format problems: " + "; ".join(problems), "red"))
    print(paint("decoded only - run 'confnb attest verify' to check it", "dim"))
    return EXIT_OK


def _describe_certificate(der: bytes) -> str:
    from confnb.attest.certs import parse_certificate

    return parse_certificate(der).describe()


def _print_tree(document: dict[str, Any], indent: int) -> None:
    width = max((len(key) for key in document), default=0)
    for key, value in document.items():
        if isinstance(value, dict):
            print(f"{'  ' * indent}{key}:")
            _print_tree(value, indent + 1)
        else:
            print(f"{'  ' * indent}{key.ljust(width)}  {'-' if value is None else value}")


# -- verify -------------------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    if args.evidence and args.report:
        raise UsageError("give either an EVIDENCE.json bundle or --report, not both")
    if not args.evidence and not args.report:
        raise UsageError("nothing to verify: give an EVIDENCE.json bundle or --report FILE")
    if args.evidence and (args.vek or args.chain):
        raise UsageError("--vek and --chain go with --report; an evidence bundle carries its own certificates")
    if args.crl_url and not args.crl:
        raise UsageError("--crl-url says where the --crl file came from; give --crl FILE too")
    at = parse_rfc3339(args.at) if args.at else None
    nonce = parse_nonce(args.nonce) if args.nonce else None
    crl = read_bytes(args.crl, "CRL") if args.crl else None
    policy = None
    if args.policy:
        from confnb.attest.policy import AttestationPolicy

        policy = AttestationPolicy.load(args.policy)
    verifier = Verifier(KdsClient(offline=True if args.offline else None))
    if args.evidence:
        data = read_bytes(args.evidence, "evidence")
        evidence = _maybe_evidence(data)
        if evidence is None:
            raise UsageError(f"{args.evidence} is not a confnb evidence bundle (for a bare report use --report)")
        result = verifier.verify_evidence(evidence, policy, at, nonce=nonce, crl=crl, crl_url=args.crl_url)
    else:
        found = decode_report(read_bytes(args.report, "report"))
        vek = read_bytes(args.vek, "VEK certificate") if args.vek else None
        chain = read_bytes(args.chain, "certificate chain") if args.chain else None
        vek, chain = _with_attached(found, vek, chain)
        result = verifier.verify(found.report, vek, chain, policy, at, nonce=nonce, crl=crl, crl_url=args.crl_url)
    if args.json:
        print_json(result.to_dict())
    else:
        print_result(result)
    return EXIT_OK if result.ok else EXIT_REJECTED


def _with_attached(found: ReportInput, vek: bytes | None, chain: bytes | None) -> tuple[bytes | None, bytes | None]:
    """Certificates appended to the report stand in for --vek when it is not given, and join the chain pool when
    it is (the verifier still picks each by role and checks every signature)."""
    if not found.certificates:
        return vek, chain
    attached = "".join(der_to_pem(der) for der in found.certificates).encode("ascii")
    if vek is None:
        return attached, chain
    return vek, attached if chain is None else _as_pem(chain) + attached


def _as_pem(chain: bytes) -> bytes:
    from confnb.attest.inputs import load_certificate_input

    return "".join(der_to_pem(cert.der) for cert in load_certificate_input(chain, "certificate chain")).encode()


def print_result(result: VerificationResult) -> None:
    """The verdict first, then every check, so a person sees at once what failed and why."""
    if result.simulated:
        print(paint(SIMULATED_BANNER, "inverse-yellow"))
    verdict = result.summary() if result.ok else "REJECTED"
    print(paint(verdict, "green" if result.ok else "red"))
    marks = {
        Outcome.PASS: paint("pass", "green"),
        Outcome.FAIL: paint("FAIL", "red"),
        Outcome.SKIP: paint("skip", "dim"),
    }
    width = max((len(check.name) for check in result.checks), default=0)
    for check in result.checks:
        print(f"  {marks[check.outcome]}  {check.name.ljust(width)}  {check.detail}")
    if not result.ok:
        failing = [check.name for check in result.failures] or ["(required checks did not run)"]
        print(paint(f"rejected by: {', '.join(failing)}", "red"), file=sys.stderr)


def _maybe_evidence(data: bytes) -> Evidence | None:
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        return Evidence.from_json(data)
    except EvidenceError:
        raise
    except ValueError as exc:
        raise EvidenceError(f"evidence bundle: {exc}") from None


# -- report and measure -------------------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    from kernel_enclave.attestation import issue_evidence
    from kernel_enclave.tee import TeeError, get_backend

    nonce = parse_nonce(args.nonce)
    name = "simulated" if args.simulated else args.tee
    try:
        backend = get_backend(name)
        evidence = issue_evidence(backend, nonce, vmpl=args.vmpl, **throwaway_public_keys())
    except TeeError as exc:
        raise UsageError(str(exc)) from None
    text = evidence.to_json() + "\n"
    if args.out:
        write_output(Path(args.out), text.encode())
        print(f"wrote {args.out} ({evidence.tee} evidence, nonce {nonce.hex()})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if evidence.simulated:
        print(paint(SIMULATED_BANNER, "inverse-yellow", sys.stderr), file=sys.stderr)
    return EXIT_OK


def throwaway_public_keys() -> dict[str, Any]:
    """Fresh HPKE (P-256), Ed25519 and CurveZMQ public keys whose private halves are dropped at once."""
    import zmq
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    hpke = ec.generate_private_key(ec.SECP256R1()).public_key()
    signing = ed25519.Ed25519PrivateKey.generate().public_key()
    curve_public, _curve_secret = zmq.curve_keypair()
    return {
        "hpke_public_key": hpke.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        "signing_public_key": signing.public_bytes(Encoding.Raw, PublicFormat.Raw),
        "curve_public_key": curve_public.decode("ascii"),
    }


_VM_INPUTS = (
    "ovmf",
    "kernel",
    "initrd",
    "append",
    "vcpus",
    "vcpu_type",
    "vcpu_sig",
    "vcpu_family",
    "vcpu_model",
    "vcpu_stepping",
)


def _measure(args: argparse.Namespace) -> int:
    given = [f"--{name.replace('_', '-')}" for name in _VM_INPUTS if getattr(args, name) is not None]
    if args.simulated:
        if given:
            raise UsageError(f"--simulated measures the installed enclave code; {', '.join(given)} describe a real VM")
        return _measure_simulated(args)
    if args.ovmf is None:
        raise UsageError(
            "nothing to measure: give --ovmf OVMF.fd --vcpus N --vcpu-type MODEL for a real SEV-SNP VM, or --simulated"
        )
    return _measure_vm(args)


def _measure_simulated(args: argparse.Namespace) -> int:
    from kernel_enclave.measurement import simulated_measurement

    measurement = simulated_measurement().hex()
    if args.json:
        print_json({"tee": "simulated", "measurement": measurement})
    else:
        print(measurement)
    return EXIT_OK


def _measure_vm(args: argparse.Namespace) -> int:
    from confnb.attest.measure import LaunchConfig, snp_launch_measurement, vcpu_signature

    if args.vcpus is None:
        raise UsageError("--vcpus N is required: every vCPU's initial state is part of the measurement")
    config = LaunchConfig(
        ovmf=Path(args.ovmf),
        vcpus=_integer("--vcpus", args.vcpus, base=10),
        vcpu_signature=vcpu_signature(
            vcpu_type=args.vcpu_type,
            signature=_optional_integer("--vcpu-sig", args.vcpu_sig, base=0),
            family=_optional_integer("--vcpu-family", args.vcpu_family, base=10),
            model=_optional_integer("--vcpu-model", args.vcpu_model, base=10),
            stepping=_optional_integer("--vcpu-stepping", args.vcpu_stepping, base=10),
        ),
        vmm_type=args.vmm_type.lower(),
        kernel=Path(args.kernel) if args.kernel is not None else None,
        initrd=Path(args.initrd) if args.initrd is not None else None,
        append=args.append,
        guest_features=_integer("--guest-features", args.guest_features, base=0),
    )
    result = snp_launch_measurement(config)
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.measurement.hex())
    return EXIT_OK


def _integer(option: str, text: str, base: int) -> int:
    try:
        return int(text, base)
    except ValueError:
        expected = "an integer (decimal, or 0x... hex)" if base == 0 else "a decimal integer"
        raise UsageError(f"{option} {text!r} is not {expected}") from None


def _optional_integer(option: str, text: str | None, base: int) -> int | None:
    return None if text is None else _integer(option, text, base)
