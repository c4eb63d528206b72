"""Flower ClientApp: parse the message, find this node's client, dispatch to its algorithm.

``describe``, ``train`` and ``evaluate`` are every algorithm's; a message type an algorithm adds
(FedMuscle's ``query.represent`` and ``train.align``) is routed to the method its client class
names in ``extra_messages``, so a new algorithm adds message types without touching this file.

Node config keys (``flower-supernode --node-config``): ``client-id``, ``state-dir``,
``data-dir``, ``device`` (e.g. ``'cuda:1'``), ``num-threads`` and ``stream-ca`` (a CA file
for FedMuscle's stream; default: the CA the server announces). In simulation only
``partition-id`` is set and the rest comes from the experiment.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedmtl.clients import CLIENT_ALGORITHMS
from fedmtl.clients.base import client_algorithm
from fedmtl.clients.session import ClientSession, shared_specs
from fedmtl.cluster import CHECK_STATE_ENV, check_state_root_visible
from fedmtl.config import Experiment, experiment_from_json
from fedmtl.messages import (
    CLIENT_ID,
    CONFIG,
    EXPERIMENT,
    NUM_EXAMPLES,
    SERVER_ROUND,
    STATE_ROOT,
    from_array_record,
    make_reply_content,
    specs_to_json,
)
from fedmtl.seeding import derive_seed

log = logging.getLogger("fedmtl.client")
app = ClientApp()

# describe announces the parameters of every group; buffers never leave the client.
ALL_GROUPS = ("encoder", "decoders", "heads", "projector")
CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's ErrorCode for "the ClientApp raised"

Handler = Callable[[Message, Context], Message]


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what the server's row, table and progress show."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def reports_errors(handler: Handler) -> Handler:
    """Answer an exception with an error reply whose reason is its first line.

    Flower would send the same error, but as ``<class 'T'>:<'...'>`` with the whole message;
    the full traceback still goes to this node's log.
    """

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            log.exception("%s failed", msg.metadata.message_type)
            error = Error(CLIENT_APP_RAISED_EXCEPTION, exception_line(exc))
            return Message(error, reply_to=msg)

    return guarded


@functools.lru_cache(maxsize=4)
def _experiment(text: str) -> Experiment:
    return experiment_from_json(text)


def client_id_of(context: Context, experiment: Experiment) -> str:
    """Return this node's client.

    ``client-id`` in the node config (deployment), else the partition-id-th client (simulation).
    """
    node_config = context.node_config
    if "client-id" in node_config:
        client_id = str(node_config["client-id"])
        experiment.client(client_id)  # raises KeyError naming it if the experiment lacks it
        return client_id
    if "partition-id" in node_config:
        index = int(node_config["partition-id"])
        if not 0 <= index < len(experiment.clients):
            raise ValueError(
                f"partition-id {index} is out of range: experiment {experiment.name!r} has "
                f"{len(experiment.clients)} clients"
            )
        return experiment.clients[index].client_id
    raise ValueError("node config needs client-id=... (deployment) or partition-id (simulation)")


def open_session(msg: Message, context: Context) -> tuple[ClientSession, dict[str, Any]]:
    """Build the session for this node from a message."""
    config = dict(msg.content[CONFIG])
    experiment = _experiment(str(config[EXPERIMENT]))
    client_id = client_id_of(context, experiment)
    addressed = config.get(CLIENT_ID)
    if addressed is not None and addressed != client_id:
        raise ValueError(f"message addressed to {addressed!r} reached client {client_id!r}")
    node_config = context.node_config
    if "state-dir" in node_config:
        state_dir = Path(str(node_config["state-dir"]))
    elif STATE_ROOT in config:
        root = Path(str(config[STATE_ROOT]))
        if os.environ.get(CHECK_STATE_ENV):
            # A Ray cluster's node that does not mount the folder would otherwise create an
            # empty one and train this client from a fresh model, silently.
            check_state_root_visible(root)
        state_dir = root / client_id
    else:
        raise ValueError("no state directory: set state-dir in the node config")
    data_root = str(node_config["data-dir"]) if "data-dir" in node_config else None
    stream_ca = str(node_config["stream-ca"]) if "stream-ca" in node_config else None
    if "device" in node_config:  # a SuperNode pins its own GPU: --node-config "device='cuda:1'"
        experiment = experiment.model_copy(update={"device": str(node_config["device"])})
    threads = int(node_config.get("num-threads", 0) or 0)
    if not threads and "client-id" not in node_config:
        # Simulation: several clients share the machine; more torch threads than the CPUs Ray
        # granted this client oversubscribe the cores (10× slower on 2 busy cores, measured).
        threads = experiment.simulation.num_cpus_per_client
    if threads:
        torch.set_num_threads(threads)
    # Dropout, stochastic depth and random augmentations draw from torch's global RNG: seed it
    # per (client, round, message) so runs repeat exactly and a resumed run matches.
    round_ = int(str(config.get(SERVER_ROUND, 0)))
    torch.manual_seed(derive_seed(experiment.seed, client_id, round_, msg.metadata.message_type))
    session = ClientSession(experiment, client_id, state_dir, data_root, stream_ca)
    if round_ > 1:
        # The server sends round r only after checkpointing round r - 1: older state can go.
        session.state.commit(round_ - 1)
    return session, config


def _received(msg: Message) -> dict[str, torch.Tensor]:
    if "arrays" in msg.content.array_records:
        return from_array_record(msg.content.array_records["arrays"])
    return {}


@app.query("describe")
@reports_errors
def describe(msg: Message, context: Context) -> Message:
    """Tell the server who this node is and which tensors it can share.

    A node that knows its client but cannot serve it (its data is missing under ``data-dir``,
    its device is absent, ...) says so in an ordinary reply with an ``error`` entry: the
    server can then name the client, which an error reply would not tell it.
    """
    config = dict(msg.content[CONFIG])
    client_id = client_id_of(context, _experiment(str(config[EXPERIMENT])))
    try:
        return _describe(msg, context)
    except Exception as exc:
        log.exception("client %s cannot start", client_id)
        info = {"error": exception_line(exc)}
        metrics = {NUM_EXAMPLES: 0, "num-test": 0}
        return Message(make_reply_content(client_id, metrics, info=info), reply_to=msg)


def _describe(msg: Message, context: Context) -> Message:
    session, _ = open_session(msg, context)
    model = session.new_model()
    info = {
        "dataset": session.client.dataset,
        "tasks": json.dumps(session.client.tasks),
        "specs": specs_to_json(shared_specs(model, ALL_GROUPS)),
        "primary-metrics": json.dumps(
            {t.name: [t.primary_metric, t.higher_is_better] for t in session.tasks}
        ),
        "device": str(session.device),
    }
    metrics = {NUM_EXAMPLES: len(session.split("train")), "num-test": len(session.split("test"))}
    return Message(make_reply_content(session.client_id, metrics, info=info), reply_to=msg)


@app.train()
@reports_errors
def train(msg: Message, context: Context) -> Message:
    """Local training on the server's tensors; reply with the shared tensors.

    On CUDA the reply's metrics include ``gpu/peak_mb``: the allocator's peak during the
    message (``torch.cuda.max_memory_allocated``, MiB; the CUDA context is not included).
    """
    session, config = open_session(msg, context)
    algorithm = client_algorithm(session.experiment, session)
    cuda = session.device.type == "cuda"
    if cuda:  # this message's own peak: an actor serves many clients one after another
        torch.cuda.reset_peak_memory_stats(session.device)
    outcome = algorithm.train(int(config[SERVER_ROUND]), _received(msg), config)
    if cuda:
        outcome.metrics["gpu/peak_mb"] = torch.cuda.max_memory_allocated(session.device) / 2**20
    content = make_reply_content(
        session.client_id, outcome.metrics, outcome.arrays, extra_arrays=outcome.extra_arrays
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@reports_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the personal model on the local test split."""
    session, config = open_session(msg, context)
    algorithm = client_algorithm(session.experiment, session)
    results, loss, examples = algorithm.evaluate(int(config[SERVER_ROUND]), _received(msg))
    metrics: dict[str, float | int] = {NUM_EXAMPLES: examples, "eval/loss": loss}
    for task, values in results.items():
        metrics.update({f"eval/{task}/{name}": float(v) for name, v in values.items()})
    return Message(make_reply_content(session.client_id, metrics), reply_to=msg)


def extra_handler(message_type: str) -> Handler:
    """The handler of an algorithm's own message type (see the module docstring).

    The handler answers with an error reply (``ValueError``) when the experiment's algorithm
    does not take ``message_type``.
    """

    @reports_errors
    def handle(msg: Message, context: Context) -> Message:
        session, config = open_session(msg, context)
        algorithm = client_algorithm(session.experiment, session)
        method = type(algorithm).extra_messages.get(message_type)
        if method is None:
            name = session.experiment.algorithm.name
            raise ValueError(f"{message_type} messages reached a client of algorithm {name!r}")
        outcome = getattr(algorithm, method)(int(config[SERVER_ROUND]), _received(msg), config)
        content = make_reply_content(session.client_id, outcome.metrics, outcome.arrays)
        return Message(content, reply_to=msg)

    handle.__name__ = f"handle_{message_type.replace('.', '_')}"
    return handle


for _type in sorted({t for cls in CLIENT_ALGORITHMS.values() for t in cls.extra_messages}):
    _category, _, _action = _type.partition(".")  # "train.align" → app.train("align")
    getattr(app, _category)(_action)(extra_handler(_type))
