"""Test-only ClientApp: fedmtl's, except that a node configured ``corrupt-replies=true`` sends
malformed tensors in every ``train`` reply (a wrong shape in round 1, NaN afterwards).

Not named ``test_*.py`` so that Flower's FAB builder keeps it: deployment tests point
``[tool.flwr.app.components]`` of a temporary app directory at ``faulty_client:app``.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmtl import client_app as fedmtl_client
from fedmtl.messages import ARRAYS, CONFIG, SERVER_ROUND, from_array_record, to_array_record

CORRUPT_KEY = "corrupt-replies"
app = ClientApp()


def corrupt(reply: Message, round_: int) -> None:
    """Make the reply's first tensor malformed: one row short in round 1, NaN afterwards."""
    tensors = from_array_record(reply.content.array_records[ARRAYS])
    name = next(iter(tensors))
    value = tensors[name]
    tensors[name] = value[:-1].clone() if round_ == 1 else torch.full_like(value, float("nan"))
    reply.content.array_records[ARRAYS] = to_array_record(tensors)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """fedmtl's ``train``, corrupted on nodes with ``corrupt-replies=true``."""
    reply = fedmtl_client.train(msg, context)
    if context.node_config.get(CORRUPT_KEY) and ARRAYS in reply.content.array_records:
        corrupt(reply, int(str(msg.content[CONFIG][SERVER_ROUND])))
    return reply


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """fedmtl's ``query.describe``."""
    return fedmtl_client.describe(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """fedmtl's ``evaluate``."""
    return fedmtl_client.evaluate(msg, context)


@app.query("represent")
def represent(msg: Message, context: Context) -> Message:
    """fedmtl's ``query.represent``."""
    return fedmtl_client.represent(msg, context)


@app.train("align")
def align(msg: Message, context: Context) -> Message:
    """fedmtl's ``train.align``."""
    return fedmtl_client.align(msg, context)
