"""Issue 12: bad inputs fail early naming the field; failing clients are reported; nothing lost."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from fedmtl import cli
from fedmtl.client_app import app as client_app
from fedmtl.config import ConfigError, load_experiment
from fedmtl.results import RunDirectory, find_reference_run, run_fingerprint
from fedmtl.strategies.loop import FederationFailed, error_line
from fedmtl.testing import FakeGrid
from tests.helpers import run_in_process, tiny_experiment
from tests.layouts import write_cifar10, write_voc

BASE = """
name = "bad"
seed = 1
rounds = 2
device = "cpu"
[algorithm]
name = "fedavg"
[hyperparameters.fedprox]
mu = 0.01
[datasets.digits]
kind = "quickstart"
image_size = 16
[defaults]
batch_size = 8
max_batches = 1
[[clients]]
client_id = "a"
dataset = "digits"
tasks = ["digit"]
samples = 16
test_samples = 8
model = { backbone = "vit_tiny_patch16_224", kwargs = { img_size = 16, patch_size = 4, depth = 1 } }
[[clients]]
client_id = "b"
dataset = "digits"
tasks = ["segmentation"]
samples = 16
test_samples = 8
model = { backbone = "resnet18", decoder_channels = 8 }
"""
BERT = (
    "{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 32 }"
)
CUDA = torch.cuda.is_available()


def _replace(old: str, new: str) -> Callable[[str, Path], str]:
    def edit(text: str, tmp: Path) -> str:
        assert old in text
        return text.replace(old, new, 1)

    return edit


def _client(client_id: str, dataset: str, task: str, model: str) -> str:
    return (
        f'\n[[clients]]\nclient_id = "{client_id}"\ndataset = "{dataset}"\ntasks = ["{task}"]\n'
        f"samples = 8\nmodel = {model}\n"
    )


def _cifar(root_of: Callable[[Path], Path]) -> Callable[[str, Path], str]:
    def edit(text: str, tmp: Path) -> str:
        root = root_of(tmp)
        dataset = f'[datasets.cif]\nkind = "cifar10"\nroot = "{root}"\nimage_size = 16\n'
        client = _client("c", "cif", "label", '{ backbone = "resnet18" }')
        return text.replace("[defaults]", dataset + "[defaults]") + client

    return edit


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _voc(prepare: Callable[[Path], None]) -> Callable[[str, Path], str]:
    def edit(text: str, tmp: Path) -> str:
        root = tmp / "voc"
        prepare(root)
        dataset = f'[datasets.voc]\nkind = "voc_multilabel"\nroot = "{root}"\nimage_size = 16\n'
        client = _client("v", "voc", "labels", '{ backbone = "resnet18" }')
        return text.replace("[defaults]", dataset + "[defaults]") + client

    return edit


def _voc_images_only(root: Path) -> None:
    (root / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)


def _voc_missing_annotation(root: Path) -> None:
    write_voc(root)
    (root / "VOCdevkit" / "VOC2012" / "Annotations" / "a1.xml").unlink()


def _captions(options: str) -> Callable[[str, Path], str]:
    def edit(text: str, tmp: Path) -> str:
        dataset = f'[datasets.captions]\nkind = "quickstart_text"\noptions = {options}\n'
        client = _client("t", "captions", "digit", f'{{ backbone = "bert", kwargs = {BERT} }}')
        return text.replace("[defaults]", dataset + "[defaults]") + client

    return edit


def _text_client_on_cifar_public(text: str, tmp: Path) -> str:
    root = write_cifar10(tmp / "cifar")
    text = text.replace('name = "fedavg"', 'name = "fedmuscle"')
    datasets = (
        f'[datasets.cif]\nkind = "cifar10"\nroot = "{root}"\nimage_size = 16\n'
        '[datasets.captions]\nkind = "quickstart_text"\n'
        '[public]\ndataset = "cif"\nsize = 8\nbatch_size = 4\n'
    )
    client = _client("t", "captions", "digit", f'{{ backbone = "bert", kwargs = {BERT} }}')
    return text.replace("[defaults]", datasets + "[defaults]") + client


no_gpu = pytest.mark.skipif(CUDA, reason="this machine has a GPU")

# (id, edit of BASE, strings the message must contain: the field first)
BAD_INPUTS: list[Any] = [
    pytest.param(
        _replace("img_size = 16, patch", "img_sizee = 16, patch"),
        ["clients[0].model.kwargs", "img_sizee"],
        id="model-kwargs-typo",
    ),
    pytest.param(
        _replace('"resnet18"', '"resnet_18"'),
        ["clients[1].model.backbone", "resnet_18"],
        id="backbone-timm-lacks",
    ),
    pytest.param(
        _replace("image_size = 16", "image_size = 24"),
        ["clients[0].model.kwargs", "datasets.digits.image_size"],
        id="image-size-not-vit-img-size",
    ),
    pytest.param(_cifar(_empty), ["datasets.cif", "cifar-10-batches-py"], id="dataset-root-empty"),
    pytest.param(_voc(_voc_images_only), ["datasets.voc", "train.txt"], id="dataset-wrong-layout"),
    pytest.param(
        _voc(_voc_missing_annotation), ["datasets.voc", "a1.xml"], id="dataset-index-file-missing"
    ),
    pytest.param(
        _replace('device = "cpu"', 'device = "cuda"'),
        ["device", "no CUDA device"],
        id="cuda-without-gpu",
        marks=no_gpu,
    ),
    pytest.param(
        _replace("[defaults]", "[simulation]\nnum_gpus_per_client = 1\n[defaults]"),
        ["simulation.num_gpus_per_client"],
        id="gpus-without-gpu",
        marks=no_gpu,
    ),
    pytest.param(
        _replace("mu = 0.01", "muu = 0.01"),
        ["hyperparameters.fedprox.muu"],
        id="hyperparameter-typo",
    ),
    pytest.param(
        _captions("{ hint_probabilty = 0.1 }"),
        ["datasets.captions.options.hint_probabilty"],
        id="dataset-option-typo",
    ),
    pytest.param(
        _captions("{ hint_probability = 2.0 }"),
        ["datasets.captions", "hint_probability"],
        id="dataset-option-value",
    ),
    pytest.param(
        _text_client_on_cifar_public,
        ["clients[2].dataset", "'t'", "text"],
        id="text-client-public-without-text-view",
    ),
    pytest.param(
        _replace(
            '"resnet18", decoder', '"resnet18", pretrained = "/nowhere/w.safetensors", decoder'
        ),
        ["clients[1].model.pretrained"],
        id="pretrained-missing",
    ),
    pytest.param(
        _replace('kind = "quickstart"', 'kind = "quickstart"\nroot = "/tmp"'),
        ["datasets.digits.root", "bundled"],
        id="root-on-bundled-dataset",
    ),
]


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # One line per message: a field name is never wrapped away from its text.
    monkeypatch.setattr(cli, "console", Console(width=1000))


@pytest.mark.usefixtures("wide_console")
@pytest.mark.parametrize("command", ["validate", "simulate", "compare"])
@pytest.mark.parametrize(("edit", "expected"), BAD_INPUTS)
def test_bad_input_exits_2_naming_the_field(
    command: str,
    edit: Callable[[str, Path], str],
    expected: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(edit(BASE, tmp_path))
    output = tmp_path / "runs"
    args = {
        "validate": ["validate", str(config)],
        "simulate": ["simulate", str(config), "--output", str(output)],
        "compare": [
            "compare",
            str(config),
            "--algorithms",
            "local,fedavg,fedprox",
            "--output",
            str(output),
        ],
    }[command]
    assert cli.main(args) == 2
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, out
    assert not output.exists(), "nothing may run (or leave a folder) before the checks pass"


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(BASE)
    assert cli.main(["validate", str(config)]) == 0


@pytest.mark.parametrize("rounds", ["0", "-1", "two"])
def test_rounds_below_one_exit_2(
    rounds: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(BASE)
    with pytest.raises(SystemExit) as info:
        cli.main(["simulate", str(config), "--rounds", rounds, "--output", str(tmp_path / "r")])
    assert info.value.code == 2
    assert "--rounds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_server_side_load_needs_no_client_paths(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    text = _cifar(lambda tmp: tmp / "only-on-the-clients")(BASE, tmp_path)
    config.write_text(
        _replace('"resnet18", decoder', '"resnet18", pretrained = "/w", decoder')(text, tmp_path)
    )
    with pytest.raises(ConfigError, match=r"datasets\.cif\.root"):
        load_experiment(config)
    experiment = load_experiment(config, check_files=False)  # what the ServerApp does
    assert experiment.datasets["cif"].root == str(tmp_path / "only-on-the-clients")


# --------------------------------------------------------------------------- failing clients


def test_error_line_unwraps_flower_reasons() -> None:
    simulated = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: ValueError: bad root\nTraceback ...'>"
    )
    assert error_line(simulated) == "ValueError: bad root"
    assert error_line("<class 'KeyError'>:<'x\ny'>") == "KeyError: x"
    assert error_line("node unavailable") == "node unavailable"


def test_client_that_cannot_start_is_named_every_round(tmp_path: Path) -> None:
    experiment = tiny_experiment("fedavg", rounds=2)
    # c's node points its data-dir at a directory; the bundled digits refuse one.
    configs: list[dict[str, Any]] = [{}, {}, {"data-dir": str(tmp_path / "data")}]
    grid = FakeGrid(client_app, 3, node_configs=configs)
    run_dir, _ = run_in_process(experiment, tmp_path, grid=grid)
    rows = {(r["round"], r["client_id"]): r for r in run_dir.read_metrics()}
    for round_ in (1, 2):
        row = rows[(round_, "c-seg-depth")]
        assert row["status"] == "failed"
        assert row["error"].startswith("describe: ValueError: datasets.digits (data-dir ")
        assert "\n" not in row["error"]
        assert rows[(round_, "a-digit")].get("status") != "failed"
    assert cli.report_failures(experiment, run_dir) == cli.EXIT_CLIENT_FAILED


def test_every_client_failing_round_1_stops_with_their_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmtl.client_app as app_module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory in layer 3\n  (a long second line)")

    monkeypatch.setattr(app_module, "client_algorithm", broken)
    experiment = tiny_experiment("fedavg", rounds=3)
    with pytest.raises(FederationFailed) as info:
        run_in_process(experiment, tmp_path)
    message = str(info.value)
    assert "no client is online" not in message
    for client in experiment.clients:
        assert f"{client.client_id}: train: client '{client.client_id}': error 2: " in message
    assert "RuntimeError: out of memory in layer 3" in message
    assert "second line" not in message
    (run_dir,) = [RunDirectory(p) for p in (tmp_path / "tiny").iterdir()]
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [1, 1, 1] and all(r["status"] == "failed" for r in rows)
    assert run_dir.checkpoint_rounds() == []  # a resume starts over at round 1


def test_messages_carry_the_round_timeout_as_ttl(tmp_path: Path) -> None:
    experiment = tiny_experiment("fedavg", rounds=1, round_timeout=123.0)
    _, grid = run_in_process(experiment, tmp_path)
    assert grid.sent and {m.metadata.ttl for m in grid.sent} == {123.0}


# --------------------------------------------------------------------------- files


def _fake_run(
    output: Path, algorithm: str = "local", finished: bool = True, seed: int = 3, **extra: Any
) -> RunDirectory:
    experiment = tiny_experiment(algorithm, rounds=2, seed=seed, **extra)
    run = RunDirectory.create(output, experiment)
    value = {"local": 0.5}.get(algorithm, 0.6)
    for round_ in (1, 2) if finished else (1,):
        run.append_metrics(
            [
                {"round": round_, "client_id": c.client_id, "eval/digit/accuracy": value}
                for c in experiment.clients
            ]
        )
        run.save_checkpoint(round_, {}, {})
    return run


def test_torn_last_metrics_line_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _fake_run(tmp_path)
    with run.metrics_path.open("a") as handle:
        handle.write('{"round": 3, "client_id": "a-di')  # what a hard kill leaves
    with caplog.at_level("WARNING"):
        rows = run.read_metrics()
    assert len(rows) == 6 and "torn last line" in caplog.text
    assert cli.main(["report", str(run.path)]) == 0
    run.append_metrics([{"round": 3, "client_id": "a-digit"}])  # a resumed run appends
    assert run.read_metrics()[-1] == {"round": 3, "client_id": "a-digit"}
    lines = run.metrics_path.read_text().splitlines()
    lines.insert(1, "{not json")
    run.metrics_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        run.read_metrics()


@pytest.mark.usefixtures("wide_console")
def test_reference_is_a_finished_run_with_the_same_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finished = _fake_run(tmp_path, "local")
    _fake_run(tmp_path, "local", seed=4)  # another seed: not comparable
    interrupted = _fake_run(tmp_path, "local", finished=False)
    assert cli.main(["report", str(interrupted.path)]) == 0  # writes a summary.json ...
    assert interrupted.read_summary() is not None and not interrupted.is_finished()
    fedavg = _fake_run(tmp_path, "fedavg")
    reference = find_reference_run(fedavg)  # ... which does not make it a reference
    assert reference is not None and reference.path == finished.path
    capsys.readouterr()
    assert cli.main(["report", str(fedavg.path)]) == 0
    summary = fedavg.read_summary()
    assert summary is not None and summary["reference_run"] == str(finished.path)
    assert f"Δ% reference: {finished.path}" in capsys.readouterr().out
    other_seed = _fake_run(tmp_path / "x", "fedavg", seed=4)
    assert run_fingerprint(other_seed.experiment()) != run_fingerprint(fedavg.experiment())
    assert find_reference_run(other_seed) is None


def test_run_folder_files_share_one_mode(tmp_path: Path) -> None:
    experiment = tiny_experiment("ditto", rounds=1)
    run_dir, _ = run_in_process(experiment, tmp_path)
    from fedmtl.report import summarize

    summarize(run_dir)
    modes = {
        str(p.relative_to(run_dir.path)): stat.S_IMODE(p.stat().st_mode)
        for p in run_dir.path.rglob("*")
        if p.is_file()
    }
    assert "metrics.jsonl" in modes and "config.json" in modes
    assert any(k.startswith("clients/") for k in modes)
    assert len(set(modes.values())) == 1, modes
    assert not any(Path(k).name.startswith(".tmp-") for k in modes)


def test_cifar_layout_helper_is_read_by_the_loader(tmp_path: Path) -> None:
    from fedmtl.data import create_dataset

    source = create_dataset("cifar10", write_cifar10(tmp_path / "c"), image_size=16)
    source.check(["label"])
    assert len(source.split("train")) == 80
