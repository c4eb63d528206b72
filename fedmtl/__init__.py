"""fedmtl: federated multi-task learning on Flower (FedMuscle, M-Fed, FedHCA2 and baselines)."""

__version__ = "0.1.0"
