"""confnb's JupyterLab integration: the server extension and the prebuilt lab extension ``confnb-lab``.

Client side only: nothing inside the confidential VM imports this package.
"""

from __future__ import annotations

from typing import Any

from confnb.server.app import ConfnbServerApp

__all__ = ["ConfnbServerApp"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "confnb.server", "app": ConfnbServerApp}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "confnb-lab"}]
