"""The relay: the only process that holds the analyst's channel keys, and the gate on everything that leaves.

The analyst's client talks CurveZMQ to the relay's five sockets with a session key and key pair generated inside
the VM; the relay admits exactly the client key pair the provisioner received (sealed) and nothing else. Behind
it, the executor is a stock ipykernel on IPC sockets with a key of its own. Requests pass through re-signed with
the executor's key; every message the executor sends back is verified with that key, put through the
:class:`~kernel_enclave.relay.gate.MessageGate`, and only then signed with the client's key. Analyst code in the
executor can therefore forge anything it likes towards the relay and still reach the client only through the gate.

Attestation is answered here, not in the executor, so it works while a cell runs and cannot be spoofed by it;
so are the policies in force (``confnb_gate_request``) and uploads (the ``confnb.upload`` comm, passed to the
vault by :mod:`kernel_enclave.relay.upload` so that the ciphertext never passes through the executor).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kernel_enclave.relay.datasets import DatasetPolicies
from kernel_enclave.relay.gate import MessageGate
from kernel_enclave.relay.upload import UPLOAD_COMM_TARGET, UploadRelay
from kernel_enclave.relay.wire import (
    Message,
    ReplayGuard,
    Signer,
    WireError,
    WireMessage,
    encode,
    new_header,
    reply,
)

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
ATTESTATION_FEATURE = "confnb-attestation"
ATTESTATION_COMM_TARGET = "confnb.attestation"
# Shell and stdin share one identity towards the executor: ipykernel sends input_request to the identity that sent
# the execute_request, on its stdin socket.
_EXECUTOR_IDENTITY = b"confnb-relay"
_FRONT_TYPES = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.XPUB, "hb": zmq.REP}
_BACK_TYPES = {"shell": zmq.DEALER, "control": zmq.DEALER, "stdin": zmq.DEALER, "iopub": zmq.SUB}

Attestor = Callable[[bytes], Mapping[str, Any]]  # nonce -> evidence bundle (JSON object)


class _OneClientKey:
    """ZAP credentials: only the key pair sealed to the provisioner may connect (the evidence makes the server
    key public, so without this anyone could subscribe to the output)."""

    def __init__(self, public_key: bytes) -> None:
        self._public_key = public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self._public_key)


class Relay:
    """One thread, one ``zmq.Poller`` over all sockets: every message costs a verify, a gate decision and a sign,
    and no event-loop machinery on top (the per-cell budget is a fraction of a millisecond)."""

    def __init__(
        self,
        *,
        client_key: bytes,
        curve_publickey: bytes,
        curve_secretkey: bytes,
        executor_key: bytes,
        executor_urls: Mapping[str, str],
        gate: MessageGate,
        attest: Attestor,
        session_id: str | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        uploads: UploadRelay | None = None,
        datasets: DatasetPolicies | None = None,
    ) -> None:
        self.session_id = session_id or uuid.uuid4().hex
        self.gate = gate
        self._attest = attest
        self._uploads = uploads
        self._upload_replies: zmq.Socket[bytes] | None = None
        self.datasets = datasets if datasets is not None else DatasetPolicies()
        self._client = Signer(client_key)
        self._executor = Signer(executor_key)
        self._replay = ReplayGuard()
        self._curve = (curve_publickey, curve_secretkey)
        self._executor_urls = dict(executor_urls)
        self._context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self._owns_context = context is None
        self._auth: ThreadAuthenticator | None = None
        self.front: dict[str, zmq.Socket[bytes]] = {}
        self.back: dict[str, zmq.Socket[bytes]] = {}
        self._attestation_comms: set[str] = set()
        self._probes: set[str] = set()  # msg_ids of the relay's own kernel_info probes
        self.ready = threading.Event()
        self._shell_answered = False
        self._iopub_subscribed = False
        self._stopping = threading.Event()
        self._wake_address = f"inproc://confnb-relay-wake-{uuid.uuid4().hex}"
        self._wake: zmq.Socket[bytes] | None = None
        self._waker: zmq.Socket[bytes] | None = None

    # -- set-up -----------------------------------------------------------------------------------------------

    def bind(self, ip: str) -> dict[str, int]:
        """Create the client-facing CurveZMQ server sockets on random ports of ``ip``."""
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=_OneClientKey(self._curve[0]))
        ports: dict[str, int] = {}
        for channel in CHANNELS:
            socket = self._context.socket(_FRONT_TYPES[channel])
            socket.linger = 1000
            socket.curve_server = True
            socket.curve_publickey, socket.curve_secretkey = self._curve
            if channel == "iopub":
                socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # a welcome for every subscriber, not only the first
            if channel in ("shell", "control", "stdin"):
                socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes over its identity
            ports[channel] = socket.bind_to_random_port(f"tcp://{ip}")
            self.front[channel] = socket
        return ports

    def connect_executor(self) -> None:
        for channel, socket_type in _BACK_TYPES.items():
            socket = self._context.socket(socket_type)
            socket.linger = 0
            if channel in ("shell", "stdin"):
                socket.identity = _EXECUTOR_IDENTITY
            if channel == "iopub":
                socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.connect(self._executor_urls[channel])
            self.back[channel] = socket
        self._wake = self._context.socket(zmq.PAIR)
        self._wake.bind(self._wake_address)
        self._waker = self._context.socket(zmq.PAIR)
        self._waker.connect(self._wake_address)
        if self._uploads is not None:
            self._upload_replies = self._uploads.start(self._context)

    # -- running ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Relay every channel until :meth:`stop`. Keep asking the executor for kernel_info until it has answered
        (it has bound every socket and runs) and its output reaches the relay's subscription; set :attr:`ready` then,
        so that no cell's output can be dropped by a subscription still in flight."""
        assert self._wake is not None
        handlers: dict[zmq.Socket[bytes], Callable[[], None]] = {
            self.front["shell"]: lambda: self._request("shell"),
            self.front["control"]: lambda: self._request("control"),
            self.front["stdin"]: lambda: self._request("stdin"),
            self.front["iopub"]: self._subscription,
            self.front["hb"]: self._heartbeat,
            self.back["shell"]: lambda: self._reply("shell"),
            self.back["control"]: lambda: self._reply("control"),
            self.back["stdin"]: lambda: self._reply("stdin"),
            self.back["iopub"]: self._output,
        }
        if self._upload_replies is not None:
            handlers[self._upload_replies] = self._publish_upload_replies
        poller = zmq.Poller()
        for socket in (*handlers, self._wake):
            poller.register(socket, zmq.POLLIN)
        next_probe = 0.0
        while not self._stopping.is_set():
            if not self.ready.is_set() and time.monotonic() >= next_probe:
                self._probe_executor()
                next_probe = time.monotonic() + 1.0
            for socket, _ in poller.poll(None if self.ready.is_set() else 250):
                if socket is self._wake:
                    socket.recv()
                    continue
                with contextlib.suppress(zmq.Again):  # a spurious wake-up: nothing to read after all
                    handlers[socket]()

    def stop(self) -> None:
        """Ask :meth:`run` to return (from any thread); also releases anyone still waiting for :attr:`ready`."""
        self._stopping.set()
        self.ready.set()
        if self._waker is not None:
            self._waker.send(b"stop")

    def close(self) -> None:
        if self._uploads is not None:
            self._uploads.stop()  # its sockets go before the context does
        for socket in [*self.front.values(), *self.back.values()]:
            socket.close(linger=200)
        for internal in (self._wake, self._waker):
            if internal is not None:
                internal.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._owns_context:
            self._context.term()

    def _check_ready(self) -> None:
        if self._shell_answered and self._iopub_subscribed:
            self.ready.set()

    def _probe_executor(self) -> None:
        header = new_header("kernel_info_request", self.session_id, "relay")
        self._probes.add(header["msg_id"])
        request = {"header": header, "parent_header": {}, "metadata": {}, "content": {}, "buffers": []}
        self.back["shell"].send_multipart(encode(request, self._executor))

    # -- client -> executor -----------------------------------------------------------------------------------

    def _request(self, channel: str) -> None:
        frames = self.front[channel].recv_multipart(zmq.NOBLOCK)
        try:
            request = WireMessage.receive(frames, self._client, self._replay)
            if channel != "stdin" and self._answer_locally(channel, request):
                return
            self.gate.observe_request(channel, request.message)
        except WireError as exc:
            # Only the analyst's own client holds the key; anything else is noise or an attack, never data.
            log.warning("dropped a %s request: %s", channel, exc)
            return
        self.back[channel].send_multipart(request.frames(self._executor))

    def _answer_locally(self, channel: str, request: WireMessage) -> bool:
        message = request.message
        msg_type = str(message["header"].get("msg_type", ""))
        content = message["content"]
        if msg_type == "confnb_attestation_request":
            self._answer(channel, request, "confnb_attestation_reply", self._evidence(content))
            return True
        if msg_type == "confnb_gate_request":
            gate = {
                "status": "ok",
                "policy": self.gate.policy.to_dict(),
                "withheld": dict(self.gate.withheld),
                "datasets": self.datasets.to_list(),
            }
            self._answer(channel, request, "confnb_gate_reply", gate)
            return True
        if msg_type == "debug_request":
            refusal = {
                "status": "error",
                "ename": "DebuggerDisabled",
                "evalue": "the debugger is disabled in confidential kernels",
                "traceback": [],
            }
            self._answer(channel, request, "debug_reply", refusal)
            return True
        if msg_type == "comm_open" and content.get("target_name") == ATTESTATION_COMM_TARGET:
            comm_id = str(content.get("comm_id", ""))
            self._attestation_comms.add(comm_id)
            self._attestation_comm(message, comm_id, content.get("data"))
            return True
        if msg_type == "comm_open" and content.get("target_name") == UPLOAD_COMM_TARGET:
            self._upload_comm("open", message)
            return True
        if (
            msg_type in ("comm_msg", "comm_close")
            and self._uploads is not None
            and self._uploads.owns(content.get("comm_id"))
        ):
            self._upload_comm("msg" if msg_type == "comm_msg" else "close", message)
            return True
        if msg_type in ("comm_msg", "comm_close") and content.get("comm_id") in self._attestation_comms:
            comm_id = str(content["comm_id"])
            if msg_type == "comm_close":
                self._attestation_comms.discard(comm_id)
                self._status(message, "busy")
                self._status(message, "idle")
            else:
                self._attestation_comm(message, comm_id, content.get("data"))
            return True
        return False

    def _answer(self, channel: str, request: WireMessage, msg_type: str, content: dict[str, Any]) -> None:
        """A reply the relay gives itself, framed by busy/idle like any kernel's (clients wait for idle)."""
        self._status(request.message, "busy")
        message = reply(msg_type, content, request.message, self.session_id)
        self.front[channel].send_multipart(encode(message, self._client, request.idents))
        self._status(request.message, "idle")

    def _attestation_comm(self, parent: Message, comm_id: str, data: Any) -> None:
        self._status(parent, "busy")
        evidence = self._evidence(data if isinstance(data, dict) else {})
        self._publish(reply("comm_msg", {"comm_id": comm_id, "data": evidence}, parent, self.session_id))
        self._status(parent, "idle")

    def _upload_comm(self, kind: str, message: Message) -> None:
        """Busy now, the reply and idle when the vault has answered (see :meth:`_publish_upload_replies`)."""
        content = message["content"]
        comm_id = str(content.get("comm_id", ""))
        self._status(message, "busy")
        if self._uploads is None:
            refusal = {"action": "error", "message": "uploads are not available in this kernel"}
            self._publish(reply("comm_msg", {"comm_id": comm_id, "data": refusal}, message, self.session_id))
            self._status(message, "idle")
            return
        parent = {"header": message["header"]}  # all a reply needs; the chunk's buffers are not kept around
        self._uploads.submit(kind, parent, comm_id, content.get("data"), list(message.get("buffers") or []))

    def _publish_upload_replies(self) -> None:
        assert self._uploads is not None
        for parent, comm_id, data in self._uploads.take_replies():
            if data is not None:
                self._publish(reply("comm_msg", {"comm_id": comm_id, "data": data}, parent, self.session_id))
            self._status(parent, "idle")

    def _evidence(self, content: Mapping[str, Any]) -> dict[str, Any]:
        nonce_text = content.get("nonce")
        try:
            if not isinstance(nonce_text, str):
                raise ValueError("the request has no nonce")
            nonce = bytes.fromhex(nonce_text)
            if not 1 <= len(nonce) <= 64:
                raise ValueError("the nonce must be 1 to 64 bytes of hex")
        except ValueError as exc:
            return {"status": "error", "ename": "AttestationError", "evalue": f"bad request: {exc}"}
        try:
            evidence = self._attest(nonce)
        except Exception as exc:  # a failing TEE is reported to the client, never crashes the relay
            return {"status": "error", "ename": "AttestationError", "evalue": " ".join(str(exc).split())[:300]}
        return {"status": "ok", "evidence": dict(evidence)}

    def _status(self, parent: Message, state: str) -> None:
        self._publish(reply("status", {"execution_state": state}, parent, self.session_id))

    def _publish(self, message: Message, topic: bytes = b"kernel.confnb") -> None:
        self.front["iopub"].send_multipart(encode(message, self._client, [topic]))

    # -- executor -> client -----------------------------------------------------------------------------------

    def _reply(self, channel: str) -> None:
        frames = self.back[channel].recv_multipart(zmq.NOBLOCK)
        try:
            response = WireMessage.receive(frames, self._executor)
            message = response.message
        except WireError as exc:
            log.warning("dropped a %s message from the executor: %s", channel, exc)
            return
        if channel == "shell" and self._probes and message["parent_header"].get("msg_id") in self._probes:
            self._shell_answered = True
            self._check_ready()
            return
        front = self.front[channel]
        for approved in self.gate.filter(channel, message):
            if approved is message:
                front.send_multipart(response.frames(self._client))
            elif approved["header"].get("msg_type") == "stream":  # a notice about a withheld reply
                self._publish(approved)
            else:
                front.send_multipart(encode(approved, self._client, response.idents))
        if message["header"].get("msg_type") == "shutdown_reply" and isinstance(message["parent_header"], dict):
            # The executor exits right after this reply, often before its own "idle" leaves; a Jupyter server that
            # last saw "busy" would skip the connection check after a restart and lose the first cell's output.
            self._status({"header": message["parent_header"]}, "idle")

    def _output(self) -> None:
        frames = self.back["iopub"].recv_multipart(zmq.NOBLOCK)
        try:
            output = WireMessage.receive(frames, self._executor)
            message = output.message
        except WireError as exc:
            log.warning("dropped an iopub message from the executor: %s", exc)
            return
        if not self._iopub_subscribed:
            # Proof that the relay's subscription reached the executor (its iopub_welcome, or anything later):
            # until then the executor's PUB side would drop a cell's output.
            self._iopub_subscribed = True
            self._check_ready()
        if self._probes and message["parent_header"].get("msg_id") in self._probes:
            return  # status messages around the relay's own readiness probe
        iopub = self.front["iopub"]
        for approved in self.gate.filter("iopub", message):
            if approved is message:
                iopub.send_multipart(output.frames(self._client))
            else:
                self._publish(approved, output.idents[0] if output.idents else b"kernel.confnb")

    def _subscription(self) -> None:
        """JEP 65: greet every subscriber, so clients know their subscription is live."""
        iopub = self.front["iopub"]
        frame = iopub.recv(zmq.NOBLOCK)
        if not frame or frame[0] != 1:
            return
        try:
            topic = frame[1:].decode("utf-8")
        except UnicodeDecodeError:
            return
        welcome = {
            "header": new_header("iopub_welcome", self.session_id),
            "parent_header": {},
            "metadata": {},
            "content": {"subscription": topic},
            "buffers": [],
        }
        iopub.send_multipart(encode(welcome, self._client, [topic.encode()] if topic else []))

    def _heartbeat(self) -> None:
        hb = self.front["hb"]
        hb.send_multipart(hb.recv_multipart(zmq.NOBLOCK))
