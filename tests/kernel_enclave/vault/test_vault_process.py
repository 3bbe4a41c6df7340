"""The vault as a kernel process: its owner's display rules reach the relay's gate before the analyst has a handle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confidential_fixtures import ConfidentialWorld, start_confidential_kernel, stop_confidential_kernel

SVG = "<svg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/>"
SHOW_SVG = f"from IPython.display import SVG, display\ndisplay(SVG({SVG!r}))\n"


@pytest.fixture
def fresh_kernel(confnb_kernel_env: Path, confidential_world: ConfidentialWorld) -> Iterator[Any]:
    kernel = start_confidential_kernel(confidential_world)
    yield kernel
    stop_confidential_kernel(kernel)


def _shown_types(outputs: list[dict[str, Any]]) -> set[str]:
    return {mime for message in outputs if message["msg_type"] == "display_data" for mime in message["content"]["data"]}


def test_opening_a_dataset_tightens_the_display_gate_to_its_owners_mime_list(fresh_kernel: Any) -> None:
    """The clinic shows text, HTML, Markdown and PNG only: an SVG displays before its data opens, not after."""
    reply, before = fresh_kernel.execute(SHOW_SVG)
    assert reply["content"]["status"] == "ok"
    assert "image/svg+xml" in _shown_types(before)

    reply, _ = fresh_kernel.execute("import confnb as cn\nt = cn.open('patients')\n")
    assert reply["content"]["status"] == "ok", reply["content"]

    reply, after = fresh_kernel.execute(SHOW_SVG)
    assert "image/svg+xml" not in _shown_types(after)
    notices = "".join(m["content"].get("text", "") for m in after if m["msg_type"] == "stream")
    assert "display.mime" in notices

    request = fresh_kernel.client.session.msg("confnb_gate_request", {})
    fresh_kernel.client.control_channel.send(request)
    gate = fresh_kernel.client.get_control_msg(timeout=10)["content"]
    assert gate["policy"]["mime"] == ["image/png", "text/html", "text/markdown", "text/plain"]
    assert gate["policy"]["max_output_bytes"] <= 4_000_000
