"""The example use cases as the demo runs them: their owners' brokers, the kernelspec that reaches them, notebooks.

Everything comes from the repository's ``examples/`` folder (a wheel carries a copy as ``confnb/_examples``, so
``pip install confnb`` is enough to run the demo): each ``*/*_owner.py`` is a data owner's script (its
``prepare`` makes the owner's store and encrypted datasets; ``OWNER`` and ``BROKER_URL_VARIABLE`` name it), and each
``*/*.ipynb`` is an analyst's notebook. The demo runs the same code a reader of the examples runs by hand, and picks
up a new example without being changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: A source checkout's ``examples/`` (what its reader edits) wins over the copy an installed wheel carries.
SOURCE_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PACKAGED_EXAMPLES = Path(__file__).resolve().parents[1] / "_examples"
DATASETS_FOLDER = "datasets"
# The order a newcomer reads them in (Lab opens the first); examples not listed follow alphabetically.
READING_ORDER = ("hospital", "credit", "two_owners")


class DemoError(RuntimeError):
    """The demo cannot go on; the message says which step failed and why."""


@dataclass(frozen=True)
class ExampleOwner:
    """One data owner of the examples: a name, the variable carrying its broker's URL, and its owner script."""

    name: str
    broker_variable: str
    script: Path
    module: ModuleType


def examples_root(root: Path | None = None) -> Path:
    candidates = [root] if root is not None else [SOURCE_EXAMPLES, PACKAGED_EXAMPLES]
    for found in candidates:
        if any(found.glob("*/*_owner.py")):
            return found
    raise DemoError(
        f"no example owner scripts in {' or '.join(str(path) for path in candidates)}: this installation of confnb "
        "carries no examples (install it from a wheel or run it from a source checkout)"
    )


def owners(root: Path) -> list[ExampleOwner]:
    found = []
    for script in sorted(root.glob("*/*_owner.py")):
        module = _load(script)
        name, variable = getattr(module, "OWNER", None), getattr(module, "BROKER_URL_VARIABLE", None)
        if not isinstance(name, str) or not isinstance(variable, str) or not callable(getattr(module, "prepare", None)):
            raise DemoError(f"{script} is not an owner script (it needs OWNER, BROKER_URL_VARIABLE and prepare())")
        found.append(ExampleOwner(name, variable, script, module))
    return found


def notebooks(root: Path) -> list[Path]:
    def rank(path: Path) -> tuple[int, str]:
        folder = path.parent.name
        return (READING_ORDER.index(folder) if folder in READING_ORDER else len(READING_ORDER), str(path))

    return sorted(root.glob("*/*.ipynb"), key=rank)


def _load(script: Path) -> ModuleType:
    """Import an owner script by path: examples are scripts beside the package, not part of it."""
    name = f"confnb_example_{script.parent.name}_{script.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise DemoError(f"cannot load {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


@contextlib.contextmanager
def running_brokers(
    workdir: Path, example_owners: list[ExampleOwner], progress: Callable[[str], None]
) -> Iterator[dict[str, str]]:
    """Each owner prepares its store and datasets and serves its broker on loopback while the block runs.

    Yields the kernel's environment: every owner's broker URL under the owner's variable, and the datasets folder
    as ``CONFNB_DATASET_PATH``. One broker per owner, shared by every notebook that uses the owner's data.
    """
    from confnb.broker.local import serve_locally
    from kernel_enclave.vault.keys import DATASET_PATH_VARIABLE

    data = workdir / DATASETS_FOLDER
    environment = {DATASET_PATH_VARIABLE: str(data)}
    with contextlib.ExitStack() as brokers:
        for owner in example_owners:
            store = owner.module.prepare(workdir / "owners" / owner.name, data)
            url = brokers.enter_context(serve_locally(store))
            environment[owner.broker_variable] = url
            datasets = ", ".join(store.dataset_ids())
            progress(
                f"{owner.name}: encrypted {datasets} ({owner.script.parent.name}/{owner.script.name}); broker {url}"
            )
        yield environment


def install_kernel(jupyter: Path, environment: dict[str, str]) -> Path:
    """The ``confnb-snp`` kernelspec in a private Jupyter folder, with the brokers and datasets in its env.

    The walkthrough installed the same spec there already; installing again keeps the two identical except for
    ``env``, which the provisioner passes to the launcher, whose vault uses it to find datasets and brokers.
    """
    from confnb.provisioner.kernelspec import install, private_jupyter_environment

    os.environ.update(private_jupyter_environment(jupyter))
    destination = install(prefix=str(jupyter))
    spec_path = destination / "kernel.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    spec["env"] = {**spec.get("env", {}), **environment}
    spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return destination


def copy_notebooks(sources: list[Path], target: Path) -> list[Path]:
    """The analyst's work folder: one copy of each example notebook (the originals stay clean)."""
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in sources:
        copy = target / source.name
        if copy.exists():
            raise DemoError(f"two example notebooks are named {source.name}")
        shutil.copyfile(source, copy)
        copies.append(copy)
    return copies
