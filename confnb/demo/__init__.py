"""``confnb demo``: the attestation walkthrough, then the example use cases on brokers, kernels and JupyterLab.

The pieces live in their own modules so the example owner scripts can reuse the owner steps (:mod:`.owner`) and
the tests can drive the notebook checks (:mod:`.notebooks`) without the command line around them.
"""
