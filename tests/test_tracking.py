"""Trackers read back with their own readers: TensorBoard's EventAccumulator, MLflow's client
on a temporary SQLite store, W&B's offline run file (decoded with W&B's record type)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from fedmtl.cli import main
from fedmtl.config import ConfigError, with_tracking
from fedmtl.results import RunDirectory
from fedmtl.tracking import (
    EXTRAS,
    MissingExtraError,
    TrackingObserver,
    check_trackers,
    flatten,
    round_scalars,
)
from tests.helpers import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- config and flags


def test_tracking_section_switches_and_tables() -> None:
    exp = tiny_experiment(
        rounds=1,
        tracking={"tensorboard": True, "mlflow": {"uri": "http://h:5000"}, "wandb": False},
    )
    assert exp.tracking.enabled() == ["tensorboard", "mlflow"]
    assert exp.tracking.mlflow is not None and exp.tracking.mlflow.uri == "http://h:5000"
    assert tiny_experiment(rounds=1).tracking.enabled() == []  # off unless asked


@pytest.mark.parametrize(
    ("tracking", "field"),
    [
        ({"mlflow": {"urii": "x"}}, "tracking.mlflow.urii"),
        ({"tensorbord": True}, "tracking.tensorbord"),
        ({"tensorboard": "yes"}, "tracking.tensorboard: must be true, false or a table"),
        ({"wandb": {"mode": "cloud"}}, "tracking.wandb.mode"),
    ],
)
def test_bad_tracking_section_names_the_field(tracking: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_experiment(rounds=1, tracking=tracking)
    assert field in str(info.value)


def test_flags_add_trackers_and_refuse_unknown_names(tmp_path: Path) -> None:
    exp = tiny_experiment(rounds=1, tracking={"wandb": {"project": "p"}})
    tracked = with_tracking(exp, ["tensorboard"], mlflow_uri="sqlite:///x.db", wandb_mode="offline")
    assert tracked.tracking.enabled() == ["tensorboard", "mlflow", "wandb"]
    assert tracked.tracking.wandb is not None
    assert (tracked.tracking.wandb.project, tracked.tracking.wandb.mode) == ("p", "offline")
    with pytest.raises(ConfigError, match=r"--track: unknown tracker \['tensorbord'\]"):
        with_tracking(exp, ["tensorbord"])
    config = tmp_path / "exp.toml"
    config.write_text((ROOT / "tests" / "data" / "tiny.toml").read_text())
    assert main(["simulate", str(config), "--track", "nope", "--output", str(tmp_path)]) == 2
    assert not (tmp_path / "tiny-e2e").exists()  # refused before the run folder exists


def test_missing_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As if tensorboard were not installed: the module the check looks for does not exist.
    monkeypatch.setitem(EXTRAS, "tensorboard", ("fedmtl_not_installed_module", "TensorBoard"))
    exp = tiny_experiment(rounds=1, tracking={"tensorboard": True})
    with pytest.raises(MissingExtraError, match=r"pip install 'fedmtl\[tensorboard\]'"):
        check_trackers(exp)
    config = tmp_path / "exp.toml"
    config.write_text((ROOT / "tests" / "data" / "tiny.toml").read_text())
    code = main(["simulate", str(config), "--track", "tensorboard", "--output", str(tmp_path)])
    assert code == 2
    out = capsys.readouterr().out
    assert "tracking.tensorboard" in out and "fedmtl[tensorboard]" in out


# --------------------------------------------------------------------------- scalars


def test_round_scalars_cover_clients_server_and_mechanism_families() -> None:
    rows = [
        {
            "round": 3,
            "client_id": "a",
            "eval/digit/accuracy": 0.5,
            "train/loss": 1.25,
            "train/lambda": 0.01,
            "bytes_up": 100,
            "seconds/train": 2.0,
            "server/mfed/distance/digits/digit": 0.2,
            "server/mfed/distance/digits/depth": 0.4,
            "server/fedmuscle/align_loss": 8.0,
        },
        {"round": 3, "client_id": "b", "status": "failed", "error": "train: boom"},
    ]
    scalars = round_scalars(rows)
    assert scalars["a/eval/digit/accuracy"] == 0.5
    assert scalars["a/train/loss"] == 1.25
    assert scalars["a/train/lambda"] == 0.01  # M-Fed's λ is each client's
    assert scalars["a/bytes_up"] == 100.0 and scalars["a/seconds/train"] == 2.0
    assert scalars["server/fedmuscle/align_loss"] == 8.0
    assert scalars["server/mfed/distance_mean"] == pytest.approx(0.3)
    assert scalars["a/failed"] == 0.0 and scalars["b/failed"] == 1.0
    assert not any(key.endswith(("/round", "/error", "/status")) for key in scalars)


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten({"a": {"b": 1, "c": [{"d": "x"}, 2]}, "e": {}, "f": None})
    assert flat == {"a.b": 1, "a.c.0.d": "x", "a.c.1": 2, "e": "{}", "f": None}


def test_a_failing_tracker_is_dropped_and_the_observer_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        name = "broken"

        def on_start(self, experiment: Any, first_round: int) -> None:
            raise ConnectionError("server gone")

    seen: list[int] = []

    class Observer:
        def on_start(self, experiment: Any, first_round: int) -> None:
            seen.append(first_round)

    tracked = TrackingObserver(Observer(), [Broken()])  # type: ignore[list-item]
    with caplog.at_level(logging.WARNING, logger="fedmtl.tracking"):
        tracked.on_start(None, 1)  # type: ignore[arg-type]
    assert seen == [1] and tracked.trackers == []
    assert "tracker broken failed in on_start" in caplog.text and "server gone" in caplog.text


# --------------------------------------------------------------------------- one tracked run


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """A 2-round FedHCA2 run (α, β signals) with every installed tracker, in process."""
    from fedmtl.simulation import run_in_process

    tracking: dict[str, Any] = {}
    for name, (module, _) in EXTRAS.items():
        try:
            __import__(module)
        except ImportError:
            continue
        tracking[name] = {"mode": "offline"} if name == "wandb" else True
    if not tracking:
        pytest.skip("no tracker extra installed (pip install '.[dev]')")
    experiment = tiny_experiment("fedhca2", rounds=2, tracking=tracking)
    out = tmp_path_factory.mktemp("tracked")
    return run_in_process(experiment, RunDirectory.create(out, experiment))


def _metrics_by_tag(run: RunDirectory) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says each tag should hold: ``tag → round → value``."""
    out: dict[str, dict[int, float]] = {}
    rounds: dict[int, list[dict[str, Any]]] = {}
    for row in run.read_metrics():
        rounds.setdefault(int(row["round"]), []).append(row)
    for round_, rows in rounds.items():
        for tag, value in round_scalars(rows).items():
            out.setdefault(tag, {})[round_] = value
    return out


# tags every check looks for: a task metric, losses, traffic, time, FedHCA2's own signals
EXPECTED_TAGS = (
    "a-digit/eval/digit/accuracy",
    "c-seg-depth/eval/depth/rmse",
    "a-digit/eval/loss",
    "a-digit/train/loss",
    "a-digit/bytes_up",
    "a-digit/bytes_down",
    "a-digit/seconds/train",
    "server/fedhca2/alpha/a-digit",
    "server/fedhca2/alpha_mean",
    "server/fedhca2/beta_mean",
)


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def test_tensorboard_events_read_back(tracked_run: RunDirectory) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard extra not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run.path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = _metrics_by_tag(tracked_run)
    assert set(EXPECTED_TAGS) <= tags and set(expected) <= tags
    for tag, by_round in expected.items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(logged) == sorted(by_round), tag
        assert all(_close(logged[r], v) for r, v in by_round.items()), tag  # float32 events
    summary = json.loads(tracked_run.summary_path.read_text())
    value = summary["clients"]["a-digit"]["tasks"]["digit"]["value"]
    assert events.Scalars("final/a-digit/digit/accuracy")[0].value == pytest.approx(value)


def test_mlflow_run_reads_back(tracked_run: RunDirectory) -> None:
    pytest.importorskip("mlflow", reason="MLflow extra not installed")
    from mlflow.tracking import MlflowClient

    # the default store: SQLite beside the runs (the run folder's grandparent)
    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run.path.parent.parent}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "fedhca2-seed3"
    params = run.data.params
    assert params["algorithm.name"] == "fedhca2" and params["seed"] == "3"
    assert params["clients.2.client_id"] == "c-seg-depth"
    assert params["clients.2.tasks.1"] == "depth"
    expected = _metrics_by_tag(tracked_run)
    assert set(EXPECTED_TAGS) <= set(run.data.metrics)
    for tag in EXPECTED_TAGS:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert sorted(history) == sorted(expected[tag]), tag
        assert all(_close(history[r], v) for r, v in expected[tag].items()), tag
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.json", "metrics.png"} <= artifacts
    summary = json.loads(tracked_run.summary_path.read_text())
    value = summary["clients"]["a-digit"]["tasks"]["digit"]["value"]
    assert run.data.metrics["final/a-digit/digit/accuracy"] == pytest.approx(value)


def test_wandb_offline_run_reads_back(tracked_run: RunDirectory) -> None:
    pytest.importorskip("wandb", reason="W&B extra not installed")
    from fedmtl.tracking.wandb_tracker import read_offline_run

    (folder,) = (tracked_run.path / "wandb").glob("offline-run-*")
    run = read_offline_run(folder)
    assert run["config"]["algorithm"]["name"] == "fedhca2"
    assert run["config"]["clients"][0]["client_id"] == "a-digit"
    by_step = {int(h["_step"]): h for h in run["history"] if "a-digit/train/loss" in h}
    expected = _metrics_by_tag(tracked_run)
    assert sorted(by_step) == [1, 2]
    for tag in EXPECTED_TAGS:
        assert all(_close(by_step[r][tag], v) for r, v in expected[tag].items()), tag
    summary = json.loads(tracked_run.summary_path.read_text())
    value = summary["clients"]["a-digit"]["tasks"]["digit"]["value"]
    assert run["summary"]["final/a-digit/digit/accuracy"] == pytest.approx(value)
    assert (folder / "files" / "summary.json").is_file()
    assert run["exit_code"] == 0


def test_tracking_state_names_every_tracker(tracked_run: RunDirectory) -> None:
    state = json.loads((tracked_run.path / "tracking.json").read_text())
    enabled = tracked_run.experiment().tracking.enabled()
    assert set(enabled) <= set(state)
    assert [line.split(":")[0] for line in state["where"]["lines"]] == enabled


# --------------------------------------------------------------------------- resume, compare


def test_resumed_run_continues_the_same_tracker_runs(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard extra not installed")
    pytest.importorskip("mlflow", reason="MLflow extra not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedmtl.simulation import run_in_process
    from tests.helpers import StopAfter

    experiment = tiny_experiment("fedavg", rounds=2, tracking={"tensorboard": True, "mlflow": True})
    run_dir = RunDirectory.create(tmp_path, experiment)
    with pytest.raises(StopAfter.Stopped):
        run_in_process(experiment, run_dir, observer=StopAfter(1))  # killed after round 1
    run_id = json.loads((run_dir.path / "tracking.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(run_id).info.status == "FAILED"

    run_in_process(experiment, run_dir, resume=True)
    assert json.loads((run_dir.path / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "a-digit/train/loss")
    assert sorted(m.step for m in history) == [1, 2]
    events = EventAccumulator(str(run_dir.path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("a-digit/train/loss")] == [1, 2]


def test_compare_logs_one_mlflow_run_per_algorithm_and_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow", reason="MLflow extra not installed")
    from mlflow.tracking import MlflowClient

    code = main(
        [
            "compare", str(ROOT / "tests" / "data" / "tiny.toml"), "--algorithms",
            "local,fedavg", "--rounds", "1", "--engine", "inprocess",
            "--mlflow-uri", f"sqlite:///{tmp_path}/store/tracking.db", "--output", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/store/tracking.db")
    experiment = client.get_experiment_by_name("tiny-e2e")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["fedavg-seed1", "local-seed1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["algorithm.name"] for r in runs} == {"local", "fedavg"}
    for run in runs:  # artifacts beside the given SQLite file, not in the working directory
        artifacts = tmp_path / "store" / "mlartifacts" / run.info.run_id / "artifacts"
        assert (artifacts / "summary.json").is_file()
    out = capsys.readouterr().out
    assert out.count("tracking: mlflow: mlflow ui --backend-store-uri sqlite:///") == 1
    assert not (tmp_path / "mlflow.db").exists()  # the given store, not the default


def test_wandb_mode_is_offline_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmtl.config import WandbConfig
    from fedmtl.tracking.wandb_tracker import resolve_mode

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode(WandbConfig()) == "offline"  # no netrc file at all
    netrc.write_text("machine example.org login user password secret\n")
    assert resolve_mode(WandbConfig()) == "offline"  # credentials, but not W&B's
    netrc.write_text("machine api.wandb.ai login user password not-a-real-key\n")
    netrc.chmod(0o600)
    assert resolve_mode(WandbConfig()) == "online"  # what `wandb login` writes
    assert resolve_mode(WandbConfig(mode="offline")) == "offline"  # the file decides
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(WandbConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(WandbConfig()) == "offline"  # the user's environment wins over auto
