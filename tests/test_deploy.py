"""fedmtl.deploy without processes: credentials, the commands, compose file and Dockerfile drift.

Independent checks: a real TLS handshake against the generated certificates (Python's ssl),
Flower's own parsers for the produced flags, node config and connection entry, ssh-keygen on
the node keys, and the committed compose file parsed as YAML against ``deploy commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmtl.config import load_experiment
from fedmtl.deploy import compose as compose_module
from fedmtl.deploy.cli import add_deploy_parser
from fedmtl.deploy.commands import DeploySettings, build_plan, toml_literal, write_scripts
from fedmtl.deploy.credentials import write_certificates, write_node_keys

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.toml"
QUICKSTART = ROOT / "configs" / "quickstart.toml"
DOCKER = ROOT / "docker"


def deploy_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="fedmtl")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["deploy", *argv])
    code = int(args.func(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- credentials


def _handshake(certs: Path, server_name: str, connect_to: str = "127.0.0.1") -> None:
    """A TLS handshake: server with server.pem/key, client trusting only ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.create_server((connect_to, 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection((connect_to, port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    tls.sendall(b"x")
        finally:
            thread.join(timeout=10)


def test_certificates_verify_for_every_name_and_only_those(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path, ["server.example", "10.1.2.3"], days=30)
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert names == {"server.example", "localhost", "superlink"}
    assert ips == {"10.1.2.3", "127.0.0.1", "::1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 30  # 30 days plus the 5-minute backdating
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Python's TLS stack accepts the chain for loopback names, and refuses other names.
    _handshake(tmp_path, "localhost")
    _handshake(tmp_path, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, "elsewhere.example")


def test_certificates_are_not_overwritten_without_force(tmp_path: Path) -> None:
    first = write_certificates(tmp_path)
    before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        write_certificates(tmp_path)
    assert first.ca_cert.read_bytes() == before
    write_certificates(tmp_path, force=True)
    assert first.ca_cert.read_bytes() != before


def test_node_keys_are_openssh_p384_pairs_flower_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pairs = write_node_keys(tmp_path, ["a", "b"])
    assert set(pairs) == {"a", "b"}
    for client_id, pair in pairs.items():
        private = load_ssh_private_key(pair.private.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
        derived = private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        assert pair.public.read_bytes().split()[:2] == derived.split()
        assert pair.public.read_text().split()[2] == f"fedmtl-{client_id}"
        assert try_load_public_key(pair.public)  # what `flwr supernode register` does
    assert load_ssh_private_key(pairs["a"].private.read_bytes(), None).public_key() != (
        load_ssh_private_key(pairs["b"].private.read_bytes(), None).public_key()
    )
    with pytest.raises(FileExistsError):
        write_node_keys(tmp_path, ["b"])


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_node_keys_read_by_ssh_keygen(tmp_path: Path) -> None:
    pair = write_node_keys(tmp_path, ["a"])["a"]
    shown = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pair.private)], capture_output=True, text=True, check=True
    ).stdout
    assert shown.startswith("384 ") and "(ECDSA)" in shown


def test_cli_keys_one_pair_per_client_of_the_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = deploy_cli(["keys", "--out", str(tmp_path), "--experiment", str(TINY)], capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.pub", "b", "b.pub", "c", "c.pub"]
    assert "c:" in out
    code, _, err = deploy_cli(["keys", "--out", str(tmp_path), "--experiment", str(TINY)], capsys)
    assert code == 2 and "--force" in err


def test_cli_certs_accepts_repeated_and_comma_separated_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["certs", "--out", str(tmp_path), "--host", "a.example,10.0.0.9", "--host", "b.example"]
    code, out, _ = deploy_cli(argv, capsys)
    assert code == 0
    assert "a.example, 10.0.0.9, b.example, localhost, 127.0.0.1, ::1, superlink" in out


# --------------------------------------------------------------------------- commands


def settings(**changes: Any) -> DeploySettings:
    base: dict[str, Any] = {
        "superlink": "10.0.0.5:8000",
        "certs_dir": "/etc/fedmtl/certs",
        "keys_dir": "/etc/fedmtl/keys",
        "experiment": "configs/x.toml",
        "data_dir": "/data",
        "devices": ("cuda:0", "cuda:1"),
    }
    return DeploySettings(**{**base, **changes})


def test_plan_has_the_exact_tls_and_auth_commands() -> None:
    plan = build_plan(settings(), ["a", "b", "c"], "x")
    assert plan.superlink.argv == (
        "flower-superlink", "--host", "0.0.0.0", "--port", "8000",
        "--ssl-ca-certfile", "/etc/fedmtl/certs/ca.crt",
        "--ssl-certfile", "/etc/fedmtl/certs/server.pem",
        "--ssl-keyfile", "/etc/fedmtl/certs/server.key",
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--database", "state/superlink.db",
    )  # fmt: skip
    assert plan.supernodes["b"].argv == (
        "flower-supernode", "--superlink", "10.0.0.5:8000",
        "--root-certificates", "/etc/fedmtl/certs/ca.crt",
        "--auth-supernode-private-key", "/etc/fedmtl/keys/b",
        "--port", "9095",
        "--node-config", "client-id='b' state-dir='state/b' data-dir='/data' device='cuda:1'",
    )  # fmt: skip
    assert [p.argv for p in plan.register] == [
        ("flwr", "supernode", "register", f"/etc/fedmtl/keys/{c}.pub", "fedmtl", "--name", c)
        for c in "abc"
    ]
    assert plan.run.argv == (
        "flwr", "run", ".", "fedmtl", "--stream", "--run-config",
        "experiment='configs/x.toml' stream-address='10.0.0.5' stream-port=9100"
        " stream-certfile='/etc/fedmtl/certs/server.pem'"
        " stream-keyfile='/etc/fedmtl/certs/server.key'"
        " stream-ca-certfile='/etc/fedmtl/certs/ca.crt'",
    )  # fmt: skip
    # devices are assigned in turn
    assert "device='cuda:0'" in plan.supernodes["c"].argv[-1]


def test_flower_parses_every_flag_and_the_node_config() -> None:
    from flwr.common.config import parse_config_args
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    plan = build_plan(settings(num_threads=3, state_root="/var/lib/fed mtl"), ["a", "b"], "x")
    link = _parse_args_run_superlink().parse_args(list(plan.superlink.argv[1:]))
    assert link.enable_supernode_auth and not link.insecure
    assert link.ssl_certfile == "/etc/fedmtl/certs/server.pem"
    assert link.host == "0.0.0.0" and link.port == 8000
    assert link.database == "/var/lib/fed mtl/superlink.db"
    node = _parse_args_run_supernode().parse_args(list(plan.supernodes["a"].argv[1:]))
    assert node.auth_supernode_private_key == "/etc/fedmtl/keys/a" and not node.insecure
    assert parse_config_args([node.node_config]) == {
        "client-id": "a",
        "state-dir": "/var/lib/fed mtl/a",
        "data-dir": "/data",
        "device": "cuda:0",
        "num-threads": 3,
    }
    run_config = plan.run.argv[plan.run.argv.index("--run-config") + 1]
    assert parse_config_args([run_config]) == {
        "experiment": "configs/x.toml",
        "stream-address": "10.0.0.5",
        "stream-port": 9100,
        "stream-certfile": "/etc/fedmtl/certs/server.pem",
        "stream-keyfile": "/etc/fedmtl/certs/server.key",
        "stream-ca-certfile": "/etc/fedmtl/certs/ca.crt",
    }
    insecure = build_plan(settings(insecure=True), ["a"], "x").run.argv[-1]
    assert parse_config_args([insecure]) == {
        "experiment": "configs/x.toml", "stream-address": "10.0.0.5", "stream-port": 9100,
    }  # fmt: skip


def test_connection_entry_is_what_the_flwr_cli_reads(tmp_path: Path) -> None:
    from flwr.cli.flower_config import parse_superlink_connection

    secure = build_plan(settings(certs_dir=str(tmp_path)), ["a"], "x").connection_toml
    entry = tomllib.loads(secure)["superlink"]["fedmtl"]
    connection = parse_superlink_connection(entry, "fedmtl")
    assert connection.address == "10.0.0.5:8000"
    assert connection.root_certificates == str(tmp_path / "ca.crt")
    insecure = build_plan(settings(insecure=True), ["a"], "x").connection_toml
    assert parse_superlink_connection(tomllib.loads(insecure)["superlink"]["fedmtl"], "f").insecure


def test_insecure_is_explicit_and_drops_tls_and_auth(capsys: pytest.CaptureFixture[str]) -> None:
    plan = build_plan(settings(insecure=True), ["a", "b"], "x")
    assert "--insecure" in plan.superlink.argv
    assert not {"--ssl-certfile", "--enable-supernode-auth"} & set(plan.superlink.argv)
    assert "--insecure" in plan.supernodes["a"].argv
    assert "--auth-supernode-private-key" not in plan.supernodes["a"].argv
    assert plan.register == ()
    base = ["commands", "--experiment", str(TINY), "--superlink", "h:8000"]
    code, _, err = deploy_cli(base, capsys)
    assert code == 2 and "--certs and --keys" in err and "--insecure" in err
    code, out, err = deploy_cli([*base, "--insecure"], capsys)
    assert code == 0 and "WARNING" in err and "--insecure" in out


def test_node_config_refuses_values_it_cannot_quote() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        toml_literal("it's")
    with pytest.raises(ValueError, match="HOST:PORT"):
        build_plan(settings(superlink="10.0.0.5"), ["a"], "x")


def test_printed_lines_and_scripts_run_the_planned_argv(tmp_path: Path) -> None:
    plan = build_plan(settings(certs_dir="/my certs", state_root="st"), ["a", "b"], "x")
    for process in [plan.superlink, *plan.register, *plan.supernodes.values(), plan.run]:
        assert shlex.split(process.shell()) == list(process.argv)
    written = write_scripts(plan, tmp_path)
    assert sorted(p.name for p in written) == [
        "flwr-config.toml", "register-supernodes.sh", "run.sh", "superlink.sh",
        "supernode-a.sh", "supernode-b.sh",
    ]  # fmt: skip
    for script in tmp_path.glob("*.sh"):
        assert os.access(script, os.X_OK)
        subprocess.run(["bash", "-n", str(script)], check=True)  # syntax
    assert "mkdir -p st\nexec flower-superlink" in (tmp_path / "superlink.sh").read_text()
    exec_line = (tmp_path / "supernode-b.sh").read_text().splitlines()[-1]
    assert shlex.split(exec_line) == ["exec", *plan.supernodes["b"].argv]
    assert (
        'FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}/supernode-b"'
        in (tmp_path / "supernode-b.sh").read_text()
    )


def test_cli_commands_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "commands", "--experiment", str(TINY), "--superlink", "srv:8000",
        "--certs", "certs", "--keys", "keys", "--format", "json",
    ]  # fmt: skip
    code, out, _ = deploy_cli(argv, capsys)
    assert code == 0
    plan = json.loads(out)
    assert list(plan["supernodes"]) == ["a", "b", "c"]
    assert plan["superlink"]["argv"][0] == "flower-superlink"
    code, text, _ = deploy_cli(argv[:-2], capsys)
    assert code == 0
    flat = " ".join(text.replace("#", " ").split())
    assert "Firewall it to the client machines" in flat and "no user authentication" in flat
    assert text.count("flower-supernode ") == 3
    assert "[superlink.fedmtl]" in text


def test_data_dir_only_for_datasets_read_from_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    on_disk = tmp_path / "cifar.toml"
    on_disk.write_text(
        TINY.read_text().replace('kind = "quickstart"', 'kind = "cifar10"\nroot = "/nowhere"')
    )
    base = ["commands", "--superlink", "h:8000", "--insecure", "--data-dir", "/data"]
    code, out, err = deploy_cli([*base, "--experiment", str(TINY), "--format", "json"], capsys)
    assert code == 0 and "--data-dir ignored" in err  # bundled data refuses a root
    assert all("data-dir" not in p["argv"][-1] for p in json.loads(out)["supernodes"].values())
    code, out, _ = deploy_cli([*base, "--experiment", str(on_disk), "--format", "json"], capsys)
    assert code == 0
    assert all("data-dir='/data'" in p["argv"][-1] for p in json.loads(out)["supernodes"].values())


# --------------------------------------------------------------------------- compose


def docker_commands(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``deploy commands`` with the container paths the README gives for compose."""
    argv = [
        "commands", "--experiment", str(QUICKSTART),
        "--superlink", "superlink:8000", "--certs", "/app/certificates", "--keys", "/app/keys",
        "--state-root", "/app/state", "--data-dir", "/data", "--devices", "cuda:0",
        "--format", "json",
    ]  # fmt: skip
    code, out, _ = deploy_cli(argv, capsys)
    assert code == 0
    return dict(json.loads(out))


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → host path of a service's volumes."""
    out = {}
    for volume in service["volumes"]:
        # the host side may hold "${VAR:-default}", whose ":-" is no separator
        match = re.fullmatch(r"((?:\$\{[^}]*\})?[^:]*):([^:]+)(?::(ro|rw))?", volume)
        assert match, volume
        out[match.group(2)] = match.group(1)
    return out


def _covered(path: str, mounts: dict[str, str]) -> bool:
    return any(path == target or path.startswith(target + "/") for target in mounts)


def test_committed_compose_file_is_what_the_generator_writes() -> None:
    experiment = load_experiment(QUICKSTART, check_data=False)
    clients = [c.client_id for c in experiment.clients]
    # the bundled digits take no data directory
    expected = compose_module.render_compose(experiment.name, clients, data=False)
    assert (DOCKER / "compose.yml").read_text() == expected, (
        "docker/compose.yml is stale: fedmtl deploy compose --experiment configs/quickstart.toml "
        "--out docker"
    )
    assert (DOCKER / ".env.example").read_text() == compose_module.render_env(
        experiment.name, clients, data=False
    )


def test_compose_services_run_the_deploy_commands(capsys: pytest.CaptureFixture[str]) -> None:
    plan = docker_commands(capsys)
    spec = yaml.safe_load((DOCKER / "compose.yml").read_text())
    services = spec["services"]
    assert set(services) == {"superlink"} | {f"supernode-{c}" for c in plan["supernodes"]}

    link = services["superlink"]
    argv = plan["superlink"]["argv"]
    assert link["command"] == argv
    listen_port = argv[argv.index("--port") + 1]
    # The ServerApp (FedMuscle's stream) runs in the SuperLink's container: its port and the
    # TLS files of the run config must be published and mounted there.
    from flwr.common.config import parse_config_args

    run_config = parse_config_args([plan["run"]["argv"][-1]])
    assert run_config["stream-address"] == "superlink"
    stream_port = str(run_config["stream-port"])
    assert [p.rsplit(":", 1)[1] for p in link["ports"]] == [listen_port, stream_port]
    mounts = _mounts(link)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert _covered(argv[argv.index(flag) + 1], mounts), flag
    for key in ("stream-certfile", "stream-keyfile", "stream-ca-certfile"):
        assert run_config[key] == argv[argv.index(f"--ssl-{key.split('-', 1)[1]}") + 1]
    assert "/app/runs" in mounts  # the ServerApp's output-dir 'runs' (cwd /app)

    for client_id, process in plan["supernodes"].items():
        service = services[f"supernode-{client_id}"]
        assert service["command"] == process["argv"]
        node_argv = process["argv"]
        host, port = node_argv[node_argv.index("--superlink") + 1].rsplit(":", 1)
        assert host == "superlink" and port == listen_port
        mounts = _mounts(service)
        for flag in ("--root-certificates", "--auth-supernode-private-key"):
            assert _covered(node_argv[node_argv.index(flag) + 1], mounts), (client_id, flag)
        assert mounts[f"/app/keys/{client_id}"] == "${KEYS_DIR:-./keys}/" + client_id
        assert _covered(f"/app/state/{client_id}", mounts)
        assert f"state-dir='/app/state/{client_id}'" in node_argv[-1]
        assert "data-dir" not in node_argv[-1] and "/data" not in mounts  # bundled data
        device = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert service["image"] == link["image"] and "build" in service


def test_compose_gpu_assignment_and_cpu_variant() -> None:
    text = compose_module.render_compose("e", ["x", "y", "z"], gpus=["0", "1"])
    services = yaml.safe_load(text)["services"]
    ids = [
        services[f"supernode-{c}"]["deploy"]["resources"]["reservations"]["devices"][0][
            "device_ids"
        ]
        for c in "xyz"
    ]
    assert ids == [["${GPU_NODE_0:-0}"], ["${GPU_NODE_1:-1}"], ["${GPU_NODE_2:-0}"]]
    env = compose_module.render_env("e", ["x", "y", "z"], gpus=["0", "1"])
    assert "GPU_NODE_2=0" in env.splitlines()
    assert services["supernode-x"]["command"][-1].endswith("data-dir='/data' device='cuda:0'")
    assert "${DATA_DIR:-./data}:/data:ro" in services["supernode-x"]["volumes"]
    cpu = yaml.safe_load(compose_module.render_compose("e", ["x"], cpu=True))
    node = cpu["services"]["supernode-x"]
    assert "deploy" not in node and "device='cpu'" in node["command"][-1]


def test_dockerfile_matches_compose_and_flower_image_conventions() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={compose_module.BASE_IMAGE}" in text
    assert "FROM ${BASE_IMAGE}" in text
    assert "49999" in text and "USER app" in text
    assert "FLWR_HOME=/app/.flwr" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    assert "pip install" in text


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_binary() is None, reason="no docker-compose binary")
@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_docker_compose_config_accepts_the_file(tmp_path: Path, variant: str) -> None:
    # `config` validates against the Compose specification: the GPU reservations of the
    # committed file can be checked here even without a GPU; the --cpu file is the one the
    # compose end-to-end test brings up.
    binary = _compose_binary()
    assert binary is not None
    for name in ("compose.yml", ".env.example"):
        shutil.copy(DOCKER / name, tmp_path / name)
    shutil.copy(DOCKER / ".env.example", tmp_path / ".env")
    if variant == "cpu":
        experiment = load_experiment(QUICKSTART, check_data=False)
        clients = [c.client_id for c in experiment.clients]
        text = compose_module.render_compose(
            experiment.name, clients, cpu=True, data=False, num_threads=1
        )
        (tmp_path / "compose.yml").write_text(text)
    result = subprocess.run(
        [*binary, "-f", str(tmp_path / "compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= {"superlink", "supernode-digit-vit-tiny"}
    assert "flower-superlink" in str(resolved["services"]["superlink"]["command"])
    node = resolved["services"]["supernode-digit-vit-tiny"]
    assert node["user"] == "49999:49999"  # .env.example's FEDMTL_UID:FEDMTL_GID
    devices = node.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if variant == "gpu":
        assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    else:
        assert devices is None and "num-threads=1" in node["command"][-1]


def test_compose_runs_as_the_env_user_and_pins_threads() -> None:
    spec = yaml.safe_load(compose_module.render_compose("e", ["x", "y"], cpu=True, num_threads=1))
    for name, service in spec["services"].items():
        assert service["user"] == "${FEDMTL_UID:-49999}:${FEDMTL_GID:-49999}", name
    assert spec["services"]["supernode-y"]["command"][-1].endswith("num-threads=1")
    env = compose_module.render_env("e", ["x", "y"], cpu=True).splitlines()
    assert "FEDMTL_UID=49999" in env and "FEDMTL_GID=49999" in env
    with pytest.raises(ValueError, match="num-threads must be at least 1"):
        compose_module.render_compose("e", ["x"], num_threads=0)


def test_compose_cli_rejects_contradictory_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["compose", "--experiment", str(TINY), "--out", str(tmp_path)]
    code, _, err = deploy_cli([*base, "--cpu", "--gpus", "1"], capsys)
    assert code == 2 and "--cpu and --gpus exclude each other" in err
    code, _, err = deploy_cli([*base, "--num-threads", "0"], capsys)
    assert code == 2 and "--num-threads must be at least 1, got 0" in err
    assert not (tmp_path / "compose.yml").exists()


def test_compose_cli_creates_the_mounted_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Created by the user, not by the engine (which would make them root's).
    argv = ["compose", "--experiment", str(TINY), "--out", str(tmp_path), "--cpu"]
    code, out, _ = deploy_cli(argv, capsys)
    assert code == 0 and "3 SuperNodes" in out
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["a", "b", "c", "superlink"]
    assert (tmp_path / "runs").is_dir()
    spec = yaml.safe_load((tmp_path / "compose.yml").read_text())
    for client_id in ("a", "b", "c"):
        mounts = _mounts(spec["services"][f"supernode-{client_id}"])
        assert mounts[f"/app/state/{client_id}"] == "${STATE_DIR:-./state}/" + client_id


def test_container_tool_probe_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmtl.deploy.containers import find_container_tool

    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_container_tool() == (None, "docker: not installed; podman: not installed")
    assert find_container_tool("podman") == (None, "podman: not installed")
    with pytest.raises(ValueError, match="must be one of"):
        find_container_tool("lxc")


# --------------------------------------------------------------------------- GPU nodes


def test_node_config_device_overrides_the_experiment_device(tmp_path: Path) -> None:
    from flwr.app import Message
    from flwr.common.config import parse_config_args

    from fedmtl.client_app import app as client_app
    from fedmtl.config import experiment_to_json
    from fedmtl.messages import DESCRIBE, make_content
    from fedmtl.testing import FakeGrid

    experiment = load_experiment(TINY).model_copy(update={"device": "cuda:7"})
    chosen = settings(state_root=str(tmp_path), devices=("cpu",), data_dir=None)
    process = build_plan(chosen, ["b"], "x")
    node_config = parse_config_args([process.supernodes["b"].argv[-1]])
    grid = FakeGrid(client_app, 1, node_configs=[node_config])
    content = make_content({"experiment": experiment_to_json(experiment), "server-round": 1})
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=101, message_type=DESCRIBE)])
    assert not reply.has_error(), reply.error
    info = reply.content.config_records["client"]
    assert info["client-id"] == "b"  # chosen by the node config, not by partition-id 0
    assert info["device"] == "cpu"  # not the experiment's cuda:7


def _with_gpus(gpus: float, monkeypatch: pytest.MonkeyPatch, visible: int) -> dict[str, Any]:
    import torch

    from fedmtl.simulation import backend_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    experiment = load_experiment(TINY, check_data=False)
    simulation = experiment.simulation.model_copy(update={"num_gpus_per_client": gpus})
    return backend_config(experiment.model_copy(update={"simulation": simulation}))


def test_simulation_gpu_fractions(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _with_gpus(0.25, monkeypatch, visible=2)
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert config["init_args"]["num_gpus"] == 2  # Ray packs 2 / 0.25 = 8 clients on the GPUs
    cpu_only = _with_gpus(0.0, monkeypatch, visible=2)
    assert cpu_only["client_resources"]["num_gpus"] == 0.0
    assert "num_gpus" not in cpu_only["init_args"]


def test_simulation_gpu_request_without_gpu_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(RuntimeError, match=r"num_gpus_per_client=0\.5 but no CUDA device"):
        _with_gpus(0.5, monkeypatch, visible=0)


def test_free_port_block_skips_ports_in_use() -> None:
    from fedmtl.deploy.local import free_port_block

    first = free_port_block(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))
        again = free_port_block(3, start=first)
        assert again > first + 1  # the block may not include the taken port
        for port in range(again, again + 3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))


def test_local_deployment_stops_whole_process_groups(tmp_path: Path) -> None:
    from fedmtl.deploy.local import LocalDeployment

    local = LocalDeployment(tmp_path, ["a"])
    # A leader and a child that both ignore SIGTERM, like a hung SuperNode and its ClientApp.
    script = "trap '' TERM; sleep 300 & echo $! > child.pid; wait"
    local.start_supernode("a", ["bash", "-c", script])
    pid_file = tmp_path / "cwd" / "supernode-a" / "child.pid"
    local.wait_for(pid_file.exists, timeout=30, interval=0.1)
    child = int(pid_file.read_text())
    assert local.running("supernode-a")
    code = local.stop("supernode-a", timeout=1)
    assert code == -9  # SIGTERM ignored, so the group got SIGKILL
    assert not local.processes

    def gone() -> bool:  # exited; a zombie awaiting its reaper counts as gone
        try:
            return Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    local.wait_for(gone, timeout=10, interval=0.1)
