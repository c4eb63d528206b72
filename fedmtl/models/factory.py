"""Building a client's tasks and model from its experiment entry (both sides' helpers).

The ClientApp builds the real model from here; ``preflight`` and tools build it on the meta
device to check an experiment file. The server never builds a client model: it learns names
and shapes from each client's ``describe`` reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fedmtl.config import ClientConfig, Experiment
from fedmtl.models.multitask import MultiTaskModel, build_model, shared_parameters
from fedmtl.seeding import derive_seed
from fedmtl.tasks import Task, create_task

if TYPE_CHECKING:
    from fedmtl.data import DatasetSource


def build_tasks(
    experiment: Experiment,
    client: ClientConfig,
    open_source: Callable[[], DatasetSource] | None = None,
    *,
    unknown_outputs: int | None = None,
) -> list[Task]:
    """Instantiate the client's tasks from its dataset's task table.

    Parameters
    ----------
    experiment : Experiment
        The experiment.
    client : ClientConfig
        The client whose tasks to build.
    open_source : callable, optional
        Returns the client's dataset source; called only when a task's number of outputs comes
        from the data (``text_classification``'s classes). Default: the source at the
        dataset's own root (a SuperNode passes its ``data-dir``'s).
    unknown_outputs : int, optional
        Use this many outputs instead of reading the data (a deployed server checks that
        models build without the clients' files).

    Raises
    ------
    FileNotFoundError, ValueError
        When the data that defines a task's outputs cannot be read.
    """
    from fedmtl.data import DATASET_REGISTRY, TaskInfo, create_dataset, dataset_task_table

    dataset = experiment.datasets[client.dataset]
    table = dataset_task_table(dataset.kind, **dataset.options)
    if DATASET_REGISTRY[dataset.kind].OUTPUTS_FROM_DATA and any(
        table[name].num_outputs == 0 for name in client.tasks
    ):
        # e.g. a text_classification file without options.classes: count the classes in it
        if unknown_outputs is not None:
            table = {
                name: TaskInfo(info.kind, info.num_outputs or unknown_outputs, info.options)
                for name, info in table.items()
            }
        elif open_source is None:
            source = create_dataset(
                dataset.kind,
                dataset.root,
                image_size=dataset.image_size,
                seed=experiment.seed,
                **dataset.options,
            )
            table = source.data_task_table()
        else:
            table = open_source().data_task_table()
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
    # Where a tokenizer folder lives is not architecture: the same run from another path (or
    # another machine) starts from the same weights.
    shape_kwargs = {k: v for k, v in model_cfg.kwargs.items() if k != "tokenizer"}
    arch = json.dumps([model_cfg.backbone, shape_kwargs], sort_keys=True)
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
