"""How Jupyter finds the extension: the entry points in ``confnb.server`` and the config file the wheel installs."""

from __future__ import annotations

import json
from pathlib import Path

import confnb.server
from confnb.server import ConfnbServerApp, _jupyter_labextension_paths, _jupyter_server_extension_points


def test_the_extension_points_name_the_app_and_the_lab_extension() -> None:
    assert _jupyter_server_extension_points() == [{"module": "confnb.server", "app": ConfnbServerApp}]
    assert _jupyter_labextension_paths() == [{"src": "labextension", "dest": "confnb-lab"}]


def test_the_installed_config_enables_the_extension() -> None:
    config = Path(confnb.server.__file__).with_name("jupyter_server_config.json")
    assert json.loads(config.read_text()) == {"ServerApp": {"jpserver_extensions": {"confnb.server": True}}}


def test_every_option_is_documented() -> None:
    options = ConfnbServerApp.class_own_traits(config=True)
    assert {"attestation_policy", "request_timeout"} <= set(options)
    assert all(trait.help for trait in options.values())
    assert ConfnbServerApp.request_timeout.default_value == 10.0
