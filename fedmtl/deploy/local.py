"""A whole deployment as real processes on this machine (loopback): tests and benchmarks.

It generates certificates and node keys with this package's own functions, starts the exact
commands of :func:`fedmtl.deploy.commands.build_plan` (SuperLink, registrations, SuperNodes),
each with a private ``FLWR_HOME``, submits runs with ``flwr run`` and stops every process it
started by its process group, also when the caller fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fedmtl.deploy.commands import DeploymentPlan, DeploySettings, build_plan, toml_literal
from fedmtl.deploy.credentials import write_certificates, write_node_keys

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
FINISHED = "finished"


def free_port_block(count: int, start: int = 20000, stop: int = 60000) -> int:
    """The first port of ``count`` consecutive ports free on 127.0.0.1."""
    port = start
    while port + count < stop:
        for offset in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port + offset))
                except OSError:
                    port += offset + 1
                    break
        else:
            return port
    raise RuntimeError(f"no {count} consecutive free ports in {start}..{stop}")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until child ``pid`` exits, without reaping it; whether it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


class FlwrCli:
    """The ``flwr`` CLI side of a deployment: submit runs, follow them, list nodes.

    Subclasses set ``workdir`` (each process's private ``FLWR_HOME`` lives below it), ``env``
    (the environment of every command), ``settings`` (``connection`` names the SuperLink entry
    in the CLI's ``config.toml``) and ``plan`` (its run command's ``stream-*`` run config is
    passed with every submitted run).
    """

    workdir: Path
    env: dict[str, str]
    settings: DeploySettings
    plan: DeploymentPlan

    def home(self, name: str) -> Path:
        """The private ``FLWR_HOME`` of process ``name`` (``cli`` for the ``flwr`` CLI)."""
        path = self.workdir / "homes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's connection."""
        return subprocess.run(
            ["flwr", *args],
            env={**self.env, "FLWR_HOME": str(self.home("cli")), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def flwr_json(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run ``flwr ... --format json``; the parsed answer (``success`` false on failure)."""
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            answer = json.loads(result.stdout)
        except json.JSONDecodeError:
            answer = {"success": False, "error-message": result.stdout + result.stderr}
        return dict(answer)

    def stop_run(self, run_id: int) -> dict[str, Any]:
        """``flwr stop RUN_ID``: the SuperLink ends the run and its ServerApp."""
        return self.flwr_json("stop", str(run_id))

    def online_nodes(self) -> list[dict[str, Any]]:
        """SuperNodes the SuperLink reports online (``flwr supernode ls``)."""
        nodes = self.flwr_json("supernode", "ls").get("nodes", [])
        return [n for n in nodes if str(n.get("status", "")).lower() == "online"]

    @staticmethod
    def wait_for(condition: Any, timeout: float, interval: float = 1.0) -> None:
        """Poll ``condition()`` until true; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(interval)
        raise TimeoutError(f"condition not met within {timeout:.0f} s")

    def submit(self, run_config: Mapping[str, str | int], app_dir: str | Path) -> int:
        """``flwr run APP <connection> --run-config ...``; returns the run id.

        The plan's own run config (FedMuscle's ``stream-*`` address, port and TLS files) is
        included; ``run_config`` adds to or overrides it.
        """
        from flwr.common.config import parse_config_args

        planned = parse_config_args([self.plan.run.argv[-1]])
        merged = {k: v for k, v in planned.items() if k.startswith("stream-")}
        merged.update(run_config)
        overrides = " ".join(
            f"{k}={v}" if isinstance(v, int) else f"{k}={toml_literal(str(v))}"
            for k, v in merged.items()
        )
        args = ("run", str(app_dir), self.settings.connection, "--run-config", overrides)
        answer = self.flwr_json(*args)
        if not answer.get("success"):
            raise RuntimeError(f"flwr run failed: {answer}")
        return int(answer["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id`` as a dict (status, network traffic, compute time)."""
        answer = self.flwr_json("ls", "--run-id", str(run_id))
        if not answer.get("success"):
            raise RuntimeError(f"flwr ls failed: {answer}")
        return dict(answer["runs"][0])

    def wait_run(self, run_id: int, timeout: float) -> dict[str, Any]:
        """Wait until the run is finished; return its ``run_info``."""
        info: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal info
            info = self.run_info(run_id)
            return str(info.get("status", "")).startswith(FINISHED)

        self.wait_for(finished, timeout, interval=3.0)
        return info


class LocalDeployment(FlwrCli):
    """SuperLink, registrations and one SuperNode per client, as processes on loopback.

    Always TLS and SuperNode authentication, as in a real deployment.

    Parameters
    ----------
    workdir : path
        Everything goes here: ``certs/``, ``keys/``, ``state/<client>``, one ``FLWR_HOME`` and
        one log file per process.
    client_ids : sequence of str
        The experiment's clients (one SuperNode each).
    env : mapping, optional
        Extra environment for every process (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
    num_threads : int, optional
        Torch threads per ClientApp.
    """

    def __init__(
        self,
        workdir: str | Path,
        client_ids: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.client_ids = list(client_ids)
        # SuperLink, one Runtime API port per SuperNode, FedMuscle's stream.
        port = free_port_block(len(self.client_ids) + 2)
        self.settings = DeploySettings(
            superlink=f"127.0.0.1:{port}",
            certs_dir=str(self.workdir / "certs"),
            keys_dir=str(self.workdir / "keys"),
            state_root=str(self.workdir / "state"),
            listen="127.0.0.1",
            connection="local-deployment",
            num_threads=num_threads,
            first_node_port=port + 1,
            stream_port=port + 1 + len(self.client_ids),
        )
        self.plan: DeploymentPlan = build_plan(self.settings, self.client_ids, "local")
        bindir = str(Path(sys.executable).parent)  # flower-* and flwr live beside this Python
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            **(env or {}),
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    # -- processes --------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        """Where the output of process ``name`` goes."""
        return self.workdir / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path(name).open("ab")
        cwd = self.workdir / "cwd" / name  # a ServerApp/ClientApp's working directory
        cwd.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**self.env, "FLWR_HOME": str(self.home(name))},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its children
        )
        self.processes[name] = process
        self._logs[name] = log
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Send ``sig`` to process ``name``'s group, wait; SIGKILL the group if it lingers.

        The group is signalled only while its leader is not yet reaped: until then its id
        cannot be reused, so no other process is ever hit.

        Returns
        -------
        int or None
            Its exit code (``None`` if it was not started).
        """
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if process.returncode is None:
            _signal_group(process.pid, sig)
            if not _wait_exit(process.pid, timeout):
                _signal_group(process.pid, signal.SIGKILL)
                _wait_exit(process.pid, timeout)
            _signal_group(process.pid, signal.SIGKILL)  # children that outlive the leader
        process.wait(timeout=timeout)
        self._logs.pop(name).close()
        return process.returncode

    def running(self, name: str) -> bool:
        """Whether process ``name`` was started and has not exited (it is not reaped here)."""
        process = self.processes.get(name)
        return process is not None and process.returncode is None and not _wait_exit(process.pid, 0)

    def close(self) -> None:
        """Stop every process this deployment started (SuperNodes first)."""
        for name in [n for n in self.processes if n != "superlink"] + ["superlink"]:
            self.stop(name)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bring-up -----------------------------------------------------------------------

    def start(self, timeout: float = 180) -> None:
        """Credentials, SuperLink, CLI connection, registrations, SuperNodes; wait for all."""
        write_certificates(self.settings.certs_dir, force=True)
        write_node_keys(self.settings.keys_dir, self.client_ids, force=True)
        connection = f'[superlink]\ndefault = "{self.settings.connection}"\n\n'
        (self.home("cli") / "config.toml").write_text(connection + self.plan.connection_toml)
        Path(self.plan.database).parent.mkdir(parents=True, exist_ok=True)
        self._spawn("superlink", self.plan.superlink.argv)
        self.wait_for(lambda: bool(self.flwr_json("ls").get("success")), timeout)
        for process in self.plan.register:
            answer = self.flwr_json(*process.argv[1:])
            if not answer.get("success"):
                raise RuntimeError(f"{process.shell()} failed: {answer}")
        for client_id in self.client_ids:
            self.start_supernode(client_id)
        self.wait_for(lambda: len(self.online_nodes()) == len(self.client_ids), timeout)

    def start_supernode(self, client_id: str, argv: Sequence[str] | None = None) -> None:
        """Start (or restart) the SuperNode of ``client_id`` with its planned command."""
        self._spawn(f"supernode-{client_id}", argv or self.plan.supernodes[client_id].argv)

    def ensure_supernodes(self, timeout: float = 180) -> None:
        """Restart planned SuperNodes that are not running; wait until all are online."""
        for client_id in self.client_ids:
            if not self.running(f"supernode-{client_id}"):
                self.stop(f"supernode-{client_id}")
                self.start_supernode(client_id)
        self.wait_for(lambda: len(self.online_nodes()) >= len(self.client_ids), timeout)
