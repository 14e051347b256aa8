"""Qwen v1 -> Qwen2 conversion: a tiny random v1 checkpoint, a plain-torch v1 forward pass, and the
converted Qwen2ForCausalLM must agree within v1's window."""

import base64
import json
import math
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

from onegpu.quantize.qwen_v1 import (
    METADATA_FILE,
    QwenV1ConversionError,
    convert_qwen_v1,
    convert_state_dict,
    convert_tensor,
    generation_config_from_v1,
    qwen2_config_from_v1,
)

TINY_V1 = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "model_type": "qwen",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "num_hidden_layers": 2,
    "intermediate_size": 192,  # v1 counts w1 and w2 together: each is 96 wide
    "vocab_size": 512,
    "seq_length": 32,
    "max_position_embeddings": 8192,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "no_bias": True,
    "scale_attn_weights": True,
    "tie_word_embeddings": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
}
# Qwen/Qwen-14B's config.json, the fields that matter.
QWEN_14B_V1 = TINY_V1 | {
    "hidden_size": 5120,
    "num_attention_heads": 40,
    "kv_channels": 128,
    "num_hidden_layers": 40,
    "intermediate_size": 27392,
    "vocab_size": 152064,
    "seq_length": 2048,
}
# A byte-level vocabulary: <|endoftext|> gets id 256, the extras end at 463 (< vocab_size 512).
TINY_ENDOFTEXT = 256


def tiny_v1_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in v1's key layout, large enough that the logits are far from flat."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator) * std

    hidden, ffn, vocab = (
        config["hidden_size"],
        config["intermediate_size"] // 2,
        config["vocab_size"],
    )
    state = {
        "transformer.wte.weight": randn(vocab, hidden),
        "transformer.ln_f.weight": 1 + randn(hidden, std=0.1),
        "lm_head.weight": randn(vocab, hidden, std=4 * hidden**-0.5),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"transformer.h.{i}"
        state |= {
            f"{layer}.ln_1.weight": 1 + randn(hidden, std=0.1),
            f"{layer}.attn.c_attn.weight": randn(3 * hidden, hidden, std=hidden**-0.5),
            f"{layer}.attn.c_attn.bias": randn(3 * hidden, std=0.5),
            f"{layer}.attn.c_proj.weight": randn(hidden, hidden, std=hidden**-0.5),
            f"{layer}.ln_2.weight": 1 + randn(hidden, std=0.1),
            f"{layer}.mlp.w1.weight": randn(ffn, hidden, std=hidden**-0.5),
            f"{layer}.mlp.w2.weight": randn(ffn, hidden, std=hidden**-0.5),
            f"{layer}.mlp.c_proj.weight": randn(hidden, ffn, std=ffn**-0.5),
        }
    return state


def v1_reference_logits(state: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """Qwen v1's forward pass (modeling_qwen.py, eval mode, no cache) in plain torch, including
    dynamic NTK and logn attention, which only act beyond `seq_length`. ids [B, T] -> [B, T, V]."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, window, eps = hidden // heads, config["seq_length"], config["layer_norm_epsilon"]
    batch, length = ids.shape

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    # QWenModel.get_ntk_alpha: 1 for any length <= seq_length.
    ntk_alpha = max(2 ** math.ceil(math.log(length / window, 2) + 1) - 1, 1)
    base = config["rotary_emb_base"] * ntk_alpha ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, T, 1, head_dim]

    def rotary(t):  # [B, T, heads, head_dim]; v1's _rotate_half splits the last dim in halves
        first, second = t.chunk(2, dim=-1)
        return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()

    # QWenAttention.logn_tensor: log_{seq_length}(position) past the window, 1 inside it.
    logn = torch.tensor([math.log(i, window) if i > window else 1.0 for i in range(1, length + 1)])
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    x = state["transformer.wte.weight"][ids]  # [B, T, H]
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, state[p + "ln_1.weight"])
        qkv = h @ state[p + "attn.c_attn.weight"].T + state[p + "attn.c_attn.bias"]  # [B, T, 3H]
        q, k, v = (t.view(batch, length, heads, head_dim) for t in qkv.split(hidden, dim=-1))
        q, k = rotary(q), rotary(k)
        if length > window and config["use_logn_attn"]:
            q = q * logn[None, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = x + attn @ state[p + "attn.c_proj.weight"].T
        h = rms_norm(x, state[p + "ln_2.weight"])
        a1, a2 = h @ state[p + "mlp.w1.weight"].T, h @ state[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ state[p + "mlp.c_proj.weight"].T
    return rms_norm(x, state["transformer.ln_f.weight"]) @ state["lm_head.weight"].T


def write_v1_checkpoint(folder: Path, config: dict, state: dict) -> Path:
    """A v1 folder as the hub has it: two safetensors shards with an index, configs, vocabulary."""
    folder.mkdir(parents=True)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    for shard, shard_names in shards.items():
        save_file({n: state[n].contiguous() for n in shard_names}, folder / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    generation = {
        "chat_format": "raw",
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "eos_token_id": TINY_ENDOFTEXT,
        "pad_token_id": TINY_ENDOFTEXT,
        "stop_words_ids": [[TINY_ENDOFTEXT]],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation))
    ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    (folder / "qwen.tiktoken").write_text(ranks)
    return folder


@pytest.fixture(scope="module")
def v1_state() -> dict[str, torch.Tensor]:
    return tiny_v1_state(TINY_V1)


@pytest.fixture(scope="module")
def v1_folder(v1_state, tmp_path_factory) -> Path:
    state = v1_state | {"transformer.h.0.attn.rotary_emb.inv_freq": torch.ones(8)}  # a stray buffer
    return write_v1_checkpoint(tmp_path_factory.mktemp("v1") / "qwen-v1", TINY_V1, state)


@pytest.fixture(scope="module")
def converted(v1_folder, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("out") / "qwen2"
    # A small shard size forces several output shards.
    return convert_qwen_v1(v1_folder, dst, dtype=torch.float32, max_shard_size=64 * 1024)


@pytest.fixture(scope="module")
def model(converted) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.mark.parametrize("length", [1, 5, 17, TINY_V1["seq_length"]])
def test_logits_match_v1_within_the_window(model, v1_state, length):
    ids = torch.randint(
        0, TINY_V1["vocab_size"], (3, length), generator=torch.Generator().manual_seed(length)
    )
    with torch.no_grad():
        want = v1_reference_logits(v1_state, TINY_V1, ids)
        got = model(ids).logits
    assert want.std() > 2.0  # far from flat logits, so agreement means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_beyond_the_window_v1_differs(model, v1_state):
    """Dynamic NTK and logn attention are not carried over: past seq_length the models part."""
    ids = torch.randint(0, TINY_V1["vocab_size"], (1, 2 * TINY_V1["seq_length"]))
    with torch.no_grad():
        want = v1_reference_logits(v1_state, TINY_V1, ids)
        got = model(ids).logits
    assert (got - want).abs().max() > 1e-2


def test_converted_folder_is_a_native_qwen2_model(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert "auto_map" not in config
    assert config["intermediate_size"] == 96
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert config["max_position_embeddings"] == 32
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == TINY_ENDOFTEXT

    index = json.loads((converted / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == sorted(p.name for p in converted.glob("*.safetensors"))
    assert "model.layers.1.self_attn.k_proj.bias" in index["weight_map"]
    assert not any("rotary_emb" in name for name in index["weight_map"])

    metadata = json.loads((converted / METADATA_FILE).read_text())
    assert metadata["exact_within_tokens"] == 32
    assert metadata["not_carried_over"]["use_dynamic_ntk"] is True
    assert metadata["not_carried_over"]["use_logn_attn"] is True
    assert not converted.with_name(converted.name + ".partial").exists()


def test_converted_folder_loads_with_auto_classes_and_generates(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == TINY_ENDOFTEXT
    assert model.generation_config.pad_token_id is None
    assert model.generation_config.top_p == 0.8
    inputs = tokenizer("Hello", return_tensors="pt")
    assert inputs.input_ids.tolist() == [list(b"Hello")]  # the tiny vocabulary is bytes
    first = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert first.shape == (1, 10)
    assert torch.equal(first, again)


@pytest.mark.parametrize(("dtype", "stored"), [(None, "F32"), (torch.bfloat16, "BF16")])
def test_dtype_is_kept_or_converted(tmp_path, v1_folder, dtype, stored):
    dst = convert_qwen_v1(v1_folder, tmp_path / "out", dtype=dtype)
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == {"F32": "float32", "BF16": "bfloat16"}[stored]
    for shard in dst.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {stored}  # noqa: SIM118


def test_a_hub_id_is_downloaded_without_remote_code(tmp_path, v1_folder, monkeypatch):
    """The hub path cannot run offline: stand the download in with the local folder, laid out as
    the hub cache lays it out (snapshots/<commit>), and check what is asked for and recorded."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "snapshots" / commit
    shutil.copytree(v1_folder, snapshot)
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    dst = convert_qwen_v1("Qwen/Qwen-14B", tmp_path / "out", revision="main")
    [(repo_id, revision, patterns)] = calls
    assert (repo_id, revision) == ("Qwen/Qwen-14B", "main")
    assert not any(pattern.endswith(".py") or pattern == "*" for pattern in patterns)
    source = json.loads((dst / METADATA_FILE).read_text())["source"]
    assert source == {
        "model": "Qwen/Qwen-14B",
        "revision": commit,
        "architecture": "QWenLMHeadModel",
    }


def test_qwen_14b_config_maps_to_qwen2():
    config = qwen2_config_from_v1(QWEN_14B_V1)
    assert config.intermediate_size == 13696
    assert config.num_attention_heads == config.num_key_value_heads == 40
    assert config.hidden_size // config.num_attention_heads == 128
    assert config.max_position_embeddings == 2048
    assert config.vocab_size == 152064
    assert config.rms_norm_eps == 1e-6
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.eos_token_id == 151643
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "not a Qwen v1"),
        ({"rotary_pct": 0.5}, "partial rotary"),
        ({"no_bias": False}, "no_bias"),
        ({"kv_channels": 32}, "kv_channels"),
        ({"tie_word_embeddings": True}, "tied"),
        ({"seq_length": None}, "lacks"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    config = {k: v for k, v in (TINY_V1 | change).items() if v is not None}
    with pytest.raises(QwenV1ConversionError, match=message):
        qwen2_config_from_v1(config)


def test_c_attn_splits_into_q_k_v_rows():
    weight = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)  # [3H, H] with H = 4
    bias = torch.arange(12, dtype=torch.float32)
    out = convert_state_dict(
        {"transformer.h.3.attn.c_attn.weight": weight, "transformer.h.3.attn.c_attn.bias": bias}
    )
    prefix = "model.layers.3.self_attn."
    for i, proj in enumerate("qkv"):
        assert torch.equal(out[f"{prefix}{proj}_proj.weight"], weight[4 * i : 4 * (i + 1)])
        assert torch.equal(out[f"{prefix}{proj}_proj.bias"], bias[4 * i : 4 * (i + 1)])


@pytest.mark.parametrize(
    ("v1_name", "qwen2_name"),
    [
        ("transformer.wte.weight", "model.embed_tokens.weight"),
        ("transformer.ln_f.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("transformer.h.7.ln_1.weight", "model.layers.7.input_layernorm.weight"),
        ("transformer.h.7.ln_2.weight", "model.layers.7.post_attention_layernorm.weight"),
        ("transformer.h.7.attn.c_proj.weight", "model.layers.7.self_attn.o_proj.weight"),
        ("transformer.h.7.mlp.w2.weight", "model.layers.7.mlp.gate_proj.weight"),
        ("transformer.h.7.mlp.w1.weight", "model.layers.7.mlp.up_proj.weight"),
        ("transformer.h.7.mlp.c_proj.weight", "model.layers.7.mlp.down_proj.weight"),
    ],
)
def test_tensor_names_map_to_qwen2(v1_name, qwen2_name):
    tensor = torch.randn(2, 2)
    assert convert_tensor(v1_name, tensor) == {qwen2_name: tensor}


@pytest.mark.parametrize(
    "buffer",
    [
        "transformer.h.0.attn.masked_bias",
        "transformer.h.0.attn.bias",
        "transformer.rotary_emb.inv_freq",
    ],
)
def test_saved_buffers_are_dropped(buffer):
    assert convert_tensor(buffer, torch.ones(1)) == {}


@pytest.mark.parametrize(
    "name", ["transformer.h.0.attn.c_attn.lora_A", "model.layers.0.mlp.up_proj.weight"]
)
def test_unknown_tensor_names_are_refused(name):
    with pytest.raises(QwenV1ConversionError, match="unexpected tensor"):
        convert_tensor(name, torch.ones(1))


def _broken_checkpoint(tmp_path, v1_state, edit) -> Path:
    state = dict(v1_state)
    edit(state)
    return write_v1_checkpoint(tmp_path / "broken", TINY_V1, state)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update({"transformer.visual.proj": torch.ones(2)}), "unexpected tensors"),
        (lambda s: s.pop("transformer.h.1.mlp.w1.weight"), "missing tensors"),
        (lambda s: s.update({"transformer.h.1.mlp.w1.weight": torch.ones(95, 64)}), "shapes"),
    ],
)
def test_checkpoints_that_disagree_with_their_config_are_refused(tmp_path, v1_state, edit, message):
    src = _broken_checkpoint(tmp_path, v1_state, edit)
    dst = tmp_path / "out"
    with pytest.raises(QwenV1ConversionError, match=message):
        convert_qwen_v1(src, dst)
    assert not dst.exists()
    assert not dst.with_name("out.partial").exists()


def test_a_non_qwen_folder_is_refused(tmp_path, v1_folder):
    src = tmp_path / "llama"
    shutil.copytree(v1_folder, src)
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(QwenV1ConversionError, match="not a Qwen v1"):
        convert_qwen_v1(src, tmp_path / "out")


def test_an_existing_destination_is_never_overwritten(tmp_path, v1_folder):
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(FileExistsError):
        convert_qwen_v1(v1_folder, dst)


@pytest.mark.parametrize(
    ("v1_generation", "eos"),
    [
        ({"chat_format": "raw", "stop_words_ids": [[151643]], "pad_token_id": 151643}, 151643),
        ({"chat_format": "chatml", "max_window_size": 6144}, [151643, 151645, 151644]),
        (None, 151643),
    ],
)
def test_generation_config_keeps_eos_and_drops_pad(v1_generation, eos):
    config = generation_config_from_v1(v1_generation)
    assert isinstance(config, GenerationConfig)
    assert config.eos_token_id == eos
    assert config.pad_token_id is None
    assert not hasattr(config, "chat_format")
