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
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from onegpu.device import cuda_index, resolve_device, resolve_dtype
from onegpu.engine.gptq_layers import gptq_config, load_quantized_head
from onegpu.errors import OutputExistsError, UserError
from onegpu.files import staged
from onegpu.gguf import converted as gguf_folder
from onegpu.gguf import is_gguf
from onegpu.provenance import Phases, new_record, write_record
from onegpu.quantize.calibration import (
    WIKITEXT2,
    CalibrationSource,
    calibration_samples,
    load_text,
)
from onegpu.quantize.perplexity import Perplexity, perplexity
from onegpu.settings import GPTQ_GROUP_SIZES, QuantizeSettings

logger = logging.getLogger(__name__)

# Kernel used while quantizing. GPTQModel's automatic choice tries Machete on Hopper, whose JIT
# build downloads CUTLASS and fails offline; the torch kernel runs everywhere.
QUANTIZE_BACKEND = "torch"
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


class TiedHeadError(UserError):
    """`--lm-head` asked for on a model whose head shares the embedding table."""


class GroupSizeError(UserError, ValueError):
    """The group size does not divide the model's layer widths."""


class PerplexityRegressionError(QuantizeError):
    """The quantized model's perplexity rose more than the allowed threshold."""

    def __init__(self, before: float, after: float, threshold: float, rejected: Path) -> None:
        self.before, self.after, self.threshold, self.rejected = before, after, threshold, rejected
        super().__init__(
            f"perplexity rose from {before:.4f} to {after:.4f} "
            f"({relative_increase(before, after):+.2%}), more than the allowed "
            f"{threshold:+.2%}; the checkpoint was kept for inspection in {rejected}"
        )


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
        fits = [
            g for g in GPTQ_GROUP_SIZES if g > 0 and not any(v % g for v in widths.values() if v)
        ]
        raise GroupSizeError(
            f"group_size={group_size} does not divide the layer input widths {bad}; vLLM and "
            f"Marlin need whole groups: pass --group-size {max(fits, default=-1)}"
        )


def check_head_untied(config: Any) -> None:
    """GPTQModel quantizes an `lm_head` only when it is its own matrix, not the embedding's."""
    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "tie_word_embeddings", False):
        raise TiedHeadError(
            "--lm-head: this model's output head is its input embedding table "
            "(tie_word_embeddings), which GPTQModel cannot quantize; quantize without --lm-head"
        )


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


@contextmanager
def _staged_output(output: Path) -> Iterator[Path]:
    """Yield ``<output>.partial`` to write into (`files.staged`): moved to ``output`` only on
    success; a rejected checkpoint is kept as ``<output>.rejected`` for inspection."""
    with staged(output) as partial:
        try:
            yield partial
        except PerplexityRegressionError as e:
            rejected = output.with_name(output.name + ".rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            partial.rename(rejected)
            raise PerplexityRegressionError(e.before, e.after, e.threshold, rejected) from None
        except KeyboardInterrupt:
            logger.error(
                "quantize interrupted: removed the partial output %s; nothing was written to %s. "
                "Rerun the same command to start again (downloaded weights and datasets stay "
                "in the Hugging Face cache).",
                partial,
                output,
            )
            raise


@dataclass
class _Prepared:
    """What the phases share, read once: the model, its tokenizer, the data, where it runs."""

    model_id: str
    revision: str | None
    config: Any  # the transformers config
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    samples: list[dict[str, torch.Tensor]] | None = None  # calibration windows
    calibration: CalibrationSource | None = None
    eval_ids: torch.Tensor | None = None  # [N] token ids perplexity is measured on
    eval_source: CalibrationSource | None = None

    @property
    def hub(self) -> dict[str, Any]:
        return {} if self.revision is None else {"revision": self.revision}


def quantize(settings: QuantizeSettings) -> Path:
    """Quantize a causal LM with GPTQ and write a transformers/vLLM-loadable checkpoint.

    ``settings.model`` is a Hub id, a local folder or a Llama/Qwen2 GGUF file (converted once into
    the cache, `onegpu.gguf`); a Qwen v1 checkpoint is first converted to the native Qwen2 layout
    in ``settings.converted`` (default ``<output>.qwen2``, kept and reused). Calibration is
    ``samples`` random windows of ``seq_len`` tokens from ``calibration`` ("wikitext2": the
    ``calibration_split`` of WikiText-2 raw through ``datasets``; or a local .txt/.jsonl file),
    drawn with ``seed``. Quantization is per group of ``group_size`` input channels, symmetric by
    default, without act-order, with Hessian damping ``damp_percent`` (GPTQ's 0.01, as the 2023
    entry used).

    Perplexity on ``eval_data`` (WikiText-2 test by default, or a local file; None skips it) is
    measured before and after, over windows of ``eval_max_length`` tokens every ``eval_stride``
    tokens, on at most ``eval_max_tokens`` tokens; the quantized model is evaluated with the
    ``eval_backend`` kernel. ``gpu_memory_gib`` caps how much of the GPU the evaluation models
    take (the rest spills to host RAM). When the relative increase exceeds ``ppl_threshold``
    (0.01 = 1%), the checkpoint is moved to ``<output>.rejected`` and
    :class:`PerplexityRegressionError` is raised.

    Phases: prepare (model config, tokenizer, calibration and evaluation data) -> evaluate the
    base -> quantize and save -> evaluate the quantized model -> record (``onegpu.json``).

    Returns ``output``. Nothing appears at ``output`` until the run succeeds: work happens in
    ``<output>.partial``, which is removed if the run fails or is interrupted.
    """
    output = Path(settings.output)
    if output.exists() and not settings.overwrite and (output.is_file() or any(output.iterdir())):
        raise OutputExistsError(f"{output} exists and is not empty: pass --overwrite to replace it")
    from onegpu.quantize.qwen_v1 import native_checkpoint

    if is_gguf(settings.model):
        model, revision = gguf_folder(settings.model), None
    else:
        converted = settings.converted or output.with_name(output.name + ".qwen2")
        model, revision = native_checkpoint(settings.model, settings.revision, converted)
    device = resolve_device(settings.device)
    if device.type == "cuda":  # accelerate's max_memory names GPUs by index
        device = torch.device("cuda", cuda_index(device))
    phases = Phases(device)
    # bf16 is Qwen's native dtype on GPU; on CPU float32 keeps the before/after comparison free
    # of bf16 rounding noise.
    dtype = resolve_dtype(settings.dtype, device, cuda_default=torch.bfloat16)
    prep = _prepare_model(str(model), revision, device, dtype, settings)

    with _staged_output(output) as out:
        _prepare_data(prep, settings, phases)
        before = after = None
        if prep.eval_ids is not None:
            with phases("perplexity_before"):
                before = _perplexity(prep, prep.model_id, settings, quantized=False)
            logger.info("perplexity before: %.4f", before.ppl)
        _quantize(prep, settings, out, phases)
        if prep.eval_ids is not None:
            with phases("perplexity_after"):
                after = _perplexity(prep, out, settings, quantized=True)
            logger.info("perplexity after: %.4f", after.ppl)
        _record(out, prep, settings, phases, before, after)
        if before is not None and after is not None:
            _judge(before, after, prep, settings, out)
    logger.info("wrote %s", output)
    return output


def _prepare_model(
    model_id: str,
    revision: str | None,
    device: torch.device,
    dtype: torch.dtype,
    settings: QuantizeSettings,
) -> _Prepared:
    """The model's config (its widths checked against the group size) and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    prep = _Prepared(model_id, revision, None, None, device, dtype)
    prep.config = AutoConfig.from_pretrained(model_id, **prep.hub)
    check_group_size(prep.config, settings.group_size)
    if settings.lm_head:
        check_head_untied(prep.config)
    prep.tokenizer = AutoTokenizer.from_pretrained(model_id, **prep.hub)
    return prep


def _prepare_data(prep: _Prepared, settings: QuantizeSettings, phases: Phases) -> None:
    """Calibration windows and evaluation tokens, before any model loads (a bad path fails fast)."""
    with phases("calibration"):
        text, prep.calibration = load_text(settings.calibration, split=settings.calibration_split)
        prep.samples = calibration_samples(
            prep.tokenizer,
            text,
            n_samples=settings.samples,
            seq_len=settings.seq_len,
            seed=settings.seed,
        )
        del text
    if settings.eval_data is not None:
        text, prep.eval_source = load_text(settings.eval_data, split="test")
        prep.eval_ids = prep.tokenizer(text, return_tensors="pt")["input_ids"][0]  # [N]


def _perplexity(
    prep: _Prepared, path: str | Path, settings: QuantizeSettings, *, quantized: bool
) -> Perplexity:
    """Load the base (or the quantized checkpoint at `path`) and measure its perplexity."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": prep.dtype,
        **_placement(prep.device, settings.gpu_memory_gib),
    }
    if quantized:
        quantization = {"bits": settings.bits, "group_size": settings.group_size}
        kwargs["quantization_config"] = gptq_config(quantization, settings.eval_backend)
    else:
        kwargs.update(prep.hub)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if quantized:
        load_quantized_head(model, Path(path))
    try:
        # GPTQModel's torch kernel wraps its dequantization in torch.compile, which recompiles
        # per layer (minutes, until dynamo's recompile limit stops it); a one-off measurement
        # is faster eager, with the same numbers.
        with torch.compiler.set_stance("force_eager"):
            return perplexity(
                model,
                prep.eval_ids,
                desc="perplexity (gptq)" if quantized else "perplexity (base)",
                max_length=settings.eval_max_length,
                stride=settings.eval_stride,
                max_tokens=settings.eval_max_tokens,
            )
    finally:
        del model
        _free_memory()


def _quantize(prep: _Prepared, settings: QuantizeSettings, out: Path, phases: Phases) -> None:
    """GPTQ layer by layer through GPTQModel, then the checkpoint and the base's tokenizer."""
    gptqmodel = _import_gptqmodel()
    backend = gptqmodel.BACKEND(QUANTIZE_BACKEND)
    with tempfile.TemporaryDirectory(prefix="onegpu-gptq-offload-") as offload:
        quant_config = gptqmodel.QuantizeConfig(
            bits=settings.bits,
            group_size=settings.group_size,
            sym=settings.sym,
            desc_act=settings.desc_act,
            damp_percent=settings.damp_percent,
            lm_head=settings.lm_head,
            # Finished layers go to disk, so host RAM holds one copy of the model at most.
            offload_to_disk=True,
            offload_to_disk_path=offload,
        )
        with phases("quantize"):
            qmodel = gptqmodel.GPTQModel.load(
                prep.model_id,
                quant_config,
                device=str(prep.device),
                backend=backend,
                dtype=prep.dtype,
                **prep.hub,
            )
            qmodel.quantize(prep.samples, batch_size=1, backend=backend)
        with phases("save"):
            qmodel.save(str(out))
            del qmodel
            _free_memory()
    # GPTQModel saves a tokenizer it may have adjusted (pad token); keep the base one as is.
    prep.tokenizer.save_pretrained(out)


def _record(
    out: Path,
    prep: _Prepared,
    settings: QuantizeSettings,
    phases: Phases,
    before: Perplexity | None,
    after: Perplexity | None,
) -> None:
    record = new_record(
        "gptq",
        base_model={
            "id": prep.model_id,
            "revision": prep.revision,
            # The resolved Hub commit, so a later run can fetch exactly these weights.
            "commit": getattr(prep.config, "_commit_hash", None),
            "architecture": (prep.config.architectures or [None])[0],
        },
        quantization={
            "method": "gptq",
            "bits": settings.bits,
            "group_size": settings.group_size,
            "sym": settings.sym,
            "desc_act": settings.desc_act,
            "damp_percent": settings.damp_percent,
            "backend": QUANTIZE_BACKEND,
            "dtype": str(prep.dtype).removeprefix("torch."),
            "device": str(prep.device),
        },
        calibration={
            **prep.calibration.describe(),
            "n_samples": settings.samples,
            "seq_len": settings.seq_len,
            "seed": settings.seed,
        },
        perplexity=None
        if before is None or after is None
        else {
            **prep.eval_source.describe(),
            "backend": settings.eval_backend,
            "before": asdict(before),
            "after": asdict(after),
            "relative_increase": relative_increase(before.ppl, after.ppl),
            "threshold": settings.ppl_threshold,
        },
    )
    write_record(out, record, phases, LIBRARIES)


def _judge(
    before: Perplexity, after: Perplexity, prep: _Prepared, settings: QuantizeSettings, out: Path
) -> None:
    """Print the perplexity table; refuse the checkpoint when the rise passes the threshold."""
    label = "WikiText-2 test" if prep.eval_source.name == WIKITEXT2 else prep.eval_source.name
    print(format_perplexity_table(before, after, label=label, bits=settings.bits), flush=True)
    if not check_perplexity(before.ppl, after.ppl, settings.ppl_threshold):
        raise PerplexityRegressionError(before.ppl, after.ppl, settings.ppl_threshold, out)
