"""The kernel provisioner that starts confidential kernels and verifies them before Jupyter may use them."""

from confnb.provisioner.provisioner import ConfidentialProvisioner, KernelLaunchError

__all__ = ["ConfidentialProvisioner", "KernelLaunchError"]
