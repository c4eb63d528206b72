"""The exact Flower command lines of a deployment: SuperLink, registrations, SuperNodes, run."""

from __future__ import annotations

import json
import os
import shlex
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmtl.deploy.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, node_key_paths

SUPERLINK_PORT = 8000  # Fleet, Control and Runtime APIs share this one port (Flower >= 1.40)
FIRST_SUPERNODE_PORT = 9094  # each SuperNode's local Runtime API; distinct when nodes share a host
STREAM_PORT = 9100  # FedMuscle's per-batch stream (channel = "stream"), opened by the ServerApp
INSECURE_WARNING = (
    "WARNING: --insecure: traffic is unencrypted and any machine that reaches the SuperLink can "
    "join as a SuperNode. Use it only on a trusted, isolated network."
)


@dataclass(frozen=True)
class DeploySettings:
    """Where things are on the machines of a deployment, and how nodes reach the SuperLink.

    Paths are written into the commands as given: they are read on the machine that runs the
    command (the server, a client machine or a container), not where the commands are printed.

    Parameters
    ----------
    superlink : str
        ``HOST:PORT`` at which SuperNodes and the ``flwr`` CLI reach the SuperLink.
    certs_dir : str
        Directory with ``ca.crt`` (every machine) and ``server.pem``/``server.key`` (server);
        required unless ``insecure``.
    keys_dir : str
        Directory with ``<client_id>`` private keys and ``<client_id>.pub`` public keys;
        required unless ``insecure``.
    experiment : str
        The experiment file, as the ServerApp should open it (relative: inside the app dir).
    state_root : str
        Each SuperNode keeps personal state in ``<state_root>/<client_id>``; the SuperLink's
        database defaults to ``<state_root>/superlink.db``.
    data_dir : str, optional
        Dataset root on the client machines (node config ``data-dir``).
    devices : sequence of str
        Torch devices assigned to the clients in turn (``cuda:0``, ``cuda:1``, ``cpu``); empty:
        the experiment's ``device``.
    listen : str
        Interface the SuperLink binds (``0.0.0.0``: every interface).
    database : str, optional
        SuperLink database path (default ``<state_root>/superlink.db``).
    connection : str
        Name of the SuperLink connection in the ``flwr`` CLI's ``config.toml``.
    app_dir : str
        The Flower app directory ``flwr run`` bundles (the project with ``pyproject.toml``).
    output_dir : str, optional
        Run config ``output-dir`` (on the server; default: the app's ``runs``).
    num_threads : int, optional
        Torch CPU threads per ClientApp (node config ``num-threads``).
    first_node_port : int
        Runtime API port of the first SuperNode; the ``i``-th uses ``first_node_port + i``.
    insecure : bool
        Plain HTTP without SuperNode authentication (only on a trusted network).
    stream_port : int
        Port of FedMuscle's stream on the server (used when an experiment sets
        ``channel = "stream"``); clients reach it at the SuperLink's host, over TLS with the
        same certificate unless ``insecure``.
    """

    superlink: str
    certs_dir: str = ""
    keys_dir: str = ""
    experiment: str = "configs/quickstart.toml"
    state_root: str = "state"
    data_dir: str | None = None
    devices: tuple[str, ...] = ()
    listen: str = "0.0.0.0"
    database: str | None = None
    connection: str = "fedmtl"
    app_dir: str = "."
    output_dir: str | None = None
    num_threads: int | None = None
    first_node_port: int = FIRST_SUPERNODE_PORT
    insecure: bool = False
    stream_port: int = STREAM_PORT

    @property
    def superlink_port(self) -> int:
        """The port part of :attr:`superlink` (the SuperLink listens on it)."""
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--superlink must be HOST:PORT, got {self.superlink!r}")
        return int(port)

    @property
    def superlink_host(self) -> str:
        """The host part of :attr:`superlink` (also where clients reach the stream)."""
        return self.superlink.rpartition(":")[0].strip("[]")


@dataclass(frozen=True)
class Process:
    """One command: a name (``superlink``, ``supernode-<client>``, ...) and its argv."""

    name: str
    argv: tuple[str, ...]

    def shell(self) -> str:
        """The command as one shell-quoted line."""
        return " ".join(shell_quote(arg) for arg in self.argv)


@dataclass(frozen=True)
class DeploymentPlan:
    """Every command of a deployment, in the order a user runs them."""

    experiment_name: str
    insecure: bool
    superlink: Process
    register: tuple[Process, ...]
    supernodes: dict[str, Process]
    run: Process
    connection_toml: str
    database: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def mkdir_database(self) -> str:
        """The shell line creating the database's folder (the SuperLink does not)."""
        return f"mkdir -p {shell_quote(os.path.dirname(self.database) or '.')}"

    def to_json(self) -> str:
        """The plan as JSON (for scripts and tests)."""
        return json.dumps(asdict(self), indent=2)


def shell_quote(arg: str) -> str:
    """Quote ``arg`` for a POSIX shell, preferring double quotes (readable TOML ``'...'``)."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def toml_literal(value: str) -> str:
    """``value`` as a TOML literal string, the form Flower's ``--node-config`` parser accepts.

    Raises
    ------
    ValueError
        If ``value`` holds a single quote or a newline, which that form cannot carry.
    """
    if "'" in value or "\n" in value:
        raise ValueError(f"{value!r}: paths and names must not contain ' or a newline")
    return f"'{value}'"


def node_config(settings: DeploySettings, client_id: str, index: int) -> str:
    """The ``--node-config`` string of the ``index``-th client (see ``fedmtl/client_app.py``)."""
    pairs = {
        "client-id": toml_literal(client_id),
        "state-dir": toml_literal(f"{settings.state_root.rstrip('/')}/{client_id}"),
    }
    if settings.data_dir:
        pairs["data-dir"] = toml_literal(settings.data_dir)
    if settings.devices:
        pairs["device"] = toml_literal(settings.devices[index % len(settings.devices)])
    if settings.num_threads:
        pairs["num-threads"] = str(int(settings.num_threads))
    return " ".join(f"{key}={value}" for key, value in pairs.items())


def superlink_process(settings: DeploySettings) -> Process:
    """``flower-superlink`` with TLS, SuperNode auth, a database and no runtime installs."""
    argv = ["flower-superlink", "--host", settings.listen, "--port", str(settings.superlink_port)]
    if settings.insecure:
        argv.append("--insecure")
    else:
        certs = settings.certs_dir.rstrip("/")
        argv += [
            "--ssl-ca-certfile",
            f"{certs}/{CA_CERT}",
            "--ssl-certfile",
            f"{certs}/{SERVER_CERT}",
            "--ssl-keyfile",
            f"{certs}/{SERVER_KEY}",
            "--enable-supernode-auth",
        ]
    # Flower would otherwise `uv sync` the app's dependencies for every run (slow, and it fails
    # on torch); fedmtl is installed on every machine instead.
    argv += ["--disable-runtime-dependency-installation", "--database", database_path(settings)]
    return Process("superlink", tuple(argv))


def database_path(settings: DeploySettings) -> str:
    """The SuperLink's database: ``settings.database`` or ``<state_root>/superlink.db``."""
    return settings.database or f"{settings.state_root.rstrip('/')}/superlink.db"


def register_process(settings: DeploySettings, client_id: str) -> Process:
    """``flwr supernode register`` of one client's public key (once, on the CLI machine)."""
    public = node_key_paths(settings.keys_dir, client_id).public
    argv = ("flwr", "supernode", "register", str(public), settings.connection, "--name", client_id)
    return Process(f"register-{client_id}", argv)


def supernode_process(settings: DeploySettings, client_id: str, index: int) -> Process:
    """``flower-supernode`` of the ``index``-th client, authenticating with its own key."""
    argv = ["flower-supernode", "--superlink", settings.superlink]
    if settings.insecure:
        argv.append("--insecure")
    else:
        argv += [
            "--root-certificates",
            f"{settings.certs_dir.rstrip('/')}/{CA_CERT}",
            "--auth-supernode-private-key",
            str(node_key_paths(settings.keys_dir, client_id).private),
        ]
    argv += [
        "--port",
        str(settings.first_node_port + index),
        "--node-config",
        node_config(settings, client_id, index),
    ]
    return Process(f"supernode-{client_id}", tuple(argv))


def run_process(settings: DeploySettings) -> Process:
    """``flwr run`` of the app against the deployment's SuperLink connection."""
    run_config = f"experiment={toml_literal(settings.experiment)}"
    if settings.output_dir:
        run_config += f" output-dir={toml_literal(settings.output_dir)}"
    # FedMuscle's stream (read only by experiments with channel = "stream"): the host the
    # clients already use for the SuperLink, and TLS with the SuperLink's own certificate.
    run_config += f" stream-address={toml_literal(settings.superlink_host)}"
    run_config += f" stream-port={settings.stream_port}"
    if not settings.insecure:
        certs = Path(settings.certs_dir)
        run_config += (
            f" stream-certfile={toml_literal(str(certs / SERVER_CERT))}"
            f" stream-keyfile={toml_literal(str(certs / SERVER_KEY))}"
            f" stream-ca-certfile={toml_literal(str(certs / CA_CERT))}"
        )
    argv = (
        "flwr",
        "run",
        settings.app_dir,
        settings.connection,
        "--stream",
        "--run-config",
        run_config,
    )
    return Process("run", argv)


def connection_toml(settings: DeploySettings) -> str:
    """The ``[superlink.<connection>]`` entry of the ``flwr`` CLI's ``config.toml``."""
    lines = [f"[superlink.{settings.connection}]", f'address = "{settings.superlink}"']
    if settings.insecure:
        lines.append("insecure = true")
    else:
        ca = os.path.abspath(os.path.join(settings.certs_dir, CA_CERT))
        lines.append(f"root-certificates = {json.dumps(ca)}")
    return "\n".join(lines) + "\n"


def build_plan(
    settings: DeploySettings, client_ids: Sequence[str], experiment_name: str
) -> DeploymentPlan:
    """Every command of a deployment of ``client_ids`` (one SuperNode each).

    Parameters
    ----------
    settings : DeploySettings
        Paths, addresses and security mode.
    client_ids : sequence of str
        The experiment's clients, in file order (node ``i`` gets Runtime API port
        ``first_node_port + i`` and the ``i``-th device, cycling).
    experiment_name : str
        For the header of the printed plan.

    Returns
    -------
    DeploymentPlan
        The commands; ``register`` is empty with ``insecure``.
    """
    if not settings.insecure and not (settings.certs_dir and settings.keys_dir):
        raise ValueError("TLS and SuperNode authentication need a certificate and a key directory")
    for client_id in client_ids:
        toml_literal(client_id)
    register = () if settings.insecure else tuple(register_process(settings, c) for c in client_ids)
    notes = [
        f"Port {settings.superlink_port} of the SuperLink serves the Fleet, Control and Runtime "
        "APIs. The Control API has no user authentication: anyone who reaches it can run code "
        "on the SuperLink and every SuperNode. Firewall it to the client machines and your own.",
    ]
    notes.append(
        f'Experiments with FedMuscle\'s channel = "stream" also need port '
        f"{settings.stream_port} of the server reachable from the client machines (the "
        "ServerApp opens it for the contrastive phase; token-checked"
        + ("" if settings.insecure else ", TLS with the server certificate")
        + "). If it is blocked the run falls back to Flower messages, with a warning."
    )
    if settings.insecure:
        notes.insert(0, INSECURE_WARNING)
    return DeploymentPlan(
        experiment_name=experiment_name,
        insecure=settings.insecure,
        superlink=superlink_process(settings),
        register=register,
        supernodes={c: supernode_process(settings, c, i) for i, c in enumerate(client_ids)},
        run=run_process(settings),
        connection_toml=connection_toml(settings),
        database=database_path(settings),
        notes=tuple(notes),
    )


def render_plan(plan: DeploymentPlan) -> str:
    """The plan as a commented, copy-pasteable walk-through."""
    mode = "plain HTTP, no node authentication" if plan.insecure else "TLS + SuperNode auth"
    out = [f"# fedmtl deployment of {plan.experiment_name!r}: {len(plan.supernodes)} SuperNodes"]
    out.append(f"# ({mode}).")
    for note in plan.notes:
        out += textwrap.wrap(note, 96, initial_indent="# ", subsequent_indent="# ")
    out += [
        "",
        "# 1. Server: start the SuperLink (keep it running).",
        plan.mkdir_database(),
        plan.superlink.shell(),
    ]
    out += [
        "",
        "# 2. Your machine (where you run `flwr`): add to $FLWR_HOME/config.toml",
        "#    (default ~/.flwr/config.toml):",
        *[f"#    {line}" for line in plan.connection_toml.splitlines()],
    ]
    if plan.register:
        out += ["", "# 3. Your machine: register each SuperNode's public key (once)."]
        out += [p.shell() for p in plan.register]
    out += [
        "",
        "# 4. Each client machine: start its SuperNode (it needs fedmtl installed, ca.crt and",
        "#    its own private key; several SuperNodes on one machine need distinct FLWR_HOMEs).",
    ]
    for client_id, process in plan.supernodes.items():
        out += [f"# client {client_id}", process.shell()]
    out += ["", "# 5. Your machine, in the app directory: submit the run.", plan.run.shell()]
    return "\n".join(out) + "\n"


_SCRIPT_HEAD = """#!/usr/bin/env bash
# Generated by `fedmtl deploy commands`; {what}.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
"""


def write_scripts(plan: DeploymentPlan, directory: str | Path) -> list[Path]:
    """Write one executable shell script per step into ``directory``.

    ``superlink.sh``, ``register-supernodes.sh``, ``supernode-<client>.sh``, ``run.sh`` and
    ``flwr-config.toml`` (the connection entry). Each SuperNode script uses its own
    ``FLWR_HOME`` below the caller's, so several SuperNodes can share a machine.

    Returns
    -------
    list of Path
        The written files.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {
        "superlink.sh": _SCRIPT_HEAD.format(what="run on the server")
        + f"{plan.mkdir_database()}\n"
        + f"exec {plan.superlink.shell()}\n",
        "run.sh": _SCRIPT_HEAD.format(what="run in the app directory")
        + f"exec {plan.run.shell()}\n",
        "flwr-config.toml": plan.connection_toml,
    }
    if plan.register:
        files["register-supernodes.sh"] = _SCRIPT_HEAD.format(what="run once") + "".join(
            f"{p.shell()}\n" for p in plan.register
        )
    for client_id, process in plan.supernodes.items():
        files[f"{process.name}.sh"] = (
            _SCRIPT_HEAD.format(what=f"run on the machine of client {client_id}")
            + f'export FLWR_HOME="${{FLWR_HOME:-$HOME/.flwr}}/{process.name}"\n'
            + f"exec {process.shell()}\n"
        )
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        if name.endswith(".sh"):
            path.chmod(0o755)
        written.append(path)
    return written
