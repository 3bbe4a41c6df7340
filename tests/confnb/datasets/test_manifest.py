"""Dataset manifests: strict parsing, signing, and verification that catches every way of tampering with a dataset
directory (edited manifest, edited / dropped / added / swapped files, replayed versions, a stranger's key)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.datasets.manifest import (
    MANIFEST_FORMAT,
    DatasetIntegrityError,
    DatasetSchema,
    FileEntry,
    Manifest,
    ManifestError,
    SchemaField,
    describe_file,
    public_key_fingerprint,
    sign_manifest,
    verify_dataset,
    write_dataset_manifest,
)

OWNER = Ed25519PrivateKey.generate()
OWNER_RAW = OWNER.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
STRANGER = Ed25519PrivateKey.generate()
ARROW_SCHEMA = pa.schema(
    [pa.field("patient_id", pa.string(), nullable=False), ("age", pa.int32()), ("cost", pa.float64())]
)
SCHEMA = DatasetSchema.from_arrow(ARROW_SCHEMA)
CREATED = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
POLICY_DIGEST = "sha256:" + "ab" * 32


def _manifest(files: list[FileEntry], version: int = 1, key: Ed25519PrivateKey = OWNER, **changes: Any) -> Manifest:
    manifest = Manifest(
        dataset_id="claims",
        version=version,
        format="arrow-ipc-tink-aes256-gcm-hkdf-1mb",
        schema=SCHEMA,
        files=tuple(files),
        key_id="claims-key-1",
        output_policy_digest=POLICY_DIGEST,
        owner_public_key=key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        created_at=CREATED,
    )
    return replace(manifest, **changes) if changes else manifest


def _publish(directory: Path, contents: dict[str, bytes], version: int = 1, key: Ed25519PrivateKey = OWNER) -> Manifest:
    """Write the files, then a signed manifest listing them, as a data owner's tool would."""
    directory.mkdir(exist_ok=True)
    entries = []
    for index, (name, content) in enumerate(contents.items()):
        (directory / name).write_bytes(content)
        entries.append(describe_file(directory / name, rows=100 + index))
    manifest = _manifest(entries, version=version, key=key)
    write_dataset_manifest(directory, manifest, key)
    return manifest


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    directory = tmp_path / "claims"
    _publish(
        directory,
        {
            "part-0001.arrow": os.urandom(3 * (1 << 20) + 17),  # spans several 1 MiB hashing chunks
            "part-0002.arrow": os.urandom(4096),
            "part-0003.arrow": os.urandom(4096),
        },
    )
    return directory


def _problems(directory: Path, **kwargs: Any) -> tuple[str, ...]:
    with pytest.raises(DatasetIntegrityError) as caught:
        verify_dataset(directory, **kwargs)
    return caught.value.problems


# -- round trip and signature ----------------------------------------------------------------------------------------


def test_written_dataset_verifies_and_round_trips(dataset):
    verified = verify_dataset(dataset, OWNER.public_key(), min_version=1, dataset_id="claims")
    manifest = verified.manifest
    assert [entry.name for entry in manifest.files] == ["part-0001.arrow", "part-0002.arrow", "part-0003.arrow"]
    assert manifest.file("part-0001.arrow").size == 3 * (1 << 20) + 17
    assert verified.path("part-0002.arrow") == dataset / "part-0002.arrow"
    with pytest.raises(KeyError):
        verified.path("../etc/passwd")
    assert verified.owner_fingerprint == public_key_fingerprint(OWNER.public_key()) == manifest.owner_fingerprint
    assert verified.manifest_digest == manifest.digest and manifest.digest.startswith("sha256:")
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest.to_json().encode()) == manifest
    assert Manifest.from_json(manifest.canonical_bytes()) == manifest
    assert manifest.schema.to_arrow().equals(ARROW_SCHEMA)
    assert verify_dataset(dataset, OWNER_RAW).manifest == manifest  # the trusted key may be given as raw bytes


def test_manifest_file_is_readable_json_and_the_signature_covers_its_canonical_form(dataset):
    text = (dataset / "manifest.json").read_text()
    assert text.startswith("{\n  ")  # indented for people
    document = json.loads(text)
    assert document["format_version"] == MANIFEST_FORMAT
    assert document["schema"]["fields"][0] == {"name": "patient_id", "type": "string", "nullable": False}
    assert base64.b64decode(document["owner_public_key"]) == OWNER_RAW
    assert document["created_at"] == "2026-05-01T12:00:00Z"
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    signature = (dataset / "manifest.sig").read_bytes()
    assert len(signature) == 64
    OWNER.public_key().verify(signature, canonical)  # verifiable with nothing but a JSON library and Ed25519


def test_signing_with_a_key_that_is_not_the_manifests_owner_is_refused(dataset):
    manifest = verify_dataset(dataset).manifest
    with pytest.raises(ManifestError, match=r"^owner_public_key: is sha256:[0-9a-f]{64}, but the signing key's"):
        sign_manifest(manifest, STRANGER)
    assert len(sign_manifest(manifest, OWNER)) == 64


def test_created_at_is_kept_in_utc_at_second_precision():
    entry = FileEntry("a.arrow", 1, 1, "0" * 64)
    plus_two = timezone(timedelta(hours=2))
    manifest = _manifest([entry], created_at=datetime(2026, 5, 1, 14, 0, 0, 999_999, tzinfo=plus_two))
    assert manifest.created_at == CREATED and manifest.created_at.tzinfo is UTC
    with pytest.raises(ManifestError, match=r"^created_at: must be timezone-aware$"):
        _manifest([entry], created_at=datetime(2026, 5, 1))  # noqa: DTZ001


# -- tampering -------------------------------------------------------------------------------------------------------


def test_editing_a_manifest_field_breaks_the_signature(dataset):
    document = json.loads((dataset / "manifest.json").read_text())
    document["files"][1]["rows"] += 1
    (dataset / "manifest.json").write_text(json.dumps(document))
    assert _problems(dataset) == ("manifest.sig: signature does not verify with the owner key",)


def test_reformatting_the_manifest_does_not_matter(dataset):
    document = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps(document, indent=7))
    verify_dataset(dataset, OWNER.public_key())


def test_editing_a_file_is_a_sha256_mismatch(dataset):
    content = bytearray((dataset / "part-0001.arrow").read_bytes())
    content[2 * (1 << 20) + 5] ^= 0x01  # in the third hashing chunk
    (dataset / "part-0001.arrow").write_bytes(content)
    assert _problems(dataset) == ("part-0001.arrow: SHA-256 mismatch",)


def test_truncating_or_extending_a_file_is_a_size_mismatch(dataset):
    with (dataset / "part-0002.arrow").open("ab") as handle:
        handle.write(b"x")
    os.truncate(dataset / "part-0003.arrow", 100)
    assert _problems(dataset) == (
        "part-0002.arrow: size is 4097 bytes, the manifest says 4096",
        "part-0003.arrow: size is 100 bytes, the manifest says 4096",
    )


def test_dropping_a_file_is_detected(dataset):
    (dataset / "part-0002.arrow").unlink()
    with pytest.raises(DatasetIntegrityError, match=r"^part-0002\.arrow: listed in the manifest but missing$"):
        verify_dataset(dataset)


@pytest.mark.parametrize("name", ["extra.arrow", ".hidden", "part-0004.arrow", "PART-0001.ARROW"])
def test_adding_a_file_is_detected(dataset, name):
    (dataset / name).write_bytes(b"swapped in")
    assert _problems(dataset) == (f"{name}: not listed in the manifest",)


def test_adding_a_directory_is_detected(dataset):
    (dataset / "more").mkdir()
    assert _problems(dataset) == ("more: not listed in the manifest",)


def test_swapping_two_files_contents_is_detected(dataset):
    second, third = (dataset / "part-0002.arrow").read_bytes(), (dataset / "part-0003.arrow").read_bytes()
    (dataset / "part-0002.arrow").write_bytes(third)
    (dataset / "part-0003.arrow").write_bytes(second)
    with pytest.raises(DatasetIntegrityError) as caught:
        verify_dataset(dataset)
    assert caught.value.problems == ("part-0002.arrow: SHA-256 mismatch", "part-0003.arrow: SHA-256 mismatch")
    assert str(caught.value) == "part-0002.arrow: SHA-256 mismatch (and 1 more problem)"


def test_every_problem_is_reported_at_once(dataset):
    (dataset / "part-0001.arrow").unlink()
    (dataset / "part-0002.arrow").write_bytes(b"changed")
    (dataset / "zzz.arrow").write_bytes(b"extra")
    assert _problems(dataset) == (
        "part-0001.arrow: listed in the manifest but missing",
        "part-0002.arrow: size is 7 bytes, the manifest says 4096",
        "zzz.arrow: not listed in the manifest",
    )


def test_a_symlinked_file_is_refused(dataset, tmp_path):
    outside = tmp_path / "outside.arrow"
    outside.write_bytes((dataset / "part-0002.arrow").read_bytes())
    (dataset / "part-0002.arrow").unlink()
    (dataset / "part-0002.arrow").symlink_to(outside)
    assert _problems(dataset) == ("part-0002.arrow: is a symbolic link, not a regular file",)


def test_replaying_an_older_version_is_rejected(tmp_path):
    old, current = tmp_path / "old", tmp_path / "current"
    _publish(old, {"part-0001.arrow": b"January"}, version=1)
    _publish(current, {"part-0001.arrow": b"February"}, version=2)
    assert verify_dataset(current, OWNER.public_key(), min_version=2).manifest.version == 2
    assert verify_dataset(old, OWNER.public_key()).manifest.version == 1  # validly signed, just old
    with pytest.raises(DatasetIntegrityError, match=r"version 1 of 'claims' is older than version 2 already seen"):
        verify_dataset(old, OWNER.public_key(), min_version=2)
    with pytest.raises(ValueError, match="min_version must be a positive integer"):
        verify_dataset(current, min_version=0)


def test_another_dataset_id_is_rejected_when_one_is_expected(dataset):
    with pytest.raises(DatasetIntegrityError, match=r"^manifest\.json: dataset id is 'claims', expected 'payroll'$"):
        verify_dataset(dataset, OWNER.public_key(), dataset_id="payroll")


def test_a_dataset_signed_by_someone_else_is_rejected_when_the_owner_key_is_given(tmp_path):
    forged = tmp_path / "forged"
    _publish(forged, {"part-0001.arrow": b"attacker data"}, key=STRANGER)
    verify_dataset(forged)  # self-consistent: this is why deciders must pass the owner's key
    problems = _problems(forged, trusted_owner_key=OWNER.public_key())
    assert len(problems) == 1
    assert problems[0].startswith("manifest.json: owner key sha256:")
    assert problems[0].endswith(f"is not the trusted owner key {public_key_fingerprint(OWNER_RAW)}")
    with pytest.raises(ValueError, match="32 raw bytes"):
        verify_dataset(forged, b"short")


def test_swapping_in_another_owners_key_without_resigning_fails_the_signature(dataset):
    document = json.loads((dataset / "manifest.json").read_text())
    stranger_raw = STRANGER.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    document["owner_public_key"] = base64.b64encode(stranger_raw).decode()
    (dataset / "manifest.json").write_text(json.dumps(document))
    assert _problems(dataset) == ("manifest.sig: signature does not verify with the owner key",)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: (d / "manifest.sig").unlink(), "manifest.sig: missing"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda d: (d / "manifest.sig").write_bytes(b"\0" * 63), "manifest.sig: must be a 64-byte Ed25519 signature"),
        (lambda d: (d / "manifest.sig").write_bytes(b"\0" * 64), "manifest.sig: signature does not verify"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
        (lambda d: (d / "manifest.json").write_text("[]"), "manifest.json: must be a JSON object, got array"),
    ],
)
def test_a_missing_or_broken_manifest_or_signature_is_named(dataset, damage, problem):
    damage(dataset)
    problems = _problems(dataset)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_field_list_that_does_not_describe_the_ipc_schema_is_rejected(tmp_path):
    directory = tmp_path / "lying"
    directory.mkdir()
    (directory / "a.arrow").write_bytes(b"data")
    fields = (SchemaField("patient_id", "string", False), SchemaField("age", "int64", True), *SCHEMA.fields[2:])
    manifest = _manifest([describe_file(directory / "a.arrow", 1)], schema=DatasetSchema(SCHEMA.ipc, fields))
    write_dataset_manifest(directory, manifest, OWNER)
    assert _problems(directory) == (
        "manifest.json: schema.fields: does not describe schema.ipc: column 1 is ('age', 'int32', True) in the IPC "
        "schema, ('age', 'int64', True) in the list",
    )
    with pytest.raises(ManifestError, match="not a serialized Arrow IPC schema"):
        DatasetSchema(b"\x01\x02", SCHEMA.fields).to_arrow()


def test_not_a_directory(tmp_path):
    with pytest.raises(DatasetIntegrityError, match="not a dataset directory"):
        verify_dataset(tmp_path / "nowhere")


# -- strict parsing --------------------------------------------------------------------------------------------------


def _document() -> dict[str, Any]:
    return _manifest(
        [FileEntry("part-0001.arrow", 10, 2, "0" * 64), FileEntry("part-0002.arrow", 5, 1, "1" * 64)]
    ).to_dict()


def _set(path: str, value: Any) -> Any:
    """A change to one field of a valid manifest document, addressed like ``files.0.name``."""

    def change(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _delete(path: str) -> Any:
    def change(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        del target[last]

    return change


FILE = "files.0"
STRICT_CASES = [
    (_set("surprise", 1), "surprise: unknown field"),
    (_delete("key_id"), "key_id: missing"),
    (_set("format_version", "confnb-manifest/2"), "format_version: unsupported 'confnb-manifest/2'"),
    (_set("format_version", 1), "format_version: must be a string, got int"),
    (_set("dataset_id", "../claims"), "dataset_id: must be 1 to 128 letters"),
    (_set("dataset_id", ""), "dataset_id: must be 1 to 128 letters"),
    (_set("version", "1"), "version: must be an integer, got string"),
    (_set("version", True), "version: must be an integer, got boolean"),
    (_set("version", 1.0), "version: must be an integer, got float"),
    (_set("version", 0), "version: must be between 1 and"),
    (_set("version", 2**53), "version: must be between 1 and"),
    (_set("format", "parquet-pme-aes-gcm-ctr-v1"), "format: must be one of"),
    (_set("files", []), "files: must not be empty"),
    (_set("files", {}), "files: must be an array, got object"),
    (_set(f"{FILE}.name", "sub/part.arrow"), "files[0].name: must be a plain file name, not a path"),
    (_set(f"{FILE}.name", "sub\\part.arrow"), "files[0].name: must be a plain file name, not a path"),
    (_set(f"{FILE}.name", "/etc/passwd"), "files[0].name: must be a relative file name, not an absolute path"),
    (_set(f"{FILE}.name", "C:part.arrow"), "files[0].name: must be a relative file name, not an absolute path"),
    (_set(f"{FILE}.name", ".."), "files[0].name: must be a file name, not '..'"),
    (_set(f"{FILE}.name", "."), "files[0].name: must be a file name, not '.'"),
    (_set(f"{FILE}.name", ""), "files[0].name: must not be empty"),
    (_set(f"{FILE}.name", ".hidden"), "files[0].name: must start with a letter or digit"),
    (_set(f"{FILE}.name", "part 1.arrow"), "files[0].name: must start with a letter or digit"),
    (_set(f"{FILE}.name", "manifest.json"), "files[0].name: 'manifest.json' is reserved"),
    (_set(f"{FILE}.name", "Manifest.SIG"), "files[0].name: 'Manifest.SIG' is reserved"),
    (_set("files.1.name", "part-0001.arrow"), "files[1].name: duplicate of files[0]"),
    (_set("files.1.name", "PART-0001.arrow"), "files[1].name: duplicate of files[0]"),
    (_set(f"{FILE}.size", -1), "files[0].size: must be between 0 and"),
    (_set(f"{FILE}.rows", None), "files[0].rows: must be an integer, got null"),
    (_set(f"{FILE}.sha256", "A" * 64), "files[0].sha256: must be 64 lowercase hex digits"),
    (_set(f"{FILE}.sha256", "0" * 63), "files[0].sha256: must be 64 lowercase hex digits"),
    (_set(f"{FILE}.extra", 1), "files[0].extra: unknown field"),
    (_set(FILE, "part-0001.arrow"), "files[0]: must be an object, got string"),
    (_set("schema.ipc", "not base64!"), "schema.ipc: not valid base64"),
    (_set("schema.ipc", ""), "schema.ipc: must not be empty"),
    (_set("schema.fields", []), "schema.fields: must not be empty"),
    (_set("schema.fields.1.name", "patient_id"), "schema.fields[1].name: duplicate column name 'patient_id'"),
    (_set("schema.fields.0.name", "a\x1b[31m"), "schema.fields[0].name: must not contain control, format"),
    (_set("schema.fields.0.name", "patient\u202eid"), "schema.fields[0].name: must not contain control, format"),
    (_set("schema.fields.0.nullable", "yes"), "schema.fields[0].nullable: must be a boolean, got string"),
    (_set("schema.fields.0.type", ""), "schema.fields[0].type: must not be empty"),
    (_set("schema", None), "schema: must be an object, got null"),
    (_set("key_id", "k" * 257), "key_id: must be at most 256 characters"),
    (_set("key_id", "key\ud800"), "key_id: must not contain control, format or surrogate characters, found U+D800"),
    (_set("output_policy_digest", "sha256:" + "A" * 64), "output_policy_digest: must be 'sha256:'"),
    (_set("output_policy_digest", "ab" * 32), "output_policy_digest: must be 'sha256:'"),
    (_set("owner_public_key", base64.b64encode(b"\0" * 31).decode()), "owner_public_key: must be 32 bytes, got 31"),
    (_set("owner_public_key", base64.b64encode(OWNER_RAW).decode().rstrip("=")), "owner_public_key: not valid base64"),
    (_set("owner_public_key", base64.urlsafe_b64encode(b"\xfb" * 32).decode()), "owner_public_key: not valid base64"),
    (_set("owner_public_key", base64.b64encode(OWNER_RAW).decode()[:-2] + "N="), "owner_public_key: not in canonical"),
    (_set("created_at", "2026-05-01T14:00:00+02:00"), "created_at: must be RFC 3339 UTC"),
    (_set("created_at", "2026-05-01T12:00:00.5Z"), "created_at: must be RFC 3339 UTC"),
    (_set("created_at", "2026-13-01T12:00:00Z"), "created_at: not a valid time"),
    (_set("created_at", 1746100800), "created_at: must be a string, got int"),
]


@pytest.mark.parametrize(("change", "message"), STRICT_CASES, ids=[case[1][:40] for case in STRICT_CASES])
def test_strict_parsing_names_the_field(change, message):
    document = _document()
    change(document)
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(json.dumps(document))
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"version": 1, "version": 2}', "version: duplicate key in a JSON object"),
        ('{"version": NaN}', "manifest: NaN is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "manifest: "),
        ("\ufeff{}", "manifest: not valid JSON"),
        (b"\xff\xfe{}", "manifest: not UTF-8 (byte 0)"),
        ("", "manifest: not valid JSON"),
        ("null", "manifest: must be a JSON object, got null"),
        ('{"\\ud800": 1}', "'\\ud800': unknown field"),
    ],
)
def test_malformed_json_is_a_manifest_error(text, message):
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_constructor_checks_as_strictly_as_the_parser():
    entry = FileEntry("a.arrow", 1, 1, "0" * 64)
    with pytest.raises(ManifestError, match=r"^name: must be a plain file name, not a path"):
        FileEntry("a/b", 1, 1, "0" * 64)
    with pytest.raises(ManifestError, match=r"^size: must be an integer, got boolean$"):
        FileEntry("a", True, 1, "0" * 64)  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=r"^files\[1\]\.name: duplicate of files\[0\]"):
        _manifest([entry, entry])
    with pytest.raises(ManifestError, match=r"^files\[0\]: must be a FileEntry, got dict$"):
        _manifest([{"name": "a.arrow"}])  # type: ignore[list-item]
    with pytest.raises(ManifestError, match=r"^owner_public_key: must be bytes, got string$"):
        _manifest([entry], owner_public_key="key")
    assert replace(_manifest([entry]), files=[entry]).files == (entry,)  # lists are stored as tuples


# -- properties ------------------------------------------------------------------------------------------------------

readable_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs")), min_size=1, max_size=16
)
file_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
    lambda name: name.lower() not in ("manifest.json", "manifest.sig")
)
file_entries = st.builds(
    FileEntry,
    name=file_names,
    size=st.integers(0, 2**53 - 1),
    rows=st.integers(0, 2**53 - 1),
    sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
)
schemas = st.builds(
    DatasetSchema,
    ipc=st.binary(min_size=1, max_size=64),
    fields=st.lists(
        st.builds(SchemaField, name=readable_text, type=readable_text, nullable=st.booleans()),
        min_size=1,
        max_size=5,
        unique_by=lambda column: column.name,
    ).map(tuple),
)
manifests = st.builds(
    Manifest,
    dataset_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
    version=st.integers(1, 2**53 - 1),
    format=st.sampled_from(["arrow-ipc-tink-aes256-gcm-hkdf-1mb", "parquet-pme-aes-gcm-v1"]),
    schema=schemas,
    files=st.lists(file_entries, min_size=1, max_size=5, unique_by=lambda entry: entry.name.casefold()).map(tuple),
    key_id=readable_text,
    output_policy_digest=st.binary(min_size=32, max_size=32).map(lambda digest: "sha256:" + digest.hex()),
    owner_public_key=st.binary(min_size=32, max_size=32),
    created_at=st.datetimes(
        min_value=datetime(1970, 1, 2),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))]),
    ),
)
# Lone surrogates are valid JSON escapes ("\\ud800") but not encodable text: the parser must reject them cleanly.
json_text = st.text(max_size=10) | st.sampled_from(["\ud800", "a\udfffb"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)
PROPERTY_SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(manifests)
def test_to_json_from_json_round_trips(manifest):
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest.canonical_bytes()) == manifest
    assert Manifest.from_dict(json.loads(manifest.to_json())).canonical_bytes() == manifest.canonical_bytes()


def _parse_or_error(data: str | bytes) -> None:
    """Any other exception escapes and fails the test."""
    outcome: Manifest | ManifestError
    try:
        outcome = Manifest.from_json(data)
    except ManifestError as error:
        outcome = error
    assert isinstance(outcome, Manifest) or "\n" not in str(outcome)


@PROPERTY_SETTINGS
@given(json_values)
def test_arbitrary_json_gives_a_manifest_or_a_manifest_error(value):
    _parse_or_error(json.dumps(value))


@PROPERTY_SETTINGS
@given(manifest=manifests, data=st.data())
def test_valid_manifests_with_one_field_replaced_give_a_manifest_or_a_manifest_error(manifest, data):
    document = manifest.to_dict()
    target: Any = document
    # Walk down to a random object or array inside the manifest, then replace one member with arbitrary JSON.
    while True:
        keys = list(range(len(target))) if isinstance(target, list) else sorted(target)
        key = data.draw(st.sampled_from(keys))
        if isinstance(target[key], dict | list) and target[key] and data.draw(st.booleans()):
            target = target[key]
            continue
        target[key] = data.draw(json_values)
        break
    _parse_or_error(json.dumps(document))


@PROPERTY_SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_bytes_and_text_give_a_manifest_error(data):
    _parse_or_error(data)
