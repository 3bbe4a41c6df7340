"""The code measurement must follow its documented encoding and move whenever the enclave's code does.

The enclave's code is ``kernel_enclave/**`` plus the confnb modules listed in ``ENCLAVE_CONFNB_MODULES``; the
launcher, the relay and the vault must import nothing else from the project (here: their modules imported in a
fresh interpreter; ``test_measurement_coverage.py``: a real kernel's processes at work).
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kernel_enclave
from kernel_enclave import measurement

PACKAGE = Path(kernel_enclave.__file__).resolve().parent
ROOT = PACKAGE.parent

# The modules the launcher, the relay and the vault run from, including those they import lazily.
ENCLAVE_ENTRY_MODULES = [
    "kernel_enclave.launcher",
    "kernel_enclave.relay.relay",
    "kernel_enclave.relay.upload",
    "kernel_enclave.relay.display",
    "kernel_enclave.relay.wire",
    "kernel_enclave.vault.process",
    "kernel_enclave.vault.service",
    "kernel_enclave.vault.upload",
    "kernel_enclave.vault.vault",
    "kernel_enclave.tee.simulated",
    "kernel_enclave.tee.sevsnp",
]


def _module_file(name: str) -> Path | None:
    """The file a dotted confnb module name runs from, or None when the name is not a module (an attribute)."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _named_confnb_modules(tree: ast.Module) -> set[str]:
    """Every confnb module a file imports or names as a string (``importlib.import_module("confnb.x")``), in any
    function, except under ``if TYPE_CHECKING:`` and in a module's PEP 562 ``__getattr__``."""
    names: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if ast.unparse(node.test).endswith("TYPE_CHECKING"):
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            if node.name != "__getattr__":
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            names.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)

        def visit_Constant(self, node: ast.Constant) -> None:
            if isinstance(node.value, str) and node.value.startswith("confnb."):
                names.add(node.value)

    Visitor().visit(tree)
    return {name for name in names if name == "confnb" or name.startswith("confnb.")}


def _expected(files: list[Path], base: Path, algorithm: str) -> bytes:
    """The documented encoding, written out again: name, NUL, 8-byte big-endian length, content."""
    hasher = hashlib.new(algorithm)
    for path in files:
        content = path.read_bytes()
        hasher.update(path.relative_to(base).as_posix().encode() + b"\0" + len(content).to_bytes(8, "big") + content)
    return hasher.digest()


def _copy_tree(destination: Path) -> Path:
    """Both packages, as installed side by side, without bytecode caches."""
    for package in ("kernel_enclave", "confnb"):
        shutil.copytree(ROOT / package, destination / package, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


@pytest.fixture
def tree_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the code that the measurement functions look at instead of the installed one."""
    copy = _copy_tree(tmp_path / "tree")
    monkeypatch.setattr(measurement, "_PACKAGE_DIR", copy / "kernel_enclave")
    monkeypatch.setattr(measurement, "_ROOT", copy)
    return copy


def test_code_files_are_the_enclave_package_and_the_listed_confnb_modules() -> None:
    names = [path.relative_to(ROOT).as_posix() for path in measurement.code_files()]
    assert names == sorted(names)
    package_files = {
        path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts
    }
    assert {name for name in names if name.startswith("kernel_enclave/")} == package_files
    assert {name for name in names if name.startswith("confnb/")} == set(measurement.ENCLAVE_CONFNB_MODULES)
    assert len(names) == len(set(names))
    assert {"confnb/policy/output.py", "confnb/hpke.py", "confnb/datasets/reader.py"} <= set(names)
    # The client side stays outside the enclave.
    assert not any(name.startswith(("confnb/broker/", "confnb/server/", "confnb/analyst/")) for name in names)
    assert "confnb/attest/verifier.py" not in names


def test_digests_follow_the_documented_encoding() -> None:
    files = measurement.code_files()
    simulated = measurement.simulated_measurement()
    assert len(simulated) == 48
    assert simulated == _expected(files, ROOT, "sha384")
    assert measurement.bundle_digest() == "sha256:" + _expected(files, ROOT, "sha256").hex()


def test_any_code_change_moves_both_digests(tree_copy: Path) -> None:
    before = (measurement.simulated_measurement(), measurement.bundle_digest())
    target = tree_copy / "kernel_enclave" / "tee" / "base.py"
    target.write_bytes(target.read_bytes() + b"\n# one more line\n")
    after = (measurement.simulated_measurement(), measurement.bundle_digest())
    assert after[0] != before[0]
    assert after[1] != before[1]


def test_weakening_the_output_policy_the_vault_enforces_moves_both_digests(tree_copy: Path) -> None:
    """The issue's case: ``strictest()`` taking the smallest ``min_group_size`` must not keep the measurement."""
    before = (measurement.simulated_measurement(), measurement.bundle_digest())
    target = tree_copy / "confnb" / "policy" / "output.py"
    source = target.read_text()
    assert "min_group_size=max(p.min_group_size for p in chosen)" in source
    target.write_text(source.replace("min_group_size=max(", "min_group_size=min("))
    after = (measurement.simulated_measurement(), measurement.bundle_digest())
    assert after[0] != before[0]
    assert after[1] != before[1]


def test_client_side_code_does_not_count(tree_copy: Path) -> None:
    """The broker and the analyst API are not the enclave's: changing them keeps the measurement."""
    before = measurement.simulated_measurement()
    for relative in ("broker/release.py", "analyst/session.py", "attest/verifier.py"):
        target = tree_copy / "confnb" / relative
        assert target.is_file(), relative
        target.write_bytes(target.read_bytes() + b"\n# elsewhere\n")
    assert measurement.simulated_measurement() == before


def test_a_missing_listed_module_is_an_error_not_a_smaller_digest(tree_copy: Path) -> None:
    (tree_copy / "confnb" / "policy" / "output.py").unlink()
    with pytest.raises(measurement.MeasurementError, match=r"confnb/policy/output\.py is missing"):
        measurement.simulated_measurement()


def test_the_measurement_of_a_copied_tree_follows_its_own_confnb(tmp_path: Path) -> None:
    """Run from a copy of the tree in a fresh interpreter: the copy's confnb files are the ones measured."""
    copy = _copy_tree(tmp_path / "tree")
    program = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(copy)!r})\n"
        "import kernel_enclave\n"
        "from kernel_enclave.measurement import simulated_measurement\n"
        "print(json.dumps([kernel_enclave.__file__, simulated_measurement().hex()]))\n"
    )

    def measure() -> str:
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60)
        where, value = json.loads(done.stdout)
        assert Path(where).resolve() == (copy / "kernel_enclave" / "__init__.py").resolve()
        return str(value)

    original = measure()
    assert original == measurement.simulated_measurement().hex()
    target = copy / "confnb" / "hpke.py"
    target.write_bytes(target.read_bytes() + b"\n# one more line\n")
    assert measure() != original


def test_renaming_or_adding_a_module_moves_the_digest(tree_copy: Path) -> None:
    package = tree_copy / "kernel_enclave"
    before = measurement.simulated_measurement()
    (package / "tee" / "base.py").rename(package / "tee" / "base2.py")
    renamed = measurement.simulated_measurement()
    (package / "extra.py").write_text("")
    added = measurement.simulated_measurement()
    assert len({before, renamed, added}) == 3


def test_bytecode_caches_and_other_files_do_not_count(tree_copy: Path) -> None:
    package = tree_copy / "kernel_enclave"
    before = measurement.simulated_measurement()
    cache = package / "tee" / "__pycache__"
    cache.mkdir()
    (cache / "base.cpython-311.pyc").write_bytes(b"\0" * 16)
    (cache / "stray.py").write_text("x = 1\n")
    (package / "notes.txt").write_text("not code")
    assert measurement.simulated_measurement() == before
    assert all("__pycache__" not in path.parts for path in measurement.code_files())


def test_the_enclave_modules_import_no_project_file_outside_the_measured_set() -> None:
    """Import the launcher's, the relay's and the vault's modules in a fresh interpreter; list the project files."""
    program = (
        "import importlib, json, sys\n"
        f"for name in {ENCLAVE_ENTRY_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "files = {getattr(module, '__file__', None) for name, module in list(sys.modules.items())\n"
        "         if name.split('.')[0] in ('confnb', 'kernel_enclave')}\n"
        "print(json.dumps(sorted(file for file in files if file)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120, cwd=ROOT
    )
    loaded = {Path(file).resolve().relative_to(ROOT).as_posix() for file in json.loads(done.stdout)}
    measured = {path.relative_to(ROOT).as_posix() for path in measurement.code_files()}
    assert "confnb/policy/output.py" in loaded  # the vault's policy module was reached: the probe saw imports
    assert loaded - measured == set(), f"the enclave imports project files outside its measurement: {loaded - measured}"


def test_every_confnb_module_the_measured_code_names_is_measured() -> None:
    """Statically, also for paths no test runs (the SEV-SNP backend, error branches, deferred imports): each confnb
    module a measured file imports, with the packages it runs on the way, is measured too."""
    measured = {path.relative_to(ROOT).as_posix() for path in measurement.code_files()}
    needed: dict[str, str] = {}
    for relative in sorted(measured):
        for name in _named_confnb_modules(ast.parse((ROOT / relative).read_text())):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:depth]))
                if found is not None:
                    needed.setdefault(found.relative_to(ROOT).as_posix(), relative)
    assert "confnb/datasets/reader.py" in needed  # named only as a string, for the vault's deferred import
    outside = {name: by for name, by in needed.items() if name not in measured}
    assert not outside, f"measured code imports confnb modules outside the measurement (module: importer): {outside}"
    unused = set(measurement.ENCLAVE_CONFNB_MODULES) - set(needed)
    assert not unused, f"listed as the enclave's code, but nothing measured imports them: {sorted(unused)}"
