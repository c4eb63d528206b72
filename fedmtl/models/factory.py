"""Building a client's tasks and model from its experiment entry (both sides' helpers).

The ClientApp builds the real model from here; ``preflight`` and tools build it on the meta
device to check an experiment file. The server never builds a client model: it learns names
and shapes from each client's ``describe`` reply.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from fedmtl.config import ClientConfig, Experiment
from fedmtl.models.multitask import MultiTaskModel, build_model, shared_parameters
from fedmtl.seeding import derive_seed
from fedmtl.tasks import Task, create_task


def build_tasks(experiment: Experiment, client: ClientConfig) -> list[Task]:
    """Instantiate the client's tasks from its dataset's task table."""
    from fedmtl.data import dataset_task_table

    dataset = experiment.datasets[client.dataset]
    table = dataset_task_table(dataset.kind, **dataset.options)
    return [
        create_task(table[name].kind, name, table[name].num_outputs, **table[name].options)
        for name in client.tasks
    ]


def _reset_parameters(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def init_model(experiment: Experiment, client: ClientConfig, tasks: list[Task]) -> MultiTaskModel:
    """Build the client's model with seeds shared by equal parts across clients.

    The encoder is seeded by the experiment seed and the backbone configuration, each decoder
    and head by the seed, dataset, task and backbone, the projector by the seed and backbone.
    Clients with equal architectures therefore start from equal weights, as if the server had
    broadcast an initial model, and the Local baseline starts where federated runs start.
    """
    model_cfg = client.model
    arch = json.dumps([model_cfg.backbone, model_cfg.kwargs], sort_keys=True)
    projector_dim = None
    hyper = experiment.algorithm
    if hasattr(hyper, "projector_dim"):
        projector_dim = int(hyper.projector_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(experiment.seed, "encoder", arch))
        model = build_model(
            model_cfg.backbone,
            tasks,
            backbone_kwargs=model_cfg.kwargs,
            pretrained=model_cfg.pretrained,
            decoder_channels=model_cfg.decoder_channels,
            decoder_hidden=model_cfg.decoder_hidden,
            projector_dim=projector_dim,
        )
    for task in tasks:
        seed = derive_seed(experiment.seed, "decoder", client.dataset, task.name, arch)
        _reset_parameters(model.decoders[task.name], seed)
        _reset_parameters(model.heads[task.name], seed + 1)
    if model.projector is not None:
        _reset_parameters(model.projector, derive_seed(experiment.seed, "projector", arch))
    return model


def shared_structure(
    experiment: Experiment, client: ClientConfig, groups: tuple[str, ...]
) -> dict[str, Tensor]:
    """The parameters ``client`` shares in ``groups``, built on the meta device.

    Names, shapes and dtypes only: no memory is allocated and no weights are read.
    """
    offline = client.model_copy(
        update={"model": client.model.model_copy(update={"pretrained": None})}
    )
    with torch.device("meta"):
        model = init_model(experiment, offline, build_tasks(experiment, client))
    return shared_parameters(model, groups)
