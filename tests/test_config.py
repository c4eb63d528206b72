"""Experiment-file validation: every error names the offending field; CLI exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmtl.cli import main
from fedmtl.config import ConfigError, load_experiment

GOOD = """
name = "t"
rounds = 2
[algorithm]
name = "fedprox"
mu = 0.1
[datasets.d]
kind = "quickstart"
image_size = 16
[defaults]
lr = 0.01
[[clients]]
client_id = "c1"
dataset = "d"
tasks = ["digit"]
model = { backbone = "resnet18" }
[[clients]]
client_id = "c2"
dataset = "d"
tasks = ["segmentation", "depth"]
model = { backbone = "vit_tiny_patch16_224", kwargs = { img_size = 16, patch_size = 4 } }
training = { lr = 0.5, batch_size = 4 }
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_good_file_resolves_defaults_and_algorithm(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, GOOD))
    assert exp.algorithm.name == "fedprox" and exp.algorithm.mu == 0.1
    assert exp.clients[0].training.lr == 0.01  # from [defaults]
    assert exp.clients[1].training.lr == 0.5  # the client's own value wins
    assert exp.clients[1].training.batch_size == 4
    assert exp.dataset_members("d") == ["c1", "c2"]


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('tasks = ["digit"]', 'tasks = ["dgit"]', "clients[0].tasks: unknown task 'dgit'"),
        ('backbone = "resnet18"', 'backbone = "alexnet"', "clients[0].model.backbone"),
        ('client_id = "c2"', 'client_id = "c1"', "duplicate client_id ['c1']"),
        ("rounds = 2", 'rounds = "two"', "rounds"),
        ("mu = 0.1", "mu = 0.1\nbeta = 3", "algorithm.fedprox.beta"),
        ('kind = "quickstart"', 'kind = "imagenet"', "datasets.d.kind: unknown dataset kind"),
        ('kind = "quickstart"', 'kind = "cifar10"\nroot = "/nope/cifar"', "datasets.d.root"),
        ("[defaults]\nlr = 0.01", "[defaults]\nlr = -1", "clients[0].training.lr"),
        ('name = "fedprox"', 'name = "fedsgd"', "algorithm"),
        (
            'dataset = "d"\ntasks = ["digit"]',
            'dataset = "e"\ntasks = ["digit"]',
            "clients[0].dataset",
        ),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert field in str(info.value)
    assert main(["validate", str(path)]) == 2


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="roundz"):
        load_experiment(_write(tmp_path, GOOD + "\nroundz = 3\n"))


def test_missing_file_and_bad_toml_exit_2(tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "missing.toml")]) == 2
    assert main(["validate", str(_write(tmp_path, "name = [unclosed"))]) == 2


def test_text_backbone_on_image_data_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace('backbone = "resnet18"', 'backbone = "bert"'))
    with pytest.raises(ConfigError, match=r"clients\[0\]\.dataset: client 'c1' has the text"):
        load_experiment(path)


def test_bundled_configs_validate(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.toml")):
        if "paper" in path.name:
            continue  # need user data paths; see test_paper_configs_validate_with_paths
        if path.name == "gpu_check.toml" and not torch.cuda.is_available():
            # the GPU check's federation asks for fractional GPUs: refused, by name, on a CPU box
            capsys.readouterr()
            assert main(["validate", str(path)]) == 2
            assert "simulation.num_gpus_per_client" in capsys.readouterr().out
            continue
        assert main(["validate", str(path)]) == 0, path
