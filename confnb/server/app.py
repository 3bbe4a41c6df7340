"""``ConfnbServerApp``: the jupyter_server extension behind the JupyterLab attestation panel and upload dialog.

It runs in the analyst's own Jupyter server, on a machine they trust, next to the kernel manager that holds the
channel keys of every confidential kernel; the browser verifies the same evidence again on its own.
"""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Unicode

from confnb.server.handlers import routes


class ConfnbServerApp(ExtensionApp):
    name = "confnb"
    load_other_extensions = True

    attestation_policy = Unicode(
        "",
        config=True,
        help="Path of an attestation policy (TOML with an [attestation] table) to appraise every kernel's fresh "
        "evidence with. Empty (the default): each kernel is appraised under the policy its provisioner launched "
        "it with.",
    )
    request_timeout = Float(
        10.0,
        config=True,
        help="Seconds to wait for a kernel's answer to an attestation or gate request before the request fails.",
    )

    broker_timeout = Float(
        3.0,
        config=True,
        help="Seconds to wait for an owner's broker to report a dataset's privacy budget; after that the policy "
        "view says the budget is unavailable.",
    )

    def initialize_handlers(self) -> None:
        self.handlers.extend(routes())
