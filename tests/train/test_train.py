"""`train(...)` end to end on a tiny Qwen2 (fp32 and 8-bit GPTQ): loss, serving, resume, merge."""

import json

import pytest
import torch

from onegpu.engine.loading import EngineConfig, load_engine
from onegpu.engine.types import GenerationRequest
from onegpu.provenance import RECORD_FILE
from onegpu.settings import TrainSettings
from onegpu.train import loop
from onegpu.train import model as tm
from onegpu.train.job import train

pytestmark = pytest.mark.slow

# Hot settings so a 2-layer model memorizes six examples in a dozen steps.
FAST = {
    "template": "qa",
    "max_length": 64,
    "batch_size": 3,
    "grad_accum": 2,
    "lr": 1e-2,
    "warmup_ratio": 0.0,
    "eval_fraction": 0.0,
    "lora_r": 8,
    "lora_alpha": 16,
    "device": "cpu",
    "progress": False,
}
PROMPT = "Question: What is the capital of Zorbania?\nAnswer:"


def run(model, data, output, **settings):
    """One training run, as `onegpu train --model MODEL --data ... --output OUTPUT` makes it."""
    return train(TrainSettings(model=str(model), data=data, output=output, **settings))


def load_base(model, **settings):
    """`tm.load_base` as `train` calls it: TrainSettings' defaults unless `settings` say."""
    names = ("quantization", "device", "dtype", "attn_implementation", "gradient_checkpointing")
    fields = TrainSettings.model_fields
    return tm.load_base(model, **{name: fields[name].default for name in names} | settings)


def record(path):
    return json.loads((path / RECORD_FILE).read_text())


def greedy(engine, prompt=PROMPT):
    request = GenerationRequest(
        prompt=prompt, max_new_tokens=8, temperature=1e-7, stop_sequences=()
    )
    return engine.generate(request)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, toy_jsonl):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    return run(
        tiny_base, [str(toy_jsonl)], out, max_steps=16, lora_dropout=0.0, packing=True, **FAST
    )


def test_training_lowers_the_loss_and_records_the_run(trained, toy_jsonl):
    rec = record(trained)
    losses = [row["loss"] for row in rec["losses"]["train"]]
    assert len(losses) == 16
    assert losses[-1] < 0.1 * losses[0]
    assert rec["data"]["sources"] == [
        {
            "name": str(toy_jsonl),
            "weight": 1.0,
            "available": 6,
            "train": 6,
            "eval": 0,
            "detail": {"file": str(toy_jsonl), "dropped_too_long": 0},
        }
    ]
    assert rec["training"]["seed"] == 0 and rec["training"]["optimizer_used"] == "adamw"
    assert rec["base_model"]["kind"] == "none"
    assert rec["libraries"]["peft"] and rec["libraries"]["torch"]
    assert (trained / "adapter_model.safetensors").is_file()
    assert not (trained / loop.CHECKPOINTS).exists()


def test_the_saved_adapter_serves_and_changes_the_answers(tiny_base, trained):
    plain = load_engine(EngineConfig(model=str(tiny_base), device="cpu"))
    adapted = load_engine(EngineConfig(model=str(tiny_base), adapter=str(trained), device="cpu"))
    assert adapted.info.adapter == str(trained)
    before, after = greedy(plain), greedy(adapted)
    assert after.text == " Quuxville." and after.finish_reason == "eos"
    assert before.token_ids != after.token_ids


def test_held_out_eval_loss_is_measured_before_and_after(tmp_path, tiny_base, toy_jsonl):
    settings = FAST | {"eval_fraction": 0.34}
    out = run(tiny_base, [str(toy_jsonl)], tmp_path / "a", max_steps=2, **settings)
    rec = record(out)
    assert [row["step"] for row in rec["losses"]["eval"]] == [0, 2]
    assert rec["data"]["eval_examples"] == 2 and rec["data"]["train_examples"] == 4


def test_an_interrupted_run_resumes_exactly(tmp_path, tiny_base, toy_jsonl, monkeypatch):
    # Dropout and NEFTune draw random numbers, so an exact match also checks the restored RNG.
    settings = FAST | {"lora_dropout": 0.1, "neftune_alpha": 5.0, "save_every": 2}
    straight = run(tiny_base, [str(toy_jsonl)], tmp_path / "straight", max_steps=4, **settings)

    real_save = loop._save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_crash)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_base, [str(toy_jsonl)], out, max_steps=4, **settings)
    monkeypatch.setattr(loop, "_save_checkpoint", real_save)
    with pytest.raises(FileExistsError, match="resume"):
        run(tiny_base, [str(toy_jsonl)], out, max_steps=4, **settings)
    run(tiny_base, [str(toy_jsonl)], out, max_steps=4, resume=True, **settings)

    a, b = record(straight), record(out)
    assert b["training"]["resumed_from_step"] == 2
    assert [r["step"] for r in b["losses"]["train"]] == [1, 2, 3, 4]
    for x, y in zip(a["losses"]["train"], b["losses"]["train"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(straight / "adapter_model.safetensors")
    wb = load_file(out / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)


def test_a_finished_adapter_is_not_overwritten_by_accident(trained, tiny_base, toy_jsonl):
    with pytest.raises(FileExistsError, match="overwrite"):
        run(tiny_base, [str(toy_jsonl)], trained, max_steps=1, **FAST)


def test_merged_model_matches_base_plus_adapter(tmp_path, tiny_base, trained):
    merged_dir = tm.merge_adapter(trained, tiny_base, tmp_path / "merged", dtype="float32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapted = load_engine(EngineConfig(model=str(tiny_base), adapter=str(trained), device="cpu"))
    ids = torch.tensor([adapted.tokenize(PROMPT)])
    with torch.no_grad():
        expected = adapted.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    assert not (merged_dir / "adapter_config.json").exists()


def test_nf4_needs_cuda(tiny_base):
    with pytest.raises(tm.TrainModelError, match="CUDA"):
        load_base(tiny_base, quantization="nf4", device="cpu")


def test_merging_into_a_quantized_model_is_refused(tmp_path, tiny_gptq, trained):
    with pytest.raises(tm.TrainModelError, match="16-bit"):
        tm.merge_adapter(trained, tiny_gptq, tmp_path / "m")


# -- the 8-bit GPTQ base ------------------------------------------------------------------------


def test_gptq_training_kernel_passes_input_gradients(tiny_gptq):
    base = load_base(tiny_gptq, device="cpu")
    assert base.kind == "gptq"
    layer = base.model.model.layers[0].mlp.down_proj  # a GPTQModel quantized linear
    assert not isinstance(layer, torch.nn.Linear)
    layer.train()
    n_in = base.model.config.intermediate_size
    with torch.no_grad():  # the layer's effective matrix and bias, read off its outputs
        bias = layer(torch.zeros(1, n_in))
        weight = layer(torch.eye(n_in)) - bias  # [in, out]
    x = torch.randn(3, n_in, requires_grad=True)
    upstream = torch.randn(3, weight.shape[1])
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream @ weight.T, atol=1e-4, rtol=1e-4)


def test_gptq_base_trains_and_serves_its_adapter(tmp_path, tiny_gptq, toy_jsonl):
    out = run(tiny_gptq, [str(toy_jsonl)], tmp_path / "a", max_steps=16, lora_dropout=0.0, **FAST)
    rec = record(out)
    losses = [row["loss"] for row in rec["losses"]["train"]]
    assert losses[-1] < 0.1 * losses[0]
    assert rec["base_model"]["kind"] == "gptq" and rec["base_model"]["bits"] == 8
    assert rec["base_model"]["kernel"] == "gptqmodel:torch"
    assert rec["base_model"]["quantized_from"]["quantization"]["bits"] == 8

    # Served as `onegpu serve --model GPTQ --adapter OUT` would; the random base cannot know this
    # answer (the fp32 test above compares with the base's own output).
    adapted = load_engine(EngineConfig(model=str(tiny_gptq), adapter=str(out), device="cpu"))
    assert adapted.info.quantization == "gptq-8bit"
    assert greedy(adapted).text == " Quuxville."
    with adapted.model.disable_adapter():
        assert greedy(adapted).text != " Quuxville."
