"""GPTQ quantization through GPTQModel, with a before/after perplexity report.

This is the only module that imports ``gptqmodel`` to quantize (style rule 8: fence third-party
churn). It takes a model in a native transformers layout (Qwen2/2.5/3, Llama, Mistral; Qwen-14B v1
is converted first by ``onegpu.quantize.qwen_v1``) and writes a standard GPTQ checkpoint folder:

    config.json (with quantization_config: gptq, bits, group_size, sym, desc_act)
    model.safetensors[...]   packed qweight/qzeros/scales, loadable by transformers and vLLM
    quantize_config.json     GPTQModel's own copy of the settings
    tokenizer files          the base model's tokenizer, unchanged
    onegpu.json              our metadata: base model, calibration, versions, timings, perplexities

GPTQModel quantizes layer by layer, so only one decoder layer and the calibration activations sit
on the GPU at a time; the full model stays in host memory.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from onegpu.provenance import library_versions, peak_rss_bytes
from onegpu.quantize.calibration import (
    WIKITEXT2,
    CalibrationSource,
    calibration_samples,
    load_text,
)
from onegpu.quantize.perplexity import Perplexity, perplexity

logger = logging.getLogger(__name__)

METADATA_FILE = "onegpu.json"
# Kernel used while quantizing. GPTQModel's automatic choice tries Machete on Hopper, whose JIT
# build downloads CUTLASS and fails offline; the torch kernel runs everywhere.
QUANTIZE_BACKEND = "torch"
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256, 512, 1024)
LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "gptqmodel",
    "optimum",
    "datasets",
    "onegpu",
)


class QuantizeError(RuntimeError):
    """Quantization could not produce an acceptable checkpoint."""


class PerplexityRegressionError(QuantizeError):
    """The quantized model's perplexity rose more than the allowed threshold."""

    def __init__(self, before: float, after: float, threshold: float, rejected: Path) -> None:
        self.before, self.after, self.threshold, self.rejected = before, after, threshold, rejected
        super().__init__(
            f"perplexity rose from {before:.4f} to {after:.4f} "
            f"({relative_increase(before, after):+.2%}), more than the allowed "
            f"{threshold:+.2%}; the checkpoint was kept for inspection in {rejected}"
        )


@dataclass
class _Phase:
    seconds: float = 0.0
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated during the phase


@dataclass
class _Report:
    phases: dict[str, _Phase] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and record its peak GPU memory (CUDA only)."""
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            p = self.phases.setdefault(name, _Phase())
            p.seconds = round(time.perf_counter() - start, 3)
            if cuda:
                p.peak_gpu_bytes = torch.cuda.max_memory_allocated()


def relative_increase(before: float, after: float) -> float:
    """``after / before - 1``: +0.01 means perplexity rose by 1%."""
    return after / before - 1.0


def check_perplexity(before: float, after: float, threshold: float | None) -> bool:
    """True when the increase is acceptable (or no threshold is set)."""
    return threshold is None or relative_increase(before, after) <= threshold


def format_perplexity_table(before: Perplexity, after: Perplexity, *, label: str, bits: int) -> str:
    """A small plain-text table of perplexity before and after quantization."""
    rows = [
        ("model", "perplexity", "change"),
        ("base", f"{before.ppl:.4f}", ""),
        (
            f"gptq {bits}-bit",
            f"{after.ppl:.4f}",
            f"{relative_increase(before.ppl, after.ppl):+.2%}",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"perplexity on {label}: {after.n_tokens:,} tokens, "
        f"window {after.max_length}, stride {after.stride}"
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _import_gptqmodel() -> Any:
    # GPTQModel 7.6 sizes its CPU worker pool as ceil(cores / 2) but always asks for a 2-worker
    # loader sub-pool, so quantizing fails on 1-2 core machines ("Virtual pool
    # 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
    if (os.cpu_count() or 1) < 3:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel

    return gptqmodel


def check_group_size(config: Any, group_size: int) -> None:
    """Reject a group size that does not divide every quantized layer's input width.

    GPTQModel pads a partial last group, but vLLM's and Marlin's GPTQ kernels need
    ``in_features % group_size == 0``, so such a checkpoint would load in transformers only.
    """
    if group_size == -1:
        return
    text = getattr(config, "get_text_config", lambda: config)()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    widths = {
        "hidden_size": text.hidden_size,  # q/k/v and gate/up inputs
        "intermediate_size": getattr(text, "intermediate_size", None),  # down_proj input
        "num_attention_heads * head_dim": text.num_attention_heads * head_dim,  # o_proj input
    }
    bad = {k: v for k, v in widths.items() if v is not None and v % group_size}
    if bad:
        raise ValueError(
            f"group_size={group_size} does not divide the layer input widths {bad}; "
            "vLLM and Marlin need whole groups: pick a group size that divides them"
        )


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    # bf16 is Qwen's native dtype on GPU; on CPU float32 keeps the before/after comparison
    # free of bf16 rounding noise.
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def _placement(device: torch.device, gpu_memory_gib: float | None) -> dict[str, Any]:
    """from_pretrained placement: whole model on CPU, or fill the GPU and spill to host RAM."""
    if device.type != "cuda":
        return {"device_map": {"": str(device)}}
    kwargs: dict[str, Any] = {"device_map": "auto"}
    if gpu_memory_gib is not None:
        # accelerate reads free memory from the driver and ignores a per-process cap.
        kwargs["max_memory"] = {device.index: f"{gpu_memory_gib}GiB", "cpu": "1024GiB"}
    return kwargs


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _eval_ids(tokenizer: Any, source: str | Path) -> tuple[torch.Tensor, CalibrationSource]:
    text, src = load_text(source, split="test")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]  # [N]
    return ids, src


@contextmanager
def _staged_output(output: Path) -> Iterator[Path]:
    """Yield ``<output>.partial`` to write into; move it to ``output`` only on success."""
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except PerplexityRegressionError as e:
        rejected = output.with_name(output.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        partial.rename(rejected)
        raise PerplexityRegressionError(e.before, e.after, e.threshold, rejected) from None
    except KeyboardInterrupt:
        shutil.rmtree(partial, ignore_errors=True)
        logger.error(
            "quantize interrupted: removed the partial output %s; nothing was written to %s. "
            "Rerun the same command to start again (downloaded weights and datasets stay "
            "in the Hugging Face cache).",
            partial,
            output,
        )
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)


def _evaluate(
    path: str | Path,
    ids: torch.Tensor,
    *,
    desc: str,
    load_kwargs: dict[str, Any],
    ppl_kwargs: dict[str, Any],
) -> Perplexity:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs).eval()
    try:
        # GPTQModel's torch kernel wraps its dequantization in torch.compile, which recompiles
        # per layer (minutes, until dynamo's recompile limit stops it); a one-off measurement
        # is faster eager, with the same numbers.
        with torch.compiler.set_stance("force_eager"):
            return perplexity(model, ids, desc=desc, **ppl_kwargs)
    finally:
        del model
        _free_memory()


def quantize(
    model: str | Path,
    output: Path,
    *,
    revision: str | None = None,
    bits: int = 8,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    calibration: str | Path = WIKITEXT2,
    calibration_split: str = "train",
    n_samples: int = 120,
    seq_len: int = 2048,
    seed: int = 0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    gpu_memory_gib: float | None = None,
    eval_data: str | Path | None = WIKITEXT2,
    eval_max_length: int = 2048,
    eval_stride: int = 2048,
    eval_max_tokens: int | None = None,
    eval_backend: str = "torch",
    ppl_threshold: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Quantize a causal LM with GPTQ and write a transformers/vLLM-loadable checkpoint.

    ``model`` is a Hub id or a local folder in a native transformers layout. Calibration is
    ``n_samples`` random windows of ``seq_len`` tokens from ``calibration`` ("wikitext2": the
    ``calibration_split`` of WikiText-2 raw through ``datasets``; or a local .txt/.jsonl file),
    drawn with ``seed``. Quantization is per group of ``group_size`` input channels, symmetric by
    default, without act-order, with Hessian damping ``damp_percent`` (GPTQ's 0.01, as the
    2023 entry used). ``device`` defaults to CUDA when present; ``dtype`` to bfloat16 on GPU and
    float32 on CPU.

    Perplexity on ``eval_data`` (WikiText-2 test by default, or a local file; None skips it) is
    measured before and after, over windows of ``eval_max_length`` tokens every ``eval_stride``
    tokens, on at most ``eval_max_tokens`` tokens; the quantized model is evaluated with the
    ``eval_backend`` kernel. ``gpu_memory_gib`` caps how much of the GPU the evaluation models
    take (the rest spills to host RAM). When the relative increase exceeds ``ppl_threshold``
    (0.01 = 1%), the checkpoint is moved to ``<output>.rejected`` and
    :class:`PerplexityRegressionError` is raised.

    Returns ``output``. Nothing appears at ``output`` until the run succeeds: work happens in
    ``<output>.partial``, which is removed if the run fails or is interrupted.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must be in (0, 1), got {damp_percent}")
    if ppl_threshold is not None and eval_data is None:
        raise ValueError("ppl_threshold needs eval_data to measure perplexity on")
    output = Path(output)
    if output.exists() and not overwrite and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty (pass overwrite=True to replace)")

    from transformers import AutoConfig, AutoTokenizer, GPTQConfig

    report = _Report()
    started = time.perf_counter()
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    model_id = str(model)
    hub_kwargs: dict[str, Any] = {} if revision is None else {"revision": revision}
    config = AutoConfig.from_pretrained(model_id, **hub_kwargs)
    check_group_size(config, group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_id, **hub_kwargs)
    load_kwargs = {"dtype": torch_dtype, **_placement(dev, gpu_memory_gib)}
    ppl_kwargs = {
        "max_length": eval_max_length,
        "stride": eval_stride,
        "max_tokens": eval_max_tokens,
    }

    with _staged_output(output) as out:
        # Data first, so a bad path fails before any model is loaded.
        with report.phase("calibration"):
            calib_text, calib_source = load_text(calibration, split=calibration_split)
            samples = calibration_samples(
                tokenizer, calib_text, n_samples=n_samples, seq_len=seq_len, seed=seed
            )
            del calib_text
        eval_ids = eval_source = before = after = None
        if eval_data is not None:
            eval_ids, eval_source = _eval_ids(tokenizer, eval_data)
            with report.phase("perplexity_before"):
                before = _evaluate(
                    model_id,
                    eval_ids,
                    desc="perplexity (base)",
                    load_kwargs=load_kwargs | hub_kwargs,
                    ppl_kwargs=ppl_kwargs,
                )
            logger.info("perplexity before: %.4f", before.ppl)

        gptqmodel = _import_gptqmodel()
        backend = gptqmodel.BACKEND(QUANTIZE_BACKEND)
        with tempfile.TemporaryDirectory(prefix="onegpu-gptq-offload-") as offload:
            quant_config = gptqmodel.QuantizeConfig(
                bits=bits,
                group_size=group_size,
                sym=sym,
                desc_act=desc_act,
                damp_percent=damp_percent,
                # Finished layers go to disk, so host RAM holds one copy of the model at most.
                offload_to_disk=True,
                offload_to_disk_path=offload,
            )
            with report.phase("quantize"):
                qmodel = gptqmodel.GPTQModel.load(
                    model_id,
                    quant_config,
                    device=str(dev),
                    backend=backend,
                    dtype=torch_dtype,
                    **hub_kwargs,
                )
                qmodel.quantize(samples, batch_size=1, backend=backend)
            with report.phase("save"):
                qmodel.save(str(out))
                del qmodel
                _free_memory()
        # GPTQModel saves a tokenizer it may have adjusted (pad token); keep the base one as is.
        tokenizer.save_pretrained(out)

        if eval_ids is not None:
            with report.phase("perplexity_after"):
                after = _evaluate(
                    out,
                    eval_ids,
                    desc="perplexity (gptq)",
                    load_kwargs=load_kwargs
                    | {"quantization_config": GPTQConfig(bits=bits, backend=eval_backend)},
                    ppl_kwargs=ppl_kwargs,
                )
            logger.info("perplexity after: %.4f", after.ppl)

        meta = {
            "format": "gptq",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": {
                "id": model_id,
                "revision": revision,
                # The resolved Hub commit, so a later run can fetch exactly these weights.
                "commit": getattr(config, "_commit_hash", None),
                "architecture": (config.architectures or [None])[0],
            },
            "quantization": {
                "method": "gptq",
                "bits": bits,
                "group_size": group_size,
                "sym": sym,
                "desc_act": desc_act,
                "damp_percent": damp_percent,
                "backend": QUANTIZE_BACKEND,
                "dtype": str(torch_dtype).removeprefix("torch."),
                "device": str(dev),
            },
            "calibration": {
                **calib_source.describe(),
                "n_samples": n_samples,
                "seq_len": seq_len,
                "seed": seed,
            },
            "libraries": library_versions(LIBRARIES),
            "timings_s": {name: p.seconds for name, p in report.phases.items()}
            | {"total": round(time.perf_counter() - started, 3)},
            "memory": {
                "peak_gpu_bytes": {
                    name: p.peak_gpu_bytes
                    for name, p in report.phases.items()
                    if p.peak_gpu_bytes is not None
                }
                or None,
                "peak_host_rss_bytes": peak_rss_bytes(),
            },
            "perplexity": None
            if after is None
            else {
                **eval_source.describe(),
                "backend": eval_backend,
                "before": asdict(before),
                "after": asdict(after),
                "relative_increase": relative_increase(before.ppl, after.ppl),
                "threshold": ppl_threshold,
            },
        }
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        if after is not None:
            label = "WikiText-2 test" if eval_source.name == WIKITEXT2 else eval_source.name
            print(format_perplexity_table(before, after, label=label, bits=bits), flush=True)
            if not check_perplexity(before.ppl, after.ppl, ppl_threshold):
                raise PerplexityRegressionError(before.ppl, after.ppl, ppl_threshold, out)
    logger.info("wrote %s", output)
    return output
