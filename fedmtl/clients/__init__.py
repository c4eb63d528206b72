"""Client-side handlers: local training, evaluation, personal state, per-algorithm behaviour."""

from fedmtl.clients import baselines  # noqa: F401  (registers the baseline client algorithms)
from fedmtl.clients.base import CLIENT_ALGORITHMS, ClientAlgorithm, register_client_algorithm

__all__ = ["CLIENT_ALGORITHMS", "ClientAlgorithm", "register_client_algorithm"]
