"""confnb: confidential notebooks on AMD SEV-SNP.

The client side (attestation verification, policies, datasets, the data owner's broker, the Jupyter integration)
lives here; everything that runs inside the confidential VM lives in ``kernel_enclave``.
"""

__version__ = "0.1.0"
