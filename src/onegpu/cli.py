"""`onegpu serve | quantize | train | config`: thin shells over one function per job.

Every flag is a field of the job's class in `onegpu.settings`, made into a flag here; a flag left
out falls back to the field's environment variable, then to its default. `main` is the one error
boundary: a `UserError` (bad argument, missing or incompatible model, bad data, an output already
there) prints one line and exits 2; any other failure prints one line and exits 1; the traceback
comes only with `--log-level DEBUG`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from onegpu import __version__
from onegpu.errors import UserError
from onegpu.settings import JobSettings, QuantizeSettings, ServeSettings, TrainSettings

log = logging.getLogger("onegpu")

# Exit statuses: a mistake the person can fix, a failure of the job, Ctrl-C, a closed pipe.
USER_ERROR, FAILURE, INTERRUPTED, BROKEN_PIPE = 2, 1, 130, 141


# -- the jobs -----------------------------------------------------------------------------------


def serve(settings: ServeSettings) -> None:
    import uvicorn

    from onegpu.engine.loading import load_engine
    from onegpu.server.app import create_app

    if settings.deterministic:  # before anything multiplies: MKL reads it once
        from onegpu.engine.invariant import MKL_STRICT

        os.environ.setdefault(*MKL_STRICT)
    # Loaded here rather than in the app's lifespan so that a model that cannot load is a one-line
    # error; either way the port opens only once the model is ready.
    engine = load_engine(settings.engine_config())
    log.info("serve settings: %s", settings.model_dump_json())
    uvicorn.run(
        create_app(settings, engine=engine),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level.lower(),
        # On SIGTERM, in-flight requests get this long to finish before connections close.
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )


def quantize(settings: QuantizeSettings) -> None:
    from onegpu.quantize.gptq import quantize

    print(quantize(settings))


def train(settings: TrainSettings) -> None:
    from onegpu.train.job import merge, train

    if settings.merge_only:
        merge(settings.output, settings.merge_base, settings.merged_to)
        return
    path = train(settings)
    log.info("adapter ready: onegpu serve --model %s --adapter %s", settings.model, path)


@dataclass(frozen=True)
class Job:
    settings: type[JobSettings]
    run: Callable[[typing.Any], None]
    help: str
    epilog: str = ""


QUANTIZE_EPILOG = """\
examples:
  onegpu quantize --output models/qwen14b-gptq8     # Qwen/Qwen-14B, 120 x 2048 WikiText-2
  onegpu quantize Qwen/Qwen2.5-14B --output models/qwen25-14b-gptq8 --ppl-threshold 0.02
  onegpu quantize ./my-model --output out/q8 --calibration my.txt --samples 64 --seq-len 1024

Qwen v1 checkpoints (QWenLMHeadModel, qwen.tiktoken) are first converted to the native Qwen2
layout in --converted (default: OUTPUT.qwen2), which is kept and reused; the conversion is exact
within Qwen-14B's 2048-token window. A 14B run needs one GPU with 24 GB, about 35 GB of host RAM
and about 75 GB of disk (download, converted copy, output).
"""

TRAIN_EPILOG = """\
data sources: oasst1, lima, arc-challenge, arc-easy, dolly, platypus (through `datasets`, from
the Hugging Face Hub) or a local .jsonl file of {"prompt", "response"} or {"messages": [...]}
objects; add :WEIGHT to scale a source (dolly:0.5 = a random half, mine.jsonl:2 = twice).

examples:
  onegpu train --model out/qwen14b-gptq8 --data oasst1 --data dolly:0.5 --data mine.jsonl:2 \\
      --output out/adapter --packing --gpu-memory-gib 24
  onegpu serve --model out/qwen14b-gptq8 --adapter out/adapter
  onegpu train --output out/adapter --merge-only --merge-base Qwen/Qwen2.5-14B
"""

JOBS = {
    "serve": Job(ServeSettings, serve, "serve /process, /tokenize and /decode over HTTP"),
    "quantize": Job(
        QuantizeSettings,
        quantize,
        "GPTQ 8-bit quantization with WikiText-2 calibration (through GPTQModel)",
        QUANTIZE_EPILOG,
    ),
    "train": Job(
        TrainSettings,
        train,
        "train a LoRA adapter (on the 8-bit GPTQ base, or QLoRA on NF4) for `serve --adapter`",
        TRAIN_EPILOG,
    ),
}


# -- settings as flags --------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one-line user errors instead of a usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: object) -> str:
    """A default as `--help` and the README show it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return str(value)


def _nullable(field: FieldInfo) -> bool:
    return type(None) in typing.get_args(field.annotation)


def _metavar(name: str, field: FieldInfo) -> str:
    kind = field.annotation
    if _nullable(field):  # X | None: describe X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    return {int: "N", float: "NUM"}.get(kind, name.upper())


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[JobSettings]) -> None:
    """One argument per field of `cls`, none with a default of its own: a flag left out is absent
    from the namespace, and pydantic-settings fills that field from the environment or default."""
    for name, field in cls.model_fields.items():
        default = (
            "required"
            if field.is_required()
            else f"default: {shown(field.get_default(call_default_factory=True))}"
        )
        text = f"{field.description} [{default}; env {cls.env_name(name)}]"
        kwargs: dict[str, typing.Any] = {
            "default": argparse.SUPPRESS,
            "help": text.replace("%", "%%"),
        }
        if name in cls.cli_positional:
            parser.add_argument(name, nargs="?", metavar=name.upper(), **kwargs)
        elif field.annotation is bool:
            parser.add_argument(
                flag(name), dest=name, action=argparse.BooleanOptionalAction, **kwargs
            )
        elif typing.get_origin(field.annotation) in (list, tuple):
            parser.add_argument(flag(name), dest=name, action="append", metavar="TEXT", **kwargs)
        else:
            parser.add_argument(flag(name), dest=name, metavar=_metavar(name, field), **kwargs)


def _given(cls: type[JobSettings], args: argparse.Namespace) -> dict[str, typing.Any]:
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    for name, value in given.items():
        if value == "none" and _nullable(cls.model_fields[name]):
            given[name] = None
    return given


def settings_from_args(cls: type[JobSettings], args: argparse.Namespace) -> JobSettings:
    """The job's settings: flags given, then environment variables, then defaults."""
    try:
        return cls(**_given(cls, args))
    except ValidationError as exc:
        raise UserError("; ".join(_explain(cls, e) for e in exc.errors())) from exc
    except SettingsError as exc:  # an environment variable that does not parse
        raise UserError(f"{exc} (complex values such as lists are JSON there)") from exc


def shown_settings(cls: type[JobSettings], args: argparse.Namespace) -> str:
    """`onegpu config JOB`: the effective settings as JSON, required fields not given as null
    (the job itself would refuse to start without them; every other mistake is reported)."""
    missing = [
        name
        for name, field in cls.model_fields.items()
        if field.is_required() and name not in vars(args) and cls.env_name(name) not in os.environ
    ]
    placeholders = {name: "." for name in missing}  # valid for the str and Path fields
    settings = settings_from_args(cls, argparse.Namespace(**vars(args), **placeholders))
    return json.dumps(settings.model_dump(mode="json") | dict.fromkeys(missing), indent=2)


def _explain(cls: type[JobSettings], error: typing.Any) -> str:
    """One pydantic error in the person's terms: the flag and variable, what is wrong."""
    message = error["msg"].removeprefix("Value error, ")
    name = error["loc"][0] if error["loc"] else None
    if name not in cls.model_fields:
        return message
    where = name.upper() if name in cls.cli_positional else flag(name)
    if error["type"] == "missing":
        return f"{where} is required (or set {cls.env_name(name)})"
    return f"{where} (or {cls.env_name(name)}): {message}; got {error['input']!r}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="onegpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"onegpu {__version__}")
    jobs = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, job in JOBS.items():
        sub = jobs.add_parser(
            name,
            help=job.help,
            description=job.settings.__doc__,
            epilog=job.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_settings_arguments(sub, job.settings)
    config = jobs.add_parser(
        "config",
        help="print the settings a job would use (flags, then environment, then defaults) as JSON",
        description="Print the effective settings of a job as JSON: the flags given, then the "
        "ONEGPU_* environment variables, then the defaults.",
    )
    shown_jobs = config.add_subparsers(dest="config_job", required=True, metavar="JOB")
    for name, job in JOBS.items():
        add_settings_arguments(shown_jobs.add_parser(name, help=f"`onegpu {name}`"), job.settings)
    return parser


# -- the error boundary -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    prog = "onegpu"
    debug = False
    try:
        args, unknown = build_parser().parse_known_args(argv)
        name = args.config_job if args.job == "config" else args.job
        prog = f"onegpu config {name}" if args.job == "config" else f"onegpu {name}"
        if unknown:
            raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see {prog} --help)")
        if args.job == "config":
            print(shown_settings(JOBS[name].settings, args), flush=True)
            return 0
        settings = settings_from_args(JOBS[name].settings, args)
        settings.configure_logging()
        debug = settings.log_level == "DEBUG"
        # At DEBUG here: a mistake found next must stay one line. Serve logs its settings once
        # the model is loaded; quantize and train write them into their record.
        log.debug("%s settings: %s", name, settings.model_dump_json())
        JOBS[name].run(settings)
    except BrokenPipeError:
        # The reader left (`onegpu config serve | head -1`): stop quietly, as Unix tools do,
        # with nothing more written to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except UserError as exc:
        return _fail(prog, exc, USER_ERROR, debug)
    except KeyboardInterrupt as exc:
        return _fail(prog, exc, INTERRUPTED, debug)
    except Exception as exc:
        return _fail(prog, exc, FAILURE, debug)
    return 0


def _fail(prog: str, exc: BaseException, status: int, debug: bool) -> int:
    if debug:
        log.error("traceback", exc_info=exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if status == USER_ERROR:
        line = f"{prog}: error: {text}"
    elif status == INTERRUPTED:
        line = f"{prog}: interrupted"
    else:
        hint = "" if debug else " (--log-level DEBUG shows the traceback)"
        line = f"{prog}: failed: {type(exc).__name__}: {text}{hint}"
    print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
