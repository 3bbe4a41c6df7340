"""The code measurement must follow its documented encoding and move whenever the enclave's code does."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import kernel_enclave
from kernel_enclave import measurement

PACKAGE = Path(kernel_enclave.__file__).resolve().parent


def _expected(files: list[Path], base: Path, algorithm: str) -> bytes:
    """The documented encoding, written out again: name, NUL, 8-byte big-endian length, content."""
    hasher = hashlib.new(algorithm)
    for path in files:
        content = path.read_bytes()
        hasher.update(path.relative_to(base).as_posix().encode() + b"\0" + len(content).to_bytes(8, "big") + content)
    return hasher.digest()


@pytest.fixture
def package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package that the measurement functions look at instead of the installed one."""
    copy = tmp_path / "kernel_enclave"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(measurement, "_PACKAGE_DIR", copy)
    return copy


def test_code_files_are_the_packages_python_files_in_path_order() -> None:
    files = measurement.code_files()
    names = [path.relative_to(PACKAGE.parent).as_posix() for path in files]
    assert names == sorted(names)
    assert {
        "kernel_enclave/__init__.py",
        "kernel_enclave/attestation.py",
        "kernel_enclave/measurement.py",
        "kernel_enclave/tee/__init__.py",
        "kernel_enclave/tee/base.py",
        "kernel_enclave/tee/certtable.py",
        "kernel_enclave/tee/sevsnp.py",
        "kernel_enclave/tee/simulated.py",
    } <= set(names)
    assert all(name.endswith(".py") and "__pycache__" not in name for name in names)


def test_digests_follow_the_documented_encoding() -> None:
    files = measurement.code_files()
    simulated = measurement.simulated_measurement()
    assert len(simulated) == 48
    assert simulated == _expected(files, PACKAGE.parent, "sha384")
    assert measurement.bundle_digest() == "sha256:" + _expected(files, PACKAGE.parent, "sha256").hex()


def test_any_code_change_moves_both_digests(package_copy: Path) -> None:
    before = (measurement.simulated_measurement(), measurement.bundle_digest())
    target = package_copy / "tee" / "base.py"
    target.write_bytes(target.read_bytes() + b"\n# one more line\n")
    after = (measurement.simulated_measurement(), measurement.bundle_digest())
    assert after[0] != before[0]
    assert after[1] != before[1]


def test_renaming_or_adding_a_module_moves_the_digest(package_copy: Path) -> None:
    before = measurement.simulated_measurement()
    (package_copy / "tee" / "base.py").rename(package_copy / "tee" / "base2.py")
    renamed = measurement.simulated_measurement()
    (package_copy / "extra.py").write_text("")
    added = measurement.simulated_measurement()
    assert len({before, renamed, added}) == 3


def test_bytecode_caches_and_other_files_do_not_count(package_copy: Path) -> None:
    before = measurement.simulated_measurement()
    cache = package_copy / "tee" / "__pycache__"
    cache.mkdir()
    (cache / "base.cpython-311.pyc").write_bytes(b"\0" * 16)
    (cache / "stray.py").write_text("x = 1\n")
    (package_copy / "notes.txt").write_text("not code")
    assert measurement.simulated_measurement() == before
    assert all("__pycache__" not in path.parts for path in measurement.code_files())
