"""`pip install .` keeps an environment's own torch when it is in setup.cfg's range.

setup.cfg states ranges and constraints.txt the exact set `make setup` installs. The resolution is
pip's own, offline: a throwaway environment holds every package of constraints.txt as an installed
distribution (metadata only) but with another torch, and pip resolves `install --dry-run` of a copy
of the project into it, with a newer torch on offer that it must not take.
"""

import configparser
import importlib.metadata
import json
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import PLUGIN_DIR

REPO = PLUGIN_DIR.parent
PROJECT_FILES = ["setup.cfg", "setup.py", "README.md", "fairseq_siamctc", "hydra_plugins", "manifests"]


def constraints() -> dict:
    """constraints.txt as {canonical name: (name, version)}."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = (name, version)
    return pins


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def direct_requirements() -> list:
    """setup.cfg's install_requires and every extra's, as packaging Requirements."""
    cfg = setup_cfg()
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def test_constraints_pin_every_direct_requirement_inside_its_range():
    pins = constraints()
    for requirement in direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name][1]), f"constraints.txt's {pins[name]} is outside {requirement}"


def fake_distribution(site: pathlib.Path, name: str, version: str):
    """An installed distribution as pip sees one: a dist-info folder with its metadata."""
    info = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def fake_wheel(folder: pathlib.Path, name: str, version: str):
    info = f"{name}-{version}.dist-info/"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(info + "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(info + "RECORD", "")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project's packaging inputs: pip builds its metadata without touching the checkout."""
    copy = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, copy / name)
    return copy


def dry_run_install(project, tmp_path, torch_version: str) -> dict:
    """pip's report of `pip install --dry-run PROJECT` into an environment holding torch_version."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next(env.glob("lib/python*/site-packages"))
    for name, version in constraints().values():
        fake_distribution(site, name, torch_version if canonicalize_name(name) == "torch" else version)
    # The metadata is built by setuptools inside that environment (no build isolation, no index):
    # the real setuptools, linked in.
    real_site = pathlib.Path(importlib.metadata.distribution("setuptools").locate_file(""))
    for path in [real_site / "setuptools", real_site / "_distutils_hack", *real_site.glob("setuptools-*.dist-info")]:
        (site / path.name).symlink_to(path)
    offer = tmp_path / "offer"
    offer.mkdir()
    fake_wheel(offer, "torch", "2.14.1")
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--python", str(env / "bin" / "python"), "install",
         "--dry-run", "--no-index", "--find-links", str(offer), "--no-build-isolation", "--quiet",
         "--report", str(report), str(project)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


VERSION = setup_cfg()["metadata"]["version"]


def test_install_keeps_a_torch_in_range(project, tmp_path):
    # the build that ran the paper's chain on a GPU; a newer torch on offer must not replace it
    assert dry_run_install(project, tmp_path, "2.11.0+cu130") == {"fairseq-siamctc": VERSION}


def test_install_replaces_a_torch_below_the_range(project, tmp_path):
    assert dry_run_install(project, tmp_path, "2.9.0") == {"fairseq-siamctc": VERSION, "torch": "2.14.1"}
