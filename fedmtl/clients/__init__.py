"""Client-side handlers: local training, evaluation, personal state, per-algorithm behaviour."""

from fedmtl.clients import (
    baselines,  # noqa: F401  (registers the baseline client algorithms)
    cofed,  # noqa: F401  (registers the CoFED client)
    fedamp,  # noqa: F401  (registers the FedAMP client)
    feddf,  # noqa: F401  (registers the FedDF client)
    fedhca2,  # noqa: F401  (registers the FedHCA² client)
    fedhenn,  # noqa: F401  (registers the FedHeNN client)
    fedmuscle,  # noqa: F401  (registers the FedMuscle client)
    fedrcl,  # noqa: F401  (registers the FedRCL client)
    matfl,  # noqa: F401  (registers the MaT-FL client)
    mfed,  # noqa: F401  (registers the M-Fed client)
    public_local,  # noqa: F401  (registers the pseudo-labelling and SimCLR clients)
)
from fedmtl.clients.base import CLIENT_ALGORITHMS, ClientAlgorithm, register_client_algorithm

__all__ = ["CLIENT_ALGORITHMS", "ClientAlgorithm", "register_client_algorithm"]
