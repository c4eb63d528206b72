"""Checks run before any round: every failure a run would meet later, named by its field.

``fedmtl validate``, ``simulate`` and ``compare`` run :func:`preflight` on the machine that
simulates the clients. A deployed ServerApp runs :func:`check_models` only: it reads no dataset
and no weights file, and each client checks its own data (its ``data-dir``) when it starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fedmtl.catalog import PUBLIC_ALGORITHMS
from fedmtl.config import ConfigError, Experiment, check_partners, check_paths

if TYPE_CHECKING:
    from fedmtl.data import DatasetSource

# Exceptions a broken model configuration raises inside timm / transformers / torch (an
# unknown keyword is a TypeError, an impossible shape a RuntimeError or AssertionError, ...).
_BUILD_ERRORS = (TypeError, ValueError, KeyError, RuntimeError, AssertionError, AttributeError)


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the rest is usually a traceback or a layout)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def preflight(experiment: Experiment, *, variants: Iterable[Experiment] = ()) -> None:
    """Everything a simulation needs, checked on this machine before the run folder exists.

    Parameters
    ----------
    experiment : Experiment
        A parsed experiment (schema, task tables and paths already checked).
    variants : iterable of Experiment
        The same experiment with the other algorithms ``compare`` runs: their models (e.g.
        FedMuscle's projector) are built too, and CoFED's and FedDF's same-task partners found.

    Raises
    ------
    ConfigError
        Naming the field: ``clients[i].model.kwargs``, ``datasets.<name>``, ``device``,
        ``simulation.num_gpus_per_client``, ``tracking.<tracker>`` (its extra is missing), ...
    """
    check_paths(experiment)
    check_machine(experiment)
    from fedmtl.tracking import check_trackers

    check_trackers(experiment)  # a tracker's missing extra, named
    check_models(experiment)
    for variant in variants:
        check_models(variant)
        check_partners(variant)  # CoFED and FedDF in a comparison need a same-task partner
    check_datasets(experiment)


def check_machine(experiment: Experiment) -> None:
    """``device`` and the simulation's CPU/GPU requests against this machine.

    With ``simulation.ray_address`` the requests are checked against the cluster when the
    simulation connects (:func:`fedmtl.cluster.check_cluster`), not against this machine.

    Raises
    ------
    ConfigError
        Naming ``device``, ``simulation.num_gpus_per_client`` or
        ``simulation.num_cpus_per_client``.
    """
    import torch

    cpus = os.cpu_count() or 1
    simulation = experiment.simulation
    if simulation.ray_address is not None:
        # The clients run on the cluster's nodes, not here: fedmtl.cluster checks its
        # resources once connected. What holds on any machine is checked here.
        if experiment.device.startswith("cuda") and simulation.num_gpus_per_client == 0:
            raise ConfigError(
                f"simulation.num_gpus_per_client: 0 hides the GPU from the simulated clients, "
                f"which device = {experiment.device!r} needs; set it > 0"
            )
        return
    if simulation.num_cpus_per_client > cpus:
        raise ConfigError(
            f"simulation.num_cpus_per_client: {simulation.num_cpus_per_client} exceeds the "
            f"{cpus} CPUs of this machine, so no client could be scheduled"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if simulation.num_gpus_per_client > 0 and gpus == 0:
        raise ConfigError(
            f"simulation.num_gpus_per_client: {simulation.num_gpus_per_client} GPU(s) per client "
            "requested but this machine has no CUDA device; set it to 0 to run on CPU"
        )
    device = experiment.device
    if device.startswith("cuda"):
        if gpus == 0:
            raise ConfigError(
                f"device: {device!r} requested but this machine has no CUDA device; "
                "use 'auto' or 'cpu'"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= gpus:
            raise ConfigError(f"device: {device!r} but this machine has {gpus} CUDA device(s)")
        if simulation.num_gpus_per_client == 0:
            raise ConfigError(
                f"simulation.num_gpus_per_client: 0 hides the GPU from the simulated clients, "
                f"which device = {device!r} needs; set it > 0 (e.g. 1 / clients per GPU)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but this machine has no MPS device")


def check_models(experiment: Experiment, *, read_files: bool = True) -> None:
    """Build every client's model on the meta device and run one meta batch through it.

    The meta device allocates nothing and ``pretrained`` weights are not read, so this is fast
    and downloads nothing, yet it fails exactly where the real build would: a keyword timm
    does not know (``img_sizee``), a backbone name timm lacks, an input size the ViT was not
    built for.

    Parameters
    ----------
    experiment : Experiment
        The experiment.
    read_files : bool
        Read what lives with the data: a local tokenizer folder, the files that give a
        ``text_classification`` task its number of classes. A deployed server has neither
        and passes False (two classes stand in; the hashing tokenizer for the folder).

    Raises
    ------
    ConfigError
        Naming ``clients[i].model.backbone`` or ``clients[i].model.kwargs``.
    """
    import torch

    from fedmtl.data import DATASET_REGISTRY
    from fedmtl.models.factory import build_tasks, init_model

    built: dict[str, str] = {}  # same architecture, same outcome: build it once
    for i, client in enumerate(experiment.clients):
        field = f"clients[{i}].model"
        dataset = experiment.datasets[client.dataset]
        source = DATASET_REGISTRY[dataset.kind]
        size = dataset.image_size or source.NATIVE_IMAGE_SIZE
        try:
            # reads the data when it sets the outputs (text_classification without classes)
            tasks = build_tasks(experiment, client, unknown_outputs=None if read_files else 2)
        except (FileNotFoundError, ValueError, KeyError, OSError, ImportError) as exc:
            text = str(exc).strip() or type(exc).__name__
            raise ConfigError(f"datasets.{client.dataset}: {text}") from None
        key = json.dumps(
            [client.model.model_dump(exclude={"pretrained"}), client.tasks, dataset.kind, size],
            sort_keys=True,
            default=str,
        )
        if key in built:
            if built[key]:
                raise ConfigError(f"{field}{built[key]}")
            continue
        offline = client.model.model_copy(update={"pretrained": None})
        if not read_files and "tokenizer" in offline.kwargs:
            kwargs = {k: v for k, v in offline.kwargs.items() if k != "tokenizer"}
            offline = offline.model_copy(update={"kwargs": kwargs})
        meta_client = client.model_copy(update={"model": offline})
        try:
            with torch.device("meta"):
                model = init_model(experiment, meta_client, tasks)
        except _BUILD_ERRORS as exc:
            where = ".backbone" if _unknown_backbone(exc) else ".kwargs"
            built[key] = (
                f"{where}: cannot build {client.model.backbone!r} with kwargs "
                f"{client.model.kwargs}: {first_line(exc)}"
            )
            raise ConfigError(f"{field}{built[key]}") from None
        if source.modality == "image" and size is not None:
            inputs = torch.empty(2, 3, size, size, device="meta")
            try:
                with torch.no_grad():
                    model(inputs)
            except _BUILD_ERRORS as exc:
                built[key] = (
                    f".kwargs: {client.model.backbone!r} with kwargs {client.model.kwargs} "
                    f"cannot read the {size}×{size} images of dataset {client.dataset!r} "
                    f"(datasets.{client.dataset}.image_size): {first_line(exc)}"
                )
                raise ConfigError(f"{field}{built[key]}") from None
        built[key] = ""


def _unknown_backbone(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "unknown model" in text or "unknown backbone" in text


def check_datasets(experiment: Experiment, data_root: str | None = None) -> None:
    """Open every dataset and read its index and first sample (of the tasks clients use).

    Parameters
    ----------
    experiment : Experiment
        The experiment.
    data_root : str, optional
        A SuperNode's ``data-dir``, replacing every root (the client's own check).

    Raises
    ------
    ConfigError
        Naming ``datasets.<name>`` and the missing or unreadable file.
    """
    from fedmtl.data import create_dataset

    for name, dataset in experiment.datasets.items():
        tasks = sorted({t for c in experiment.clients if c.dataset == name for t in c.tasks})
        root = data_root if data_root is not None and dataset.root is not None else dataset.root
        try:
            source = create_dataset(
                dataset.kind,
                Path(root).expanduser() if root is not None else None,
                image_size=dataset.image_size,
                seed=experiment.seed,
                **dataset.options,
            )
            source.check(tasks)
            if experiment.public is not None and experiment.public.dataset == name:
                _check_public_views(experiment, source)
        except (FileNotFoundError, ValueError, KeyError, OSError, ImportError) as exc:
            text = str(exc).strip() or type(exc).__name__
            raise ConfigError(f"datasets.{name}: {text}") from None


def _check_public_views(experiment: Experiment, source: DatasetSource) -> None:
    """Read the public dataset in every other modality its FedMuscle clients need.

    A public COCO set read by a text client needs ``captions_train2017.json`` beside the
    instances file: a missing one fails here, naming the file, not in the first round.
    """
    from fedmtl.data import DATASET_REGISTRY

    if experiment.algorithm.name not in PUBLIC_ALGORITHMS:
        return
    wanted = {
        DATASET_REGISTRY[experiment.datasets[c.dataset].kind].modality for c in experiment.clients
    }
    for modality in sorted(wanted - {source.modality}):
        view = source.counterpart(modality)
        view.public_pool()[0]  # the index and the first sample of what the public set draws
