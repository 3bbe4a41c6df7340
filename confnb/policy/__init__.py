"""Policies people write: the data owner's output policy and the shared TOML validation behind every policy file.

The attestation half (``[attestation]``) lives in :mod:`confnb.attest.policy`; the output half (``[policy]``,
``[release]``, ``[display]``) in :mod:`confnb.policy.output`. One file may hold both.
"""
