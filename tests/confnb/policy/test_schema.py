"""Policy files fail closed: a name the schema does not know, at any level, is refused by every way in.

An ignored table or key is a rule the owner believes in and nothing enforces, so each case here is tried through
both typed loaders, the vault's JSON form, an upload's descriptor and the broker on loopback, and each refusal must
name the file, the line and the name (with a suggestion when a known name is close). Each refusal has a legitimate
twin that must still load.
"""

from __future__ import annotations

import json
import tomllib
import urllib.error
import urllib.request

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.attest.errors import PolicyError
from confnb.attest.policy import AttestationPolicy
from confnb.policy.output import OutputPolicy
from confnb.policy.schema import NOT_YET_SUPPORTED, OUTPUT, OUTPUT_TABLES, POLICY_FILE, Table
from confnb.policy.toml import KeyLines

LOADERS = (AttestationPolicy.from_toml, OutputPolicy.from_toml)
VALID = '[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\n[attestation]\nreject_debug = true\n'


def refusals(text: str) -> list[str]:
    """The error of each loader for ``text``; both must refuse, with one line."""
    messages = []
    for load in LOADERS:
        with pytest.raises(PolicyError) as caught:
            load(text, source="policy.toml")
        message = str(caught.value)
        assert len(message.splitlines()) == 1, message
        messages.append(message)
    return messages


UNKNOWN = [
    # top level: tables, inline tables, dotted keys, bare keys
    (
        '[policy]\nid = "p"\n[relese]\nallow = ["aggregate"]\n',
        3,
        "[relese]: unknown table (did you mean [release]?)",
    ),
    (
        '[policy]\nid = "p"\n[Display]\nmime = ["text/plain"]\n',
        3,
        "[Display]: unknown table (did you mean [display]?)",
    ),
    (
        'relese = { allow = ["aggregate"] }\n[policy]\nid = "p"\n',
        1,
        "[relese]: unknown table (did you mean [release]?)",
    ),
    (
        '[policy]\nid = "p"\n[notes.owner]\nx = 1\n',
        3,
        "[notes]: unknown table (a policy file holds only [attestation]",
    ),
    (
        'id = "p"\n[policy]\nid = "p"\n',
        1,
        "id: unknown top-level key (a policy file holds only",
    ),
    (
        'relese.allow = ["aggregate"]\n[policy]\nid = "p"\n',
        1,
        "[relese]: unknown table (did you mean [release]?)",
    ),
    # keys of each known table
    (
        '[policy]\nid = "p"\nowner = "me"\n',
        3,
        "policy.owner: unknown key (known: id)",
    ),
    (
        '[policy]\nid = "p"\n[release]\nmin_group = 10\n',
        4,
        "release.min_group: unknown key (did you mean 'min_group_size'?)",
    ),
    (
        '[policy]\nid = "p"\n[display]\ncolour = "red"\n',
        4,
        "display.colour: unknown key (known: max_output_bytes",
    ),
    (
        "[attestation]\nreject_debg = true\n",
        2,
        "attestation.reject_debg: unknown key (did you mean 'reject_debug'?)",
    ),
    # nested tables, as headers, inline tables and dotted keys
    (
        '[policy]\nid = "p"\n[release.extra]\nx = 1\n',
        3,
        "release.extra: unknown key",
    ),
    (
        "[attestation]\n[attestation.min_tcb.Turn]\nsnp = 1\n",
        2,
        "attestation.min_tcb.Turn: unknown TCB component or product (did you mean 'Turin'?)",
    ),
    (
        "[attestation.min_tcb.Turin]\nfmc = 1\nspn = 3\n",
        3,
        "attestation.min_tcb.Turin.spn: unknown TCB component (did you mean 'snp'?)",
    ),
    (
        "[attestation]\nmin_tcb = { Genoa = { snp = 1, tcb = 2 } }\n",
        2,
        "attestation.min_tcb.Genoa.tcb: unknown TCB component",
    ),
    (
        "[attestation]\nmin_launch_tcb.Milan.microcod = 3\n",
        2,
        "attestation.min_launch_tcb.Milan.microcod: unknown TCB component (did you mean 'microcode'?)",
    ),
    (
        "attestation.guest_policy.debug = false\n",
        1,
        "attestation.guest_policy.debug: unknown flag",
    ),
    (
        "[attestation]\n[attestation.platform_info]\nsmt_enable = true\n",
        3,
        "attestation.platform_info.smt_enable: unknown flag (did you mean 'smt_enabled'?)",
    ),
    # lines counted past multi-line values and through comments that look like keys
    (
        "[attestation]\nmeasurements = [\n  # x = 1\n]\n'odd' = 1\n",
        5,
        "attestation.odd: unknown key",
    ),
    (
        '[policy]\nid = """p\nq"""\nid2 = 1 # [release]\n',
        4,
        "policy.id2: unknown key (did you mean 'id'?)",
    ),
]


@pytest.mark.parametrize(("text", "line", "fragment"), UNKNOWN)
def test_an_unknown_name_at_any_level_is_refused_with_its_line(text, line, fragment):
    for message in refusals(text):
        assert message.startswith(f"policy.toml:{line}: "), message
        assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[policy]\nid = "p"\n[privacy]\nmode = "dp"\nepsilon = 1.0\nepsilons = 2\n', 6, "did you mean 'epsilon'?"),
        ('privacy = { mode = "dp", epsilon = 1, unt = "id" }\n[policy]\nid = "p"\n', 1, "did you mean 'unit'?"),
        ('[policy]\nid = "p"\n[privacy.bound]\nage = [0, 120]\n', 3, "privacy.bound: unknown key"),
        ('privacy.mod = "dp"\n[policy]\nid = "p"\n', 1, "privacy.mod: unknown key (did you mean 'mode'?)"),
        ('[policy]\nid = "p"\n[privcy]\nmode = "dp"\n', 3, "[privcy]: unknown table (did you mean [privacy]?)"),
    ],
)
def test_names_in_the_privacy_table_are_checked_like_any_other(text, line, fragment):
    for message in refusals(text):
        assert message.startswith(f"policy.toml:{line}: "), message
        assert fragment in message, message
    # The twin: every name known, the column names of bounds and keys being the owner's own.
    twin = '[policy]\nid = "p"\n[privacy]\nmode = "dp"\nepsilon = 1.0\n[privacy.bounds]\nany_column = [0, 1]\n'
    assert OutputPolicy.from_toml(twin).privacy.bounds == {"any_column": (0.0, 1.0)}


def test_the_legitimate_twin_loads_with_every_name_known():
    full = (
        VALID + "[attestation.min_tcb]\nsnp = 8\n[attestation.min_tcb.Turin]\nfmc = 1\n"
        "[attestation.guest_policy]\nsmt_allowed = false\n"
        '[display]\nmime = ["text/plain"]\nmax_output_bytes = 10\ntracebacks = "full"\n'
    )
    assert AttestationPolicy.from_toml(full).minimum_tcb(None) == {"snp": 8}
    assert OutputPolicy.from_toml(full).tracebacks == "full"


def test_a_suggestion_is_made_only_when_a_known_name_is_close():
    (message, _) = refusals("[attestation]\nzzzz = 1\n")
    assert "did you mean" not in message and "known: allow_simulated, author_key_digests" in message
    (message, _) = refusals("[relese.x]\n[zzzz]\n")
    assert "did you mean [release]?" in message


def test_names_are_shown_on_one_line_and_bounded():
    (message, _) = refusals('[attestation]\n"a\\nb\\u2028c" = 1\n')
    assert 'attestation."a\\nb\\u2028c": unknown key' in message
    (message, _) = refusals('[attestation]\n"' + "x" * 5000 + '" = 1\n')
    assert len(message) < 600


@pytest.mark.parametrize(
    "text",
    [
        '[policy]\nid = "p"\n[release]\nallow = ' + "[" * 2000 + "]" * 2000 + "\n",
        "[policy]\nid = " + "{ a = " * 2000 + "1" + " }" * 2000 + "\n",
        '[policy]\nid = "p"\n[release]\nnever_release = ["' + "x" * 50_000 + '", 1]\n',
        '[policy]\nid = "' + "x" * 50_000 + '"\n',
    ],
)
def test_hostile_values_give_a_short_policy_error_not_a_crash(text):
    for message in refusals(text):
        assert len(message) < 400, message


def test_a_known_table_of_the_wrong_type_is_refused():
    for message in refusals('[policy]\nid = "p"\n[[release]]\nallow = []\n'):
        assert message == "policy.toml:3: [release]: must be a table, not a list"


# -- the vault's JSON form and an upload's policy ------------------------------------------------------------


def test_the_vaults_json_policies_are_checked_alike():
    document = OutputPolicy.from_toml(VALID).to_dict()
    assert OutputPolicy.from_dict(document).id == "p"
    for bad, fragment in (
        ({**document, "release": {**document["release"], "max_row": 5}}, "release.max_row: unknown key"),
        ({**document, "privacy": {"mode": "dp", "budget": 1}}, "privacy.budget: unknown key"),
        ({**document, "attestation": {}}, "[attestation]: has no effect here"),
    ):
        with pytest.raises(PolicyError) as caught:
            OutputPolicy.from_dict(bad, source="output policy of claims")
        assert str(caught.value).startswith("output policy of claims: "), caught.value
        assert fragment in str(caught.value)


def test_an_upload_policy_holds_only_the_output_tables():
    from kernel_enclave.vault.upload import UploadDescriptor, UploadError

    def descriptor(policy: str) -> dict[str, str]:
        return {"format": "confnb-upload/1", "name": "t", "file_format": "csv", "filename": "t.csv", "policy": policy}

    output_only = '[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\nmin_group_size = 10\n'
    assert UploadDescriptor.from_mapping(descriptor(output_only)).policy.min_group_size == 10
    for extra, fragment in (
        ("[attestation]\nallow_simulated = true\n", "upload policy:6: [attestation]: has no effect here"),
        ('[privacy]\nmode = "dp"\nepsilon = 1\n', 'upload policy:7: privacy.mode: cannot be "dp" here'),
        ("[release.limits]\nmax_releases = 3\n", "upload policy:6: release.limits: unknown key"),
    ):
        with pytest.raises(UploadError) as caught:
            UploadDescriptor.from_mapping(descriptor(output_only + extra))
        assert fragment in str(caught.value), caught.value
    assert tuple(OUTPUT) == OUTPUT_TABLES


# -- the broker, on loopback -------------------------------------------------------------------------------


def _post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:  # it holds the connection's socket
            return error.code, json.loads(error.read())


def test_the_broker_denies_a_release_under_an_attestation_file_with_an_unknown_table(tmp_path, simulated_backend):
    from confnb.attest import Verifier
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from kernel_enclave.attestation import issue_evidence
    from kernel_enclave.measurement import simulated_measurement

    store = OwnerStore.create(tmp_path / "owner")
    store.register_dataset("claims", OutputPolicy.from_toml('[policy]\nid = "claims-v1"\n'))
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    with pytest.raises(PolicyError, match=r"attestation policy of other:4: \[privcy\]: unknown table \(did you mean"):
        store.register_dataset("other", OutputPolicy.from_toml('[policy]\nid = "o"\n'), attestation + "[privcy]\n")
    assert store.dataset("other") is None

    def release() -> tuple[int, dict]:
        _, challenge = _post(f"{url}/v1/challenge", {})
        evidence = issue_evidence(
            simulated_backend,
            bytes.fromhex(challenge["nonce"]),
            hpke_public_key=ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
            signing_public_key=ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw),
            curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
        ).to_dict()
        return _post(f"{url}/v1/datasets/claims/key-release", {"evidence": evidence})

    default = store.directory / "attestation.toml"
    with serve_locally(store, Verifier()) as url:
        default.write_text(attestation + '[relese]\nallow = ["aggregate"]\n')
        status, denial = release()
        assert status == 403 and "sealed_key" not in denial
        assert f"{default}:4: [relese]: unknown table (did you mean [release]?)" in denial["reason"]
        default.write_text(attestation + '[release]\nallow = ["aggregate"]\n')  # the twin: the same rules, spelt right
        status, grant = release()
        assert status == 200 and grant["sealed_key"], grant


# -- the schema agrees with the readers --------------------------------------------------------------------


def test_the_schema_names_exactly_the_output_keys_the_vault_receives():
    # The attestation half's counterpart is in tests/confnb/attest/test_policy.py.
    # every output key, as the vault receives them
    from confnb.policy.privacy import PrivacyPolicy

    privacy = PrivacyPolicy(
        mode="dp",
        epsilon=1.0,
        epsilon_per_kernel=0.5,
        unit="u",
        public=("row_count",),
        bounds={"a": (0.0, 1.0)},
        keys={"k": ("x",)},
    )
    written = OutputPolicy(
        id="p", max_rows=1, max_releases=1, max_kernels_per_day=1, difference_checks=True, privacy=privacy
    ).to_dict()
    assert {table: set(keys) for table, keys in written.items()} == {
        table: set(schema.children) for table, schema in OUTPUT.items()
    }
    assert not set(NOT_YET_SUPPORTED) & set(POLICY_FILE.children)


# -- properties ----------------------------------------------------------------------------------------------


def _tables(table: Table, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Table]]:
    found = [(path, table)]
    for name, child in table.children.items():
        if child is not None:
            found += _tables(child, (*path, name))
    return found


TABLES = _tables(POLICY_FILE)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}", fullmatch=True)


def _inline(path: tuple[str, ...]) -> str:
    """``a = { b = { name = 1 } }`` for the path (a, b, name)."""
    return f"{path[0]} = 1" if len(path) == 1 else f"{path[0]} = {{ {_inline(path[1:])} }}"


@settings(max_examples=300, deadline=None)
@given(
    where=st.sampled_from(TABLES),
    name=NAMES,
    form=st.sampled_from(["key", "header", "dotted", "inline"]),
    padding=st.lists(st.sampled_from(["", "# [release] min_group_size = 1", "  "]), max_size=4),
)
def test_any_unknown_name_anywhere_is_refused_where_it_was_written(where, name, form, padding):
    path, table = where
    if name in table.children or (not path and name in NOT_YET_SUPPORTED):
        return
    full = (*path, name)
    statement = {
        "key": f"[{'.'.join(path)}]\n{name} = 1" if path else f"{name} = 1",
        "header": f"[{'.'.join(full)}]",
        "dotted": f"{'.'.join(full)} = 1",
        "inline": _inline(full),
    }[form]
    text = "\n".join([*padding, statement, ""])
    line = len(padding) + (2 if path and form == "key" else 1)
    for message in refusals(text):
        assert message.startswith(f"policy.toml:{line}: "), (text, message)
        assert f"{'.'.join(full)}: unknown" in message or f"[{name}]: unknown table" in message, (text, message)


_KEY_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=6)
_KEYS = st.one_of(NAMES, _KEY_TEXT)
_VALUES = st.one_of(
    st.integers(-5, 5).map(lambda n: (str(n), 0)),
    st.sampled_from(['"a # b"', "'x = 1'", '"q\\"[t]"']).map(lambda s: (s, 0)),
    st.integers(0, 3).map(lambda n: ("[\n" + "".join(f"  {i}, # [x]\n" for i in range(n)) + "]", n + 1)),
    st.integers(0, 3).map(lambda n: ('"""' + "\\n= 1\n" * n + '"""', n)),
    st.integers(0, 2).map(lambda n: ("'''" + "[t]\n" * n + "'''", n)),
)


def _key(name: str) -> str:
    import re

    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        _KEYS,
        st.dictionaries(_KEYS, st.tuples(_VALUES, st.booleans(), st.integers(0, 2)), max_size=4),
        max_size=4,
    )
)
def test_key_lines_finds_where_each_key_is_written(document):
    lines: list[str] = []
    expected: dict[tuple[str, ...], int] = {}
    for table, entries in document.items():
        lines.append(f"[{_key(table)}]")
        expected[(table,)] = len(lines)
        for key, ((value, extra_lines), inline, blanks) in entries.items():
            lines += ["# a comment = 1"] * blanks
            expected[(table, key)] = len(lines) + 1
            if inline:
                expected[(table, key, "v")] = len(lines) + 1
                lines += f"{_key(key)} = {{ v = {value} }}".split("\n")
            else:
                lines += f"{_key(key)} = {value}".split("\n")
            assert len(lines) == expected[(table, key)] + extra_lines
    text = "\n".join(lines) + "\n"
    parsed = tomllib.loads(text)
    assert parsed.keys() == document.keys()
    located = KeyLines(text)
    for path, line in expected.items():
        assert located.line(path) == line, (text, path)
