"""`onegpu quantize`: parse arguments, convert Qwen v1 to Qwen2 if needed, call `quantize`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen-14B"

_EPILOG = """\
examples:
  onegpu quantize --output models/qwen14b-gptq8     # Qwen/Qwen-14B, 120 x 2048 WikiText-2
  onegpu quantize Qwen/Qwen2.5-14B --output models/qwen25-14b-gptq8 --ppl-threshold 0.02
  onegpu quantize ./my-model --output out/q8 --calibration my.txt --samples 64 --seq-len 1024

Qwen v1 checkpoints (QWenLMHeadModel, qwen.tiktoken) are first converted to the native Qwen2
layout in --converted (default: OUTPUT.qwen2), which is kept and reused; the conversion is exact
within Qwen-14B's 2048-token window. A 14B run needs one GPU with 24 GB, about 35 GB of host RAM
and about 75 GB of disk (download, converted copy, output).
"""


def register(subparsers) -> None:
    """Add the `quantize` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "quantize",
        help="GPTQ 8-bit quantization with WikiText-2 calibration (through GPTQModel)",
        description="Quantize a causal LM with GPTQ and report perplexity before and after.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="hub id or local folder")
    p.add_argument("--output", required=True, type=Path, help="folder to write the checkpoint to")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=8)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp-percent", type=float, default=0.01, help="Hessian damping (0.01)")
    p.add_argument(
        "--calibration", default="wikitext2", help="wikitext2 (default) or a .txt/.jsonl file"
    )
    p.add_argument("--calibration-split", default="train", help="WikiText-2 split (train)")
    p.add_argument("--samples", type=int, default=120, help="calibration windows (120)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--gpu-memory-gib", type=float, help="cap for evaluation models, e.g. 20")
    p.add_argument(
        "--eval-data", default="wikitext2", help="wikitext2 (test split), a file, or 'none'"
    )
    p.add_argument("--eval-max-tokens", type=int, help="evaluate on at most this many tokens")
    p.add_argument(
        "--ppl-threshold",
        type=float,
        help="fail when perplexity rises by more than this fraction (e.g. 0.01 = 1%%)",
    )
    p.add_argument("--converted", type=Path, help="where a Qwen v1 model is converted to")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
    p.set_defaults(func=run)


def read_config(model: str, revision: str | None) -> dict:
    """The model's config.json, from a local folder or the hub (only that file is downloaded)."""
    local = Path(model)
    if local.is_dir():
        return json.loads((local / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model, "config.json", revision=revision)).read_text())


def is_qwen_v1(config: dict) -> bool:
    return config.get("model_type") == "qwen" or "QWenLMHeadModel" in (
        config.get("architectures") or []
    )


def run(args: argparse.Namespace) -> int:
    from onegpu.cli import configure_logging
    from onegpu.quantize.gptq import quantize

    configure_logging(args.log_level)
    source: str | Path = args.model
    revision = args.revision
    if is_qwen_v1(read_config(args.model, revision)):
        from onegpu.quantize.qwen_v1 import convert_qwen_v1

        converted = args.converted or args.output.with_name(args.output.name + ".qwen2")
        if (converted / "config.json").is_file():
            log.warning("reusing the converted Qwen2 copy in %s", converted)
        else:
            log.warning(
                "Qwen v1 checkpoint: converting to the native Qwen2 layout in %s", converted
            )
            convert_qwen_v1(args.model, converted, revision=revision)
        source, revision = converted, None
    path = quantize(
        source,
        args.output,
        revision=revision,
        bits=args.bits,
        group_size=args.group_size,
        damp_percent=args.damp_percent,
        calibration=args.calibration,
        calibration_split=args.calibration_split,
        n_samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        device=args.device,
        gpu_memory_gib=args.gpu_memory_gib,
        eval_data=None if args.eval_data == "none" else args.eval_data,
        eval_max_tokens=args.eval_max_tokens,
        ppl_threshold=args.ppl_threshold,
        overwrite=args.overwrite,
    )
    print(path)
    return 0
