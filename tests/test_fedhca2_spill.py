"""Issue 19: FedHCA²'s [N, d] buffers in a memory-mapped file over a budget, same arithmetic."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmtl.aggregation.conflict_averse import gram_matrix
from fedmtl.aggregation.fedhca2 import _encoder_statistics
from fedmtl.aggregation.spill import SpilledMatrix
from fedmtl.strategies.fedhca2 import FedHCA2
from tests.helpers import eval_rows, run_in_process, tiny_experiment


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_spilled_matrix_is_a_tensor_whose_pages_can_be_released(tmp_path: Path) -> None:
    rows, cols = 16, 1 << 20  # 64 MiB in float32
    matrix = SpilledMatrix(rows, cols, torch.float32, tmp_path)
    assert not list(tmp_path.iterdir())  # unlinked at once: nothing left behind
    assert matrix.tensor.shape == (rows, cols) and float(matrix.tensor.abs().max()) == 0.0
    gen = torch.Generator().manual_seed(0)
    row = torch.empty(cols)
    rows_written = []

    def fill(release: bool) -> int:
        matrix.release()
        before, growth = _rss_bytes(), 0
        for i in range(rows):
            torch.randn(cols, generator=gen, out=row)
            matrix.tensor[i].copy_(row)
            rows_written.append(row[:5].clone())
            if release:
                matrix.release()
            growth = max(growth, _rss_bytes() - before)
        return growth

    kept = fill(release=False)
    released = fill(release=True)
    assert kept > 48 * 2**20, kept  # without releases the whole 64 MiB becomes resident
    # Row by row with a release after each: about one row (4 MiB) resident.
    assert released < 12 * 2**20, released
    rows_written = rows_written[rows:]
    for i, head in enumerate(rows_written):  # the contents survive the releases
        assert torch.equal(matrix.tensor[i, :5], head)


def test_blockwise_gram_on_a_spilled_buffer_equals_the_in_ram_one(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    n, d = 7, 300_001
    last, local = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    spilled = [SpilledMatrix(n, d, torch.float32, tmp_path) for _ in range(2)]
    spilled[0].tensor.copy_(last)
    spilled[1].tensor.copy_(local)
    releases = []

    def release() -> None:
        releases.append(1)
        for m in spilled:
            m.release()

    gram, _ = _encoder_statistics(spilled[0].tensor, spilled[1].tensor, None, None, release)
    in_ram, _ = _encoder_statistics(last, local, None, None)
    assert len(releases) > 1  # blockwise: several chunks, each released
    assert torch.equal(gram, in_ram)
    # and it is the Gram matrix of the updates (independent float64 product)
    delta = (local - last).double()
    scale = float(gram.diagonal().max())  # float32 chunks: errors relative to ‖Δ‖²
    torch.testing.assert_close(gram, delta @ delta.T, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(gram, gram_matrix(local - last), rtol=0, atol=1e-6 * scale)


def test_fedhca2_over_its_budget_runs_bit_identical_to_in_ram(tmp_path: Path) -> None:
    ram = tiny_experiment("fedhca2", rounds=3)
    data = ram.model_dump(mode="json")
    data["algorithm"].update({"memory_budget_mb": 0.01, "spill_dir": str(tmp_path)})
    from fedmtl.config import parse_experiment

    spill = parse_experiment(data)
    runs = {}
    for name, experiment in {"ram": ram, "spill": spill}.items():
        run_dir, _ = run_in_process(experiment, tmp_path / name)
        runs[name] = run_dir
    assert eval_rows(runs["spill"]) == eval_rows(runs["ram"])
    _, a, _ = runs["ram"].load_checkpoint()  # type: ignore[misc]
    _, b, _ = runs["spill"].load_checkpoint()  # type: ignore[misc]
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fedmtl-spill-")]


def test_budget_decides_where_the_buffers_live() -> None:
    for budget, spilled in ((None, False), (1e6, False), (0.01, True)):
        data = tiny_experiment("fedhca2", rounds=1).model_dump(mode="json")
        data["algorithm"]["memory_budget_mb"] = budget
        from fedmtl.config import parse_experiment
        from tests.helpers import described_clients

        experiment = parse_experiment(data)
        strategy = FedHCA2(experiment)
        strategy.prepare(described_clients(experiment))
        assert bool(strategy._spilled) == spilled
        if spilled:
            assert strategy.state.encoder_last.data_ptr() == strategy._spilled[0].tensor.data_ptr()
