"""A ClientApp's end of the FedMuscle stream: the ticket from the Flower message and the channel."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from torch import Tensor

from fedmtl.proto import muscle_stream_pb2 as pb
from fedmtl.proto import muscle_stream_pb2_grpc as pb_grpc
from fedmtl.stream.wire import FrameError, decode_tensors, encode_tensor

log = logging.getLogger("fedmtl.stream")

# Keys of the Flower message (train.align) that opens a stream phase.
ADDRESS = "fedmuscle.stream-address"
TOKEN = "fedmuscle.stream-token"
CA = "fedmuscle.stream-ca"
CONNECT_DEADLINE = "fedmuscle.stream-connect-deadline"
BATCH_DEADLINE = "fedmuscle.stream-batch-deadline"
MAX_RECEIVE = "fedmuscle.stream-max-receive"
MAX_SEND = "fedmuscle.stream-max-send"
# Beyond the server's own deadlines: time to build payloads and cross the network.
RESPONSE_MARGIN = 30.0


class StreamUnreachable(RuntimeError):
    """The announced address cannot be reached (firewall, wrong address, TLS mismatch)."""


class StreamRefused(RuntimeError):
    """The server refused this client (wrong token, no open phase, malformed hello)."""


class StreamLost(RuntimeError):
    """The stream broke or the server did not answer in time."""


@dataclass(frozen=True)
class StreamTicket:
    """What a client needs to join a phase, as announced in the Flower message."""

    address: str
    token: str
    ca_pem: bytes | None
    connect_deadline: float
    batch_deadline: float
    max_receive: int
    max_send: int

    def to_config(self) -> dict[str, Any]:
        """Flower ConfigRecord entries."""
        return {
            ADDRESS: self.address,
            TOKEN: self.token,
            CA: self.ca_pem or b"",
            CONNECT_DEADLINE: self.connect_deadline,
            BATCH_DEADLINE: self.batch_deadline,
            MAX_RECEIVE: self.max_receive,
            MAX_SEND: self.max_send,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StreamTicket | None:
        """The ticket in a message's config, or ``None`` when the message opens no stream."""
        if ADDRESS not in config:
            return None
        ca = config.get(CA) or b""
        return cls(
            address=str(config[ADDRESS]),
            token=str(config[TOKEN]),
            ca_pem=bytes(ca) if ca else None,
            connect_deadline=float(config[CONNECT_DEADLINE]),
            batch_deadline=float(config[BATCH_DEADLINE]),
            max_receive=int(config[MAX_RECEIVE]),
            max_send=int(config[MAX_SEND]),
        )


_EOF = object()


class StreamClient:
    """One client's stream to the ServerApp for one round's phase.

    Parameters
    ----------
    ticket : StreamTicket
        From the Flower message.
    client_id : str
        This client.
    round_ : int
        The round whose phase to join.
    root_certificates : bytes, optional
        A CA to verify the server with instead of the one in the ticket (a node's own copy).
    """

    def __init__(
        self,
        ticket: StreamTicket,
        client_id: str,
        round_: int,
        *,
        root_certificates: bytes | None = None,
    ) -> None:
        self.ticket = ticket
        self.client_id = client_id
        self.round = round_
        self.root_certificates = root_certificates or ticket.ca_pem or None
        self.steps = 0
        self._channel: grpc.Channel | None = None
        self._requests: queue.Queue[pb.ClientFrame | None] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self._timeout = max(ticket.connect_deadline, ticket.batch_deadline) + RESPONSE_MARGIN

    # -- connection --------------------------------------------------------------------

    def connect(self, timeout: float) -> int:
        """Open the stream and say hello; returns the step the server is at.

        Raises
        ------
        StreamUnreachable
            If no connection (TCP and, with TLS, a verified handshake) within ``timeout``.
        StreamRefused
            If the server refuses the hello.
        """
        self.close()
        options = [
            ("grpc.max_receive_message_length", self.ticket.max_receive),
            ("grpc.max_send_message_length", self.ticket.max_send),
        ]
        if self.root_certificates:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            channel = grpc.secure_channel(self.ticket.address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(self.ticket.address, options=options)
        self._channel = channel
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            self.close()
            security = "TLS" if self.root_certificates else "plaintext"
            raise StreamUnreachable(
                f"cannot reach the FedMuscle stream at {self.ticket.address} ({security}) "
                f"within {timeout:.0f} s"
            ) from exc
        self._requests = queue.Queue()
        self._responses = queue.Queue()
        call = pb_grpc.MuscleExchangeStub(channel).Exchange(self._outgoing(self._requests))
        threading.Thread(
            target=self._read, args=(call, self._responses), name="stream-reader", daemon=True
        ).start()
        hello = pb.Hello(client_id=self.client_id, token=self.ticket.token, round=self.round)
        self._requests.put(pb.ClientFrame(hello=hello))
        frame = self._next(self._timeout)
        if frame.WhichOneof("kind") != "welcome":
            raise StreamLost(f"expected a welcome, got {frame.WhichOneof('kind')}")
        self.steps = int(frame.welcome.steps)
        return int(frame.welcome.step)

    @staticmethod
    def _outgoing(requests: queue.Queue[pb.ClientFrame | None]) -> Iterator[pb.ClientFrame]:
        while True:
            frame = requests.get()
            if frame is None:
                return
            yield frame

    @staticmethod
    def _read(call: Iterator[pb.ServerFrame], responses: queue.Queue[Any]) -> None:
        try:
            for frame in call:
                responses.put(frame)
        except grpc.RpcError as exc:
            responses.put(exc)
        finally:
            responses.put(_EOF)

    def _next(self, timeout: float) -> pb.ServerFrame:
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty as exc:
            raise StreamLost(f"no answer from the server within {timeout:.0f} s") from exc
        if isinstance(item, grpc.RpcError):
            code = item.code() if hasattr(item, "code") else None
            details = item.details() if hasattr(item, "details") else str(item)
            if code in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise StreamRefused(f"{code.name}: {details}")
            raise StreamLost(f"stream ended: {code.name if code else ''} {details}")
        if item is _EOF:
            raise StreamLost("the server closed the stream")
        frame: pb.ServerFrame = item
        return frame

    def close(self) -> None:
        """End the stream (idempotent)."""
        self._requests.put(None)
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()
            self._channel = None

    # -- exchange ----------------------------------------------------------------------

    def exchange(self, step: int, z: Tensor) -> tuple[dict[str, Tensor] | None, int]:
        """Send ``Z`` of ``step``; return the server's payload (``None``: skip) and its next step.

        Raises
        ------
        StreamLost
            If the stream breaks, the server does not answer in time or answers out of order.
        FrameError
            If the payload holds non-finite or inconsistent tensors.
        """
        frame = pb.ClientFrame(representation=pb.Representation(step=step, z=encode_tensor(z)))
        self._requests.put(frame)
        while True:
            reply = self._next(self._timeout)
            if reply.WhichOneof("kind") != "payload":
                raise StreamLost(f"expected a payload, got {reply.WhichOneof('kind')}")
            payload = reply.payload
            if payload.step == step:
                break
            if payload.step > step:
                raise StreamLost(f"answer for step {payload.step} while waiting for {step}")
            # An answer to an earlier frame (sent before a reconnect): ignore it.
        # The server says which step to send next: the following one, or (when this frame
        # came too late or out of turn) the step it is collecting now.
        next_step = int(payload.next_step) if payload.next_step > 0 else step + 1
        if payload.skip:
            log.debug("stream: %s step %d skipped (%s)", self.client_id, step, payload.reason)
            return None, next_step
        try:
            return decode_tensors(payload.tensors), next_step
        except FrameError as exc:
            raise FrameError(f"payload of step {step}: {exc}") from exc

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
