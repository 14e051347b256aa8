"""`onegpu serve | ...`: thin shells that parse arguments and call one function each."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("onegpu")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from onegpu.server.app import create_app
    from onegpu.settings import ServeSettings

    overrides = {
        k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None
    }
    settings = ServeSettings(**overrides)
    configure_logging(settings.log_level)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level.lower(),
        # On SIGTERM, in-flight requests get this long to finish before connections close.
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onegpu", description=__doc__)
    jobs = parser.add_subparsers(dest="job", required=True)

    serve = jobs.add_parser("serve", help="serve /process, /tokenize and /decode over HTTP")
    serve.add_argument("--host", help="bind address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 8080; the container uses 80)")
    serve.add_argument("--model", help="local folder or hub id (default: embedded SmolLM2-135M)")
    serve.add_argument("--revision", help="hub revision of --model")
    serve.add_argument("--adapter", help="peft adapter folder served on top of the model")
    serve.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    serve.add_argument("--dtype", help="auto (default), float16, bfloat16, float32")
    serve.add_argument("--gpu-memory-gib", type=float, help="cap GPU memory, e.g. 24 (an RTX 4090)")
    serve.add_argument("--max-context", type=int, help="context window in tokens (default 2048)")
    serve.add_argument("--max-batch", type=int, help="most requests decoded together (default 32)")
    serve.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        default=None,
        help="decode eagerly instead of replaying CUDA graphs",
    )
    serve.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="run the model repository's own code (off by default; never needed for Qwen-14B here)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    serve.set_defaults(func=_serve)

    from onegpu.quantize.command import register as register_quantize
    from onegpu.train.command import register as register_train

    register_quantize(jobs)
    register_train(jobs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
