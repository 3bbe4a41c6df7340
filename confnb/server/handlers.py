"""The REST endpoints the JupyterLab extension calls, under ``{base_url}confnb/api/``.

Every method is ``@web.authenticated`` (an API request without the server's token or cookie gets 403, never a
redirect), and the kernel endpoints are also ``@authorized`` on the ``kernels`` resource, as jupyter_server's own
kernel handlers are: asking a kernel for evidence talks to it. Errors are one line of JSON, ``{"message": ...}``,
never a traceback.
"""

from __future__ import annotations

import json
import re
from http.client import responses
from typing import TYPE_CHECKING, Any, cast

from jupyter_client.manager import AsyncKernelManager
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado import web

from confnb.policy.presets import upload_presets
from confnb.server.attestation import KernelRequestError, attest_kernel
from confnb.server.budget import kernel_budgets
from confnb.server.policies import kernel_policies

if TYPE_CHECKING:
    from confnb.server.app import ConfnbServerApp

API_PATH = "confnb/api"
NONCE_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
_KERNEL_ID = r"(?P<kernel_id>[\w-]+)"


class ConfnbHandler(ExtensionHandlerMixin, APIHandler):
    """Shared by every confnb endpoint: the extension's configuration and one-line JSON errors."""

    @property
    def app(self) -> ConfnbServerApp:
        from confnb.server.app import ConfnbServerApp

        return cast(ConfnbServerApp, self.extensionapp)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        if isinstance(error, web.HTTPError) and error.log_message:
            message = error.log_message % error.args if error.args else error.log_message
        elif error is None or isinstance(error, web.HTTPError):
            message = responses.get(status_code, "error")
        else:  # a bug, logged with its traceback by tornado; the client learns only that it happened
            message = "internal error in the confnb server extension (see the server log)"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": " ".join(message.split())}))

    def write_json(self, document: object) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(document))


class KernelHandler(ConfnbHandler):
    auth_resource = "kernels"

    def kernel(self, kernel_id: str) -> AsyncKernelManager:
        manager = self.kernel_manager
        if kernel_id not in manager:
            raise web.HTTPError(404, f"no kernel {kernel_id}")
        return cast(AsyncKernelManager, manager.get_kernel(kernel_id))


class AttestationHandler(KernelHandler):
    """``GET kernels/{id}/attestation?nonce=<64 hex>``: fresh evidence for the browser's nonce, verified here."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        nonce = self.get_query_argument("nonce", "")
        if not NONCE_PATTERN.fullmatch(nonce):
            raise web.HTTPError(400, "nonce must be 64 hex characters (32 random bytes chosen by the browser)")
        manager = self.kernel(kernel_id)
        verdict = await attest_kernel(
            manager,
            kernel_id,
            nonce.lower(),
            override_policy=self.app.attestation_policy,
            timeout=self.app.request_timeout,
        )
        self.write_json(verdict)


class PoliciesHandler(KernelHandler):
    """``GET kernels/{id}/policies``: the display policy and each dataset's output policy, from the kernel's relay."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        manager = self.kernel(kernel_id)
        try:
            view = await kernel_policies(manager, kernel_id, timeout=self.app.request_timeout)
        except KernelRequestError as exc:
            raise web.HTTPError(502, str(exc)) from None
        self.write_json(view)


class BudgetsHandler(KernelHandler):
    """``GET kernels/{id}/budgets``: each open DP dataset's budget as its owner's broker reports it (fail-soft)."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        manager = self.kernel(kernel_id)
        try:
            view = await kernel_budgets(
                manager, kernel_id, timeout=self.app.request_timeout, broker_timeout=self.app.broker_timeout
            )
        except KernelRequestError as exc:
            raise web.HTTPError(502, str(exc)) from None
        self.write_json(view)


class UploadPoliciesHandler(ConfnbHandler):
    """``GET upload-policies``: the output policies the upload dialog offers."""

    @web.authenticated
    async def get(self) -> None:
        self.write_json(upload_presets())


def routes() -> list[tuple[str, type[ConfnbHandler]]]:
    """Patterns relative to the server's base_url (the ExtensionApp prepends it)."""
    return [
        (url_path_join(API_PATH, "kernels", _KERNEL_ID, "attestation"), AttestationHandler),
        (url_path_join(API_PATH, "kernels", _KERNEL_ID, "policies"), PoliciesHandler),
        (url_path_join(API_PATH, "kernels", _KERNEL_ID, "budgets"), BudgetsHandler),
        (url_path_join(API_PATH, "upload-policies"), UploadPoliciesHandler),
    ]
