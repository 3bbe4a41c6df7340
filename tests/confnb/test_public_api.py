"""``import confnb as cn``: what ``dir(cn)`` and tab completion show is the analyst API, nothing this file imports."""

from __future__ import annotations

import confnb as cn


def test_dir_lists_the_public_api_and_no_import_helpers() -> None:
    public = {name for name in dir(cn) if not (name.startswith("__") and name.endswith("__"))}
    assert public == set(cn.__all__) - {"__version__"}
    assert {"Any", "TYPE_CHECKING", "annotations", "importlib"}.isdisjoint(dir(cn))
    assert "__version__" in dir(cn) and "__doc__" in dir(cn)


def test_every_listed_name_resolves() -> None:
    for name in cn.__all__:
        assert getattr(cn, name) is not None, name
