"""``[release] max_releases`` and ``max_kernels_per_day``: read strictly, combined strictly, explained plainly; and the
``min_group_size`` default that keeps a forgetful owner from releasing one record's values."""

from __future__ import annotations

import pytest

from confnb.attest.errors import PolicyError
from confnb.policy.explain import explain_output
from confnb.policy.output import DEFAULT_MIN_GROUP_SIZE, OutputPolicy, strictest
from confnb.policy.schema import OUTPUT_TABLES


def _toml(release: str, ident: str = "p") -> str:
    return f'[policy]\nid = "{ident}"\n[release]\nallow = ["aggregate", "row_count"]\n{release}'


def test_limits_are_read_and_round_trip_through_the_signed_form() -> None:
    policy = OutputPolicy.from_toml(_toml("max_releases = 500\nmax_kernels_per_day = 4\n"))
    assert (policy.max_releases, policy.max_kernels_per_day) == (500, 4)
    assert OutputPolicy.from_dict(policy.to_dict()) == policy
    absent = OutputPolicy.from_toml(_toml(""))
    assert absent.max_releases is None and absent.max_kernels_per_day is None
    # No limit written, none in the canonical form: digests of policies signed before the limits existed hold.
    assert set(absent.to_dict()["release"]) == {"allow", "min_group_size", "never_release"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_releases = 0", "release.max_releases: must be an integer from 1 to 1000000000, not 0"),
        ("max_releases = -3", "release.max_releases: must be an integer from 1"),
        ("max_releases = 2.5", "release.max_releases: must be an integer"),
        ('max_releases = "10"', "release.max_releases: must be an integer"),
        ("max_releases = true", "release.max_releases: must be an integer"),
        ("max_kernels_per_day = 0", "release.max_kernels_per_day: must be an integer from 1"),
        ("max_kernel_per_day = 3", "did you mean 'max_kernels_per_day'?"),
    ],
)
def test_bad_limits_are_refused_with_the_file_line_and_key(line: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        OutputPolicy.from_toml(_toml(line + "\n"), source="p.toml")
    assert "p.toml:5: " in str(caught.value) and message in str(caught.value)


def test_an_upload_policy_cannot_hold_a_daily_key_cap_no_broker_would_enforce() -> None:
    with pytest.raises(PolicyError, match="max_kernels_per_day: has no effect here"):
        OutputPolicy.from_toml(_toml("max_kernels_per_day = 2\n"), source="upload", tables=OUTPUT_TABLES)
    assert OutputPolicy.from_toml(_toml("max_releases = 2\n"), tables=OUTPUT_TABLES).max_releases == 2  # the twin


def test_strictest_takes_the_smallest_limit_of_those_set() -> None:
    a = OutputPolicy.from_toml(_toml("max_releases = 50\n", "a"))
    b = OutputPolicy.from_toml(_toml("max_releases = 20\nmax_kernels_per_day = 3\n", "b"))
    c = OutputPolicy.from_toml(_toml("", "c"))
    combined = strictest([a, b, c])
    assert (combined.max_releases, combined.max_kernels_per_day) == (20, 3)
    assert strictest([c, c]).max_releases is None


def test_explain_states_both_limits_and_their_product() -> None:
    lines = explain_output(OutputPolicy.from_toml(_toml("max_releases = 100\nmax_kernels_per_day = 5\n")))
    text = "\n".join(lines)
    assert "at most 100 releases" in text and "(release.max_releases)" in text
    assert "at most 5 kernels per UTC day" in text and "at most 500 releases in all" in text


def test_explain_says_when_there_is_no_limit() -> None:
    text = "\n".join(explain_output(OutputPolicy.from_toml(_toml(""))))
    assert "any number of releases (no max_releases)" in text
    assert "Any number of kernels per day may be given the dataset's key (no max_kernels_per_day)." in text
    # A policy that releases nothing but the schema has no count to limit, and says nothing of one.
    schema_only = OutputPolicy.from_toml('[policy]\nid = "s"\n[release]\nallow = ["schema"]\n')
    assert "max_releases" not in "\n".join(explain_output(schema_only))


def test_a_policy_without_min_group_size_gets_ten_and_never_reads_as_single_records() -> None:
    policy = OutputPolicy.from_toml(_toml(""))
    assert policy.min_group_size == DEFAULT_MIN_GROUP_SIZE == 10
    assert policy.to_dict()["release"]["min_group_size"] == 10  # the vault receives the default, written out
    text = "\n".join(explain_output(policy))
    assert "even single records" not in text and "at least 10 records" in text
    # The twin: an owner who writes 1 gets 1, and the explanation says exactly what that means.
    single = OutputPolicy.from_toml(_toml("min_group_size = 1\n"))
    assert single.min_group_size == 1 and "even single records" in "\n".join(explain_output(single))
