"""`onegpu train`: parse arguments, call `train(...)` (or `merge(...)` with --merge-only).

Options left out fall back to `train`'s own defaults, which stay the one place they are set.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

_EPILOG = """\
data sources: oasst1, lima, arc-challenge, arc-easy, dolly, platypus (through `datasets`, from
the Hugging Face Hub) or a local .jsonl file of {"prompt", "response"} or {"messages": [...]}
objects; add :WEIGHT to scale a source (dolly:0.5 = a random half, mine.jsonl:2 = twice).

example:
  onegpu train --model out/qwen14b-gptq8 --data oasst1 --data dolly:0.5 --data mine.jsonl:2 \\
      --output out/adapter --packing --gpu-memory-gib 24
  onegpu serve --model out/qwen14b-gptq8 --adapter out/adapter
"""


def register(subparsers) -> None:
    """Add the `train` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="train a LoRA adapter (on the 8-bit GPTQ base, or QLoRA on NF4) for `serve --adapter`",
        description="Train a peft LoRA adapter that `onegpu serve --adapter` loads on its base.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="base: GPTQ folder from `onegpu quantize`, or a 16-bit model")
    p.add_argument(
        "--data",
        action="append",
        metavar="SOURCE[:WEIGHT]",
        help="a data source (repeat to mix several)",
    )
    p.add_argument("--output", required=True, help="adapter folder to write")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument(
        "--quantization",
        choices=["auto", "gptq", "nf4", "none"],
        help="auto (default): GPTQ if the checkpoint is, else as is; nf4: QLoRA (CUDA)",
    )
    p.add_argument("--template", choices=["qa", "alpaca", "chatml", "plain"], help="default qa")
    p.add_argument("--max-length", type=int, help="tokens per example/row (default 2048)")
    p.add_argument(
        "--packing",
        action="store_true",
        default=None,
        help="pack several examples per row (they never attend to each other)",
    )
    p.add_argument("--eval-fraction", type=float, help="share held out per source (0.02)")
    p.add_argument("--max-eval-examples", type=int, help="cap on held-out examples (200)")
    p.add_argument("--epochs", type=float, help="passes over the data (1)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch (1)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (16)")
    p.add_argument("--lr", type=float, help="peak learning rate (2e-4)")
    p.add_argument("--min-lr-ratio", type=float, help="cosine floor as a share of --lr (0)")
    p.add_argument("--warmup-ratio", type=float, help="share of steps warming up (0.03)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (0)")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (1.0)")
    p.add_argument(
        "--optimizer",
        choices=["auto", "adamw", "paged_adamw_8bit"],
        help="auto: paged 8-bit AdamW with bitsandbytes on CUDA, else AdamW",
    )
    p.add_argument("--lora-r", type=int, help="LoRA rank (16)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (32)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (0.05)")
    p.add_argument(
        "--target-modules",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        help="comma-separated module names (default: all attention and MLP projections)",
    )
    p.add_argument("--neftune-alpha", type=float, help="NEFTune noise (e.g. 5; off by default)")
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        default=None,
        help="keep all activations (faster, far more memory)",
    )
    p.add_argument("--attn-implementation", help="sdpa (default), eager, flash_attention_2")
    p.add_argument("--seed", type=int, help="seed for data order, eval split and LoRA init (0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--gpu-memory-gib", type=float, help="cap GPU memory, e.g. 24 (an RTX 4090)")
    p.add_argument("--eval-every", type=int, help="eval loss every N steps (also first and last)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (for --resume)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (2)")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue from the last checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="replace an existing --output"
    )
    p.add_argument("--merge-base", help="also fold the adapter into this 16-bit model")
    p.add_argument("--merge-output", help="where the merged model goes (<output>-merged)")
    p.add_argument(
        "--merge-only",
        action="store_true",
        help="do not train: merge the adapter at --output into --merge-base",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="run the model repository's own code",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no bars"
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
    p.set_defaults(func=_run)


# Arguments that are not `train` keywords.
_NOT_TRAIN = {"job", "func", "model", "data", "output", "merge_only", "log_level"}


def _run(args: argparse.Namespace) -> int:
    from onegpu.cli import configure_logging
    from onegpu.train.run import merge, train

    configure_logging(args.log_level)
    if args.merge_only:
        if not args.merge_base:
            raise SystemExit("--merge-only needs --merge-base (the 16-bit model)")
        out = args.merge_output or f"{args.output.rstrip('/')}-merged"
        merge(args.output, args.merge_base, out)
        return 0
    if not args.model or not args.data:
        raise SystemExit("onegpu train: --model and at least one --data are required")
    kwargs = {k: v for k, v in vars(args).items() if k not in _NOT_TRAIN and v is not None}
    path = train(args.model, args.data, args.output, **kwargs)
    log.info("adapter ready: onegpu serve --model %s --adapter %s", args.model, path)
    return 0
