"""MLflow: one MLflow run per fedmtl run, params = the resolved experiment, metrics per round."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from fedmtl.config import Experiment, MLflowConfig
from fedmtl.results import RunDirectory
from fedmtl.tracking.base import (
    final_scalars,
    flatten,
    read_state,
    round_scalars,
    run_name,
    run_paths,
    write_state,
)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# MLflow's limits: log_batch takes at most 1000 metrics and 100 params; a param value has at
# most 6000 characters (500 before MLflow 2.9: values are cut to that, with a marker).
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
PARAM_VALUE_MAX = 500
_UNSAFE = re.compile(r"[^\w\-. :/]")  # MLflow's allowed key characters


def default_uri(run_dir: RunDirectory) -> str:
    """``sqlite:///<output_dir>/mlflow.db``: one store for every experiment under ``runs/``.

    MLflow 3 refuses its old ``./mlruns`` file store by default; SQLite needs no server and
    ``mlflow ui --backend-store-uri`` reads it.
    """
    return f"sqlite:///{(run_dir.path.parent.parent / DB_FILE).resolve()}"


def metric_key(tag: str) -> str:
    """A tag with the characters MLflow refuses replaced by ``_``."""
    return _UNSAFE.sub("_", tag)


class MLflowTracker:
    """Log a run to MLflow through ``MlflowClient`` (no global active run: compare runs many).

    Parameters
    ----------
    run_dir : RunDirectory
        The run folder; its ``tracking.json`` keeps the MLflow run id, so a resumed fedmtl run
        continues the same MLflow run.
    config : MLflowConfig
        ``uri`` (default :func:`default_uri`) and ``experiment`` (default: the experiment's
        name).
    """

    name = "mlflow"

    def __init__(self, run_dir: RunDirectory, config: MLflowConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.uri = config.uri or default_uri(run_dir)
        self.client: Any = None
        self.run_id: str | None = None

    def on_start(self, experiment: Experiment, first_round: int) -> None:
        """Create (or, on resume, reopen) the MLflow run; log the flattened experiment."""
        # MLflow logs the creation of a new SQLite store table by table at INFO.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.config.experiment or experiment.name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = found.experiment_id
        elif self.uri.startswith("sqlite:///"):
            # Beside the SQLite file, not in the current directory (MLflow's default).
            database = Path(self.uri.removeprefix("sqlite:///")).expanduser()
            artifacts = (database.parent / ARTIFACTS_DIR).resolve()
            experiment_id = self.client.create_experiment(
                name, artifact_location=artifacts.as_uri()
            )
        else:  # a tracking server (or another database) decides where artifacts go
            experiment_id = self.client.create_experiment(name)
        previous = read_state(self.run_dir).get(self.name, {})
        if first_round > 1 and previous.get("run_id"):
            self.run_id = str(previous["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(
            experiment_id,
            run_name=run_name(experiment),
            tags={
                "fedmtl.experiment": experiment.name,
                "fedmtl.algorithm": experiment.algorithm.name,
                "fedmtl.seed": str(experiment.seed),
                "fedmtl.run_folder": self.run_dir.path.name,
            },
        )
        self.run_id = run.info.run_id
        write_state(
            self.run_dir,
            self.name,
            {"run_id": self.run_id, "experiment_id": experiment_id, "uri": self.uri},
        )
        params = [
            Param(key, _param_value(value))
            for key, value in flatten(experiment.model_dump(mode="json")).items()
        ]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])

    def on_phase(self, round_: int, phase: str, done: int, total: int) -> None:
        """Nothing per phase."""

    def on_round_end(self, round_: int, rows: list[dict[str, Any]]) -> None:
        """Every scalar of the round at step ``round_``."""
        self._log(round_scalars(rows), round_)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(k), v, now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def finish(self, status: str) -> None:
        """Attach summary.json, config.json and metrics.png; log final values; end the run."""
        if self.run_id is None:
            return
        summary = self.run_dir.read_summary()
        if summary is not None and status == "FINISHED":
            rounds = int(summary.get("rounds", 0))
            self._log(final_scalars(summary), rounds)
            for path in run_paths(self.run_dir).values():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)

    def where(self) -> str:
        """The command that shows this store."""
        if self.uri.startswith("sqlite:///"):
            return f"mlflow ui --backend-store-uri {self.uri}  (run {self.run_id})"
        return f"{self.uri}  (run {self.run_id})"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_VALUE_MAX else text[: PARAM_VALUE_MAX - 3] + "..."
