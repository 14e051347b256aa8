"""Fixtures for the deployment tests: the repository's scripts loaded as modules, the HELM venv."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"


def load_script(name: str) -> ModuleType:
    """Import a script (scripts/docker-steps, scripts/run-helm, scripts/host_pip_conf.py) as a
    module."""
    module_name = name.removesuffix(".py").replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader = importlib.machinery.SourceFileLoader(module_name, str(SCRIPTS / name))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
    sys.modules[module_name] = module  # dataclasses look their module up while the class is made
    loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def docker_steps() -> ModuleType:
    return load_script("docker-steps")


@pytest.fixture(scope="session")
def run_helm() -> ModuleType:
    return load_script("run-helm")


@pytest.fixture(scope="session")
def host_pip_conf() -> ModuleType:
    return load_script("host_pip_conf.py")
