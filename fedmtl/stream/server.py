"""The ServerApp's end of the FedMuscle stream: a gRPC server and one round's synchronous phase.

:class:`ExchangeServer` listens for the whole run (opened at the first contrastive phase);
:class:`StreamPhase` is one round's phase: the schedule of steps (one public batch of one
contrastive epoch each), the clients and their tokens, and a coordinator (:meth:`StreamPhase.run`,
called in its own thread by the strategy) that, for every step, waits for the representations
of the connected clients until all have arrived or the step's deadline passes, builds each
client's payload with the strategy's own function (the same code as the Flower path) and
answers every client that sent one.

Rules (the issue's contract):

- The first frame of a stream is a ``Hello`` with the client's per-run token for this round's
  phase; anything else, a wrong token or a round without an open phase ends the RPC with
  ``UNAUTHENTICATED``/``FAILED_PRECONDITION`` before any tensor is read.
- Every representation is decoded and checked (float32, the step's ``[B_b, d]``, finite) before
  use; a bad one is answered with a ``skip`` naming the problem and the client is left out of
  that step's peer draw (it may take part in the next).
- Step 0 waits for every client of the phase until ``connect_deadline`` (ClientApps start,
  load their model and connect); later steps wait for the clients connected at that moment
  until ``batch_deadline``. A client that disconnects or misses a deadline is left out of that
  step; a representation for a closed step is answered ``skip`` ("late") with the step the
  server is at, so the client catches up; a client may reconnect with its token and rejoin.
- The phase always ends: after the last step, when cancelled, or when nobody connected by the
  connect deadline (``unreachable``: the strategy then falls back to Flower messages).
"""

from __future__ import annotations

import hmac
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from torch import Tensor

from fedmtl.messages import TensorSpec
from fedmtl.proto import muscle_stream_pb2 as pb
from fedmtl.proto import muscle_stream_pb2_grpc as pb_grpc
from fedmtl.stream.wire import FrameError, decode_tensor, encode_tensors
from fedmtl.tls import CA_CERT, SERVER_CERT, SERVER_KEY

log = logging.getLogger("fedmtl.stream")

HELLO_TIMEOUT = 30.0  # seconds a connection may stay silent before its Hello
# payloads(step, {client: Z}) → {client: {name: tensor}} for the clients that get one.
PayloadBuilder = Callable[[int, Mapping[str, Tensor]], Mapping[str, Mapping[str, Tensor]]]


class _Cancelled(Exception):
    """The phase was cancelled while a step waited."""


class StreamUnavailable(RuntimeError):
    """The stream's port cannot be opened (in use, no permission, bad TLS files)."""


@dataclass(frozen=True)
class StreamEndpoint:
    """Where the ServerApp listens and what it announces to clients.

    Parameters
    ----------
    bind : str
        Interface to listen on (``0.0.0.0`` on a server other machines reach).
    port : int
        TCP port; 0 picks a free one (tests).
    address : str, optional
        ``host`` or ``host:port`` clients connect to (the name in the server certificate when
        TLS is on; a different port when a NAT or Docker maps it). Default: ``bind`` (loopback
        when ``bind`` is ``0.0.0.0``) and the bound port.
    certfile, keyfile, ca_certfile : str, optional
        The deployment's server certificate, its key and the CA that signed it. With them the
        stream is TLS-only and clients verify the server against that CA.
    """

    bind: str = "127.0.0.1"
    port: int = 9100
    address: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    ca_certfile: str | None = None

    def __post_init__(self) -> None:
        tls = (self.certfile, self.keyfile, self.ca_certfile)
        if any(tls) and not all(tls):
            raise ValueError(
                "stream TLS needs stream-certfile, stream-keyfile and stream-ca-certfile together"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"stream-port {self.port} is not a TCP port")

    @property
    def tls(self) -> bool:
        """Whether the stream uses TLS."""
        return self.certfile is not None

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any], default_port: int) -> StreamEndpoint:
        """Read the ``stream-*`` keys of a Flower run config (empty strings and 0 mean unset)."""

        def text(key: str) -> str | None:
            value = str(config.get(key, "") or "").strip()
            return value or None

        address = text("stream-address")
        bind = text("stream-bind") or ("0.0.0.0" if address else "127.0.0.1")
        port = int(config.get("stream-port", 0) or 0) or default_port
        return cls(
            bind=bind,
            port=port,
            address=address,
            certfile=text("stream-certfile"),
            keyfile=text("stream-keyfile"),
            ca_certfile=text("stream-ca-certfile"),
        )

    @classmethod
    def from_certs_dir(
        cls, certs_dir: str | Path, *, address: str, port: int = 0, bind: str = "127.0.0.1"
    ) -> StreamEndpoint:
        """A TLS endpoint with the files ``fedmtl deploy certs`` writes into ``certs_dir``."""
        certs = Path(certs_dir)
        return cls(
            bind=bind,
            port=port,
            address=address,
            certfile=str(certs / SERVER_CERT),
            keyfile=str(certs / SERVER_KEY),
            ca_certfile=str(certs / CA_CERT),
        )

    def announced(self, bound_port: int) -> str:
        """``host:port`` for clients."""
        address = self.address
        if address:
            if address.startswith("["):  # [IPv6] or [IPv6]:port
                return address if "]:" in address else f"{address}:{bound_port}"
            if address.count(":") == 1:  # host:port
                return address
            if ":" in address:  # a bare IPv6 address
                return f"[{address}]:{bound_port}"
            return f"{address}:{bound_port}"
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "::", "[::]") else self.bind
        return f"{host}:{bound_port}"

    def ca_pem(self) -> bytes | None:
        """The CA certificate clients verify the server with (``None`` without TLS)."""
        return Path(self.ca_certfile).read_bytes() if self.ca_certfile else None


# --------------------------------------------------------------------------- one phase


class Connection:
    """One client's open stream: frames to send it, in order."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.outbox: queue.Queue[pb.ServerFrame | None] = queue.Queue()
        self.closed = False

    def send(self, frame: pb.ServerFrame) -> None:
        """Queue a frame (dropped once the stream is closed)."""
        if not self.closed:
            self.outbox.put(frame)

    def close(self) -> None:
        """End the stream after the frames already queued."""
        if not self.closed:
            self.closed = True
            self.outbox.put(None)


@dataclass
class PhaseReport:
    """What happened in a phase (the strategy logs it and puts it in the round's metrics)."""

    steps: int = 0
    connected: set[str] = field(default_factory=set)  # clients that connected at least once
    rejected: int = 0  # representations that failed validation
    late: int = 0  # representations for a closed step
    missed: int = 0  # (client, step) pairs left out because a connected client missed it
    reconnects: int = 0
    step_seconds: list[float] = field(default_factory=list)  # step open → payloads sent
    unreachable: bool = False  # nobody connected by the connect deadline

    def metrics(self) -> dict[str, float]:
        """Round metrics under ``fedmuscle/stream_*``."""
        out = {
            "fedmuscle/stream_steps": float(self.steps),
            "fedmuscle/stream_clients": float(len(self.connected)),
            "fedmuscle/stream_rejected": float(self.rejected),
            "fedmuscle/stream_late": float(self.late),
            "fedmuscle/stream_missed": float(self.missed),
            "fedmuscle/stream_reconnects": float(self.reconnects),
        }
        if self.step_seconds:
            out["fedmuscle/stream_step_seconds_median"] = statistics.median(self.step_seconds)
        return out


def _skip(step: int, reason: str, next_step: int) -> pb.ServerFrame:
    return pb.ServerFrame(
        payload=pb.Payload(step=step, skip=True, reason=reason, next_step=next_step)
    )


class StreamPhase:
    """One round's contrastive phase over the stream (module docstring).

    Parameters
    ----------
    round_ : int
        The round; a Hello for another round is refused.
    tokens : mapping
        Client id → its token for this run.
    specs : sequence of TensorSpec
        The expected ``Z`` of every step (its length is the number of steps).
    build : callable
        ``build(step, reps)`` → each client's payload tensors for that step.
    batch_deadline, connect_deadline : float
        Seconds a step waits for representations (step 0: for connections too).
    """

    def __init__(
        self,
        round_: int,
        tokens: Mapping[str, str],
        specs: Sequence[TensorSpec],
        build: PayloadBuilder,
        *,
        batch_deadline: float,
        connect_deadline: float,
    ) -> None:
        self.round = round_
        self.tokens = dict(tokens)
        self.specs = list(specs)
        self.build = build
        self.batch_deadline = batch_deadline
        self.connect_deadline = connect_deadline
        self.report = PhaseReport()
        self.current = 0
        self.finished = False
        self._cancelled = False
        self._cond = threading.Condition()
        self._connections: dict[str, Connection] = {}
        self._submitted: dict[str, Tensor] = {}
        self._rejected: dict[str, str] = {}  # client → why its representation was refused

    # -- called by the gRPC handlers ---------------------------------------------------

    def authenticate(self, client_id: str, token: str) -> bool:
        """Whether ``token`` is ``client_id``'s token (constant-time comparison)."""
        expected = self.tokens.get(client_id)
        return expected is not None and hmac.compare_digest(expected, token)

    def connect(self, client_id: str) -> tuple[Connection, int]:
        """Register a client's stream (replacing an older one); returns it and the current step."""
        with self._cond:
            old = self._connections.get(client_id)
            if old is not None:
                old.close()
            if client_id in self.report.connected:
                self.report.reconnects += 1
            connection = Connection(client_id)
            if self.finished:
                connection.close()
            else:
                self._connections[client_id] = connection
                self.report.connected.add(client_id)
            self._cond.notify_all()
            return connection, self.current

    def disconnect(self, connection: Connection) -> None:
        """Forget a stream that ended; the coordinator stops waiting for it."""
        with self._cond:
            if self._connections.get(connection.client_id) is connection:
                del self._connections[connection.client_id]
            connection.close()
            self._cond.notify_all()

    def receive(self, connection: Connection, frame: pb.ClientFrame) -> None:
        """Handle a frame after the Hello: a representation for the current step, checked."""
        client = connection.client_id
        if frame.WhichOneof("kind") != "representation":
            raise FrameError(f"{client}: expected a representation frame after the hello")
        rep = frame.representation
        step = int(rep.step)
        with self._cond:
            if connection.closed:
                return
            if client in self._submitted or client in self._rejected:
                log.warning("[ROUND %d] stream: %s sent step %d twice", self.round, client, step)
                return  # its answer comes when the step closes
            if step != self.current or self.finished:
                # Answered at once, with the step to send next: a late client catches up, a
                # client ahead of the server (after a reconnect) goes back to the open step.
                why = "late" if step < self.current or self.finished else "out of turn"
                self.report.late += 1
                message = f"{why}: the server is at step {self.current}"
                connection.send(_skip(step, message, self.current))
                return
            try:
                z = decode_tensor(rep.z, f"{client} step {step} Z", self.specs[step])
            except FrameError as exc:
                self.report.rejected += 1
                log.warning("[ROUND %d] stream: rejected %s", self.round, exc)
                self._rejected[client] = f"rejected: {exc}"  # answered when the step closes
            else:
                self._submitted[client] = z
            self._cond.notify_all()

    # -- the coordinator ---------------------------------------------------------------

    def cancel(self) -> None:
        """Stop waiting: the coordinator ends the phase at once."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _waiting_for(self, step: int) -> set[str]:
        # Step 0 also waits for clients that have not connected yet (not for those that left).
        expected = set(self._connections)
        if step == 0:
            expected |= set(self.tokens) - self.report.connected
        return expected - set(self._submitted) - set(self._rejected)

    def _collect(self, step: int, deadline: float) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Wait for the step's representations; returns them and the rejected clients' reasons.

        Raises
        ------
        _Cancelled
            If the phase was cancelled while waiting.
        """
        with self._cond:
            while not self._cancelled:
                remaining = deadline - time.monotonic()
                if not self._waiting_for(step) or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._cancelled:
                raise _Cancelled
            reps, rejected = dict(self._submitted), dict(self._rejected)
            self.report.missed += len(set(self._connections) - set(reps) - set(rejected))
            self._submitted.clear()
            self._rejected.clear()
            self.current = step + 1
            return reps, rejected

    def run(self) -> PhaseReport:
        """Coordinate every step (blocking); returns the phase's report."""
        start = time.monotonic()
        try:
            for step in range(len(self.specs)):
                opened = time.monotonic()
                # Step 0 also waits for ClientApps to start, load their model and connect.
                deadline = (
                    start + self.connect_deadline if step == 0 else opened + self.batch_deadline
                )
                try:
                    reps, rejected = self._collect(step, deadline)
                except _Cancelled:
                    break
                if step == 0 and not self.report.connected:
                    self.report.unreachable = True
                    break
                built = self.build(step, reps) if len(reps) >= 2 else {}
                with self._cond:
                    for client, reason in rejected.items():
                        if client in self._connections:
                            self._connections[client].send(_skip(step, reason, step + 1))
                    for client in reps:
                        connection = self._connections.get(client)
                        if connection is None:
                            continue
                        tensors = built.get(client)
                        if tensors:
                            frame = pb.ServerFrame(
                                payload=pb.Payload(
                                    step=step,
                                    tensors=encode_tensors(tensors),
                                    next_step=step + 1,
                                )
                            )
                        else:
                            frame = _skip(step, "no peer for this step", step + 1)
                        connection.send(frame)
                self.report.steps += 1
                self.report.step_seconds.append(time.monotonic() - opened)
        finally:
            with self._cond:
                self.finished = True
                self.current = len(self.specs)
                for connection in self._connections.values():
                    connection.close()
                self._connections.clear()
                self._cond.notify_all()
        return self.report


# --------------------------------------------------------------------------- the server


class _Servicer(pb_grpc.MuscleExchangeServicer):
    def __init__(self, owner: ExchangeServer) -> None:
        self.owner = owner

    def Exchange(
        self, request_iterator: Iterator[pb.ClientFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerFrame]:
        # A connection that never says hello must not hold a worker thread.
        timer = threading.Timer(HELLO_TIMEOUT, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            first = next(request_iterator, None)
        except grpc.RpcError:
            return
        finally:
            timer.cancel()
        if first is None:
            return
        if first.WhichOneof("kind") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be a hello")
        hello = first.hello
        phase = self.owner.phase
        if phase is None or phase.finished or hello.round != phase.round:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no contrastive phase of round {hello.round} is open",
            )
        assert phase is not None  # abort raises
        if not phase.authenticate(hello.client_id, hello.token):
            log.warning(
                "stream: refused %r from %s (invalid token for this run)",
                hello.client_id,
                context.peer(),
            )
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"invalid token for client {hello.client_id!r}"
            )
        connection, step = phase.connect(hello.client_id)
        context.add_callback(lambda: phase.disconnect(connection))

        def pump() -> None:
            try:
                for frame in request_iterator:
                    phase.receive(connection, frame)
            except (grpc.RpcError, FrameError) as exc:
                log.info("stream: %s disconnected (%s)", connection.client_id, exc)
            finally:
                phase.disconnect(connection)

        threading.Thread(target=pump, name=f"stream-{hello.client_id}", daemon=True).start()
        yield pb.ServerFrame(welcome=pb.Welcome(step=step, steps=len(phase.specs)))
        while context.is_active():
            try:
                frame = connection.outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if frame is None:
                return
            yield frame


class ExchangeServer:
    """A gRPC server for FedMuscle's phases, listening on one port for the whole run.

    Parameters
    ----------
    endpoint : StreamEndpoint
        Bind address, port and TLS files.
    max_receive, max_send : int
        Frame size limits in bytes (what the experiment implies: a representation in, a payload
        out); bigger frames are refused by gRPC itself.
    max_clients : int
        Streams served at once.

    Raises
    ------
    StreamUnavailable
        If the port cannot be opened or the TLS files cannot be read.
    """

    def __init__(
        self, endpoint: StreamEndpoint, *, max_receive: int, max_send: int, max_clients: int
    ) -> None:
        self.endpoint = endpoint
        self.phase: StreamPhase | None = None
        options = [
            ("grpc.max_receive_message_length", max_receive),
            ("grpc.max_send_message_length", max_send),
            ("grpc.so_reuseport", 0),  # a port in use must fail, not be shared
        ]
        # Each stream holds one worker for its lifetime; refusals and reconnects need spares.
        workers = 2 * max_clients + 4
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stream-rpc"),
            options=options,
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_MuscleExchangeServicer_to_server(_Servicer(self), self._server)
        where = f"{endpoint.bind}:{endpoint.port}"
        try:
            if endpoint.tls:
                assert endpoint.certfile is not None and endpoint.keyfile is not None
                key = Path(endpoint.keyfile).read_bytes()
                cert = Path(endpoint.certfile).read_bytes()
                credentials = grpc.ssl_server_credentials([(key, cert)])
                port = self._server.add_secure_port(where, credentials)
            else:
                port = self._server.add_insecure_port(where)
        except (OSError, RuntimeError) as exc:
            raise StreamUnavailable(f"cannot listen on {where}: {exc}") from exc
        if port == 0:
            raise StreamUnavailable(f"cannot listen on {where} (port in use or not permitted)")
        self.port = port
        self._server.start()
        log.info(
            "stream: listening on %s:%d (%s)",
            endpoint.bind,
            port,
            "TLS" if endpoint.tls else "plain",
        )

    @property
    def address(self) -> str:
        """``host:port`` announced to clients."""
        return self.endpoint.announced(self.port)

    def stop(self, grace: float = 1.0) -> None:
        """Close the port and end every open stream."""
        self._server.stop(grace).wait()
