"""The executor's kernel class: stock ipykernel, except that an interrupt only ever stops the analyst's code.

ipykernel turns SIGINT into ``KeyboardInterrupt`` for the whole time it handles a message. An interrupt that lands
in its own code around a cell (publishing the input, flushing, sending the reply) ends the handler without an
``execute_reply``: the notebook waits for an answer that never comes. An interrupt sent just as a cell finishes
hits exactly there. So here SIGINT raises only while the analyst's code runs (between IPython's ``pre_run_cell``
and ``post_run_cell`` events); at any other moment there is nothing of the analyst's to stop, and it is ignored,
as it is between messages. Every cell therefore gets its reply, interrupted or not.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from ipykernel.ipkernel import IPythonKernel


class ConfidentialKernel(IPythonKernel):
    """:class:`IPythonKernel` whose interrupts reach the analyst's code only."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._in_cell = False
        assert self.shell is not None  # made by IPythonKernel.__init__
        self.shell.events.register("pre_run_cell", self._cell_starts)
        self.shell.events.register("post_run_cell", self._cell_ends)

    def _cell_starts(self, *_: object) -> None:
        self._in_cell = True

    def _cell_ends(self, *_: object) -> None:
        self._in_cell = False

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self._in_cell:
            raise KeyboardInterrupt

    def pre_handler_hook(self) -> None:
        self.saved_sigint_handler = signal.signal(signal.SIGINT, self._interrupt)
