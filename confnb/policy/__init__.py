"""Policies people write: the data owner's output policy and the shared TOML validation behind every policy file.

The attestation half (``[attestation]``) lives in :mod:`confnb.attest.policy`; the output half (``[policy]``,
``[release]``, ``[display]``) in :mod:`confnb.policy.output`. One file may hold both, and nothing else: every name a
file may use, at any level, is listed in :mod:`confnb.policy.schema`, and any other is an error wherever the file is
read.
"""
