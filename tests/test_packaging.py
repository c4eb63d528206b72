"""The repository is self-contained: bundled configs resolve by name and ship in the wheel."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedmtl.cli import main
from fedmtl.config import (
    ConfigError,
    bundled_configs,
    load_experiment,
    resolve_experiment,
)
from fedmtl.server_app import resolve_experiment_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REPO_NAMES = sorted(p.stem for p in CONFIGS.glob("*.toml"))


def _local_copy(path: Path, name: str) -> Path:
    """A copy of the quickstart config under another ``name`` (so it can be told apart)."""
    text = (CONFIGS / "quickstart.toml").read_text(encoding="utf-8")
    assert 'name = "quickstart"\n' in text
    path.write_text(text.replace('name = "quickstart"\n', f'name = "{name}"\n'), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- resolution order


def test_bundled_configs_lists_every_toml_in_configs_by_name() -> None:
    names = bundled_configs()
    assert names == REPO_NAMES
    assert {"quickstart", "mfed", "fedhca2", "fedmuscle"} <= set(names)


def test_bundled_name_resolves_with_or_without_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing called quickstart here
    bare = resolve_experiment("quickstart")
    assert bare == resolve_experiment("quickstart.toml")
    assert bare.read_bytes() == (CONFIGS / "quickstart.toml").read_bytes()
    assert (
        load_experiment(resolve_experiment("mfed")).name
        == load_experiment(CONFIGS / "mfed.toml").name
    )


def test_an_existing_file_wins_over_the_bundled_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _local_copy(tmp_path / "quickstart.toml", "mine")
    assert resolve_experiment("quickstart.toml") == Path("quickstart.toml")
    assert load_experiment(resolve_experiment("quickstart.toml")).name == "mine"
    # no file is called plain "quickstart": that name is the bundled one
    assert load_experiment(resolve_experiment("quickstart")).name == "quickstart"
    # a path with folders is a path, whatever its file name
    (tmp_path / "sub").mkdir()
    _local_copy(tmp_path / "sub" / "mfed.toml", "other")
    assert load_experiment(resolve_experiment("sub/mfed.toml")).name == "other"


def test_a_directory_does_not_shadow_a_bundled_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # e.g. a run folder of that name
    assert (
        resolve_experiment("quickstart").read_bytes() == (CONFIGS / "quickstart.toml").read_bytes()
    )


def test_unknown_name_is_an_error_listing_the_bundled_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_experiment("quickstrat")
    message = str(info.value)
    assert message.startswith("experiment file not found: quickstrat")
    assert f"bundled: {', '.join(REPO_NAMES)}" in message


def test_a_missing_path_is_not_replaced_by_the_bundled_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # outside the checkout: configs/quickstart.toml does not exist
    with pytest.raises(ConfigError, match=r"pass its name: quickstart\)"):
        resolve_experiment("configs/quickstart.toml")


def test_cli_validate_takes_a_bundled_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "quickstart"]) == 0
    assert "ok: quickstart: 5 clients" in capsys.readouterr().out
    assert main(["validate", "quickstrat"]) == 2
    out = capsys.readouterr().out
    assert "experiment file not found: quickstrat" in out and "quickstart" in out


def test_server_app_prefers_the_fab_copy_then_the_bundled_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fab = tmp_path / "fab"
    (fab / "configs").mkdir(parents=True)
    _local_copy(fab / "configs" / "quickstart.toml", "from-fab")
    monkeypatch.setattr(sys, "path", [str(fab), *sys.path])
    # pyproject's run config: the FAB's file, not the bundled one
    assert load_experiment(resolve_experiment_path("configs/quickstart.toml")).name == "from-fab"
    assert load_experiment(resolve_experiment_path("quickstart")).name == "quickstart"
    with pytest.raises(ConfigError, match="bundled: "):
        resolve_experiment_path("configs/nosuch.toml")


# --------------------------------------------------------------------------- the wheel


def test_pyproject_lists_every_package_and_maps_configs() -> None:
    """Packages are listed by hand (find cannot map configs/): a new subpackage must be added."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(folder.relative_to(ROOT).parts)
        for folder in {p.parent for p in (ROOT / "fedmtl").rglob("*.py")}
        if "__pycache__" not in folder.parts
    }
    assert set(setuptools["packages"]) == on_disk | {"fedmtl.configs"}
    assert setuptools["package-dir"] == {"fedmtl.configs": "configs"}
    assert setuptools["package-data"]["fedmtl.configs"] == ["*.toml"]
    # the Flower app's default experiment is a checkout path that exists
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    assert (ROOT / flwr["app"]["config"]["experiment"]).is_file()


def _can_build_offline() -> bool:
    """Whether this environment has the build backend (no download needed)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_installed_wheel_runs_a_bundled_config_outside_the_checkout(tmp_path: Path) -> None:
    # Build from a copy of what the build reads (plus tests/, which must stay out of the
    # wheel), so the checkout gets no build/ or egg-info and no stale build/lib leaks in.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fedmtl", "configs", "tests"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PIP_NO_INPUT="1")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    isolation = ["--no-build-isolation"] if _can_build_offline() else []
    build = _run(
        [*pip, "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(source)],
        tmp_path,
        env,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("fedmtl-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fedmtl/configs/{n}.toml" for n in REPO_NAMES} <= names
    assert "fedmtl/py.typed" in names and "fedmtl/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "configs/"))], sorted(names)

    site = tmp_path / "site"
    install = _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp_path, env)
    assert install.returncode == 0, install.stdout + install.stderr

    # Outside the checkout, the installed package only; dependencies from this interpreter.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(site)
    probe = _run(
        [
            sys.executable,
            "-c",
            "import fedmtl, fedmtl.config as c; print(fedmtl.__file__); "
            "print(c.resolve_experiment('quickstart')); print(','.join(c.bundled_configs()))",
        ],
        elsewhere,
        env,
    )
    assert probe.returncode == 0, probe.stderr
    package, quickstart, listed = probe.stdout.split()
    assert Path(package).is_relative_to(site)
    assert Path(quickstart) == site / "fedmtl" / "configs" / "quickstart.toml"
    assert listed.split(",") == REPO_NAMES

    validate = _run([sys.executable, "-m", "fedmtl.cli", "validate", "quickstart"], elsewhere, env)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "ok: quickstart: 5 clients" in validate.stdout
    unknown = _run([sys.executable, "-m", "fedmtl.cli", "validate", "nosuch"], elsewhere, env)
    assert unknown.returncode == 2
    assert "bundled: " in unknown.stdout and "quickstart" in unknown.stdout
