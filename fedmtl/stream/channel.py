"""The server's side of the stream for one run: its port, its tokens, one phase at a time.

A strategy that moves a phase onto the stream (FedMuscle's ``channel = "stream"``) asks
:meth:`StreamChannel.tickets` for the config entries that announce the stream to each client,
sends them in its own Flower message, and runs the phase inside :meth:`StreamChannel.phase`
while it waits for those messages' replies. The channel opens the port on first use and keeps
it for the run; when it cannot open it, or no client reaches it, it says so once and
:attr:`StreamChannel.failed` tells the strategy to use Flower messages from then on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fedmtl.messages import TensorSpec
from fedmtl.stream.client import StreamTicket
from fedmtl.stream.server import (
    ExchangeServer,
    PayloadBuilder,
    StreamEndpoint,
    StreamPhase,
    StreamUnavailable,
)

log = logging.getLogger("fedmtl.server")


class StreamChannel:
    """The run's stream: opened on first use, closed by :meth:`close`.

    Parameters
    ----------
    clients : iterable of str
        Every client id of the experiment (each gets a fresh token for this run; a resumed run
        is a new run).
    default_port : int
        The port when the run config sets no ``stream-port``.
    max_up, max_down : int
        Largest frame in bytes a client sends (a representation) and receives (a payload).
    connect_deadline, batch_deadline : float
        Seconds a phase waits for connections, and for each step's frames.
    """

    def __init__(
        self,
        clients: Iterable[str],
        *,
        default_port: int,
        max_up: int,
        max_down: int,
        connect_deadline: float,
        batch_deadline: float,
    ) -> None:
        self.tokens = {client: secrets.token_urlsafe(32) for client in clients}
        self.default_port = default_port
        self.max_up, self.max_down = max_up, max_down
        self.connect_deadline, self.batch_deadline = connect_deadline, batch_deadline
        self.failed = False  # the run uses Flower messages from now on
        self._server: ExchangeServer | None = None

    def _open(self, run_config: Mapping[str, Any]) -> ExchangeServer | None:
        """The server, opened on first use; ``None`` (with a warning, once) if it fails."""
        if self._server is not None or self.failed:
            return self._server
        try:
            endpoint = StreamEndpoint.from_run_config(run_config, self.default_port)
            self._server = ExchangeServer(
                endpoint,
                max_receive=self.max_up,
                max_send=self.max_down,
                max_clients=len(self.tokens),
            )
        except (StreamUnavailable, ValueError, OSError) as exc:
            port = run_config.get("stream-port") or self.default_port
            log.warning(
                "stream on port %s cannot be opened (%s): falling back to Flower messages for "
                "the rest of the run",
                port,
                exc,
            )
            self.failed = True
        return self._server

    def tickets(
        self, run_config: Mapping[str, Any], clients: Sequence[str]
    ) -> dict[str, dict[str, Any]] | None:
        """Config entries announcing the stream to each client, or ``None`` if it failed."""
        server = self._open(run_config)
        if server is None:
            return None
        ticket = StreamTicket(
            address=server.address,
            token="",
            ca_pem=server.endpoint.ca_pem(),
            connect_deadline=self.connect_deadline,
            batch_deadline=self.batch_deadline,
            max_receive=self.max_down,  # the client receives payloads, sends representations
            max_send=self.max_up,
        )
        return {
            client: dict(dataclasses.replace(ticket, token=self.tokens[client]).to_config())
            for client in clients
        }

    @contextlib.contextmanager
    def phase(
        self,
        round_: int,
        clients: Sequence[str],
        specs: Sequence[TensorSpec],
        build: PayloadBuilder,
    ) -> Iterator[StreamPhase]:
        """Serve one phase while the block waits for the clients' Flower replies.

        ``specs`` are the expected representations of every step; ``build(step, reps)`` makes
        each client's payload. The phase's ``report`` says what happened; when the block ends,
        every client has answered its Flower message (or failed), so nobody is left to wait
        for and the phase is cancelled.

        Raises
        ------
        RuntimeError
            If the stream is not open (call :meth:`tickets` first).
        """
        server = self._server
        if server is None:
            raise RuntimeError("the stream is not open")
        phase = StreamPhase(
            round_,
            {client: self.tokens[client] for client in clients},
            specs,
            build,
            batch_deadline=self.batch_deadline,
            connect_deadline=self.connect_deadline,
        )
        server.phase = phase
        coordinator = threading.Thread(target=phase.run, name="stream-phase", daemon=True)
        coordinator.start()
        try:
            yield phase
        finally:
            phase.cancel()
            coordinator.join()
            server.phase = None

    def where(self) -> str:
        """``address (port N)`` of the open stream, for messages."""
        if self._server is None:
            return "(closed)"
        return f"{self._server.address} (port {self._server.port})"

    def give_up(self) -> None:
        """Use Flower messages for the rest of the run, and close the port."""
        self.failed = True
        self.close()

    def close(self) -> None:
        """Close the port (the end of the run)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
