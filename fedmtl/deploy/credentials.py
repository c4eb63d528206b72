"""TLS certificates (a private CA and a SuperLink certificate) and SuperNode key pairs."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmtl.tls import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY

# Names every SuperLink certificate covers: loopback (CLI and SuperNodes on the server itself)
# and the docker compose service name (SuperNode containers reach it as ``superlink``).
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "superlink")
# Flower accepts SuperNode keys on NIST curves only; P-384 as in Flower's own docs.
NODE_KEY_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class CertificatePaths:
    """Files written by :func:`write_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """A SuperNode's private key (``--auth-supernode-private-key``) and its public key."""

    private: Path
    public: Path


def server_names(hosts: Iterable[str]) -> list[str]:
    """The certificate's subject alternative names: ``hosts`` plus the defaults, deduplicated.

    Parameters
    ----------
    hosts : iterable of str
        Host names or IP addresses the SuperNodes and the ``flwr`` CLI use to reach the
        SuperLink.

    Returns
    -------
    list of str
        Given names first (in order), then the defaults not already given.
    """
    names: list[str] = []
    for name in [*hosts, *DEFAULT_SERVER_NAMES]:
        name = name.strip()
        if not name:
            continue
        if name.startswith("[") and name.endswith("]"):  # "[::1]" as written in URLs
            name = name[1:-1]
        if name not in names:
            names.append(name)
    return names


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing certificates and CRLs for the CA; signatures and ECDH for the server."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _write_private(path: Path, data: bytes) -> None:
    # Created with mode 0600 from the start: a key must never be world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {existing} (pass --force to replace them)")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_certificates(
    out: str | Path,
    hosts: Iterable[str] = (),
    *,
    days: int = 365,
    organization: str = "fedmtl",
    force: bool = False,
) -> CertificatePaths:
    """Create a private CA and a SuperLink server certificate signed by it.

    Parameters
    ----------
    out : path
        Directory for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (created).
    hosts : iterable of str
        Names and IPs of the SuperLink (see :func:`server_names`).
    days : int
        Validity of both certificates.
    organization : str
        Organisation in the subjects.
    force : bool
        Replace existing files instead of refusing.

    Returns
    -------
    CertificatePaths
        The written files; private keys have mode 0600.

    Raises
    ------
    FileExistsError
        If a target exists and ``force`` is false.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertificatePaths(
        directory / CA_CERT, directory / CA_KEY, directory / SERVER_CERT, directory / SERVER_KEY
    )
    _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little: hosts whose clocks lag the issuer would otherwise reject a fresh cert.
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} federation CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    names = server_names(hosts)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_private(paths.server_key, _pem_key(server_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def node_key_paths(keys_dir: str | Path, client_id: str) -> NodeKeyPaths:
    """Where the key pair of ``client_id`` lives: ``<dir>/<client_id>`` and ``.pub``."""
    directory = Path(keys_dir)
    return NodeKeyPaths(directory / client_id, directory / f"{client_id}.pub")


def write_node_keys(
    out: str | Path, client_ids: Iterable[str], *, force: bool = False
) -> dict[str, NodeKeyPaths]:
    """Create one OpenSSH ECDSA P-384 key pair per client (SuperNode authentication).

    Parameters
    ----------
    out : path
        Directory for ``<client_id>`` (private, mode 0600) and ``<client_id>.pub`` (created).
    client_ids : iterable of str
        The experiment's client ids; each SuperNode authenticates with its client's key.
    force : bool
        Replace existing keys instead of refusing.

    Returns
    -------
    dict
        ``client_id`` → :class:`NodeKeyPaths`.

    Raises
    ------
    FileExistsError
        If a key exists and ``force`` is false (a replaced key must be registered again).
    """
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {client_id: node_key_paths(directory, client_id) for client_id in client_ids}
    _refuse_overwrite([p for pair in paths.values() for p in (pair.private, pair.public)], force)
    for client_id, pair in paths.items():
        key = ec.generate_private_key(NODE_KEY_CURVE())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_private(pair.private, private)
        pair.public.write_bytes(public + f" fedmtl-{client_id}\n".encode())
    return paths
