"""Appraisal policies: the design's example, strict validation, and errors that name the key and line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.attest.errors import PolicyError
from confnb.attest.policy import AttestationPolicy
from confnb.attest.report import Product

DESIGN_EXAMPLE = """
[attestation]
allow_simulated = false
measurements = ["%s"]        # allowlist; empty list = reject all
min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }   # per-product tables allowed
reject_debug = true
reject_migration_agent = true
max_vmpl = 0
max_evidence_age_s = 300
signing_keys = ["VCEK", "VLEK"]
""" % ("ab" * 48)


def test_the_design_example_parses():
    policy = AttestationPolicy.from_toml(DESIGN_EXAMPLE)
    assert policy.measurements == ("ab" * 48,)
    assert policy.min_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert policy.max_evidence_age_s == 300 and policy.max_vmpl == 0 and not policy.allow_simulated


def test_defaults_are_strict():
    policy = AttestationPolicy.from_toml("[attestation]\n")
    assert policy.reject_debug and policy.reject_migration_agent and not policy.allow_simulated
    assert policy.max_vmpl == 0 and policy.measurements is None


def test_per_product_tcb_tables_override_the_generic_floor():
    policy = AttestationPolicy.from_toml(
        "[attestation]\n[attestation.min_tcb]\nsnp = 8\n[attestation.min_tcb.Turin]\nfmc = 1\nsnp = 3\n"
    )
    assert policy.minimum_tcb(Product.MILAN) == {"snp": 8}
    assert policy.minimum_tcb(Product.TURIN) == {"snp": 3, "fmc": 1}


def test_output_policy_tables_beside_attestation_are_left_alone():
    text = '[policy]\nid = "x"\n[release]\nallow = ["schema"]\n[attestation]\nmax_vmpl = 1\n'
    assert AttestationPolicy.from_toml(text).max_vmpl == 1


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("[relese]\nallow = []\n", "policy.toml:3: [relese]: unknown table (did you mean [release]?)"),
        ("[release]\nmax_row = 5\n", "policy.toml:4: release.max_row: unknown key (did you mean 'max_rows'?)"),
        ('[privacy]\nmod = "dp"\n', "policy.toml:4: privacy.mod: unknown key (did you mean 'mode'?)"),
    ],
)
def test_an_unknown_table_beside_attestation_is_refused_though_this_half_does_not_read_it(tmp_path, extra, error):
    # The broker reads only [attestation] from its attestation.toml; a misspelt table there is still an error.
    text = "[attestation]\nmax_vmpl = 1\n" + extra
    with pytest.raises(PolicyError) as caught:
        AttestationPolicy.from_toml(text, source="policy.toml")
    assert str(caught.value).startswith(error)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        AttestationPolicy.load(path)
    assert str(caught.value).startswith(error.replace("policy.toml", str(path), 1))


def test_the_schema_knows_every_key_the_reader_reads():
    from dataclasses import fields

    from confnb.policy.schema import ATTESTATION

    read = {f.name for f in fields(AttestationPolicy)} - {"source", "min_tcb_by_product", "min_launch_tcb_by_product"}
    assert set(ATTESTATION.children) == read


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("[attestation]\nreject_debg = true\n", 2, "attestation.reject_debg: unknown key"),
        ("[attestation]\nallow_simulated = 1\n", 2, "attestation.allow_simulated: must be true or false"),
        ("[attestation]\n\nmax_vmpl = 4\n", 3, "attestation.max_vmpl: must be an integer from 0 to 3"),
        ('[attestation]\nmeasurements = ["abc"]\n', 2, "is not 96 hex characters"),
        ('[attestation]\nmeasurements = "ab"\n', 2, "must be a list"),
        ('[attestation]\nsigning_keys = ["VCEK", "ASK"]\n', 2, "'ASK' is not one of VCEK, VLEK"),
        (
            "[attestation]\nmin_tcb = { snp = 8, spl = 1 }\n",
            2,
            "attestation.min_tcb.spl: unknown TCB component",
        ),
        ("[attestation]\nmin_tcb = { snp = 300 }\n", 2, "attestation.min_tcb.snp: must be an integer"),
        ('[attestation]\nmin_firmware = "one"\n', 2, "must be a version"),
        ("[attestation]\nmax_evidence_age_s = 0\n", 2, "max_evidence_age_s"),
        ('[attestation]\nproducts = ["Venice"]\n', 2, "'Venice' is not one of Milan, Genoa, Turin"),
        ("[attestation]\nguest_policy = { debug = false }\n", 2, "attestation.guest_policy.debug: unknown flag"),
        ("[attestation]\nreject_debg = true\n", 2, "unknown key (did you mean 'reject_debug'?)"),
        ("[attestation]\n[attestation.extra]\nx = 1\n", 2, "attestation.extra: unknown key"),
        (
            "[attestation]\n\n[attestation.min_tcb.Turn]\nsnp = 1\n",
            3,
            "attestation.min_tcb.Turn: unknown TCB component or product (did you mean 'Turin'?)",
        ),
        (
            "[attestation.min_tcb.Genoa]\nsnp = 1\nspn = 2\n",
            3,
            "attestation.min_tcb.Genoa.spn: unknown TCB component (did you mean 'snp'?)",
        ),
        (
            "[attestation]\nmin_launch_tcb = { Milan = { tee = 1, xx = 1 } }\n",
            2,
            "attestation.min_launch_tcb.Milan.xx: unknown TCB component",
        ),
        ("[attestation]\nplatform_info.smt = true\n", 2, "attestation.platform_info.smt: unknown flag"),
        ("[attestation]\nmin_tcb = { Turin = 3 }\n", 2, "attestation.min_tcb.Turin: must be a table of SPLs"),
        (
            "[attestation]\n[attestation.platform_info]\ntsme_enabled = 1\n",
            3,
            "attestation.platform_info.tsme_enabled: must be true or false",
        ),
        ('[attestation]\nmin_abi = "1"\n', 2, "must be a version like"),
        ('[attestation]\nchip_ids = ["abcd"]\n', 2, "is not 128 hex characters (64 bytes)"),
        ("[attestation]\nmin_launch_tcb = { fmc = -1 }\n", 2, "attestation.min_launch_tcb.fmc: must be an integer"),
        ("[attestation]\nrequired_launch_mitigations = true\n", 2, "must be an integer"),
    ],
)
def test_errors_name_the_key_and_the_line(text, line, fragment):
    with pytest.raises(PolicyError) as caught:
        AttestationPolicy.from_toml(text, source="policy.toml")
    message = str(caught.value)
    assert message.startswith(f"policy.toml:{line}: "), message
    assert fragment in message


def test_toml_syntax_errors_carry_the_position():
    with pytest.raises(PolicyError, match=r"policy.toml: not valid TOML: .*line 2"):
        AttestationPolicy.from_toml("[attestation]\nmax_vmpl = = 1\n", source="policy.toml")


def test_a_file_without_an_attestation_table_is_refused():
    with pytest.raises(PolicyError, match="no \\[attestation\\] table"):
        AttestationPolicy.from_toml("[release]\nallow = []\n")


def test_load_reports_unreadable_files(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy"):
        AttestationPolicy.load(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError, match="not UTF-8"):
        AttestationPolicy.load(binary)


def test_digest_is_stable_and_sensitive():
    one = AttestationPolicy.from_toml(DESIGN_EXAMPLE)
    assert one.digest() == AttestationPolicy.from_toml(DESIGN_EXAMPLE).digest()
    assert one.digest() != AttestationPolicy.from_toml(DESIGN_EXAMPLE.replace("max_vmpl = 0", "max_vmpl = 1")).digest()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_policy_or_a_policy_error(text):
    try:
        AttestationPolicy.from_toml("[attestation]\n" + text)
    except PolicyError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "max_vmpl",
                "reject_debug",
                "measurements",
                "min_tcb",
                "products",
                "signing_keys",
                "min_firmware",
                "host_data",
                "allow_simulated",
            ]
        ),
        st.one_of(
            st.integers(-5, 300),
            st.booleans(),
            st.text(max_size=5),
            st.lists(st.text(max_size=4), max_size=2),
            st.dictionaries(st.sampled_from(["snp", "tee", "x"]), st.integers(-1, 300)),
        ),
    )
)
def test_typed_garbage_gives_a_policy_or_a_policy_error(values):
    import json

    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines.append(f"{key} = {{ {', '.join(f'{k} = {v}' for k, v in value.items())} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    try:
        AttestationPolicy.from_toml("[attestation]\n" + "\n".join(lines) + "\n")
    except PolicyError:
        pass
