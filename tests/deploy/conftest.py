"""Fixtures for the deployment tests: the repository's scripts loaded as modules, the HELM venv."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"
HELM_PYTHON = REPO / ".venv-helm" / "bin" / "python"


def load_script(name: str) -> ModuleType:
    """Import an extension-less script (scripts/docker-steps, scripts/run-helm) as a module."""
    module_name = name.replace("-", "_")
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
def helm_python() -> Path:
    """crfm-helm's venv (scripts/setup-helm-venv); CI sets ONEGPU_REQUIRE_HELM=1: it must exist."""
    if not HELM_PYTHON.exists():
        message = "the HELM client venv is missing: run scripts/setup-helm-venv"
        if os.environ.get("ONEGPU_REQUIRE_HELM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return HELM_PYTHON
