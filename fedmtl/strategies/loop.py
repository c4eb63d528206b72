"""The round loop over Flower's Grid that every strategy reuses.

Discovery (``query.describe``), client selection, one message per client with its own content,
reply validation (a bad or missing reply is logged and left out, never a crash), evaluation,
metrics.jsonl, per-round checkpoints and resume.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedmtl.config import Experiment, experiment_to_json
from fedmtl.messages import (
    ARRAYS,
    CLIENT,
    CLIENT_ID,
    DESCRIBE,
    EVALUATE,
    EXPERIMENT,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    STATE_ROOT,
    TRAIN,
    UPLOAD_GROUPS,
    ReplyError,
    content_bytes,
    from_array_record,
    make_content,
    specs_from_json,
    validate_metrics,
    validate_tensors,
)
from fedmtl.results import RunDirectory
from fedmtl.seeding import derive_seed
from fedmtl.strategies.base import ClientInfo, Reply, ReplyHandler, Strategy, Validator

log = logging.getLogger("fedmtl.server")

DESCRIBE_ERROR = "error"  # describe reply: the client's own error (it knows who it is, not ok)
POLL_SECONDS = 0.2  # how often replies are pulled (and a stop request noticed)


class RunInterrupted(Exception):
    """The run was asked to stop (Ctrl-C); the last checkpoint is where a resume continues."""


class FederationFailed(RuntimeError):
    """No client completed round 1: the run cannot learn anything, the clients' errors say why."""


def error_line(reason: str) -> str:
    """The first meaningful line of an error reply's reason.

    Flower wraps a ClientApp's exception as ``<class 'T'>:<'message'>`` (simulation adds
    ``Exception ClientAppException occurred. Message:``); the server's tables show one line.
    """
    text = reason.strip()
    match = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", text, flags=re.S)
    if match:
        kind, text = match.group(1).rpartition(".")[2], match.group(2).strip()
        text = text.removeprefix("Exception ClientAppException occurred. Message:").strip()
        if kind != "ClientAppException" and text:
            text = f"{kind}: {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else reason.strip() or "unknown error"


class Observer(Protocol):
    """Progress callbacks (the CLI shows them with rich; the default logs them)."""

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Before the first round (``first_round`` > 1 on resume)."""

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """After a phase; ``done`` of ``total`` clients replied usefully."""

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """After a round's metrics and checkpoint were written."""


class LogObserver:
    """Reports progress through the ``fedmtl.server`` logger."""

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Log the start."""
        log.info(
            "[%s] %s from round %d of %d",
            experiment.name,
            experiment.algorithm.name,
            first_round,
            experiment.rounds,
        )

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """Log a finished phase."""
        log.info("[ROUND %d] %s: %d/%d replies", round_, phase, done, total)

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """Log the end of a round."""
        log.info("[ROUND %d] done (%d clients)", round_, len(rows))


class FederatedLoop:
    """Run an experiment's rounds over a Grid with one strategy.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The simulation, deployment or test grid.
    experiment : Experiment
        The resolved experiment.
    strategy : Strategy
        The algorithm's server side.
    run_dir : RunDirectory
        Where metrics, checkpoints and the summary go.
    observer : Observer, optional
        Progress reporting.
    state_root : str, optional
        Personal-state root sent to clients whose node config has no ``state-dir``
        (simulation: ``<run>/clients``).
    run_config : mapping, optional
        Flower's run config (``flwr run -c``): settings of this deployment that are not part
        of the experiment, e.g. FedMuscle's ``stream-*`` address and TLS files.
    stop : threading.Event, optional
        Set it (Ctrl-C) to end the run at the next reply poll with :class:`RunInterrupted`;
        the checkpoint of the last finished round stays the resume point.
    """

    def __init__(
        self,
        grid: Grid,
        experiment: Experiment,
        strategy: Strategy,
        run_dir: RunDirectory,
        *,
        observer: Observer | None = None,
        state_root: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.grid = grid
        self.stop = stop or threading.Event()
        self.run_config: dict[str, Any] = dict(run_config or {})
        self.experiment = experiment
        self.strategy = strategy
        self.run_dir = run_dir
        self.observer: Observer = observer or LogObserver()
        self.state_root = state_root if state_root is not None else str(run_dir.clients_dir)
        self.clients: dict[str, ClientInfo] = {}
        self._experiment_json = experiment_to_json(experiment)
        self._rows: dict[str, dict[str, Any]] = {}
        # Clients whose node answered describe with its own error (bad data-dir, ...): they
        # get a failed row every round until a describe succeeds.
        self.broken: dict[str, str] = {}
        self.node_errors: dict[int, str] = {}  # nodes that failed before knowing their client

    # -- messaging ---------------------------------------------------------------------

    def base_config(self, round_: int, client_id: str | None = None) -> dict[str, Any]:
        """Config every message carries."""
        config: dict[str, Any] = {
            EXPERIMENT: self._experiment_json,
            SERVER_ROUND: round_,
            STATE_ROOT: self.state_root,
        }
        if client_id is not None:
            config[CLIENT_ID] = client_id
        return config

    def exchange(
        self,
        round_: int,
        phase: str,
        message_type: str,
        contents: Mapping[str, RecordDict],
        validate: Validator | None = None,
        on_reply: ReplyHandler | None = None,
    ) -> dict[str, Reply]:
        """Send one message per client and return the good replies by client id.

        Each reply is parsed and validated as it is pulled, and handed to ``on_reply`` if
        given; when that returns True its tensors are dropped at once (the strategy folded
        them in), so the server never holds every upload of a phase. Failures (error replies,
        timeouts, wrong identity, failed validation) are logged, recorded in the client's
        metrics row and left out.
        """
        sent: dict[str, str] = {}  # message id → client id
        client_of = {self.clients[c].node_id: c for c in contents}

        def messages() -> Iterator[Message]:
            # Built one by one as the window lets them go: with ``messages_in_flight`` the
            # server holds that many messages' tensors, not one copy per client.
            for client_id in contents:
                content = contents[client_id]
                row = self._row(round_, client_id)
                row["bytes_down"] = row.get("bytes_down", 0) + content_bytes(content)
                yield self._message(content, self.clients[client_id].node_id, message_type)

        def pushed(batch: list[Message]) -> None:  # message ids exist once pushed
            for message in batch:
                sent[message.metadata.message_id] = client_of[message.metadata.dst_node_id]

        good: dict[str, Reply] = {}

        def handle(reply: Message) -> None:
            client_id = sent.get(reply.metadata.reply_to_message_id)
            if client_id is None:
                return
            try:
                parsed = self._parse(reply, client_id)
                if validate is not None:
                    validate(self.clients[client_id], parsed)
            except ReplyError as exc:
                self._fail(round_, client_id, phase, str(exc))
                return
            row = self._row(round_, client_id)
            row["bytes_up"] = row.get("bytes_up", 0) + content_bytes(reply.content)
            if on_reply is not None and on_reply(client_id, parsed):
                parsed.arrays, parsed.records = {}, {}
            good[client_id] = parsed

        start = time.perf_counter()
        window = self.experiment.messages_in_flight
        self.send_and_receive(messages(), on_reply=handle, window=window, on_pushed=pushed)
        for client_id in contents:
            if client_id not in good and "error" not in self._row(round_, client_id):
                self._fail(round_, client_id, phase, "no reply before the round timeout")
        self._row_phase_seconds(round_, contents, phase, time.perf_counter() - start)
        self.observer.on_phase(round_, phase, len(good), len(contents))
        return good

    def _message(self, content: RecordDict, node: int, message_type: str) -> Message:
        # The ttl ends when the server stops waiting: a node that picks the message up later
        # (it was busy, or reconnected) drops it instead of running work nobody collects.
        ttl = self.experiment.round_timeout
        return Message(content, dst_node_id=node, message_type=message_type, ttl=ttl)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        on_reply: Callable[[Message], None] | None = None,
        *,
        window: int | None = None,
        on_pushed: Callable[[list[Message]], None] | None = None,
    ) -> list[Message]:
        """Push ``messages``, pull replies until all came or the round timeout passed.

        Like ``Grid.send_and_receive``, but a set :attr:`stop` ends the wait at once. With
        ``on_reply`` each reply is handed over as it is pulled and not kept (the returned list
        is then empty): a phase's uploads need not all sit in memory at once. With ``window``
        at most that many messages are in flight: ``messages`` (which may be a generator) is
        drawn from as replies come back. ``on_pushed`` sees each pushed batch (message ids
        are set by then).

        Raises
        ------
        RunInterrupted
            When :attr:`stop` is set.
        """
        self._check_stop()
        queue = iter(messages)
        # A list, not a set: replies then come in push order on grids that keep it, and
        # aggregation sums them in the same order every run (bitwise-equal results).
        pending: list[str] = []

        def top_up() -> bool:
            room = None if window is None else window - len(pending)
            batch = list(queue) if room is None else list(itertools.islice(queue, max(room, 0)))
            if not batch:
                return False
            pending.extend(self.grid.push_messages(batch))
            if on_pushed is not None:
                on_pushed(batch)
            return True

        top_up()
        deadline = time.monotonic() + self.experiment.round_timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            answered = {reply.metadata.reply_to_message_id for reply in got}
            if on_reply is None:
                replies.extend(got)
            else:
                for reply in got:
                    on_reply(reply)
                del got
            pending = [message_id for message_id in pending if message_id not in answered]
            more = top_up()
            if not pending or time.monotonic() >= deadline:
                break
            if not more and self.stop.wait(POLL_SECONDS):
                self._check_stop()
        return replies

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise RunInterrupted("stop requested")

    def _client_of_node(self, node_id: int) -> str:
        for info in self.clients.values():
            if info.node_id == node_id:
                return info.client_id
        raise KeyError(node_id)

    def _parse(self, reply: Message, client_id: str) -> Reply:
        if reply.has_error():
            error = reply.error
            reason = error_line(error.reason or "")
            raise ReplyError(f"client {client_id!r}: error {error.code}: {reason}")
        content = reply.content
        if CLIENT not in content.config_records or METRICS not in content.metric_records:
            raise ReplyError(f"client {client_id!r}: reply lacks client or metrics records")
        info = dict(content.config_records[CLIENT])
        if info.get(CLIENT_ID) != client_id:
            raise ReplyError(f"reply from {info.get(CLIENT_ID)!r} where {client_id!r} was asked")
        metrics = dict(content.metric_records[METRICS])
        validate_metrics(metrics, client_id=client_id)
        arrays = (
            from_array_record(content.array_records[ARRAYS])
            if ARRAYS in content.array_records
            else {}
        )
        records = {
            key: from_array_record(record)
            for key, record in content.array_records.items()
            if key != ARRAYS
        }
        return Reply(client_id, metrics, arrays, records, info)

    def _fail(self, round_: int, client_id: str, phase: str, reason: str) -> None:
        log.warning("[ROUND %d] %s: %s left out: %s", round_, phase, client_id, reason)
        row = self._row(round_, client_id)
        row["status"] = "failed"
        row["error"] = f"{phase}: {reason}"

    def _row(self, round_: int, client_id: str) -> dict[str, Any]:
        return self._rows.setdefault(client_id, {"round": round_, "client_id": client_id})

    def _row_phase_seconds(
        self, round_: int, clients: Mapping[str, Any], phase: str, seconds: float
    ) -> None:
        # A phase may run several exchanges a round (FedMuscle's per-batch align): add them up.
        for client_id in clients:
            row = self._row(round_, client_id)
            row[f"seconds/{phase}"] = round(row.get(f"seconds/{phase}", 0.0) + seconds, 4)

    def record_client(self, round_: int, client_id: str, metrics: Mapping[str, float]) -> None:
        """Add a client's metrics of ``round_`` to its row in metrics.jsonl."""
        self._row(round_, client_id).update(metrics)

    def record_server(self, round_: int, metrics: Mapping[str, float]) -> None:
        """Attach server-side metrics of ``round_`` to every row of the round."""
        for row in self._rows.values():
            row.update({f"server/{k}": v for k, v in metrics.items()})

    # -- discovery and selection ------------------------------------------------------

    def discover(self, round_: int) -> None:
        """Ask nodes the server does not know yet who they are (``query.describe``)."""
        online = set(self.grid.get_node_ids())
        known = {info.node_id for info in self.clients.values()}
        for client_id in [c for c, info in self.clients.items() if info.node_id not in online]:
            del self.clients[client_id]  # a node that left; it is re-learnt if it comes back
        unknown = sorted(online - known)
        if not unknown:
            return
        messages = [
            self._message(make_content(self.base_config(round_)), node, DESCRIBE)
            for node in unknown
        ]
        for reply in self.send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.node_errors[node] = error_line(reply.error.reason or "")
                log.warning("node %d did not describe itself: %s", node, self.node_errors[node])
                continue
            info = dict(reply.content.config_records[CLIENT])
            metrics = dict(reply.content.metric_records[METRICS])
            client_id = str(info[CLIENT_ID])
            self.node_errors.pop(node, None)
            if DESCRIBE_ERROR in info:
                self.broken[client_id] = str(info[DESCRIBE_ERROR])
                log.warning("client %s cannot start: %s", client_id, self.broken[client_id])
                continue
            self.broken.pop(client_id, None)
            self.clients[client_id] = ClientInfo(
                client_id=client_id,
                node_id=node,
                dataset=str(info["dataset"]),
                tasks=list(json.loads(str(info["tasks"]))),
                num_train=int(str(metrics[NUM_EXAMPLES])),
                num_test=int(str(metrics["num-test"])),
                specs=specs_from_json(str(info["specs"])),
                primary_metrics={
                    task: (str(metric), bool(higher))
                    for task, (metric, higher) in json.loads(
                        str(info.get("primary-metrics", "{}"))
                    ).items()
                },
            )
        missing = [c.client_id for c in self.experiment.clients if c.client_id not in self.clients]
        if missing:
            log.warning("clients not online: %s", missing)

    def wait_for_nodes(self, timeout: float, poll: float = 0.2) -> int:
        """Block until every client of the experiment has a node online, or ``timeout``.

        Nodes register asynchronously (simulation engine start-up, SuperNodes connecting), so
        the first round waits for them, as Flower's own node sampling does. Returns how many
        nodes are online; a run then proceeds with whoever came.
        """
        expected = len(self.experiment.clients)
        deadline = time.monotonic() + timeout
        online = len(list(self.grid.get_node_ids()))
        while online < expected and time.monotonic() < deadline:
            if self.stop.wait(poll):
                self._check_stop()
            online = len(list(self.grid.get_node_ids()))
        if online < expected:
            log.warning(
                "%d of %d client nodes online after %.0f s; continuing with them",
                online,
                expected,
                timeout,
            )
        return online

    def select(self, round_: int) -> list[ClientInfo]:
        """Return the participants of a round: all online clients, or a seeded sample of them."""
        online = [
            self.clients[c.client_id]
            for c in self.experiment.clients
            if c.client_id in self.clients
        ]
        k = self.experiment.clients_per_round
        if k is None or k >= len(online):
            return online
        rng = random.Random(derive_seed(self.experiment.seed, "select", round_))
        chosen = set(rng.sample([c.client_id for c in online], k))
        return [c for c in online if c.client_id in chosen]

    # -- phases -----------------------------------------------------------------------

    def train_phase(
        self, round_: int, clients: list[ClientInfo], on_reply: ReplyHandler | None = None
    ) -> dict[str, Reply]:
        """Send ``train`` with each client's own tensors; validate and return good replies.

        The strategy's upload plan is asked once per client: it goes into the message, into
        the reply's validation and onto the reply (:attr:`Reply.upload_groups`). ``on_reply``
        sees each good reply, plan set, as it arrives (see :meth:`exchange`).
        """
        strategy = self.strategy
        contents = {}
        plan: dict[str, list[str] | None] = {}
        for c in clients:
            config = {**self.base_config(round_, c.client_id), **strategy.train_config(round_, c)}
            upload = plan[c.client_id] = strategy.upload_groups(c)
            if upload is not None:
                config[UPLOAD_GROUPS] = list(upload)
            contents[c.client_id] = make_content(config, strategy.train_arrays(round_, c))

        def validate(client: ClientInfo, reply: Reply) -> None:
            expected = strategy.expected_reply(client, plan[client.client_id])
            validate_tensors(reply.arrays, expected, client_id=client.client_id)

        def arrived(client_id: str, reply: Reply) -> bool:
            reply.upload_groups = plan[client_id]
            return on_reply(client_id, reply) if on_reply is not None else False

        replies = self.exchange(round_, "train", TRAIN, contents, validate, arrived)
        for client_id, reply in replies.items():
            metrics = {k: v for k, v in reply.metrics.items() if k != NUM_EXAMPLES}
            self.record_client(round_, client_id, metrics)
        return replies

    def evaluate_phase(self, round_: int, clients: list[ClientInfo]) -> None:
        """Each client evaluates its personal model on its local test split."""
        contents = {
            c.client_id: make_content(
                self.base_config(round_, c.client_id), self.strategy.evaluate_arrays(round_, c)
            )
            for c in clients
        }
        for client_id, reply in self.exchange(round_, "evaluate", EVALUATE, contents).items():
            metrics = {k: v for k, v in reply.metrics.items() if k.startswith("eval/")}
            self.record_client(round_, client_id, metrics)

    # -- the run ----------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> None:
        """Run (or resume) every round, checkpointing after each."""
        first = 1
        if resume:
            checkpoint = self.run_dir.load_checkpoint()
            if checkpoint is not None:
                done, tensors, meta = checkpoint
                self.strategy.load_state_dict(tensors, meta.get("strategy", {}))
                self.run_dir.truncate_metrics(done)
                first = done + 1
                log.info("resuming after round %d", done)
            else:
                self.run_dir.truncate_metrics(0)
        self.observer.on_start(self.experiment, first)
        self.wait_for_nodes(self.experiment.round_timeout)
        try:
            for round_ in range(first, self.experiment.rounds + 1):
                self._run_round(round_)
        finally:
            self.strategy.close()

    def _run_round(self, round_: int) -> None:
        self._check_stop()
        self._rows = {}
        self.discover(round_)
        participants = self.select(round_)
        broken = [c.client_id for c in self.experiment.clients if c.client_id in self.broken]
        for client_id in broken:
            self._fail(round_, client_id, "describe", self.broken[client_id])
        if not participants:
            self.run_dir.append_metrics([self._rows[c] for c in broken])
            if broken or self.node_errors:
                raise FederationFailed(self._failure_report(round_, broken))
            raise RuntimeError(f"round {round_}: no client is online")
        self.strategy.run_round(self, round_, participants)
        if round_ == 1 and all(
            self._rows.get(c.client_id, {}).get("status") == "failed" for c in participants
        ):
            # Nothing trained: evaluating or going on would only repeat the clients' errors.
            failed = [c.client_id for c in participants] + broken
            self.run_dir.append_metrics([self._rows[c] for c in failed])
            raise FederationFailed(self._failure_report(round_, failed))
        last = round_ == self.experiment.rounds
        if last or round_ % self.experiment.evaluate_every == 0:
            self.evaluate_phase(round_, participants)
        rows = [self._rows[c.client_id] for c in participants if c.client_id in self._rows]
        rows += [self._rows[c] for c in broken]
        self.run_dir.append_metrics(rows)
        tensors, meta = self.strategy.state_dict()
        self.run_dir.save_checkpoint(round_, tensors, {"strategy": meta})
        self.observer.on_round_end(round_, rows)

    def _failure_report(self, round_: int, clients: list[str]) -> str:
        lines = [f"round {round_}: no client completed the round"]
        lines += [f"  {c}: {self._rows.get(c, {}).get('error', 'no reply')}" for c in clients]
        lines += [f"  node {n}: {e}" for n, e in self.node_errors.items()]
        return "\n".join(lines)
