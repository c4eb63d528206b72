"""Experiment file (TOML) schema: pydantic models whose errors name the offending field."""

from __future__ import annotations

import atexit
import contextlib
import re
import tomllib
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from fedmtl.catalog import ALGORITHM_NAMES, PUBLIC_ALGORITHMS, TEXT_BACKBONES, backbone_family


class ConfigError(ValueError):
    """An invalid experiment file; the message names the field (``clients[2].model.backbone``)."""


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- algorithms


class LocalConfig(Strict):
    """Local training only: nothing is exchanged (the Δ% reference)."""

    name: Literal["local"] = "local"
    shares: ClassVar[tuple[str, ...]] = ()


class FedAvgConfig(Strict):
    """FedAvg for heterogeneous clients (encoders by architecture, decoders by task)."""

    name: Literal["fedavg"] = "fedavg"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")


class FedProxConfig(Strict):
    """FedAvg plus the proximal term (mu/2)·‖w − w_global‖² on the shared tensors."""

    name: Literal["fedprox"] = "fedprox"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    mu: float = Field(0.01, ge=0)


class FedPerConfig(Strict):
    """Share the encoder only; decoders and heads stay personal."""

    name: Literal["fedper"] = "fedper"
    shares: ClassVar[tuple[str, ...]] = ("encoder",)


class DittoConfig(Strict):
    """FedAvg global model plus a personal model pulled toward it by (lam/2)·‖v − w‖²."""

    name: Literal["ditto"] = "ditto"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    lam: float = Field(0.1, ge=0)
    personal_epochs: int = Field(1, ge=1)


class FedAvgTaskConfig(Strict):
    """Per-task FedAvg: whole task models averaged inside each task group, nothing across groups.

    M-Fed's "traditional FL" baseline: a task group is a dataset's task among clients whose
    encoder, decoder and head of that task are equal; a multi-task client starts from the mean
    of its task groups' encoders (as in M-Fed's tier 1).
    """

    name: Literal["fedavg_task"] = "fedavg_task"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders", "heads")


class FedAMPConfig(Strict):
    """FedAMP: per-client cloud models by attention over parameter distance (Huang et al., 2021).

    ``u_i = ξ_ii·θ_i + Σ_{j≠i} ξ_ij·θ_j`` with ``ξ_ij = alpha_k·exp(−d̄²_ij/sigma)/sigma`` among
    architecture-equal groups, ``d̄²`` the squared distance *per parameter* (so ``sigma`` and
    ``alpha_k`` are per parameter too: no underflow for large models); clients add
    ``(lam/2)·‖θ_i − u_i‖²``, i.e. the paper's ``λ/(2α_k)`` with ``lam = λ/α_k`` ("Personalized
    Cross-Silo Federated Learning on Non-IID Data", AAAI 2021).
    """

    name: Literal["fedamp"] = "fedamp"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    lam: float = Field(1.0, ge=0)
    alpha_k: float = Field(1.0, gt=0)
    sigma: float = Field(1.0, gt=0)


class MaTFLConfig(Strict):
    """MaT-FL: encoders averaged inside clusters of their updates, decoders by task (Cai et al.).

    Agglomerative clustering (average linkage, cosine distance) of the encoder updates among
    equal encoders, cut into ``num_clusters`` clusters or at ``distance_threshold`` ("Many-Task
    Federated Learning: A New Problem Setting and A Simple Baseline", CVPR-W 2023).
    """

    name: Literal["matfl"] = "matfl"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    num_clusters: int | None = Field(2, ge=1)
    distance_threshold: float | None = Field(None, ge=0, le=2)  # cosine distance in [0, 2]

    @model_validator(mode="before")
    @classmethod
    def _threshold_replaces_count(cls, data: Any) -> Any:
        # A distance threshold alone means "cut by distance": the default count steps aside.
        if isinstance(data, dict) and data.get("distance_threshold") is not None:
            data = {"num_clusters": None, **data}
        return data

    @model_validator(mode="after")
    def _one_cut(self) -> MaTFLConfig:
        if self.num_clusters is not None and self.distance_threshold is not None:
            raise ValueError(
                "num_clusters and distance_threshold both set: the dendrogram is cut by one "
                "of them (omit num_clusters to cut at distance_threshold)"
            )
        if self.num_clusters is None and self.distance_threshold is None:
            raise ValueError("num_clusters: set it or distance_threshold")
        return self


class MFedConfig(Strict):
    """M-Fed: FedAvg in task groups, then an encoder-only average across groups.

    Clients are pulled toward the global encoder by ``λ_r·‖w_enc − g‖²``, with ``λ_r`` constant
    or growing as ``min(λ_max, λ_0·growth^(r−1))`` ("Multi-task Federated Learning with
    Encoder-Decoder Structure", arXiv 2504.09800).
    """

    name: Literal["mfed"] = "mfed"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders", "heads")
    lambda_schedule: Literal["exponential", "constant"] = "exponential"
    lambda_0: float = Field(1e-3, gt=0)
    growth: float = Field(1.2, gt=0)
    lambda_max: float = Field(1.0, gt=0)
    lambda_constant: float = Field(0.01, ge=0)
    threshold: float | None = Field(None, gt=0)  # negative-transfer switch (relative drop)
    patience: int = Field(1, ge=1)
    intra_task_weighting: Literal["data", "uniform"] = "data"
    inter_task_weighting: Literal["uniform", "data"] = "uniform"
    keep_local_encoder: bool = False


class FedHCA2Config(Strict):
    """FedHCA2: conflict-averse encoders, cross-attention decoders, learned hyper weights.

    Each client gets its own encoder and decoders: its update plus ``α``·(the conflict-averse
    encoder direction, CAGrad constant ``ca_c``) and ``β``·(the cross-attention decoder update),
    with ``α``, ``β`` learned by SGD (``hyper_*``) (Lu et al., "FedHCA²: Towards Hetero-Client
    Federated Multi-Task Learning", CVPR 2024, arXiv 2311.13250).
    """

    name: Literal["fedhca2"] = "fedhca2"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    ca_c: float = Field(0.4, ge=0)
    rescale: Literal[0, 1, 2] = 1
    hyper_lr: float = Field(0.01, gt=0)
    hyper_momentum: float = Field(0.9, ge=0, lt=1)
    hyper_weight_decay: float = Field(1e-4, ge=0)
    alpha_init: float = Field(0.1, ge=0, le=1)
    beta_init: float = Field(0.1, ge=0, le=1)
    # The server's two [N, d] encoder buffers (θ^last and the uploads) go to a memory-mapped
    # file in spill_dir (default: the system temp folder; put it on a disk, not a tmpfs) when
    # together they exceed this many MiB. None: always in RAM. Same arithmetic either way.
    memory_budget_mb: float | None = Field(None, gt=0)
    spill_dir: str | None = None


class FedMuscleConfig(Strict):
    """FedMuscle: contrastive alignment on a shared public dataset.

    Clients exchange representations of public samples, never weights; each minimises the
    Muscle loss against M peers (Setayesh et al., "Toward Enhancing Representation Learning in
    Federated Multi-Task Settings", ICLR 2026, arXiv 2602.01626).
    """

    name: Literal["fedmuscle"] = "fedmuscle"
    shares: ClassVar[tuple[str, ...]] = ()
    projector_dim: int = Field(128, ge=2)
    num_peers: int = Field(2, ge=1)
    tau: float = Field(0.2, gt=0)
    tau_prev: float = Field(0.15, gt=0)
    loss: Literal["muscle", "infonce", "gram"] = "muscle"
    protocol: Literal["peers", "targets", "gradient"] = "peers"
    schedule: Literal["batch", "epoch"] = "epoch"
    contrastive_epochs: int = Field(1, ge=1)
    contrastive_lr: float | None = Field(None, gt=0)
    # "stream": the batch schedule over fedmtl's own gRPC stream (fedmtl.stream), one
    # exchange per public batch in milliseconds instead of a Flower round-trip in seconds.
    channel: Literal["flower", "stream"] = "flower"
    stream_port: int = Field(9100, ge=0, le=65535)  # 0: any free port; run config may override
    batch_deadline: float = Field(30.0, gt=0)  # seconds a step waits for representations
    connect_deadline: float = Field(120.0, gt=0)  # step 0: ClientApps start and connect

    @model_validator(mode="after")
    def _stream_needs_batch_schedule(self) -> FedMuscleConfig:
        if self.channel == "stream" and self.schedule != "batch":
            raise ValueError(
                "channel 'stream' carries the per-batch schedule: set schedule = \"batch\" "
                f"(got {self.schedule!r}; the epoch schedule needs no stream)"
            )
        return self


class PseudoLabelConfig(Strict):
    """Local pseudo-labelling of the public set (Lee, 2013); nothing is exchanged.

    After each round's local epochs the client labels public batches with its own model and
    trains ``public_epochs`` passes on the confident ones: a class (or pixel) is kept when its
    probability is at least ``threshold``; regression tasks (depth, normals) get none.
    """

    name: Literal["pseudolabel"] = "pseudolabel"
    shares: ClassVar[tuple[str, ...]] = ()
    threshold: float = Field(0.9, ge=0, lt=1)
    public_weight: float = Field(1.0, gt=0)
    public_epochs: int = Field(1, ge=1)


class SimCLRConfig(Strict):
    """Local SimCLR pretraining on the public set, then the tasks; nothing is exchanged.

    In each of the first ``pretrain_rounds`` rounds the client runs ``contrastive_epochs``
    passes of NT-Xent (temperature ``tau``) on two augmentations of every public batch, over
    its encoder and projector, before its local epochs (Chen et al., ICML 2020).
    """

    name: Literal["simclr"] = "simclr"
    shares: ClassVar[tuple[str, ...]] = ()
    projector_dim: int = Field(128, ge=2)
    tau: float = Field(0.5, gt=0)
    pretrain_rounds: int = Field(1, ge=1)
    contrastive_epochs: int = Field(2, ge=1)
    contrastive_lr: float | None = Field(None, gt=0)


class FedHeNNConfig(Strict):
    """FedHeNN: a global kernel of public-set representations; no weights are exchanged.

    Clients send the linear kernel of their representations of a public batch, the server
    averages the kernels, and each client adds ``eta·(1 − CKA(K_local, K_global))`` to its task
    loss (Makhija et al., "Architecture Agnostic Federated Learning for Neural Networks",
    ICML 2022).
    """

    name: Literal["fedhenn"] = "fedhenn"
    shares: ClassVar[tuple[str, ...]] = ()
    eta: float = Field(1.0, ge=0)


class CoFEDConfig(Strict):
    """CoFED: predictions on the public set up, per-task majority votes down (Cao et al., 2022).

    Clients of one dataset classification task upload their predicted class of every public
    sample; the server keeps a sample's majority class when more than ``min_agreement`` of the
    votes agree and sends those pseudo-labels back; each client then trains ``public_epochs``
    passes on them after its private epochs ("CoFED: Cross-silo Heterogeneous Federated
    Multi-task Learning via Co-training", arXiv 2202.08603).
    """

    name: Literal["cofed"] = "cofed"
    shares: ClassVar[tuple[str, ...]] = ()
    min_agreement: float = Field(0.5, ge=0, lt=1)
    public_weight: float = Field(1.0, gt=0)
    public_epochs: int = Field(1, ge=1)


class FedRCLConfig(Strict):
    """FedRCL: FedAvg plus a local relaxed supervised contrastive loss (Seo et al., CVPR 2024).

    Encoders and decoders are averaged as FedAvg's (among equal architectures and tasks); each
    client adds ``weight·(SCL + beta·penalty)`` on its pooled encoder features and the labels of
    its first classification task: SCL with the hardest positive and ``topk_neg`` hardest
    negatives at temperature ``tau``, and a divergence penalty on same-class pairs more
    similar than ``threshold`` ("Relaxed Contrastive Learning for Federated Learning").
    """

    name: Literal["fedrcl"] = "fedrcl"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    tau: float = Field(0.05, gt=0)
    threshold: float = Field(0.7, ge=-1, le=1)
    topk_neg: int = Field(2, ge=1)
    beta: float = Field(1.0, ge=0)
    weight: float = Field(1.0, ge=0)


class FedDFConfig(Strict):
    """FedDF: FedAvg per architecture prototype, then ensemble distillation on the public set.

    Groups are averaged as FedAvg's (encoders among equal architectures, decoders among equal
    ones of the same dataset task; heads personal); the ensemble target of a classification
    task is the mean of its clients' logits on the public set, distilled into each prototype
    for ``distill_epochs`` passes with temperature ``temperature`` (Lin et al., "Ensemble
    Distillation for Robust Model Fusion in Federated Learning", NeurIPS 2020).
    """

    name: Literal["feddf"] = "feddf"
    shares: ClassVar[tuple[str, ...]] = ("encoder", "decoders")
    temperature: float = Field(1.0, gt=0)
    distill_epochs: int = Field(1, ge=1)
    distill_lr: float | None = Field(None, gt=0)


AlgorithmConfig = Annotated[
    LocalConfig
    | FedAvgConfig
    | FedProxConfig
    | FedPerConfig
    | DittoConfig
    | FedAvgTaskConfig
    | FedAMPConfig
    | MaTFLConfig
    | MFedConfig
    | FedHCA2Config
    | FedMuscleConfig
    | PseudoLabelConfig
    | SimCLRConfig
    | FedHeNNConfig
    | CoFEDConfig
    | FedRCLConfig
    | FedDFConfig,
    Field(discriminator="name"),
]


# --------------------------------------------------------------------------- data and models


class PartitionConfig(Strict):
    """How a dataset's train split is divided among the clients that use it."""

    scheme: Literal["iid", "dirichlet", "sizes"] = "iid"
    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(8, ge=1)


class DatasetConfig(Strict):
    """A dataset the federation uses (``[datasets.<name>]``)."""

    kind: str
    root: str | None = None
    image_size: int | None = Field(None, ge=8)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Strict):
    """A client's network: backbone (timm name or bert/distilbert) plus decoders per task."""

    backbone: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None
    decoder_channels: int = Field(64, ge=1)
    decoder_hidden: int = Field(128, ge=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        backbone_family(value)  # raises ValueError listing the supported names
        return value


class TrainingConfig(Strict):
    """Local-training settings; ``[defaults]`` fills what a client leaves out."""

    local_epochs: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)
    max_batches: int | None = Field(None, ge=1)


class ClientConfig(Strict):
    """One client of the federation (``[[clients]]``).

    A ``[[clients]]`` block with ``count = n`` is a *client group*: ``n`` clients from one
    template, named ``<client_id>-000`` … (see :func:`expand_client_groups`). The group is
    expanded before validation, so every member is an ordinary ``ClientConfig``.
    """

    client_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    dataset: str
    tasks: list[str] = Field(min_length=1)
    model: ModelConfig
    samples: int | None = Field(None, ge=1)  # train examples (cap, or the size under "sizes")
    test_samples: int | None = Field(None, ge=1)  # cap on the local test split
    training: TrainingConfig


class PublicDatasetConfig(Strict):
    """The public dataset FedMuscle clients represent (``[public]``)."""

    dataset: str
    size: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=2)


# What ray.init(address=...) accepts for a running cluster: "auto", host:port, ray://host:port.
_RAY_ADDRESS = re.compile(r"^(auto|(ray://)?([A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5}))$")


def check_ray_address(value: str) -> str:
    """``value`` if Ray can connect to it: ``auto``, ``host:port`` or ``ray://host:port``.

    Raises
    ------
    ValueError
        For anything else (``local`` included: a private instance is the default, no address).
    """
    match = _RAY_ADDRESS.match(value)
    if match is None or (match.group(4) is not None and not 0 < int(match.group(4)) < 65536):
        raise ValueError(
            f"{value!r} is not the address of a Ray cluster: use 'auto' (the cluster `ray start` "
            "started on this machine), 'host:port' or 'ray://host:port'; leave it out for a "
            "private Ray instance"
        )
    return value


class SimulationConfig(Strict):
    """Flower simulation-engine resources per client, and the Ray cluster to run on.

    ``ray_address``: an existing Ray cluster (``auto``, ``host:port``, ``ray://host:port``);
    fedmtl connects to it and neither starts nor stops Ray. Unset: a private Ray instance on
    this machine. ``state_root``: where the clients keep personal state, as
    ``<state_root>/<experiment>/<run folder name>/<client_id>``; on a multi-node cluster a
    path every node mounts. Unset: ``<run folder>/clients``.
    """

    num_cpus_per_client: int = Field(1, ge=1)
    num_gpus_per_client: float = Field(0.0, ge=0)
    ray_address: str | None = None
    state_root: str | None = Field(None, min_length=1)

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        return None if value is None else check_ray_address(value)


# --------------------------------------------------------------------------- tracking


class TensorBoardConfig(Strict):
    """TensorBoard event files under ``<run folder>/tensorboard`` (``fedmtl[tensorboard]``)."""


class MLflowConfig(Strict):
    """One MLflow run per fedmtl run (extra ``fedmtl[mlflow]``)."""

    # None: a SQLite store beside the runs, sqlite:///<output_dir>/mlflow.db
    uri: str | None = Field(None, min_length=1)
    experiment: str | None = Field(None, min_length=1)  # None: the experiment's name


class WandbConfig(Strict):
    """One Weights & Biases run per fedmtl run (extra ``fedmtl[wandb]``)."""

    project: str = Field("fedmtl", min_length=1)
    entity: str | None = Field(None, min_length=1)
    group: str | None = Field(None, min_length=1)  # None: the experiment's name
    # auto: online when logged in (WANDB_API_KEY, or `wandb login`'s netrc entry), else offline
    mode: Literal["auto", "offline", "online"] = "auto"


TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")


class TrackingConfig(Strict):
    """``[tracking]``: experiment trackers fed from the same rows as metrics.jsonl.

    Each tracker is ``true``/``false`` or a table of its options (a table turns it on):
    ``tensorboard = true``, ``[tracking.mlflow] uri = "http://host:5000"``.
    """

    tensorboard: TensorBoardConfig | None = None
    mlflow: MLflowConfig | None = None
    wandb: WandbConfig | None = None

    @field_validator("tensorboard", "mlflow", "wandb", mode="before")
    @classmethod
    def _switch_or_table(cls, value: Any) -> Any:
        # `true` turns a tracker on with its defaults; a table sets options (and turns it on).
        if value is True:
            return {}
        if value is False or value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"must be true, false or a table of options, got {value!r}")
        return value

    def enabled(self) -> list[str]:
        """Names of the trackers turned on, in :data:`TRACKER_NAMES` order."""
        return [name for name in TRACKER_NAMES if getattr(self, name) is not None]


class StateConfig(Strict):
    """Clients' personal state between rounds (``[state]``).

    ``dtype``: floating tensors are stored in it and restored to their own dtype on load;
    ``bfloat16``/``float16`` halve the disk a run needs but round the state every round, so
    the default keeps float32 (bit-exact resumes, metrics unchanged). ``keep``: leave
    ``<run>/clients/`` in place after a finished simulation (by default it is deleted, after
    its size is recorded in ``summary.json``).
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    keep: bool = False


class Experiment(Strict):
    """The whole experiment file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: int = 0
    rounds: int = Field(3, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    output_dir: str = "runs"
    evaluate_every: int = Field(1, ge=1)
    # A run's reported metric is the mean of its last k evaluated rounds (one round is noisy).
    average_last_rounds: int = Field(3, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    # At most this many messages of a phase in flight (built as replies come back), so the
    # server holds that many downlink copies of the model, not one per client. None: all at
    # once (every client can work in parallel; the server holds k copies).
    messages_in_flight: int | None = Field(None, ge=1)
    algorithm: AlgorithmConfig = FedAvgConfig()
    # Per-algorithm hyper-parameters used when --algorithm / compare selects that algorithm.
    hyperparameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    public: PublicDatasetConfig | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    datasets: dict[str, DatasetConfig]
    clients: list[ClientConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        """Merge ``[defaults]`` into every client's ``training`` section."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        defaults = data.pop("defaults", {}) or {}
        if not isinstance(defaults, dict):
            raise ValueError("[defaults] must be a table")
        clients = data.get("clients")
        if isinstance(clients, list):
            clients, _ = expand_client_groups(clients)
            merged = []
            for client in clients:
                if isinstance(client, dict):
                    client = dict(client)
                    own = client.get("training", {})
                    if not isinstance(own, dict):
                        raise ValueError("clients[].training must be a table")
                    client["training"] = {**defaults, **own}
                merged.append(client)
            data["clients"] = merged
        return data

    @model_validator(mode="after")
    def _cross_check(self) -> Experiment:
        ids = [c.client_id for c in self.clients]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"clients: duplicate client_id {dupes}")
        if self.clients_per_round is not None and self.clients_per_round > len(self.clients):
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds the "
                f"{len(self.clients)} clients"
            )
        for i, client in enumerate(self.clients):
            if client.dataset not in self.datasets:
                raise ValueError(
                    f"clients[{i}].dataset: {client.dataset!r} is not declared under [datasets] "
                    f"(declared: {sorted(self.datasets)})"
                )
            if len(set(client.tasks)) != len(client.tasks):
                raise ValueError(f"clients[{i}].tasks: duplicate task in {client.tasks}")
        unknown = sorted(set(self.hyperparameters) - set(ALGORITHM_NAMES))
        if unknown:
            raise ValueError(f"hyperparameters: unknown algorithm {unknown}")
        for name, values in self.hyperparameters.items():
            _check_hyperparameters(name, values)
        if self.public is not None and self.public.dataset not in self.datasets:
            raise ValueError(f"public.dataset: {self.public.dataset!r} is not declared")
        if self.algorithm.name in PUBLIC_ALGORITHMS and self.public is None:
            raise ValueError(
                f"public: {self.algorithm.name} needs a [public] dataset section (its clients "
                "read the public set)"
            )
        algorithm = self.algorithm
        if (
            isinstance(algorithm, FedMuscleConfig)
            and algorithm.channel == "stream"
            and self.messages_in_flight is not None
            and self.messages_in_flight < len(self.clients)
        ):
            raise ValueError(
                f"messages_in_flight: FedMuscle's stream needs every client in its handler at "
                f"once, so at least {len(self.clients)} messages in flight (or unset)"
            )
        return self

    # -- convenience -------------------------------------------------------------------

    def client(self, client_id: str) -> ClientConfig:
        """The client named ``client_id``."""
        for client in self.clients:
            if client.client_id == client_id:
                return client
        raise KeyError(f"no client {client_id!r} in experiment {self.name!r}")

    def client_index(self, client_id: str) -> int:
        """Position of ``client_id`` in the file (its simulation partition-id)."""
        return [c.client_id for c in self.clients].index(client_id)

    def dataset_members(self, dataset: str) -> list[str]:
        """Client ids that draw from ``dataset``, in file order (their partition order)."""
        return [c.client_id for c in self.clients if c.dataset == dataset]

    def iter_tasks(self) -> Iterator[tuple[str, str]]:
        """Yield ``(client_id, task)`` for every task of every client."""
        for client in self.clients:
            for task in client.tasks:
                yield client.client_id, task


# Keys of a client-group block that are not ClientConfig fields.
GROUP_KEYS = ("count", "overrides")
# Sections of a client entry an override merges into key by key (the rest it replaces).
_MERGED_SECTIONS = ("model", "training")


def member_id(group_id: str, index: int, count: int) -> str:
    """The id of member ``index`` of a group of ``count`` clients (``worker-007``).

    Zero-padded to at least three digits, wider when ``count`` needs it, so ids sort in
    member order.
    """
    width = max(3, len(str(count - 1)))
    return f"{group_id}-{index:0{width}d}"


def expand_client_groups(entries: list[Any]) -> tuple[list[Any], list[str]]:
    """Expand client groups (``count = n``) into their members, in file order.

    A group block is a client template plus ``count`` (1 ≤ n) and optionally ``overrides``,
    a table from member id to the fields that member changes; ``model`` and ``training``
    merge key by key, anything else replaces the template's value. A member is then validated
    exactly as a single client, and takes its partition of its dataset in file order, as a
    single client at that position would.

    Parameters
    ----------
    entries : list
        The ``[[clients]]`` entries as parsed from TOML.

    Returns
    -------
    clients : list
        The entries with every group replaced by its members.
    origins : list of str
        For each returned client, where it comes from in the file: ``clients[i]`` for a
        single client, ``clients[i] (member worker-007)`` for a group member; error messages
        name the file's entry this way.

    Raises
    ------
    ValueError
        Naming the group's field (``clients[1].count``, ``clients[1].overrides``).
    """
    clients: list[Any] = []
    origins: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not any(key in entry for key in GROUP_KEYS):
            clients.append(entry)
            origins.append(f"clients[{i}]")
            continue
        count = entry.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"clients[{i}].count: must be an integer >= 1 (got {count!r})")
        group_id = entry.get("client_id")
        if not isinstance(group_id, str):
            raise ValueError(f"clients[{i}].client_id: a client group needs a string id")
        overrides = entry.get("overrides", {})
        if not isinstance(overrides, dict):
            raise ValueError(f"clients[{i}].overrides: must be a table of member id → fields")
        ids = [member_id(group_id, k, count) for k in range(count)]
        unknown = sorted(set(overrides) - set(ids))
        if unknown:
            raise ValueError(
                f"clients[{i}].overrides: {unknown} are not members of group {group_id!r} "
                f"(its members are {ids[0]} … {ids[-1]})"
            )
        template = {k: v for k, v in entry.items() if k not in GROUP_KEYS}
        for member in ids:
            own = overrides.get(member, {})
            if not isinstance(own, dict):
                raise ValueError(f"clients[{i}].overrides.{member}: must be a table")
            fixed = sorted(set(own) & {"client_id", *GROUP_KEYS})
            if fixed:
                raise ValueError(f"clients[{i}].overrides.{member}: cannot set {fixed}")
            client = {**template, **own, "client_id": member}
            for section in _MERGED_SECTIONS:
                base, change = template.get(section), own.get(section)
                if isinstance(base, dict) and isinstance(change, dict):
                    client[section] = {**base, **change}
            clients.append(client)
            origins.append(f"clients[{i}] (member {member})")
    return clients, origins


def _relabel_clients(message: str, origins: list[str]) -> str:
    """Replace expanded indices (``clients[37]``) by the file's entry, when groups moved them."""

    def label(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return origins[index] if index < len(origins) else match.group(0)

    return re.sub(r"clients\[(\d+)\]", label, message)


_ALGORITHM_ADAPTER: TypeAdapter[Any] = TypeAdapter(AlgorithmConfig)


def _check_hyperparameters(name: str, values: dict[str, Any]) -> None:
    """Validate ``[hyperparameters.<name>]`` as the algorithm section it becomes.

    ``compare`` and ``--algorithm`` turn the table into ``[algorithm]`` only when they select
    the algorithm; checking every table up front means a typo (``muu``) is refused before the
    first run starts, not after the algorithms listed before it have run.
    """
    if "name" in values and values["name"] != name:
        raise ValueError(f"hyperparameters.{name}.name: must be {name!r} or absent")
    try:
        _ALGORITHM_ADAPTER.validate_python({**values, "name": name})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            # drop pydantic's discriminator tag (the algorithm name) from the location
            loc = [part for part in err["loc"] if part != name]
            where = ".".join(str(part) for part in loc)
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"hyperparameters.{name}{'.' + where if where else ''}: {message}")
        raise ValueError("; ".join(problems)) from None


def _error_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``field: problem`` line per error of a pydantic validation."""
    return [
        f"{prefix}{_format_location(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()
    ]


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            # pydantic puts the discriminator value in the path ("algorithm.fedprox.mu")
            out += f".{part}"
    return out or "<root>"


def parse_experiment(
    data: dict[str, Any], *, check_data: bool = True, check_files: bool = True
) -> Experiment:
    """Validate a parsed experiment mapping.

    Parameters
    ----------
    data : dict
        The TOML document as a mapping.
    check_data : bool
        Also check dataset kinds and options, task names against each dataset's task table,
        task/backbone modality, the views FedMuscle's public dataset must offer and the
        partition sizes (needs ``fedmtl.data``).
    check_files : bool
        With ``check_data``, also check that dataset roots and local ``pretrained`` paths
        exist. A deployed server passes ``False``: only the clients read those paths.

    Raises
    ------
    ConfigError
        Naming the offending field, e.g. ``clients[1].tasks: unknown task 'dpeth'``.
    """
    origins = _client_origins(data)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        message = "invalid experiment file:\n  " + "\n  ".join(_error_lines(exc))
        raise ConfigError(_relabel_clients(message, origins)) from None
    if check_data:
        try:
            _check_data(experiment, check_files=check_files)
            if check_files:
                check_paths(experiment)
        except ConfigError as exc:
            raise ConfigError(_relabel_clients(str(exc), origins)) from None
    return experiment


def _client_origins(data: Any) -> list[str]:
    """Each validated client's entry in the file (see :func:`expand_client_groups`)."""
    clients = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(clients, list):
        return []
    try:
        return expand_client_groups(clients)[1]
    except ValueError:
        return []  # validation reports the group's own error


def _check_data(experiment: Experiment, *, check_files: bool) -> None:
    """Checks that need the dataset registry (and, with ``check_files``, the dataset roots)."""
    from fedmtl.data import DATASET_REGISTRY, dataset_task_table
    from fedmtl.data.base import accepted_options

    for name, dataset in experiment.datasets.items():
        field = f"datasets.{name}"
        if dataset.kind not in DATASET_REGISTRY:
            raise ConfigError(
                f"{field}.kind: unknown dataset kind {dataset.kind!r}; "
                f"known: {sorted(DATASET_REGISTRY)}"
            )
        cls = DATASET_REGISTRY[dataset.kind]
        if cls.requires_root and dataset.root is None:
            raise ConfigError(f"{field}.root: dataset kind {dataset.kind!r} needs a root path")
        if not cls.requires_root and dataset.root is not None:
            raise ConfigError(
                f"{field}.root: dataset kind {dataset.kind!r} is bundled and takes no root"
            )
        if check_files and dataset.root is not None:
            if not Path(dataset.root).expanduser().exists():
                raise ConfigError(f"{field}.root: path does not exist: {dataset.root}")
        accepted = accepted_options(cls)
        for key in dataset.options:
            if key not in accepted:
                raise ConfigError(
                    f"{field}.options.{key}: unknown option of dataset kind {dataset.kind!r}; "
                    f"accepted: {accepted}"
                )
    for i, client in enumerate(experiment.clients):
        dataset = experiment.datasets[client.dataset]
        table = dataset_task_table(dataset.kind, **dataset.options)
        for task in client.tasks:
            if task not in table:
                raise ConfigError(
                    f"clients[{i}].tasks: unknown task {task!r} for dataset {client.dataset!r} "
                    f"(kind {dataset.kind!r}; it offers {sorted(table)})"
                )
        _check_client_modality(i, client, dataset)
    _check_public_views(experiment)
    check_partners(experiment)
    partitions: dict[str, list[ClientConfig]] = {}
    for client in experiment.clients:
        partitions.setdefault(client.dataset, []).append(client)
    for name, members in partitions.items():
        scheme = experiment.datasets[name].partition.scheme
        sized = [c.samples is not None for c in members]
        if scheme == "sizes" and not all(sized):
            missing = [c.client_id for c in members if c.samples is None]
            raise ConfigError(
                f"datasets.{name}.partition.scheme: 'sizes' needs clients[].samples for {missing}"
            )


CLASS_KINDS = ("classification", "text_classification")
# Algorithms that exchange something per classification task among the clients holding it.
PARTNER_ALGORITHMS = ("cofed", "feddf")


def partnered_class_tasks(experiment: Experiment, client_id: str) -> list[str]:
    """The client's classification tasks another client of its dataset holds, in task order.

    CoFED votes and FedDF distils on these (a task no other client holds has no ensemble).
    Classification means a ``classification`` or ``text_classification`` kind in the
    dataset's (static) task table.
    """
    from fedmtl.data import dataset_task_table

    client = next(c for c in experiment.clients if c.client_id == client_id)
    dataset = experiment.datasets[client.dataset]
    table = dataset_task_table(dataset.kind, **dataset.options)
    out = []
    for task in client.tasks:
        if table[task].kind not in CLASS_KINDS:
            continue
        holders = [c for c in experiment.clients if c.dataset == client.dataset and task in c.tasks]
        if len(holders) >= 2:
            out.append(task)
    return out


def task_group(experiment: Experiment, client_id: str, task: str) -> str:
    """The clients whose ``task`` is one task: those of one dataset (``<dataset>/<task>``)."""
    client = next(c for c in experiment.clients if c.client_id == client_id)
    return f"{client.dataset}/{task}"


def check_partners(experiment: Experiment) -> None:
    """CoFED and FedDF need at least one classification task that two clients hold.

    Raises
    ------
    ConfigError
        Naming every client and its tasks, when none has such a partner.
    """
    name = experiment.algorithm.name
    if name not in PARTNER_ALGORITHMS:
        return
    if any(partnered_class_tasks(experiment, c.client_id) for c in experiment.clients):
        return
    alone = ", ".join(
        f"{c.client_id} ({c.dataset}: {', '.join(c.tasks)})" for c in experiment.clients
    )
    raise ConfigError(
        f"algorithm.name: {name} needs two clients of one dataset sharing a classification "
        f"task, and no client has such a partner: {alone}"
    )


def _check_client_modality(index: int, client: ClientConfig, dataset: DatasetConfig) -> None:
    """A client's encoder must read its dataset's inputs: a text backbone needs a text dataset.

    The message names the client, the dataset and, when the dataset has a view in the
    encoder's modality (COCO's captions), the dataset kind that reads it.
    """
    from fedmtl.data import DATASET_REGISTRY

    source = DATASET_REGISTRY[dataset.kind]
    wanted = "text" if client.model.backbone in TEXT_BACKBONES else "image"
    if source.modality == wanted:
        return
    other = source.VIEW_KINDS.get(wanted)
    if other is not None:
        advice = (
            f"its {wanted} view is dataset kind {other!r}: add a [datasets.<name>] with "
            f"kind = {other!r} (same root) and point the client at it"
        )
    else:
        advice = (
            f"it has no {wanted} view; give the client a {wanted} dataset or a "
            f"{source.modality} backbone"
        )
    raise ConfigError(
        f"clients[{index}].dataset: client {client.client_id!r} has the {wanted} backbone "
        f"{client.model.backbone!r}, but dataset {client.dataset!r} (kind {dataset.kind!r}) "
        f"holds {source.modality} inputs; {advice}"
    )


def _check_public_views(experiment: Experiment) -> None:
    """Public-set clients read the public dataset in their own modality: it needs that view."""
    from fedmtl.data import DATASET_REGISTRY

    public = experiment.public
    if public is None or experiment.algorithm.name not in PUBLIC_ALGORITHMS:
        return
    source = DATASET_REGISTRY[experiment.datasets[public.dataset].kind]
    views = source.views()
    for i, client in enumerate(experiment.clients):
        modality = DATASET_REGISTRY[experiment.datasets[client.dataset].kind].modality
        if modality not in views:
            raise ConfigError(
                f"clients[{i}].dataset: client {client.client_id!r} reads {modality} but the "
                f"public dataset {public.dataset!r} (kind {source.kind!r}) offers only "
                f"{list(views)} views; use a public dataset with a {modality} view "
                "(e.g. kind 'quickstart', or 'coco_multilabel' with its captions) or drop the "
                "client"
            )


def check_paths(experiment: Experiment) -> None:
    """Dataset roots, local ``pretrained`` paths and tokenizer folders exist on this machine.

    Only the machines that read them need this: the simulating machine, or each client
    machine (with its ``data-dir``); a deployed server reads neither.

    Raises
    ------
    ConfigError
        Naming ``datasets.<name>.root``, ``clients[i].model.pretrained`` or
        ``clients[i].model.kwargs.tokenizer``.
    """
    for name, dataset in experiment.datasets.items():
        if dataset.root is not None and not Path(dataset.root).expanduser().exists():
            raise ConfigError(f"datasets.{name}.root: path does not exist: {dataset.root}")
    for i, client in enumerate(experiment.clients):
        pretrained = client.model.pretrained
        if pretrained not in (None, "hub") and not Path(pretrained).expanduser().exists():
            raise ConfigError(
                f"clients[{i}].model.pretrained: weights path does not exist: {pretrained}"
            )
        tokenizer = client.model.kwargs.get("tokenizer")
        if client.model.backbone in TEXT_BACKBONES and isinstance(tokenizer, str):
            if not Path(tokenizer).expanduser().is_dir():
                raise ConfigError(
                    f"clients[{i}].model.kwargs.tokenizer: not a directory: {tokenizer} "
                    "(a tokenizer saved with save_pretrained: vocab.txt or tokenizer.json)"
                )


# --------------------------------------------------------------------------- bundled files

# Bundled files a zipped installation had to extract to disk; removed when the process exits.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _bundled_root() -> Traversable | None:
    """The folder of bundled experiment files, or None when this installation has none.

    A wheel carries the repository's top-level ``configs/`` as ``fedmtl/configs``
    (``[tool.setuptools.package-dir]`` in pyproject.toml). A source checkout, on ``PYTHONPATH``
    or installed in editable mode, has no ``fedmtl/configs``: its bundled files are the
    checkout's own ``configs/``, so an edit there is what ``fedmtl simulate quickstart`` runs.
    """
    packaged = resources.files("fedmtl") / "configs"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent
    # pyproject.toml marks a checkout: a bare configs/ beside an installed package (in
    # site-packages) would belong to some other distribution.
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def bundled_configs() -> list[str]:
    """Names of the experiment files shipped with fedmtl, sorted (``quickstart``, ``mfed``, ...).

    Each name is accepted wherever an experiment file is (see :func:`resolve_experiment`).
    """
    root = _bundled_root()
    if root is None:
        return []
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in root.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    )


def resolve_experiment(value: str | Path) -> Path:
    """The experiment file an argument names: an existing file, else a bundled config.

    Parameters
    ----------
    value : str or Path
        A path to a TOML file, or the name of a bundled config with or without ``.toml``
        (``quickstart``, ``mfed.toml``; see :func:`bundled_configs`).

    Returns
    -------
    Path
        ``value`` itself when it is an existing file (so a local ``quickstart.toml`` shadows
        the bundled one), else the bundled file of that name.

    Raises
    ------
    ConfigError
        If ``value`` is neither an existing file nor a bundled name; the message lists the
        bundled names.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    text = str(value)
    root = _bundled_root()
    # Only a bare name is looked up: configs/quickstart.toml is a path, and a missing path is
    # an error rather than silently another file.
    if root is not None and text and Path(text).name == text:
        entry = root / (text if text.endswith(".toml") else f"{text}.toml")
        if entry.is_file():
            if isinstance(entry, Path):
                return entry
            return _extracted.enter_context(resources.as_file(entry))
    names = bundled_configs()
    hint = f"; bundled: {', '.join(names)}" if names else "; this installation bundles none"
    if path.stem in names and path.name != text:
        hint += f" (for the bundled copy, pass its name: {path.stem})"
    raise ConfigError(f"experiment file not found: {text} (not a file nor a bundled name{hint})")


def load_experiment(
    path: str | Path, *, check_data: bool = True, check_files: bool = True
) -> Experiment:
    """Read and validate an experiment file (see :func:`parse_experiment` for the flags).

    Raises
    ------
    ConfigError
        If the file is missing, is not valid TOML, or fails validation; the message names the
        file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_experiment(data, check_data=check_data, check_files=check_files)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_algorithm(experiment: Experiment, name: str) -> Experiment:
    """The experiment running algorithm ``name`` with its ``[hyperparameters.<name>]``.

    Raises
    ------
    ConfigError
        If that section does not fit the algorithm (an unknown or mistyped key).
    """
    data = experiment.model_dump(mode="json")
    data["algorithm"] = {"name": name, **experiment.hyperparameters.get(name, {})}
    return parse_experiment(data, check_data=False)


def experiment_to_json(experiment: Experiment) -> str:
    """Serialise the resolved experiment (sent to clients, saved beside results)."""
    return experiment.model_dump_json()


def experiment_from_json(text: str) -> Experiment:
    """Inverse of :func:`experiment_to_json` (no data checks: clients check their own data)."""
    return Experiment.model_validate_json(text)


def with_tracking(
    experiment: Experiment,
    trackers: list[str] | tuple[str, ...] = (),
    *,
    mlflow_uri: str | None = None,
    wandb_mode: str | None = None,
) -> Experiment:
    """The experiment with the trackers the CLI flags turn on, on top of its ``[tracking]``.

    Parameters
    ----------
    experiment : Experiment
        The parsed experiment.
    trackers : sequence of str
        Names from ``--track`` (each in :data:`TRACKER_NAMES`); a tracker the file already
        configures keeps its options.
    mlflow_uri : str, optional
        ``--mlflow-uri``: the MLflow tracking URI (turns MLflow on).
    wandb_mode : str, optional
        ``--wandb-mode``: ``auto``, ``offline`` or ``online`` (turns W&B on).

    Raises
    ------
    ConfigError
        Naming the flag: an unknown tracker or a bad option value.
    """
    unknown = [name for name in trackers if name not in TRACKER_NAMES]
    if unknown:
        raise ConfigError(f"--track: unknown tracker {unknown}; known: {list(TRACKER_NAMES)}")
    data = experiment.tracking.model_dump(mode="json")
    for name in trackers:
        data[name] = data.get(name) or {}
    if mlflow_uri is not None:
        data["mlflow"] = {**(data.get("mlflow") or {}), "uri": mlflow_uri}
    if wandb_mode is not None:
        data["wandb"] = {**(data.get("wandb") or {}), "mode": wandb_mode}
    try:
        tracking = TrackingConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_error_lines(exc, prefix="tracking."))) from None
    return experiment.model_copy(update={"tracking": tracking})
