"""The policy view's words are made on the server side from the policy the relay reports."""

from __future__ import annotations

from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy
from confnb.policy.presets import upload_presets
from confnb.server.policies import _explained


def test_a_reported_policy_is_explained_as_the_owner_would_read_it() -> None:
    preset = upload_presets()[0]
    policy = OutputPolicy.from_toml(preset["toml"])
    entry = {"id": "visits", "source": "upload", "policy_id": policy.id, "policy": policy.to_dict()}
    explained = _explained(entry)
    assert explained["explanation"] == explain_output(policy)
    assert {key: explained[key] for key in entry} == entry


def test_a_policy_that_does_not_parse_is_said_so_not_shown_as_permissive() -> None:
    entry = {"id": "odd", "source": "broker", "policy_id": "x", "policy": {"release": {"allow": ["raw_rows"]}}}
    [line] = _explained(entry)["explanation"]
    assert line.startswith("the kernel reported a policy that does not parse")
