"""In-process Flower Grid for tests: the real ClientApp, a real serialisation round-trip.

``FakeGrid`` calls the ClientApp directly for every pushed message, keeping one ``Context`` per
fake node, and passes every message and reply through Flower's protobuf serialisation, so a
record that would not survive the wire fails here too. It can drop nodes and tamper with
replies, to test what the server does with a dead node or a client that sends garbage.

It relies on ``flwr.supercore.task_identity.TaskIdentity`` (internal, as in Flower's own
``run_simulation``); ``test_fake_grid_relies_on_flower_task_identity`` in
``tests/test_foundation_units.py`` fails loudly if that API moves; ``tests/test_contract.py``
runs every registered strategy on a FakeGrid.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message, RecordDict], RecordDict | None]

NODE_UNAVAILABLE = 5
CLIENT_APP_RAISED_EXCEPTION = 2


def wire_roundtrip(content: RecordDict) -> RecordDict:
    """Serialise a message's content to protobuf bytes and back."""
    data = recorddict_to_proto(content).SerializeToString()
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


class FakeGrid(Grid):
    """A Grid whose nodes run ``client_app`` in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Nodes get ids 101, 102, ... and ``partition-id`` 0, 1, ...
    node_configs : list of dict, optional
        Extra node-config keys per node (e.g. ``client-id``, ``state-dir``).
    concurrent : collection of str
        Message types whose messages the nodes handle at the same time, in threads, as real
        nodes do (FedMuscle's stream phase: every client must be in its handler at once).
        Other types are delivered one node after the other (model construction seeds torch's
        global RNG, which threads would share).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_configs: list[dict[str, Any]] | None = None,
        run_id: int = 7,
        concurrent: Collection[str] = (),
    ) -> None:
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.concurrent = set(concurrent)
        self.contexts: dict[int, Context] = {}
        for index in range(num_nodes):
            node_id = 101 + index
            config: dict[str, Any] = {"partition-id": index, "num-partitions": num_nodes}
            config.update((node_configs or [{}] * num_nodes)[index])
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=config,
                state=RecordDict(),
                run_config={},
            )
        self.offline: set[int] = set()
        self.fail_next: dict[int, int] = {}  # node → how many messages to answer with an error
        self.tamper: Tamper | None = None
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self._ids = itertools.count()
        self._run: Any = None

    # -- Grid API ----------------------------------------------------------------------

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Any:  # noqa: D102
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        raise NotImplementedError("use Message(...) directly")

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        messages = list(messages)
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}-{uuid.uuid4().hex[:6]}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            ids.append(message_id)
        if len(messages) > 1 and all(m.metadata.message_type in self.concurrent for m in messages):
            with ThreadPoolExecutor(max_workers=len(messages)) as pool:
                replies = list(pool.map(self._deliver, messages))
        else:
            replies = [self._deliver(m) for m in messages]
        self.replies.update(zip(ids, replies, strict=True))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return list(self.pull_messages(ids))

    # -- delivery ----------------------------------------------------------------------

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node in self.offline or node not in self.contexts:
            return Message(Error(NODE_UNAVAILABLE, "node unavailable"), reply_to=message)
        if self.fail_next.get(node, 0) > 0:
            self.fail_next[node] -= 1
            return Message(Error(NODE_UNAVAILABLE, "node died mid-round"), reply_to=message)
        message.__dict__["_content"] = wire_roundtrip(message.content)
        try:
            reply = self.client_app(message, self.contexts[node])
        except Exception as exc:  # the real runtimes turn exceptions into error replies too
            return Message(
                Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                reply_to=message,
            )
        if reply.has_error():
            return reply
        content = wire_roundtrip(reply.content)
        if self.tamper is not None:
            content = self.tamper(node, message, content) or content
        reply.__dict__["_content"] = content
        return reply
