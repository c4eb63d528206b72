"""The papers' comparison sets: the paper configs carry the new baselines and pass preflight."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedmtl.config import load_experiment, with_algorithm
from fedmtl.preflight import preflight
from tests.layouts import write_everything, write_nyud, write_pascal_context

ROOT = Path(__file__).resolve().parents[1]
FEDHCA2_TABLE = ["local", "fedavg", "fedprox", "fedper", "ditto", "fedamp", "matfl", "fedhca2"]


def _with_roots(name: str, tmp_path: Path) -> Path:
    text = (ROOT / "configs" / name).read_text()
    for folder, writer in (("PASCALContext", write_pascal_context), ("NYUDv2", write_nyud)):
        if f'"/data/{folder}"' in text:
            writer(tmp_path / folder)
            text = text.replace(f'"/data/{folder}"', f'"{tmp_path / folder}"')
    text = re.sub(r"num_gpus_per_client = [0-9.]+", "num_gpus_per_client = 0.0", text)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["fedhca2_nyud_paper.toml", "fedhca2_pascal_context_paper.toml"])
def test_fedhca2_table_passes_compare_preflight(name: str, tmp_path: Path) -> None:
    experiment = load_experiment(_with_roots(name, tmp_path))
    # what `fedmtl compare <file> --algorithms <FedHCA²'s table>` checks before the first run
    variants = [with_algorithm(experiment, algorithm) for algorithm in FEDHCA2_TABLE]
    preflight(experiment, variants=variants)
    by_name = {v.algorithm.name: v.algorithm for v in variants}
    assert (by_name["fedamp"].lam, by_name["fedamp"].alpha_k, by_name["fedamp"].sigma) == (
        15.0,
        1.0,
        1.0,
    )
    assert by_name["matfl"].num_clusters == 2 and by_name["matfl"].distance_threshold is None
    assert by_name["fedprox"].mu == 1e-3


def test_mfed_table_passes_compare_preflight(tmp_path: Path) -> None:
    experiment = load_experiment(_with_roots("mfed_pascal_context_paper.toml", tmp_path))
    assert "fedavg_task" in experiment.hyperparameters
    variants = [with_algorithm(experiment, a) for a in ("local", "fedavg_task", "mfed")]
    preflight(experiment, variants=variants)
    assert variants[1].algorithm.shares == ("encoder", "decoders", "heads")


FEDMUSCLE_TABLE = [
    "local",
    "fedmuscle",
    "fedhenn",
    "cofed",
    "feddf",
    "fedrcl",
    "simclr",
    "pseudolabel",
]


@pytest.mark.parametrize(
    "name", ["fedmuscle_voc_paper.toml", "fedmuscle_coco_paper.toml", "fedmuscle_cifar_paper.toml"]
)
def test_fedmuscle_table_passes_compare_preflight(name: str, tmp_path: Path) -> None:
    # the paper files' roots → small on-disk layouts of every dataset they name
    text = (ROOT / "configs" / name).read_text()
    for index, root in enumerate(sorted(set(re.findall(r'^root = "([^"]+)"', text, re.M)))):
        write_everything(tmp_path / f"data{index}")
        text = text.replace(f'root = "{root}"', f'root = "{tmp_path / f"data{index}"}"')
    text = re.sub(r"num_gpus_per_client = [0-9.]+", "num_gpus_per_client = 0.0", text)
    path = tmp_path / name
    path.write_text(text)
    experiment = load_experiment(path)
    # what `fedmtl compare <file> --algorithms <FedMuscle's table>` checks before the first run
    variants = [with_algorithm(experiment, algorithm) for algorithm in FEDMUSCLE_TABLE]
    preflight(experiment, variants=variants)
    by_name = {v.algorithm.name: v.algorithm for v in variants}
    assert by_name["simclr"].projector_dim == 256 and by_name["simclr"].tau == 0.5
    assert by_name["fedhenn"].eta == 1.0 and by_name["pseudolabel"].threshold == 0.9
    assert by_name["cofed"].min_agreement == 0.5 and by_name["feddf"].temperature == 1.0
    assert (by_name["fedrcl"].tau, by_name["fedrcl"].threshold) == (0.05, 0.7)


def test_fedmuscle_table_passes_compare_preflight_on_the_bundled_federation() -> None:
    experiment = load_experiment(ROOT / "configs" / "fedmuscle.toml")
    variants = [with_algorithm(experiment, algorithm) for algorithm in FEDMUSCLE_TABLE]
    preflight(experiment, variants=variants)
    assert set(FEDMUSCLE_TABLE[2:]) <= set(experiment.hyperparameters)  # the baselines
    from benchmarks.efficacy import FEDERATIONS

    assert set(FEDMUSCLE_TABLE) <= set(FEDERATIONS["fedmuscle"][1])
