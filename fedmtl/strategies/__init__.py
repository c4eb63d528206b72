"""Server-side round loops, one module per algorithm, on a shared base loop."""

from fedmtl.strategies import (
    baselines,  # noqa: F401  (registers the baseline strategies)
    cofed,  # noqa: F401  (registers CoFED)
    fedamp,  # noqa: F401  (registers FedAMP)
    fedavg_task,  # noqa: F401  (registers per-task FedAvg)
    feddf,  # noqa: F401  (registers FedDF)
    fedhca2,  # noqa: F401  (registers FedHCA²)
    fedhenn,  # noqa: F401  (registers FedHeNN)
    fedmuscle,  # noqa: F401  (registers FedMuscle)
    matfl,  # noqa: F401  (registers MaT-FL)
    mfed,  # noqa: F401  (registers M-Fed)
)
from fedmtl.strategies.base import STRATEGIES, ClientInfo, Reply, Strategy, create_strategy
from fedmtl.strategies.loop import FederatedLoop

__all__ = ["STRATEGIES", "ClientInfo", "FederatedLoop", "Reply", "Strategy", "create_strategy"]
