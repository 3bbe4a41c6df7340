"""``confnb kernel``: install the "Confidential Python (SEV-SNP)" kernelspec for Jupyter."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from confnb.cli.common import EXIT_OK, UsageError, print_json, read_bytes


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "kernel",
        help="install the confidential kernel for Jupyter",
        description="Manage the confnb-snp kernelspec, whose kernels are started by confnb-provisioner and reach "
        "Jupyter only after their attestation verifies.",
    )
    commands = parser.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)

    install = commands.add_parser(
        "install",
        help="install the kernelspec",
        description="Install the confnb-snp kernelspec with its attestation policy. Without --policy, a local "
        "simulated-TEE kernel gets a policy that accepts simulated hardware but pins this installation's exact "
        "enclave code.",
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python environment (sys.prefix)")
    where.add_argument("--prefix", metavar="DIR", help="install under DIR/share/jupyter/kernels")
    install.add_argument("--name", default=None, help="kernelspec name (default: confnb-snp)")
    install.add_argument("--mode", choices=("local", "ssh"), default="local", help="where the launcher runs")
    install.add_argument(
        "--tee", choices=("simulated", "auto", "sev-snp"), default="simulated", help="TEE backend of the launcher"
    )
    install.add_argument("--policy", metavar="FILE", help="attestation policy to install with the kernelspec")
    install.add_argument("--display-policy", metavar="FILE", help="TOML whose [display] table tightens output")
    install.add_argument("--ssh-host", help="ssh mode: the confidential VM to start kernels in")
    install.add_argument("--ssh-user", help="ssh mode: remote user")
    install.add_argument("--ssh-port", type=int, help="ssh mode: remote port")
    install.add_argument("--ssh-identity-file", metavar="FILE", help="ssh mode: private key for ssh -i")
    install.add_argument("--json", action="store_true", help="print the result as JSON")
    install.set_defaults(handler=run_install)

    uninstall = commands.add_parser("uninstall", help="remove the kernelspec", description="Remove the kernelspec.")
    uninstall.add_argument("--name", default=None, help="kernelspec name (default: confnb-snp)")
    uninstall.add_argument("--json", action="store_true", help="print the result as JSON")
    uninstall.set_defaults(handler=run_uninstall)


def run_install(args: argparse.Namespace) -> int:
    from confnb.attest.policy import AttestationPolicy
    from confnb.provisioner.kernelspec import KERNEL_NAME, install

    policy_text = None
    if args.policy:
        policy_text = read_bytes(args.policy, "policy").decode("utf-8", "replace")
        AttestationPolicy.from_toml(policy_text, source=args.policy)  # refuse to install a broken policy
    elif args.tee != "simulated":
        raise UsageError("a kernel on real hardware needs --policy FILE (an [attestation] table)")
    config: dict[str, Any] = {}
    if args.display_policy:
        config["display_policy"] = args.display_policy
    if args.mode == "ssh":
        if not args.ssh_host:
            raise UsageError("--mode ssh needs --ssh-host")
        config["ssh_host"] = args.ssh_host
        for option in ("ssh_user", "ssh_port", "ssh_identity_file"):
            if getattr(args, option):
                config[option] = getattr(args, option)
    elif args.ssh_host:
        raise UsageError("--ssh-host is for --mode ssh")
    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        path = install(
            user=args.user,
            prefix=prefix,
            mode=args.mode,
            tee=args.tee,
            policy_text=policy_text,
            config=config,
            name=args.name or KERNEL_NAME,
        )
    except OSError as exc:
        raise UsageError(f"cannot install the kernelspec: {exc.strerror or exc}") from None
    if args.json:
        print_json({"installed": args.name or KERNEL_NAME, "path": str(path), "mode": args.mode, "tee": args.tee})
    else:
        print(f"Installed kernelspec {args.name or KERNEL_NAME} in {path}")
    return EXIT_OK


def run_uninstall(args: argparse.Namespace) -> int:
    from jupyter_client.kernelspec import KernelSpecManager

    from confnb.provisioner.kernelspec import KERNEL_NAME

    name = args.name or KERNEL_NAME
    try:
        path = KernelSpecManager().remove_kernel_spec(name)
    except KeyError:
        raise UsageError(f"no kernelspec named {name}") from None
    except OSError as exc:
        raise UsageError(f"cannot remove the kernelspec {name}: {exc.strerror or exc}") from None
    if args.json:
        print_json({"removed": name, "path": path})
    else:
        print(f"Removed kernelspec {name} from {path}")
    return EXIT_OK
