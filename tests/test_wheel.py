"""What ``pip install confnb`` ships: the wheel built by the project's own backend, opened and installed.

The wheel must carry the JupyterLab extension (so analysts need no Node.js), the server extension's config (so
Jupyter enables it), and the examples (so ``confnb demo`` runs without a source checkout), and nothing of a
developer's working tree (bytecode caches). Built without build isolation from the test environment's hatchling,
so the test needs nothing from the network; the lab extension's bundle is the one the development install built.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = "confnb-{version}.data/data/"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr[-4000:]
    (path,) = out.glob("confnb-*.whl")
    return path


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _data(wheel: Path) -> str:
    version = wheel.name.split("-")[1]
    return DATA.format(version=version)


def test_the_wheel_ships_the_lab_extension_and_enables_the_server_extension(wheel: Path) -> None:
    names, data = _names(wheel), _data(wheel)
    lab = data + "share/jupyter/labextensions/confnb-lab/"
    assert {lab + "package.json", lab + "install.json", lab + "static/style.js"} <= names
    assert any(name.startswith(lab + "static/remoteEntry.") for name in names)
    config = data + "etc/jupyter/jupyter_server_config.d/confnb.json"
    with zipfile.ZipFile(wheel) as archive:
        enabled = json.loads(archive.read(config))
        package = json.loads(archive.read(lab + "package.json"))
    assert enabled == {"ServerApp": {"jpserver_extensions": {"confnb.server": True}}}
    assert package["name"] == "confnb-lab"


def test_the_wheel_ships_every_example_and_no_bytecode(wheel: Path) -> None:
    names = _names(wheel)
    examples = {
        "confnb/_examples/" + str(path.relative_to(REPO / "examples"))
        for path in (REPO / "examples").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert examples and examples <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_demo_finds_its_examples_in_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    probe = (
        "import json, confnb\n"
        "from confnb.demo import examples\n"
        "root = examples.examples_root()\n"
        "print(json.dumps({'package': confnb.__file__, 'root': str(root),\n"
        "    'owners': [owner.name for owner in examples.owners(root)],\n"
        "    'notebooks': [path.name for path in examples.notebooks(root)]}))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert found.returncode == 0, found.stderr[-4000:]
    report = json.loads(found.stdout)
    assert Path(report["package"]).is_relative_to(target)  # the wheel's copy, not the development install
    assert report["root"] == str(target / "confnb" / "_examples")
    assert sorted(report["owners"]) == ["bank", "hospital", "insurer"]
    assert report["notebooks"] == ["hospital.ipynb", "hospital_dp.ipynb", "credit.ipynb", "two_owners.ipynb"]
