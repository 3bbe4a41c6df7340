"""The policy view's words are made on the server side from the policy the relay reports."""

from __future__ import annotations

from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy
from confnb.policy.presets import upload_presets
from confnb.server.policies import _explained, privacy_view


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


def test_exact_mode_is_shown_with_the_rules_that_protect_exact_numbers() -> None:
    preset = upload_presets()[0]
    policy = OutputPolicy.from_toml(preset["toml"])
    entry = {"id": "visits", "source": "upload", "policy_id": policy.id, "policy": policy.to_dict()}
    assert _explained(entry)["privacy"] == {
        "mode": "exact",
        "min_group_size": policy.min_group_size,
        "difference_checks": True,  # unwritten means on
    }
    relaxed = OutputPolicy.from_toml('[policy]\nid = "r"\n[release]\nmin_group_size = 5\ndifference_checks = false\n')
    assert privacy_view(relaxed) == {"mode": "exact", "min_group_size": 5, "difference_checks": False}


def test_dp_mode_is_shown_as_the_owners_canonical_table() -> None:
    policy = OutputPolicy.from_toml(
        '[policy]\nid = "dp"\n[release]\nallow = ["aggregate"]\n'
        '[privacy]\nmode = "dp"\nepsilon = 1\ndelta = 1e-7\nepsilon_per_kernel = 0.5\nunit = "patient_id"\n'
    )
    entry = {"id": "admissions", "source": "broker", "policy_id": policy.id, "policy": policy.to_dict()}
    assert _explained(entry)["privacy"] == {
        "mode": "dp",
        "epsilon": 1.0,
        "delta": 1e-7,
        "epsilon_per_kernel": 0.5,
        "unit": "patient_id",
        "max_contributions": 1,
    }
    bad = {"id": "odd", "source": "broker", "policy_id": "x", "policy": {"release": {"allow": ["raw_rows"]}}}
    assert _explained(bad)["privacy"] is None  # unreadable: the panel says unknown, never guesses exact
