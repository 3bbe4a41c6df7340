"""Output policies: the design's example, strict validation with lines, combination to the strictest rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.attest.errors import PolicyError
from confnb.policy.output import RELEASE_KINDS, OutputPolicy, strictest

DESIGN_EXAMPLE = """
[policy]
id = "claims-2026-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics", "model_parameters", "predict_public"]
min_group_size = 10            # every released aggregate row is computed from >= 10 records
never_release = ["patient_id"] # columns that appear in no released result
max_rows = 1000
[display]
mime = ["text/plain", "text/markdown", "image/png"]
max_output_bytes = 1000000
tracebacks = "redacted"
"""


def test_the_design_example_parses():
    policy = OutputPolicy.from_toml(DESIGN_EXAMPLE)
    assert policy.id == "claims-2026-v1"
    assert policy.allow == frozenset(RELEASE_KINDS) - {"window"}  # every kind but the one that gives up the rules
    assert policy.min_group_size == 10 and policy.never_release == {"patient_id"} and policy.max_rows == 1000
    assert policy.mime == ("text/plain", "text/markdown", "image/png") and policy.tracebacks == "redacted"


def test_defaults_deny():
    policy = OutputPolicy.from_toml('[policy]\nid = "p"\n')
    assert not policy.allow and not any(policy.allows(kind) for kind in RELEASE_KINDS)
    assert policy.mime == ("text/plain",) and policy.tracebacks == "redacted"


def test_a_policy_silent_on_min_group_size_needs_10_records_and_says_so():
    from confnb.policy.explain import explain_output

    silent = OutputPolicy.from_toml('[policy]\nid = "p"\n[release]\nallow = ["aggregate", "row_count"]\n')
    assert silent.min_group_size == 10
    assert OutputPolicy.from_dict(silent.to_dict()).min_group_size == 10  # what the vault receives says 10
    explained = "\n".join(explain_output(silent))
    assert "at least 10 records; smaller groups are suppressed" in explained
    assert "A row count is released only when it counts at least 10 records." in explained
    assert "single records" not in explained
    # The twin: an owner who means single records must say so, and the explanation says it plainly.
    single = OutputPolicy.from_toml('[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\nmin_group_size = 1\n')
    assert single.min_group_size == 1 and "even single records" in "\n".join(explain_output(single))


def test_the_same_file_can_carry_the_attestation_half():
    from confnb.attest.policy import AttestationPolicy

    text = DESIGN_EXAMPLE + "[attestation]\nallow_simulated = true\n"
    assert OutputPolicy.from_toml(text).id == "claims-2026-v1"
    assert AttestationPolicy.from_toml(text).allow_simulated


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[policy]\nid = "p"\n[release]\nallow = ["rows"]\n', 4, "release.allow: 'rows' is not one of"),
        ('[policy]\nid = "p"\n[release]\nmin_group_size = 0\n', 4, "release.min_group_size: must be an integer"),
        ('[policy]\nid = "p"\n[release]\nnever_release = "ssn"\n', 4, "release.never_release: must be a list"),
        ('[policy]\nid = "p"\n[display]\ntracebacks = "partial"\n', 4, "display.tracebacks: must be one of"),
        ('[policy]\nid = "p"\n[display]\nmime = ["html"]\n', 4, "display.mime: 'html' is not a MIME type"),
        ('[policy]\nid = "p"\n[display]\ncolour = "red"\n', 4, "display.colour: unknown key"),
        ('[policy]\nid = "has space"\n', 2, "policy.id: must be"),
        ('[policy]\nid = "p"\n[release]\nallow = ["schema", "schema"]\n', 4, "lists an entry twice"),
    ],
)
def test_errors_name_the_key_and_the_line(text, line, fragment):
    with pytest.raises(PolicyError) as caught:
        OutputPolicy.from_toml(text, source="owner.toml")
    assert str(caught.value).startswith(f"owner.toml:{line}: "), caught.value
    assert fragment in str(caught.value)


def test_missing_id_and_missing_tables():
    with pytest.raises(PolicyError, match="needs an id"):
        OutputPolicy.from_toml('[release]\nallow = ["schema"]\n')
    with pytest.raises(PolicyError, match="no output policy"):
        OutputPolicy.from_toml("[attestation]\n")


def test_strictest_rule_of_each_wins():
    hospital = OutputPolicy.from_toml(DESIGN_EXAMPLE)
    bank = OutputPolicy.from_toml(
        '[policy]\nid = "bank"\n[release]\nallow = ["aggregate", "model_metrics"]\nmin_group_size = 25\n'
        'never_release = ["iban"]\n[display]\nmime = ["text/plain", "image/png"]\nmax_output_bytes = 5000\n'
        'tracebacks = "full"\n'
    )
    both = strictest([hospital, bank])
    assert both.allow == {"aggregate", "model_metrics"}
    assert both.min_group_size == 25
    assert both.never_release == {"patient_id", "iban"}
    assert both.max_rows == 1000
    assert both.mime == ("text/plain", "image/png")
    assert both.max_output_bytes == 5000 and both.tracebacks == "redacted"
    assert both.sources == ("claims-2026-v1", "bank")
    assert strictest([hospital]) is hospital
    with pytest.raises(ValueError, match="no policies"):
        strictest([])


def test_digest_names_the_content():
    policy = OutputPolicy.from_toml(DESIGN_EXAMPLE)
    reordered = OutputPolicy.from_toml(DESIGN_EXAMPLE.replace('"schema", "row_count"', '"row_count", "schema"'))
    assert policy.digest() == reordered.digest()
    assert policy.digest() != OutputPolicy.from_toml(DESIGN_EXAMPLE.replace("= 10 ", "= 11 ")).digest()


_policies = st.builds(
    lambda allow, size, never, rows, mime: OutputPolicy(
        id="x",
        allow=frozenset(allow),
        min_group_size=size,
        never_release=frozenset(never),
        max_rows=rows,
        mime=tuple(dict.fromkeys(mime)),
        sources=("x",),
    ),
    st.sets(st.sampled_from(RELEASE_KINDS)),
    st.integers(1, 100),
    st.sets(st.sampled_from(["a", "b", "c"])),
    st.one_of(st.none(), st.integers(0, 100)),
    st.lists(st.sampled_from(["text/plain", "image/png"]), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_policies, min_size=1, max_size=4))
def test_combining_never_loosens_any_rule(policies):
    both = strictest(policies)
    for policy in policies:
        assert both.allow <= policy.allow
        assert both.min_group_size >= policy.min_group_size
        assert both.never_release >= policy.never_release
        assert set(both.mime) <= set(policy.mime)
        if policy.max_rows is not None:
            assert both.max_rows is not None and both.max_rows <= policy.max_rows


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_policy_or_a_policy_error(text):
    try:
        OutputPolicy.from_toml('[policy]\nid = "p"\n' + text)
    except PolicyError:
        pass
