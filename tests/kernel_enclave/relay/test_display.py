"""A display policy is read strictly from an owner's table, survives its JSON form, and only ever tightens."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_enclave.relay.display import DEFAULT_MIME, TRACEBACK_MODES, DisplayPolicy, DisplayPolicyError

MIB = 1024 * 1024
# The [display] example of DESIGN.md, "Output policy".
OWNER_TABLE = """
[display]
mime = ["text/plain", "text/markdown", "image/png"]
max_output_bytes = 1000000
tracebacks = "redacted"
"""


def test_defaults_are_ordinary_notebook_output() -> None:
    policy = DisplayPolicy()
    assert policy.mime == {
        "text/plain",
        "text/html",
        "text/markdown",
        "text/latex",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/svg+xml",
        "application/json",
        "application/vnd.jupyter.widget-view+json",
    }
    assert policy.mime == DEFAULT_MIME
    assert "application/javascript" not in policy.mime
    assert policy.max_message_bytes == 16 * MIB
    assert policy.max_output_bytes == 64 * MIB
    assert policy.tracebacks == "full"
    assert policy.comms is True
    assert TRACEBACK_MODES == ("full", "redacted")


def test_a_data_owners_display_table_is_accepted() -> None:
    policy = DisplayPolicy.from_mapping(tomllib.loads(OWNER_TABLE)["display"])
    assert policy.mime == {"text/plain", "text/markdown", "image/png"}
    assert policy.max_output_bytes == 1_000_000
    assert policy.tracebacks == "redacted"
    assert policy.max_message_bytes == 16 * MIB  # absent keys keep the default
    assert policy.comms is True


def test_an_empty_table_is_the_default() -> None:
    assert DisplayPolicy.from_mapping({}) == DisplayPolicy()


def test_every_key_is_read() -> None:
    policy = DisplayPolicy.from_mapping(
        {
            "mime": ["text/plain"],
            "max_message_bytes": 10,
            "max_output_bytes": 20,
            "tracebacks": "redacted",
            "comms": False,
        }
    )
    assert policy == DisplayPolicy(frozenset({"text/plain"}), 10, 20, "redacted", False)


def test_mime_types_are_compared_in_lower_case() -> None:
    policy = DisplayPolicy.from_mapping({"mime": ["Text/Plain", "IMAGE/png", "text/plain"]})
    assert policy.mime == {"text/plain", "image/png"}


def test_an_empty_mime_list_allows_no_display_output() -> None:
    assert DisplayPolicy.from_mapping({"mime": []}).mime == frozenset()


def test_limits_at_the_ends_of_their_range_are_accepted() -> None:
    policy = DisplayPolicy.from_mapping({"max_output_bytes": 0, "max_message_bytes": 10_000_000_000})
    assert (policy.max_output_bytes, policy.max_message_bytes) == (0, 10_000_000_000)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_output_bytes": "x"}, "display.max_output_bytes: must be an integer from 0 to 10000000000, not 'x'"),
        ({"max_output_bytes": True}, "display.max_output_bytes: must be an integer from 0 to 10000000000, not True"),
        ({"max_output_bytes": -1}, "display.max_output_bytes: must be an integer from 0 to 10000000000, not -1"),
        ({"max_output_bytes": 1.5}, "display.max_output_bytes: must be an integer from 0 to 10000000000, not 1.5"),
        (
            {"max_output_bytes": 10_000_000_001},
            "display.max_output_bytes: must be an integer from 0 to 10000000000, not 10000000001",
        ),
        ({"max_message_bytes": None}, "display.max_message_bytes: must be an integer from 0 to 10000000000, not None"),
        (
            {"max_message_bytes": False},
            "display.max_message_bytes: must be an integer from 0 to 10000000000, not False",
        ),
        ({"tracebacks": "none"}, "display.tracebacks: must be 'full' or 'redacted', not 'none'"),
        ({"tracebacks": "Redacted"}, "display.tracebacks: must be 'full' or 'redacted', not 'Redacted'"),
        ({"comms": "yes"}, "display.comms: must be true or false, not 'yes'"),
        ({"comms": 1}, "display.comms: must be true or false, not 1"),
        ({"mime": "text/plain"}, "display.mime: must be a list of MIME types such as 'text/plain', not 'text/plain'"),
        ({"mime": {"text/plain": True}}, "display.mime: must be a list of MIME types"),
        ({"mime": ["text"]}, "display.mime: entry 0 must be a MIME type of the form type/subtype, not 'text'"),
        ({"mime": ["text/plain", 7]}, "display.mime: entry 1 must be a MIME type of the form type/subtype, not 7"),
        ({"mime": ["text/plain", "text/ html"]}, "display.mime: entry 1 must be a MIME type"),
        ({"mime": ["text/plain\n"]}, "display.mime: entry 0 must be a MIME type"),
        ({"mime": ["*/*"]}, "display.mime: entry 0 must be a MIME type"),
        ({"colour": "red"}, "display.colour: unknown key (known keys: comms, max_message_bytes, max_output_bytes"),
        ({"max_output_byte": 5}, "display.max_output_byte: unknown key"),
        ({"mime": ["text/plain"], 3: 4}, "display.3: unknown key"),
    ],
)
def test_errors_name_the_key(table: dict[Any, Any], message: str) -> None:
    with pytest.raises(DisplayPolicyError) as caught:
        DisplayPolicy.from_mapping(table)
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert isinstance(caught.value, ValueError)


def test_a_table_that_is_not_a_table_is_an_error() -> None:
    with pytest.raises(DisplayPolicyError, match=r"^display: must be a table, not \['text/plain'\]$"):
        DisplayPolicy.from_mapping(["text/plain"])  # type: ignore[arg-type]


def test_an_unprintable_unknown_key_stays_on_one_line() -> None:
    with pytest.raises(DisplayPolicyError) as caught:
        DisplayPolicy.from_mapping({"evil\nkey": 1})
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("display.'evil\\nkey': unknown key")


def test_a_long_bad_value_is_shortened() -> None:
    with pytest.raises(DisplayPolicyError) as caught:
        DisplayPolicy.from_mapping({"tracebacks": "x" * 10_000})
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_output_bytes": -1}, "display.max_output_bytes"),
        ({"max_message_bytes": "1"}, "display.max_message_bytes"),
        ({"tracebacks": "partial"}, "display.tracebacks"),
        ({"comms": None}, "display.comms"),
        ({"mime": "text/plain"}, "display.mime"),
    ],
)
def test_direct_construction_is_validated_too(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(DisplayPolicyError, match=f"^{re.escape(key)}: "):
        DisplayPolicy(**kwargs)


def test_direct_construction_normalises_the_mime_set() -> None:
    policy = DisplayPolicy(mime=["Text/Plain"])  # type: ignore[arg-type]
    assert policy.mime == frozenset({"text/plain"})
    assert isinstance(policy.mime, frozenset)


def test_a_policy_cannot_be_changed_in_place() -> None:
    policy = DisplayPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.comms = False  # type: ignore[misc]


def test_to_dict_is_json_and_sorted() -> None:
    policy = DisplayPolicy(mime=frozenset({"text/plain", "image/png", "application/json"}))
    as_dict = policy.to_dict()
    assert as_dict == {
        "mime": ["application/json", "image/png", "text/plain"],
        "max_message_bytes": 16 * MIB,
        "max_output_bytes": 64 * MIB,
        "tracebacks": "full",
        "comms": True,
    }
    assert json.loads(json.dumps(as_dict)) == as_dict


mime_types = st.sampled_from(
    sorted(DEFAULT_MIME | {"application/javascript", "text/csv", "application/vnd.custom+json", "image/bmp"})
)
policies = st.builds(
    DisplayPolicy,
    mime=st.frozensets(mime_types),
    max_message_bytes=st.integers(0, 10_000_000_000),
    max_output_bytes=st.integers(0, 10_000_000_000),
    tracebacks=st.sampled_from(TRACEBACK_MODES),
    comms=st.booleans(),
)


def at_least_as_strict(strict: DisplayPolicy, loose: DisplayPolicy) -> bool:
    return (
        strict.mime <= loose.mime
        and strict.max_message_bytes <= loose.max_message_bytes
        and strict.max_output_bytes <= loose.max_output_bytes
        and (loose.tracebacks == "full" or strict.tracebacks == "redacted")
        and (loose.comms or not strict.comms)
    )


@given(policies)
def test_the_dict_form_round_trips(policy: DisplayPolicy) -> None:
    assert DisplayPolicy.from_mapping(json.loads(json.dumps(policy.to_dict()))) == policy


@given(policies, policies)
def test_tighten_never_loosens(first: DisplayPolicy, second: DisplayPolicy) -> None:
    combined = first.tighten(second)
    assert at_least_as_strict(combined, first)
    assert at_least_as_strict(combined, second)
    assert combined == second.tighten(first)
    assert combined.tighten(first) == combined
    assert first.tighten(first) == first


@given(policies, policies, policies)
def test_tighten_is_associative(first: DisplayPolicy, second: DisplayPolicy, third: DisplayPolicy) -> None:
    assert first.tighten(second).tighten(third) == first.tighten(second.tighten(third))


def test_tighten_takes_the_strictest_of_each_field() -> None:
    loose = DisplayPolicy()
    owner = DisplayPolicy.from_mapping(tomllib.loads(OWNER_TABLE)["display"])
    other = DisplayPolicy(mime=frozenset({"text/plain", "text/html"}), max_message_bytes=100, comms=False)
    combined = loose.tighten(owner).tighten(other)
    assert combined == DisplayPolicy(
        mime=frozenset({"text/plain"}),
        max_message_bytes=100,
        max_output_bytes=1_000_000,
        tracebacks="redacted",
        comms=False,
    )


def test_tighten_refuses_anything_but_a_policy() -> None:
    with pytest.raises(TypeError):
        DisplayPolicy().tighten({"mime": []})  # type: ignore[arg-type]
