"""The deploy recipes parse, and install tilepipe the way the README says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _readme_install_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r'pip install -e "\.\[all\]"', text)
    assert m, "README must give the install command pip install -e \".[all]\""
    return m.group(0)


def test_compose_file_parses_and_has_the_services():
    doc = yaml.safe_load((DEPLOY / "docker" / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"scheduler", "worker", "s3", "runner"} <= set(services)
    assert "tcp://scheduler:8786" in services["worker"]["command"]
    assert services["runner"]["command"][:3] == ["tilepipe", "--scheduler", "tcp://scheduler:8786"]


def test_dockerfile_installs_with_the_readme_command():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert _readme_install_command() in text
    assert "COPY pyproject.toml" in text


def test_kubernetes_manifests_parse():
    doc = yaml.safe_load((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    assert doc["kind"] == "DaskCluster" and doc["apiVersion"].startswith("kubernetes.dask.org/")
    assert doc["spec"]["worker"]["replicas"] >= 1
    values = yaml.safe_load((DEPLOY / "kubernetes" / "helm-values.yaml").read_text())
    assert values["worker"]["image"]["repository"] == "tilepipe"


def test_slurm_example_is_valid_python_using_run_pipeline():
    src = (DEPLOY / "slurm" / "slurm_cluster.py").read_text()
    tree = ast.parse(src)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "run_pipeline" in names
    assert "SLURMCluster" in src
