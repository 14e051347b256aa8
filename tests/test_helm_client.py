"""The real HELM client (crfm-helm 0.5.16, its own venv) against a live server on the real model.

`make test` builds `.venv-helm` and sets ONEGPU_REQUIRE_HELM=1, so in CI a missing client fails
instead of skipping.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import REPO
from tests.live import live_server

pytestmark = [pytest.mark.helm, pytest.mark.slow]


def test_helm_run_synthetic_reasoning_with_zero_failures(helm_python, smol_engine, tmp_path):
    with live_server(create_app(ServeSettings(), engine=smol_engine)) as url:
        result = subprocess.run(
            [
                str(helm_python),
                str(REPO / "scripts" / "helm_smoke.py"),
                "--base-url",
                url,
                "--output-dir",
                str(tmp_path / "helm"),
                "--max-eval-instances",
                "10",
                "--threads",
                "8",
                "--offline",
                "--json",
                str(tmp_path / "summary.json"),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    sys.stdout.write(result.stdout[-4000:])
    sys.stderr.write(result.stderr[-4000:])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(json.dumps(summary, indent=1)[:2000])
