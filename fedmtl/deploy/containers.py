"""A docker compose deployment driven from this machine: tests and measurements.

It does what the README's compose section tells a user to do, with the real tools: builds
``docker/Dockerfile``, writes certificates, node keys and a ``--cpu`` compose file with the
``fedmtl deploy`` commands, brings the SuperLink up, registers the node keys, starts the
SuperNodes, submits runs with the host's ``flwr`` CLI through the published port, and tears
everything down again (containers, network and volumes of its compose project). Docker with
Compose v2 and podman with podman-compose run the same file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmtl.config import load_experiment
from fedmtl.deploy.commands import DeploymentPlan, DeploySettings, build_plan
from fedmtl.deploy.compose import APP_UID, docker_settings
from fedmtl.deploy.local import FLOWER_ENV, FlwrCli, free_port_block

PROJECT_LABEL = "com.docker.compose.project"  # set by Docker Compose and by podman-compose
SERVICE_LABEL = "com.docker.compose.service"
ENGINES = ("docker", "podman")


@dataclass(frozen=True)
class ContainerTool:
    """A container engine and the compose front end that drives it.

    Parameters
    ----------
    engine : str
        ``docker`` or ``podman`` (builds images, runs one-off containers, lists leftovers).
    compose : tuple of str
        The compose command: ``("docker", "compose")`` or ``("podman-compose",)``.
    """

    engine: str
    compose: tuple[str, ...]


def _works(argv: Sequence[str]) -> bool:
    if shutil.which(argv[0]) is None:
        return False
    try:
        result = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def find_container_tool(prefer: str | None = None) -> tuple[ContainerTool | None, str]:
    """The first usable engine with its compose front end, or why there is none.

    Docker needs a reachable engine (``docker info``) and Compose v2 (``docker compose``);
    podman needs ``podman info`` and ``podman-compose``.

    Parameters
    ----------
    prefer : str, optional
        ``docker`` or ``podman``: try only that one (``FEDMTL_CONTAINER_ENGINE``).

    Returns
    -------
    tuple
        ``(tool, "")``, or ``(None, reason)`` naming what is missing for each engine tried.
    """
    if prefer is not None and prefer not in ENGINES:
        raise ValueError(f"container engine must be one of {ENGINES}, got {prefer!r}")
    reasons = []
    for engine in [prefer] if prefer else ENGINES:
        if not _works([engine, "info"]):
            found = shutil.which(engine) is not None
            reasons.append(f"{engine}: " + ("no engine reachable" if found else "not installed"))
            continue
        if engine == "docker":
            if _works(["docker", "compose", "version"]):
                return ContainerTool("docker", ("docker", "compose")), ""
            reasons.append("docker: no Compose v2 plugin (`docker compose`)")
        elif _works(["podman-compose", "--version"]):
            return ContainerTool("podman", ("podman-compose",)), ""
        else:
            reasons.append("podman: podman-compose not installed")
    return None, "; ".join(reasons)


class ComposeDeployment(FlwrCli):
    """One SuperLink and one SuperNode container per client, from a generated compose file.

    TLS and SuperNode authentication on, CPU only (``fedmtl deploy compose --cpu``).

    Parameters
    ----------
    workdir : path
        Gets ``docker/`` (compose.yml, .env, certificates, keys, state, runs), the ``flwr``
        CLI's home and the app directories of submitted runs.
    experiment : path
        The experiment whose clients get a SuperNode each.
    tool : ContainerTool
        The engine and compose front end (:func:`find_container_tool`).
    project_root : path
        The checkout: build context of the image and source of the app's ``pyproject.toml``.
    image : str
        Image tag to build and run.
    base_image : str, optional
        ``BASE_IMAGE`` build argument (default: the Dockerfile's, a CUDA PyTorch image).
    project : str, optional
        Compose project name (default ``fedmtl-<pid>``); everything it creates carries it.
    num_threads : int, optional
        Torch threads per ClientApp (node config ``num-threads``).
    """

    def __init__(
        self,
        workdir: str | Path,
        experiment: str | Path,
        tool: ContainerTool,
        *,
        project_root: str | Path,
        image: str,
        base_image: str | None = None,
        project: str | None = None,
        num_threads: int | None = 1,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.experiment_path = Path(experiment).resolve()
        self.experiment = load_experiment(self.experiment_path, check_data=False)
        self.client_ids = [c.client_id for c in self.experiment.clients]
        self.tool = tool
        self.project_root = Path(project_root).resolve()
        self.image = image
        self.base_image = base_image
        self.project = project or f"fedmtl-{os.getpid()}"
        self.num_threads = num_threads
        self.compose_dir = self.workdir / "docker"
        # Containers never run as root: as the host user, or as the image's user under root.
        self.uid = os.getuid() if os.getuid() != 0 else APP_UID
        self.gid = os.getgid() if os.getuid() != 0 else APP_UID
        port = free_port_block(2)
        self.superlink_port, self.stream_port = port, port + 1
        # What the containers run: the plan behind `fedmtl deploy compose`, container paths.
        container = docker_settings(cpu=True, data=False, num_threads=num_threads)
        self.settings: DeploySettings = container
        self.plan: DeploymentPlan = build_plan(container, self.client_ids, self.experiment.name)
        bindir = str(Path(sys.executable).parent)  # flwr and python beside this interpreter
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }
        if tool.engine == "podman" and os.getuid() != 0:
            # Rootless podman maps the host user to root in the container; keep-id maps it to
            # itself, so `user: <uid>` really is the host user (an environment variable podman
            # reads: nothing podman-specific in the compose file).
            self.env["PODMAN_USERNS"] = "keep-id"
        self.timings: dict[str, float] = {}

    # -- commands ---------------------------------------------------------------------

    def _run(
        self, argv: Sequence[str], *, timeout: float = 600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv``; ``RuntimeError`` with its output if it fails."""
        result = subprocess.run(
            list(argv),
            cwd=cwd or self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``<compose> -p PROJECT -f compose.yml ARGS`` in the compose folder (reads .env)."""
        argv = [*self.tool.compose, "-p", self.project, "-f", "compose.yml", *args]
        return self._run(argv, timeout=timeout, cwd=self.compose_dir)

    def fedmtl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``fedmtl`` CLI of this checkout (``python -m fedmtl.cli``)."""
        return self._run([sys.executable, "-m", "fedmtl.cli", *args])

    def _timed(self, step: str, started: float) -> None:
        self.timings[step] = round(time.monotonic() - started, 1)

    # -- image --------------------------------------------------------------------------

    def build(self, timeout: float = 3600) -> None:
        """Build the image from the checkout (the engine's layer cache makes rebuilds quick).

        A CA bundle named by ``PIP_CERT`` (a TLS-intercepting proxy) is passed to pip as the
        build secret ``pip-ca``.
        """
        argv = [self.tool.engine, "build", "-f", "docker/Dockerfile", "-t", self.image]
        if self.base_image:
            argv += ["--build-arg", f"BASE_IMAGE={self.base_image}"]
        ca = os.environ.get("PIP_CERT", "")
        if ca and Path(ca).is_file():
            argv += ["--secret", f"id=pip-ca,src={ca}"]
        started = time.monotonic()
        self._run([*argv, "."], timeout=timeout, cwd=self.project_root)
        self._timed("image build", started)

    def run_image(
        self,
        command: Sequence[str],
        *,
        mounts: Mapping[str | Path, str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """A one-off container of the image, without network, as the deployment's user."""
        argv = [self.tool.engine, "run", "--rm", "--network", "none"]
        argv += ["--user", f"{self.uid}:{self.gid}"]
        for host, inside in (mounts or {}).items():
            argv += ["-v", f"{Path(host).resolve()}:{inside}"]
        for key, value in (env or {}).items():
            argv += ["-e", f"{key}={value}"]
        return self._run([*argv, self.image, *command], timeout=timeout)

    # -- bring-up -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Compose file, .env, certificates and keys (``fedmtl deploy``), host folders."""
        out = self.compose_dir
        context = os.path.relpath(self.project_root, out)
        compose_args = ["deploy", "compose", "--experiment", str(self.experiment_path)]
        compose_args += ["--out", str(out), "--cpu", "--context", context]
        if self.num_threads:
            compose_args += ["--num-threads", str(self.num_threads)]
        self.fedmtl(*compose_args)
        self.fedmtl("deploy", "certs", "--out", str(out / "certificates"), "--force")
        keys = ["deploy", "keys", "--out", str(out / "keys"), "--force"]
        self.fedmtl(*keys, "--experiment", str(self.experiment_path))
        overrides = {
            "COMPOSE_PROJECT_NAME": self.project,
            "FEDMTL_UID": str(self.uid),
            "FEDMTL_GID": str(self.gid),
            "FEDMTL_IMAGE": self.image,
            "SUPERLINK_PORT": str(self.superlink_port),
            "STREAM_PORT": str(self.stream_port),
        }
        if self.base_image:
            overrides["BASE_IMAGE"] = self.base_image
        lines = []
        for line in (out / ".env.example").read_text().splitlines():
            key = line.split("=", 1)[0]
            lines.append(f"{key}={overrides.pop(key)}" if key in overrides else line)
        lines += [f"{key}={value}" for key, value in overrides.items()]
        (out / ".env").write_text("\n".join(lines) + "\n")
        # Bind-mount sources must exist (an engine would create them owned by root).
        folders = [out / "runs", out / "state" / "superlink"]
        folders += [out / "state" / c for c in self.client_ids]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:  # the containers' user must read its keys and write its state
            for path in [out / "certificates", out / "keys", out / "state", out / "runs"]:
                for item in [path, *path.rglob("*")]:
                    os.chown(item, self.uid, self.gid)
        connection = f'[superlink]\ndefault = "{self.settings.connection}"\n\n'
        connection += f"[superlink.{self.settings.connection}]\n"
        connection += f'address = "127.0.0.1:{self.superlink_port}"\n'
        connection += f'root-certificates = "{out / "certificates" / "ca.crt"}"\n'
        (self.home("cli") / "config.toml").write_text(connection)

    def up(self, timeout: float = 600) -> None:
        """SuperLink, key registrations, SuperNodes; wait until every node is online."""
        started = time.monotonic()
        self.compose("up", "-d", "--no-build", "superlink")
        self.wait_for(lambda: bool(self.flwr_json("ls").get("success")), timeout)
        for client_id in self.client_ids:
            public = self.compose_dir / "keys" / f"{client_id}.pub"
            answer = self.flwr_json("supernode", "register", str(public), self.settings.connection)
            if not answer.get("success"):
                raise RuntimeError(f"registering {client_id}'s key failed: {answer}")
        self.compose("up", "-d", "--no-build")
        self.wait_for(lambda: len(self.online_nodes()) == len(self.client_ids), timeout)
        self._timed("bring-up", started)

    def start(self, timeout: float = 600) -> None:
        """:meth:`prepare` and :meth:`up` (the image must exist: :meth:`build`)."""
        self.prepare()
        self.up(timeout)

    # -- services -----------------------------------------------------------------------

    def container(self, service: str) -> str:
        """The container name of ``service`` (the two front ends name them differently)."""
        names = self._ls("ps", "-a", service=service)
        if len(names) != 1:
            raise RuntimeError(f"expected one container of {service}, found {names}")
        return names[0]

    def kill(self, service: str) -> None:
        """SIGKILL ``service``'s container: a crash, not a shutdown."""
        self._run([self.tool.engine, "kill", "--signal", "KILL", self.container(service)])

    def start_service(self, service: str) -> None:
        """Start the stopped container of ``service`` again (same volumes, same state)."""
        self.compose("start", service)

    def restart_service(self, service: str) -> None:
        """Restart ``service``'s container (its processes stop; its volumes stay)."""
        self.compose("restart", service)

    def logs(self, service: str) -> str:
        """The output of ``service``'s container."""
        result = subprocess.run(
            [self.tool.engine, "logs", self.container(service)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return result.stdout + result.stderr

    # -- teardown -----------------------------------------------------------------------

    def _ls(self, kind: str, *args: str, service: str | None = None) -> list[str]:
        """Names of ``kind`` (``ps``, ``network ls``, ``volume ls``) of this project."""
        argv = [self.tool.engine, *kind.split(), *args]
        argv += ["--filter", f"label={PROJECT_LABEL}={self.project}"]
        if service:
            argv += ["--filter", f"label={SERVICE_LABEL}={service}"]
        fmt = "{{.Names}}" if kind == "ps" else "{{.Name}}"
        result = self._run([*argv, "--format", fmt], timeout=120)
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this compose project that still exist."""
        return {
            "containers": self._ls("ps", "-a"),
            "networks": self._ls("network ls"),
            "volumes": self._ls("volume ls"),
        }

    def down(self) -> dict[str, list[str]]:
        """``compose down -v``, then remove what it left; return what still remains."""
        started = time.monotonic()
        try:
            self.compose("down", "-v", timeout=300)
        except RuntimeError:
            pass  # removed piece by piece below
        # podman-compose 1.0 keeps the project network after `down`; anything left is removed.
        left = self.leftovers()
        for name in left["containers"]:
            subprocess.run([self.tool.engine, "rm", "-f", name], capture_output=True, check=False)
        for kind in ("network", "volume"):
            for name in left[f"{kind}s"]:
                subprocess.run(
                    [self.tool.engine, kind, "rm", "-f", name], capture_output=True, check=False
                )
        if "teardown" not in self.timings:  # the first teardown, not a later no-op one
            self._timed("teardown", started)
        return self.leftovers()
