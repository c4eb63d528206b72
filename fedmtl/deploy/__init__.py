"""Deployment on several machines and with docker compose: credentials, commands, compose."""

from fedmtl.deploy.commands import DeploymentPlan, DeploySettings, Process, build_plan
from fedmtl.deploy.compose import docker_settings, render_compose
from fedmtl.deploy.credentials import write_certificates, write_node_keys

__all__ = [
    "DeploySettings",
    "DeploymentPlan",
    "Process",
    "build_plan",
    "docker_settings",
    "render_compose",
    "write_certificates",
    "write_node_keys",
]
