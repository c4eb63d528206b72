"""Everything one client needs for one message: its config, tasks, data, model and state."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedmtl.clients.state import StateStore
from fedmtl.clients.training import Batch, resolve_device
from fedmtl.config import DatasetConfig, Experiment
from fedmtl.data import (
    DatasetSource,
    SampleSet,
    cap_positions,
    client_split,
    collate,
    create_dataset,
)
from fedmtl.messages import TensorSpec
from fedmtl.models import MultiTaskModel
from fedmtl.models.factory import build_tasks, init_model
from fedmtl.models.multitask import shared_parameters
from fedmtl.seeding import derive_seed

MODEL_PREFIX = "model."
STORED = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # [state] dtype → torch
EXTRA_PREFIX = "extra."


@functools.lru_cache(maxsize=8)
def _dataset_source(
    kind: str, root: str | None, image_size: int | None, seed: int, options: str
) -> DatasetSource:
    # Pure, read-only derived data: caching per process saves rebuilding it for every message
    # (simulation actors serve many messages; deployment spawns a process per message anyway).
    return create_dataset(kind, root, image_size=image_size, seed=seed, **json.loads(options))


def dataset_source(cfg: DatasetConfig, seed: int, root: str | None = None) -> DatasetSource:
    """The (cached) dataset source a ``[datasets.X]`` entry describes."""
    options = json.dumps(cfg.options, sort_keys=True)
    return _dataset_source(cfg.kind, root or cfg.root, cfg.image_size, seed, options)


class ClientSession:
    """One client's view of the experiment, rebuilt for every message (no globals per node).

    Parameters
    ----------
    experiment : Experiment
        The resolved experiment (sent by the server in every message).
    client_id : str
        Which client of the experiment this node is.
    state_dir : path
        Node-local directory for personal state.
    data_root : str, optional
        Overrides the dataset root (a SuperNode's ``data-dir``).
    stream_ca : str, optional
        A CA certificate file the node trusts for FedMuscle's stream (a SuperNode's
        ``stream-ca``); default: the CA the server announces over the Flower channel.
    """

    def __init__(
        self,
        experiment: Experiment,
        client_id: str,
        state_dir: str | Path,
        data_root: str | None = None,
        stream_ca: str | None = None,
    ) -> None:
        self.experiment = experiment
        self.client = experiment.client(client_id)
        self.client_id = client_id
        self.index = experiment.client_index(client_id)
        self.data_root = data_root  # before the tasks: text_classification counts its classes
        self.tasks = build_tasks(experiment, self.client, self.source)
        self.device = resolve_device(experiment.device)
        stored = experiment.state.dtype
        self.state = StateStore(state_dir, dtype=None if stored == "float32" else STORED[stored])
        self.stream_ca = stream_ca
        self._splits: dict[str, SampleSet] = {}

    # -- data -------------------------------------------------------------------------

    def source(self) -> DatasetSource:
        """The client's (cached) dataset source, at this node's ``data-dir`` if it has one."""
        exp, client = self.experiment, self.client
        dataset = exp.datasets[client.dataset]
        try:
            return dataset_source(dataset, exp.seed, self.data_root)
        except (FileNotFoundError, ValueError) as exc:
            # Name the dataset and where this node looked: on a SuperNode, the data-dir.
            where = f"data-dir {self.data_root}" if self.data_root else f"root {dataset.root}"
            raise type(exc)(f"datasets.{client.dataset} ({where}): {exc}") from exc

    def split(self, name: str) -> SampleSet:
        """The client's partition of the ``train`` or ``test`` split."""
        if name not in self._splits:
            exp, client = self.experiment, self.client
            dataset = exp.datasets[client.dataset]
            source = self.source()
            members = exp.dataset_members(client.dataset)
            sizes = None
            if dataset.partition.scheme == "sizes":
                sizes = [exp.client(m).samples or 0 for m in members]
            part = client_split(
                source,
                name,
                partition_index=members.index(self.client_id),
                num_partitions=len(members),
                scheme=dataset.partition.scheme if name == "train" else "iid",
                alpha=dataset.partition.alpha,
                sizes=sizes if name == "train" else None,
                seed=exp.seed,
            )
            part = part.with_tasks(client.tasks)  # read only this client's targets
            cap = client.samples if name == "train" else client.test_samples
            if cap and not (name == "train" and dataset.partition.scheme == "sizes"):
                # A seeded, stratified subset: the first N of a class-sorted store would drop
                # whole classes.
                seed = derive_seed(exp.seed, self.client_id, "cap", name)
                part = part.subset(cap_positions(len(part), cap, part.stratify_labels(), seed=seed))
            self._splits[name] = part
        return self._splits[name]

    def batches(self, split: str | SampleSet, round_: int, purpose: str = "train") -> Any:
        """``batches(epoch)`` for training: a seeded shuffle per (client, round, epoch).

        ``split`` is a split name or a subset of one (e.g. a held-out validation carve-out).
        """
        dataset = self.split(split) if isinstance(split, str) else split
        batch_size = self.client.training.batch_size

        def make(epoch: int) -> Iterator[Batch]:
            generator = torch.Generator()
            generator.manual_seed(
                derive_seed(self.experiment.seed, self.client_id, round_, epoch, purpose)
            )
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=True,
                generator=generator,
                collate_fn=collate,
                drop_last=len(dataset) > batch_size,
            )
            return iter(loader)

        return make

    def eval_batches(self, split: str | SampleSet = "test") -> DataLoader[Any]:
        """Unshuffled batches of a split (or a subset of one) for evaluation."""
        return DataLoader(
            self.split(split) if isinstance(split, str) else split,
            batch_size=max(self.client.training.batch_size, 64),
            shuffle=False,
            collate_fn=collate,
        )

    # -- model and state ----------------------------------------------------------------

    def new_model(self) -> MultiTaskModel:
        """A freshly initialised model (see :func:`init_model`), on the client's device."""
        return init_model(self.experiment, self.client, self.tasks).to(self.device)

    def load(self, round_: int) -> tuple[MultiTaskModel, dict[str, dict[str, Tensor]], int | None]:
        """The model and extras as of the newest saved round not after ``round_``.

        Returns
        -------
        model, extras, loaded_round
            ``extras`` maps an extra's name (e.g. Ditto's ``personal``) to its tensors;
            ``loaded_round`` is ``None`` for a fresh client.
        """
        model = self.new_model()
        found = self.state.latest_at_most(round_)
        extras: dict[str, dict[str, Tensor]] = {}
        if found is None:
            return model, extras, None
        loaded = self.state.load(found)
        assert loaded is not None
        tensors, _ = loaded
        own = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        model.load_state_dict(own)
        for key, value in tensors.items():
            if key.startswith(EXTRA_PREFIX):
                name, _, sub = key[len(EXTRA_PREFIX) :].partition("/")
                extras.setdefault(name, {})[sub] = value
        return model, extras, found

    def save(
        self,
        round_: int,
        model: nn.Module,
        extras: Mapping[str, Mapping[str, Tensor]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Persist the model and extras as the state produced by ``round_``."""
        tensors = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
        for name, group in (extras or {}).items():
            tensors.update({f"{EXTRA_PREFIX}{name}/{k}": v for k, v in group.items()})
        self.state.save(round_, tensors, meta)


def shared_specs(model: nn.Module, groups: tuple[str, ...]) -> dict[str, TensorSpec]:
    """Specs of :func:`~fedmtl.models.multitask.shared_parameters`, announced in ``describe``."""
    return {k: TensorSpec.of(v) for k, v in shared_parameters(model, groups).items()}
