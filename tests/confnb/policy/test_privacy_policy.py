"""The owner's ``[privacy]`` table and default-on difference checks: read strictly, signed canonically, combined,
explained; every refusal names the file, the line and the key, and has a twin that loads."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.attest.errors import PolicyError
from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy, strictest
from confnb.policy.privacy import MAX_KEYS, PrivacyPolicy
from confnb.policy.schema import OUTPUT, OUTPUT_TABLES

HEAD = '[policy]\nid = "p"\n[release]\nallow = ["schema", "row_count", "aggregate"]\n'
FULL = (
    HEAD + "[privacy]\n"
    'mode = "dp"\n'
    "epsilon = 1.0\n"
    "delta = 1e-7\n"
    "epsilon_per_kernel = 0.5\n"
    'unit = "patient_id"\n'
    "max_contributions = 1\n"
    'public = ["row_count"]\n'
    "[privacy.bounds]\n"
    "age = [0, 120]\n"
    "cost = [0.0, 100000.0]\n"
    "[privacy.keys]\n"
    'diagnosis = ["cardiac", "respiratory", "orthopaedic"]\n'
)
CANONICAL = {
    "mode": "dp",
    "epsilon": 1.0,
    "delta": 1e-07,
    "epsilon_per_kernel": 0.5,
    "unit": "patient_id",
    "max_contributions": 1,
    "public": ["row_count"],
    "bounds": {"age": [0.0, 120.0], "cost": [0.0, 100000.0]},
    "keys": {"diagnosis": ["cardiac", "respiratory", "orthopaedic"]},
}

# Computed before the [privacy] table existed: policies without it must keep their signed digests.
FIXED = (
    '[policy]\nid = "claims-2026-v1"\n[release]\nallow = ["schema", "row_count", "aggregate", "model_metrics"]\n'
    'min_group_size = 10\nnever_release = ["patient_id"]\nmax_rows = 1000\nmax_releases = 500\n'
    '[display]\nmime = ["text/plain", "text/markdown", "image/png"]\nmax_output_bytes = 1000000\n'
    'tracebacks = "redacted"\n'
)
FIXED_DIGEST = "sha256:30a033e6f1b82f66793652aced3230845b9efc20bd16858e76b1e4c3b4f780ae"
FIXED_WITH_CHECKS_DIGEST = "sha256:41945ad5cd44809e9855c1f98171ac8be38eb480ad21746e57cc40aba7ec652d"
MINIMAL_DIGEST = "sha256:d55cf82f064759939e63e8ef418248c213da38a09de0a1a4cbddf69a6d068d77"


def _refusal(text: str, **kwargs: object) -> str:
    with pytest.raises(PolicyError) as caught:
        OutputPolicy.from_toml(text, source="policy.toml", **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


# -- reading and the canonical form ---------------------------------------------------------------------------


def test_the_agreed_table_reads_and_round_trips_through_the_signed_form() -> None:
    policy = OutputPolicy.from_toml(FULL)
    assert policy.privacy == PrivacyPolicy(
        mode="dp",
        epsilon=1.0,
        delta=1e-7,
        epsilon_per_kernel=0.5,
        unit="patient_id",
        max_contributions=1,
        public=("row_count",),
        bounds={"age": (0.0, 120.0), "cost": (0.0, 100000.0)},
        keys={"diagnosis": ("cardiac", "respiratory", "orthopaedic")},
    )
    assert policy.is_dp and policy.privacy is not None and policy.privacy.is_dp
    document = policy.to_dict()
    assert document["privacy"] == CANONICAL
    assert all(isinstance(document["privacy"][key], float) for key in ("epsilon", "delta", "epsilon_per_kernel"))
    assert all(isinstance(bound, float) for pair in document["privacy"]["bounds"].values() for bound in pair)
    again = OutputPolicy.from_dict(json.loads(policy.canonical_json()))  # what the vault receives: JSON
    assert again == policy and again.canonical_json() == policy.canonical_json()
    assert hash(again.privacy) == hash(policy.privacy)


def test_defaults_and_absent_keys_stay_out_of_the_canonical_form() -> None:
    policy = OutputPolicy.from_toml(HEAD + '[privacy]\nmode = "dp"\nepsilon = 2\n')
    assert policy.privacy == PrivacyPolicy(mode="dp", epsilon=2.0)
    assert policy.to_dict()["privacy"] == {"mode": "dp", "epsilon": 2.0, "delta": 0.0, "max_contributions": 1}
    assert OutputPolicy.from_dict(policy.to_dict()) == policy
    empty_lists = OutputPolicy.from_toml(HEAD + '[privacy]\nmode = "dp"\nepsilon = 2\npublic = []\n')
    assert empty_lists.to_dict()["privacy"] == policy.to_dict()["privacy"]


def test_exact_mode_and_an_absent_table() -> None:
    exact = OutputPolicy.from_toml(HEAD + '[privacy]\nmode = "exact"\n')
    assert exact.privacy == PrivacyPolicy() and not exact.is_dp
    assert exact.to_dict()["privacy"] == {"mode": "exact"}
    assert OutputPolicy.from_dict(exact.to_dict()) == exact
    absent = OutputPolicy.from_toml(HEAD)
    assert absent.privacy is None and not absent.is_dp and "privacy" not in absent.to_dict()
    assert exact.digest() != absent.digest()  # the owner wrote a table, and signed it


def test_policies_without_the_table_keep_their_digests() -> None:
    assert OutputPolicy.from_toml(FIXED).digest() == FIXED_DIGEST
    checked = FIXED.replace("max_releases = 500\n", "max_releases = 500\ndifference_checks = true\n")
    assert OutputPolicy.from_toml(checked).digest() == FIXED_WITH_CHECKS_DIGEST
    assert OutputPolicy.from_toml('[policy]\nid = "p"\n').digest() == MINIMAL_DIGEST
    assert OutputPolicy(id="p", sources=("p",)).digest() == MINIMAL_DIGEST


def test_the_schema_names_exactly_the_keys_of_a_full_table() -> None:
    assert set(CANONICAL) == set(OUTPUT["privacy"].children)
    assert "privacy" in OUTPUT_TABLES


def test_a_privacy_table_alone_is_an_output_policy_that_needs_an_id() -> None:
    message = _refusal('[privacy]\nmode = "exact"\n')
    assert message == 'policy.toml: [policy] needs an id, e.g. id = "claims-2026-v1"'
    assert OutputPolicy.from_toml('[policy]\nid = "p"\n[privacy]\nmode = "exact"\n').privacy == PrivacyPolicy()


# -- refusals: one rule each, with the line and the key, and a twin that loads ---------------------------------

# (the table's body after "[privacy]" on line 5, the twin's body, the line of the error, what the error says)
RULES = [
    ("epsilon = 1.0\n", 'mode = "dp"\nepsilon = 1.0\n', 5, '[privacy]: needs a mode: "exact"'),
    (
        'mode = "DP"\nepsilon = 1.0\n',
        'mode = "dp"\nepsilon = 1.0\n',
        6,
        'privacy.mode: must be "exact" or "dp", not \'DP\'',
    ),
    ("mode = 1\n", 'mode = "exact"\n', 6, 'privacy.mode: must be "exact" or "dp", not 1'),
    (
        'mode = "exact"\nepsilon = 1.0\n',
        'mode = "dp"\nepsilon = 1.0\n',
        7,
        "privacy.epsilon: has no effect in exact mode",
    ),
    ('mode = "exact"\nunit = "id"\n', 'mode = "exact"\n', 7, "privacy.unit: has no effect in exact mode"),
    ('mode = "exact"\npublic = []\n', 'mode = "exact"\n', 7, "privacy.public: has no effect in exact mode"),
    ('mode = "exact"\n[privacy.bounds]\n', 'mode = "exact"\n', 7, "privacy.bounds: has no effect in exact mode"),
    ('mode = "exact"\nkeys = {}\n', 'mode = "exact"\n', 7, "privacy.keys: has no effect in exact mode"),
    ('mode = "dp"\n', 'mode = "dp"\nepsilon = 0.1\n', 5, '[privacy]: mode = "dp" needs epsilon'),
    ('mode = "dp"\nepsilon = 0\n', 'mode = "dp"\nepsilon = 1e-9\n', 7, "privacy.epsilon: must be a number above 0"),
    ('mode = "dp"\nepsilon = -1.0\n', 'mode = "dp"\nepsilon = 1.0\n', 7, "privacy.epsilon: must be a number above 0"),
    ('mode = "dp"\nepsilon = 100.5\n', 'mode = "dp"\nepsilon = 100\n', 7, "at most 100, not 100.5"),
    ('mode = "dp"\nepsilon = "1"\n', 'mode = "dp"\nepsilon = 1\n', 7, "privacy.epsilon: must be a number, not '1'"),
    ('mode = "dp"\nepsilon = true\n', 'mode = "dp"\nepsilon = 1\n', 7, "privacy.epsilon: must be a number, not True"),
    ('mode = "dp"\nepsilon = nan\n', 'mode = "dp"\nepsilon = 1\n', 7, "privacy.epsilon: must be a finite number"),
    ('mode = "dp"\nepsilon = inf\n', 'mode = "dp"\nepsilon = 1\n', 7, "privacy.epsilon: must be a finite number"),
    (
        'mode = "dp"\nepsilon = 1\ndelta = 1e-3\n',
        'mode = "dp"\nepsilon = 1\ndelta = 9.9e-4\n',
        8,
        "privacy.delta: must",
    ),
    ('mode = "dp"\nepsilon = 1\ndelta = -1e-9\n', 'mode = "dp"\nepsilon = 1\ndelta = 0\n', 8, "from 0 to below 0.001"),
    (
        'mode = "dp"\nepsilon = 1\nepsilon_per_kernel = 1.5\n',
        'mode = "dp"\nepsilon = 1\nepsilon_per_kernel = 1\n',
        8,
        "privacy.epsilon_per_kernel: must be a number above 0 and at most epsilon (1.0), not 1.5",
    ),
    (
        'mode = "dp"\nepsilon = 1\nepsilon_per_kernel = 0\n',
        'mode = "dp"\nepsilon = 1\nepsilon_per_kernel = 0.01\n',
        8,
        "privacy.epsilon_per_kernel: must be a number above 0",
    ),
    (
        'mode = "dp"\nepsilon = 1\nunit = ""\n',
        'mode = "dp"\nepsilon = 1\nunit = "u"\n',
        8,
        "privacy.unit: must be a col",
    ),
    (
        'mode = "dp"\nepsilon = 1\nunit = 3\n',
        'mode = "dp"\nepsilon = 1\nunit = "3"\n',
        8,
        "privacy.unit: must be a col",
    ),
    (
        'mode = "dp"\nepsilon = 1\nmax_contributions = 0\n',
        'mode = "dp"\nepsilon = 1\nmax_contributions = 10000\n',
        8,
        "privacy.max_contributions: must be an integer from 1 to 10000, not 0",
    ),
    (
        'mode = "dp"\nepsilon = 1\nmax_contributions = 2.0\n',
        'mode = "dp"\nepsilon = 1\nmax_contributions = 2\n',
        8,
        "privacy.max_contributions: must be an integer",
    ),
    (
        'mode = "dp"\nepsilon = 1\npublic = ["schema"]\n',
        'mode = "dp"\nepsilon = 1\npublic = []\n',
        8,
        "privacy.public: 'schema' is always released",
    ),
    (
        'mode = "dp"\nepsilon = 1\npublic = ["aggregate"]\n',
        'mode = "dp"\nepsilon = 1\npublic = ["row_count"]\n',
        8,
        "privacy.public: 'aggregate' is not one of row_count",
    ),
    (
        'mode = "dp"\nepsilon = 1\npublic = ["row_count", "row_count"]\n',
        'mode = "dp"\nepsilon = 1\npublic = ["row_count"]\n',
        8,
        "privacy.public: lists an entry twice",
    ),
    (
        'mode = "dp"\nepsilon = 1\npublic = "row_count"\n',
        'mode = "dp"\nepsilon = 1\npublic = ["row_count"]\n',
        8,
        "privacy.public: must be a list",
    ),
    (
        'mode = "dp"\nepsilon = 1\nbounds = [0, 120]\n',
        'mode = "dp"\nepsilon = 1\nbounds = { age = [0, 120] }\n',
        8,
        "privacy.bounds: must be a table such as { age = [0, 120] }",
    ),
    *[
        (
            f'mode = "dp"\nepsilon = 1\n[privacy.bounds]\nheight = [1, 2]\nage = {bad}\n',
            'mode = "dp"\nepsilon = 1\n[privacy.bounds]\nheight = [1, 2]\nage = [0, 120]\n',
            10,
            f"privacy.bounds.age: must be [low, high], two finite numbers with low < high, not {shown}",
        )
        for bad, shown in (
            ("[120, 0]", "[120, 0]"),
            ("[1, 1]", "[1, 1]"),
            ("[0]", "[0]"),
            ("[0, 1, 2]", "[0, 1, 2]"),
            ("[0, inf]", "[0, inf]"),
            ("[nan, 1]", "[nan, 1]"),
            ("[false, true]", "[False, True]"),
            ('["0", "1"]', "['0', '1']"),
        )
    ],
    (
        'mode = "dp"\nepsilon = 1\nbounds = { age = [0, 1], height = 2 }\n',
        'mode = "dp"\nepsilon = 1\nbounds = { age = [0, 1], height = [1, 2] }\n',
        8,
        "privacy.bounds.height: must be [low, high]",
    ),
    (
        'mode = "dp"\nepsilon = 1\n[privacy.bounds]\n"" = [0, 1]\n',
        'mode = "dp"\nepsilon = 1\n[privacy.bounds]\n" " = [0, 1]\n',
        9,
        'privacy.bounds."": a column name cannot be empty',
    ),
    (
        'mode = "dp"\nepsilon = 1\n[privacy.bounds]\n"a.b" = [1, 0]\n',
        'mode = "dp"\nepsilon = 1\n[privacy.bounds]\n"a.b" = [0, 1]\n',
        9,
        'privacy.bounds."a.b": must be [low, high]',
    ),
    (
        'mode = "dp"\nepsilon = 1\nkeys = ["a"]\n',
        'mode = "dp"\nepsilon = 1\nkeys = { d = ["a"] }\n',
        8,
        "privacy.keys: must be a table such as",
    ),
    *[
        (
            f'mode = "dp"\nepsilon = 1\n[privacy.keys]\nd = {bad}\n',
            'mode = "dp"\nepsilon = 1\n[privacy.keys]\nd = ["a", "b"]\n',
            9,
            f"privacy.keys.d: {why}",
        )
        for bad, why in (
            ("[]", f"must be a list of 1 to {MAX_KEYS} strings or integers, not 0 entries"),
            ('"a"', f"must be a list of 1 to {MAX_KEYS} strings or integers, not 'a'"),
            ("[1.5]", "1.5 is not a string or an integer"),
            ("[true, false]", "True is not a string or an integer"),
            ('["a", 1]', "mixes strings and integers"),
            ('["a", "b", "a"]', "lists 'a' twice"),
            ("[1, 2, 1]", "lists 1 twice"),
            ("[[1]]", "[1] is not a string or an integer"),
        )
    ],
    (
        'mode = "dp"\nepsilon = 1\n[privacy.keys]\nd = [' + ", ".join(map(str, range(MAX_KEYS + 1))) + "]\n",
        'mode = "dp"\nepsilon = 1\n[privacy.keys]\nd = [' + ", ".join(map(str, range(MAX_KEYS))) + "]\n",
        9,
        f"privacy.keys.d: must be a list of 1 to {MAX_KEYS} strings or integers, not {MAX_KEYS + 1} entries",
    ),
    ('mode = "dp"\nepsilon = 1\nepsilons = 2\n', 'mode = "dp"\nepsilon = 1\n', 8, "did you mean 'epsilon'?"),
    (
        'mode = "dp"\nepsilon = 1\n[privacy.bound]\n',
        'mode = "dp"\nepsilon = 1\n[privacy.bounds]\n',
        8,
        "privacy.bound:",
    ),
]


@pytest.mark.parametrize(("bad", "good", "line", "fragment"), RULES)
def test_each_rule_refuses_with_the_line_and_the_key_and_its_twin_loads(
    bad: str, good: str, line: int, fragment: str
) -> None:
    message = _refusal(HEAD + "[privacy]\n" + bad)
    assert message.startswith(f"policy.toml:{line}: "), message
    assert fragment in message, message
    policy = OutputPolicy.from_toml(HEAD + "[privacy]\n" + good)
    assert policy.privacy is not None and OutputPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("privacy", "fragment"),
    [
        ({"mode": "dp", "epsilon": 0.0}, "privacy.epsilon: must be a number above 0"),
        ({"mode": "dp", "epsilon": 1e400}, "privacy.epsilon: must be a finite number"),
        ({"mode": "dp", "epsilon": 1.0, "bounds": {"age": [0.0, 10**400]}}, "privacy.bounds.age: must be [low, high]"),
        ({"mode": "dp", "epsilon": 1.0, "keys": {"d": [2**63]}}, "privacy.keys.d: 9223372036854775808 is not a 64-bit"),
        ({"mode": "exact", "delta": 0.0}, "privacy.delta: has no effect in exact mode"),
        ({"mode": "dp", "epsilon": 1.0, "budget": 1}, "privacy.budget: unknown key"),
        ("dp", "[privacy]: must be a table, not a string"),
    ],
)
def test_the_vaults_json_form_is_checked_alike(privacy: object, fragment: str) -> None:
    document = OutputPolicy.from_toml(HEAD).to_dict()
    with pytest.raises(PolicyError) as caught:
        OutputPolicy.from_dict({**document, "privacy": privacy}, source="output policy of claims")
    assert str(caught.value).startswith(f"output policy of claims: {fragment}"), caught.value
    twin = {**document, "privacy": {"mode": "dp", "epsilon": 1.0, "keys": {"d": [2**63 - 1]}}}
    assert OutputPolicy.from_dict(twin).privacy == PrivacyPolicy(mode="dp", epsilon=1.0, keys={"d": (2**63 - 1,)})


def test_an_upload_cannot_be_dp_since_no_broker_keeps_its_budget() -> None:
    message = _refusal(HEAD + '[privacy]\nmode = "dp"\nepsilon = 1\n', tables=OUTPUT_TABLES)
    assert message.startswith('policy.toml:6: privacy.mode: cannot be "dp" here'), message
    exact = OutputPolicy.from_toml(HEAD + '[privacy]\nmode = "exact"\n', tables=OUTPUT_TABLES)  # the twin
    assert exact.privacy == PrivacyPolicy()


# -- combining ------------------------------------------------------------------------------------------------


def test_strictest_marks_a_combination_with_any_dp_input_as_dp() -> None:
    dp = OutputPolicy.from_toml(FULL.replace('id = "p"', 'id = "dp"'))
    other_dp = OutputPolicy.from_toml(HEAD.replace('id = "p"', 'id = "q"') + '[privacy]\nmode = "dp"\nepsilon = 3\n')
    exact = OutputPolicy.from_toml(HEAD.replace('id = "p"', 'id = "e"') + '[privacy]\nmode = "exact"\n')
    absent = OutputPolicy.from_toml(HEAD.replace('id = "p"', 'id = "a"'))
    assert strictest([absent, dp, other_dp]).privacy == dp.privacy
    assert strictest([other_dp, dp]).privacy == other_dp.privacy
    assert strictest([exact, dp]).is_dp
    assert strictest([exact, absent]).privacy is None and not strictest([exact, absent]).is_dp


@pytest.mark.parametrize(
    ("written", "combined"),
    [((None, None), None), ((None, False), None), ((True, False), None), ((False, False), False), ((True,), True)],
)
def test_strictest_checks_differences_when_any_input_does(
    written: tuple[bool | None, ...], combined: bool | None
) -> None:
    policies = [
        OutputPolicy(id=f"p{i}", difference_checks=value, sources=(f"p{i}",)) for i, value in enumerate(written)
    ]
    result = strictest(policies)
    assert result.difference_checks is combined and result.checks_differences is (combined is not False)


# -- difference checks on by default ------------------------------------------------------------------------


def test_difference_checks_are_on_unless_the_owner_writes_false() -> None:
    unstated = OutputPolicy.from_toml(HEAD)
    assert unstated.difference_checks is None and unstated.checks_differences
    assert "difference_checks" not in unstated.to_dict()["release"]
    assert OutputPolicy(id="p").checks_differences
    for value, text in ((True, "true"), (False, "false")):
        policy = OutputPolicy.from_toml(HEAD + f"difference_checks = {text}\n")
        assert policy.difference_checks is value and policy.checks_differences is value
        assert policy.to_dict()["release"]["difference_checks"] is value
        assert OutputPolicy.from_dict(json.loads(policy.canonical_json())) == policy
    assert OutputPolicy.from_dict(unstated.to_dict()).difference_checks is None


def test_explain_says_whether_difference_checks_are_on() -> None:
    unstated = "\n".join(explain_output(OutputPolicy.from_toml(HEAD)))
    assert "Difference checks are on (the default): a number whose records differ" in unstated
    assert "by 1 to 9 records is refused" in unstated
    stated = "\n".join(explain_output(OutputPolicy.from_toml(HEAD + "difference_checks = true\n")))
    assert "Difference checks are on: a number" in stated
    off = "\n".join(explain_output(OutputPolicy.from_toml(HEAD + "difference_checks = false\n")))
    assert "Difference checks are OFF (difference_checks = false): two releases whose records differ by one " in off
    assert "reveal that person's value" in off and "Difference checks are on" not in off


# -- explain ------------------------------------------------------------------------------------------------


def test_explain_says_what_a_dp_policy_means() -> None:
    lines = explain_output(OutputPolicy.from_toml(FULL))
    assert lines[2] == (
        "Differential privacy: every released number is noisy; the dataset's total budget is ε = 1 (δ = 1e-7), at "
        "most ε = 0.5 per kernel; one person is identified by patient_id and may contribute up to 1 row; public "
        "bounds: age 0..120, cost 0..100000; public group keys: diagnosis (3 values); exact releases: only schema "
        "and row_count."
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            "epsilon = 2.5\n",
            "the dataset's total budget is ε = 2.5 (δ = 0), all of which one kernel may spend; one row is one "
            "person; exact releases: only schema.",
        ),
        ("epsilon = 1\nmax_contributions = 3\n", "one person may contribute up to 3 rows (no column identifies them)"),
        ('epsilon = 1\nunit = "pid"\nmax_contributions = 5\n', "identified by pid and may contribute up to 5 rows;"),
        ('epsilon = 1\npublic = ["row_count"]\n', "exact releases: only schema and row_count."),
        ('epsilon = 1\nbounds = { "a b" = [-1.5, 2e20] }\n', 'public bounds: "a b" -1.5..2e20;'),
        ("epsilon = 1\nkeys = { year = [2024] }\n", "public group keys: year (1 value);"),
    ],
)
def test_explain_states_each_dp_setting(body: str, fragment: str) -> None:
    text = "\n".join(explain_output(OutputPolicy.from_toml(HEAD + '[privacy]\nmode = "dp"\n' + body)))
    assert "Differential privacy: every released number is noisy; " in text and fragment in text, text


def test_explain_lists_only_exact_releases_the_policy_allows() -> None:
    text = HEAD.replace('"schema", "row_count", ', "") + '[privacy]\nmode = "dp"\nepsilon = 1\npublic = ["row_count"]\n'
    assert "; no release is exact." in "\n".join(explain_output(OutputPolicy.from_toml(text)))


def test_explain_of_exact_mode_says_nothing_of_differential_privacy() -> None:
    for text in (HEAD, HEAD + '[privacy]\nmode = "exact"\n'):
        explained = explain_output(OutputPolicy.from_toml(text))
        assert explained == explain_output(OutputPolicy.from_toml(HEAD))
        assert not any("Differential privacy" in line for line in explained)


# -- properties -----------------------------------------------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=8)
_COLUMN = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=8)
_FINITE = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def _privacy(draw: st.DrawFn) -> PrivacyPolicy:
    if draw(st.booleans()):
        return PrivacyPolicy()
    epsilon = draw(st.floats(min_value=0, max_value=100, exclude_min=True))
    share = draw(st.none() | st.floats(min_value=0, max_value=epsilon, exclude_min=True))
    pairs = draw(st.dictionaries(_COLUMN, st.tuples(_FINITE, _FINITE).filter(lambda p: p[0] != p[1]), max_size=3))
    keys = draw(
        st.dictionaries(
            _COLUMN,
            st.lists(_TEXT, min_size=1, max_size=4, unique=True)
            | st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4, unique=True),
            max_size=3,
        )
    )
    return PrivacyPolicy(
        mode="dp",
        epsilon=epsilon,
        delta=draw(st.floats(min_value=0, max_value=1e-3, exclude_max=True)),
        epsilon_per_kernel=share,
        unit=draw(st.none() | _COLUMN),
        max_contributions=draw(st.integers(1, 10_000)),
        public=draw(st.sampled_from([(), ("row_count",)])),
        bounds={column: (min(pair), max(pair)) for column, pair in pairs.items()},
        keys={column: tuple(values) for column, values in keys.items()},
    )


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return str(value)


def _toml(privacy: PrivacyPolicy) -> str:
    lines = ["[privacy]", f'mode = "{privacy.mode}"']
    if privacy.is_dp:
        for key in ("epsilon", "delta", "epsilon_per_kernel", "unit", "max_contributions", "public"):
            value = getattr(privacy, key)
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        for table in ("bounds", "keys"):
            lines.append(f"[privacy.{table}]")
            for column, values in getattr(privacy, table).items():
                lines.append(f"{_toml_value(column)} = {_toml_value(values)}")
    return HEAD + "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None)
@given(_privacy())
def test_any_valid_table_round_trips_and_its_canonical_form_is_stable(privacy: PrivacyPolicy) -> None:
    policy = OutputPolicy.from_toml(_toml(privacy))
    assert policy.privacy == privacy
    canonical = policy.canonical_json()
    again = OutputPolicy.from_dict(json.loads(canonical))
    assert again == policy and again.canonical_json() == canonical
    assert OutputPolicy.from_dict(again.to_dict()).canonical_json() == canonical
    assert json.loads(canonical)["privacy"] == privacy.to_dict()
