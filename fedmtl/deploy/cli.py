"""``fedmtl deploy``: certificates, node keys, the deployment's commands, a compose file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedmtl.config import ConfigError, Experiment, load_experiment, resolve_experiment
from fedmtl.deploy.commands import (
    INSECURE_WARNING,
    DeploySettings,
    build_plan,
    render_plan,
    write_scripts,
)
from fedmtl.deploy.compose import render_compose, render_env
from fedmtl.deploy.credentials import server_names, write_certificates, write_node_keys

EXIT_BAD_INPUT = 2


def _experiment(path: str) -> Experiment:
    # Only client ids and names are needed here; datasets live on the client machines.
    return load_experiment(resolve_experiment(path), check_data=False)


def needs_data_dir(experiment: Experiment) -> bool:
    """Whether a client reads a dataset from disk (bundled datasets refuse a ``data-dir``)."""
    from fedmtl.data import DATASET_REGISTRY

    kinds = {experiment.datasets[c.dataset].kind for c in experiment.clients}
    return any(DATASET_REGISTRY[kind].requires_root for kind in kinds if kind in DATASET_REGISTRY)


def _split(values: Sequence[str] | None) -> list[str]:
    """``--x a,b --x c`` → ``[a, b, c]``."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a CA and a SuperLink certificate for the given host names and IPs."""
    hosts = _split(args.host)
    paths = write_certificates(args.out, hosts, days=args.days, force=args.force)
    print(f"CA certificate:     {paths.ca_cert}   (copy to every machine)")
    print(f"CA key:             {paths.ca_key}   (keep private; issues new server certificates)")
    print(f"server certificate: {paths.server_cert}   (SuperLink only)")
    print(f"server key:         {paths.server_key}   (SuperLink only, keep private)")
    print("names covered:      " + ", ".join(server_names(hosts)))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Write one SuperNode key pair per client of the experiment."""
    experiment = _experiment(args.experiment)
    pairs = write_node_keys(args.out, [c.client_id for c in experiment.clients], force=args.force)
    for client_id, pair in pairs.items():
        print(f"{client_id}: {pair.private} (its SuperNode only), {pair.public} (register)")
    return 0


def settings_from_args(args: argparse.Namespace, experiment: Experiment) -> DeploySettings:
    """The :class:`DeploySettings` the ``commands`` options describe."""
    data_dir = args.data_dir
    if data_dir and not needs_data_dir(experiment):
        print(
            "note: --data-dir ignored: the experiment uses bundled datasets only", file=sys.stderr
        )
        data_dir = None
    return DeploySettings(
        superlink=args.superlink,
        certs_dir=args.certs or "",
        keys_dir=args.keys or "",
        experiment=args.run_experiment or args.experiment,
        state_root=args.state_root,
        data_dir=data_dir,
        devices=tuple(_split(args.devices)),
        listen=args.listen,
        database=args.database,
        connection=args.connection,
        app_dir=args.app_dir,
        output_dir=args.output_dir,
        num_threads=args.num_threads,
        insecure=args.insecure,
    )


def cmd_commands(args: argparse.Namespace) -> int:
    """Print (and optionally write as scripts) every command of the deployment."""
    experiment = _experiment(args.experiment)
    settings = settings_from_args(args, experiment)
    if settings.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    if not settings.insecure:
        missing = [flag for flag in ("certs", "keys") if not getattr(args, flag)]
        if missing:
            raise ValueError(
                "TLS and SuperNode authentication need "
                + " and ".join(f"--{m}" for m in missing)
                + " (or pass --insecure explicitly)"
            )
    plan = build_plan(settings, [c.client_id for c in experiment.clients], experiment.name)
    print(plan.to_json() if args.format == "json" else render_plan(plan), end="")
    if args.write_scripts:
        written = write_scripts(plan, args.write_scripts)
        print(f"wrote {len(written)} files to {args.write_scripts}", file=sys.stderr)
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    """Write compose.yml and .env.example for the experiment's clients."""
    experiment = _experiment(args.experiment)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clients = [c.client_id for c in experiment.clients]
    if args.cpu and args.gpus:
        raise ValueError("--cpu and --gpus exclude each other (--cpu: no GPU reservations)")
    gpus = _split(args.gpus) or ["0"]
    data = needs_data_dir(experiment)
    compose = render_compose(
        experiment.name,
        clients,
        gpus=gpus,
        cpu=args.cpu,
        context=args.context,
        data=data,
        num_threads=args.num_threads,
    )
    (out / "compose.yml").write_text(compose, encoding="utf-8")
    env = render_env(experiment.name, clients, gpus=gpus, cpu=args.cpu, data=data)
    (out / ".env.example").write_text(env, encoding="utf-8")
    print(f"wrote {out / 'compose.yml'} ({len(clients)} SuperNodes) and {out / '.env.example'}")
    # The bind mounts' host folders (.env.example's defaults), created by the user who runs
    # compose: an engine would create missing ones owned by root, unwritable for the containers.
    folders = [out / "runs", out / "state" / "superlink", *(out / "state" / c for c in clients)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    print(f"created {out / 'runs'} and {out / 'state'}/{{superlink,<client>}} (mounted volumes)")
    return 0


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report bad input (invalid values, existing files) as one line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ConfigError:
            raise  # the main CLI prints these
        except (ValueError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    run.__doc__ = handler.__doc__
    return run


def add_deploy_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``deploy`` with its subcommands ``certs``, ``keys``, ``commands``, ``compose``.

    Parameters
    ----------
    subparsers
        The ``add_subparsers()`` object of the ``fedmtl`` parser; every subcommand sets
        ``func`` (called with the parsed arguments, returns the exit code).

    Returns
    -------
    argparse.ArgumentParser
        The ``deploy`` parser.
    """
    deploy = subparsers.add_parser(
        "deploy", help="run on several machines or with docker compose (TLS + node auth)"
    )
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    certs = sub.add_parser("certs", help="CA and SuperLink certificate (TLS)")
    certs.add_argument("--out", required=True, help="output directory")
    certs.add_argument(
        "--host",
        action="append",
        help="SuperLink host name or IP the nodes use (repeatable or comma-separated); "
        "localhost, 127.0.0.1, ::1 and 'superlink' are always included",
    )
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=_guarded(cmd_certs))

    keys = sub.add_parser("keys", help="one SuperNode key pair per client (node auth)")
    keys.add_argument("--out", required=True, help="output directory")
    keys.add_argument("--experiment", required=True, help="experiment TOML file")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(func=_guarded(cmd_keys))

    cmds = sub.add_parser("commands", help="print the SuperLink, SuperNode and flwr commands")
    cmds.add_argument("--experiment", required=True, help="experiment TOML file")
    cmds.add_argument("--superlink", required=True, help="HOST:PORT nodes use (port 8000)")
    cmds.add_argument("--certs", help="certificate directory (from `deploy certs`)")
    cmds.add_argument("--keys", help="key directory (from `deploy keys`)")
    cmds.add_argument("--insecure", action="store_true", help="no TLS, no node auth (unsafe)")
    cmds.add_argument("--state-root", default="state", help="personal state: ROOT/<client_id>")
    cmds.add_argument("--data-dir", help="dataset root on the client machines")
    cmds.add_argument("--devices", action="append", help="torch devices in turn: cuda:0,cuda:1")
    cmds.add_argument("--num-threads", type=int, help="torch CPU threads per ClientApp")
    cmds.add_argument("--listen", default="0.0.0.0", help="SuperLink bind address")
    cmds.add_argument("--database", help="SuperLink database (default STATE_ROOT/superlink.db)")
    cmds.add_argument("--connection", default="fedmtl", help="flwr CLI connection name")
    cmds.add_argument("--app-dir", default=".", help="app directory for `flwr run`")
    cmds.add_argument("--run-experiment", help="experiment path as the ServerApp opens it")
    cmds.add_argument("--output-dir", help="run config output-dir (on the server)")
    cmds.add_argument("--write-scripts", metavar="DIR", help="also write one script per step")
    cmds.add_argument("--format", choices=("text", "json"), default="text")
    cmds.set_defaults(func=_guarded(cmd_commands))

    comp = sub.add_parser("compose", help="write compose.yml + .env.example (one node per GPU)")
    comp.add_argument("--experiment", required=True, help="experiment TOML file")
    comp.add_argument("--out", required=True, help="output directory (e.g. docker)")
    comp.add_argument("--gpus", action="append", help="host GPU indices in turn (default 0)")
    comp.add_argument("--cpu", action="store_true", help="no GPU reservations")
    comp.add_argument("--context", default="..", help="build context relative to --out")
    comp.add_argument("--num-threads", type=int, help="torch CPU threads per ClientApp")
    comp.set_defaults(func=_guarded(cmd_compose))
    return deploy


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmtl.deploy.cli <subcommand> ...`` (same as ``fedmtl deploy ...``)."""
    parser = argparse.ArgumentParser(prog="fedmtl")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["deploy", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
