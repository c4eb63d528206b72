"""The experiment's public dataset on a client: its view, its batches, seeded forwards.

Shared by every algorithm whose clients read ``[public]`` (FedMuscle, FedHeNN, SimCLR,
pseudo-labelling). Every client draws the same public samples in the same order (seeded by the
experiment seed), each in its own modality.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedmtl.clients.session import ClientSession, dataset_source
from fedmtl.clients.training import autocast, to_device
from fedmtl.config import DatasetConfig
from fedmtl.data import DATASET_REGISTRY, PublicDataset, collate


@functools.lru_cache(maxsize=4)
def _public_view(
    dataset_json: str,
    seed: int,
    root: str | None,
    size: int,
    batch_size: int,
    modality: str,
    image_size: int | None,
) -> PublicDataset:
    # Cached per process: building a source (COCO's annotation json) is slow and every
    # contrastive message of every client in a simulation actor needs the same view.
    source = dataset_source(DatasetConfig.model_validate_json(dataset_json), seed, root)
    public = PublicDataset(source, size, batch_size, seed)
    options: dict[str, Any] = {}
    if modality == "image" and image_size != source.image_size:
        options["image_size"] = image_size  # the client's model expects its own input size
    return public.modality_view(modality, **options)


def public_view(session: ClientSession) -> PublicDataset:
    """The experiment's public dataset as this client sees it (its modality and image size).

    Every client draws the same samples in the same order (seeded by the experiment seed);
    a text client gets the captions of the samples image clients get as images.

    Raises
    ------
    ValueError
        If the experiment has no ``[public]`` section or the public dataset has no view in the
        client's modality.
    """
    experiment = session.experiment
    public = experiment.public
    if public is None:
        raise ValueError(f"{experiment.algorithm.name} needs a [public] dataset section")
    cfg = experiment.datasets[public.dataset]
    own = experiment.datasets[session.client.dataset]
    # A SuperNode's data-dir overrides the root of the client's own dataset only.
    root = session.data_root if public.dataset == session.client.dataset else None
    return _public_view(
        cfg.model_dump_json(),
        experiment.seed,
        root,
        public.size,
        public.batch_size,
        DATASET_REGISTRY[own.kind].modality,
        own.image_size,
    )


def public_batch(view: PublicDataset, epoch: int, batch: int) -> Tensor | list[str]:
    """Inputs of public batch ``batch`` of ``epoch`` (images ``[B, 3, H, W]`` or captions).

    Raises
    ------
    IndexError
        If the epoch has no batch ``batch``.
    """
    positions = view.batch_indices(epoch)[batch]
    inputs, _ = collate([view.samples[int(p)] for p in positions])
    return inputs


def ordered_batches(view: PublicDataset) -> Iterator[tuple[Tensor, Tensor | list[str]]]:
    """``(positions, inputs)`` over the public samples in selection order, ``batch_size`` at once.

    For what must be indexed by public sample (CoFED's predictions and labels), not shuffled.
    """
    for start in range(0, len(view), view.batch_size):
        positions = torch.arange(start, min(start + view.batch_size, len(view)))
        inputs, _ = collate([view.samples[int(p)] for p in positions])
        yield positions, inputs


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under a fixed torch RNG (dropout masks), restoring the RNG afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def public_outputs(
    session: ClientSession, model: nn.Module, tasks: Sequence[str]
) -> dict[str, Tensor]:
    """``model``'s float32 outputs for ``tasks`` on the whole public set, in its fixed order.

    What CoFED (predictions) and FedDF (logits) upload; evaluation mode, no gradient.
    """
    outputs: dict[str, list[Tensor]] = {task: [] for task in tasks}
    model.eval()
    with torch.no_grad():
        for _, inputs in ordered_batches(public_view(session)):
            with autocast(session.device):
                batch = model(to_device(inputs, session.device))
            for task in tasks:
                outputs[task].append(batch[task].float().cpu())
    return {task: torch.cat(parts) for task, parts in outputs.items()}
