"""Each default appears once: `--help` shows exactly the settings' fields, and the README's option
tables are what `--help` shows.

`python -m tests.test_cli_help` rewrites the README's tables from `--help`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from onegpu.cli import JOBS, main
from onegpu.settings import JobSettings

README = Path(__file__).resolve().parents[1] / "README.md"
ENTRY = re.compile(r"(?P<text>.*) \[(?:required|default: (?P<default>.*)); env (?P<env>\w+)\]$")


@dataclass(frozen=True)
class Option:
    """One entry of a `--help` listing."""

    invocation: str  # "--max-batch N", "--cuda-graphs, --no-cuda-graphs", "MODEL"
    text: str
    default: str | None  # as shown; None when the option is required
    env: str

    @property
    def flags(self) -> list[str]:
        return re.findall(r"--[a-z0-9-]+", self.invocation) or [self.invocation]


def help_text(argv: list[str]) -> str:
    """What `onegpu ARGV --help` prints, on lines too wide to wrap."""
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*argv, "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue()


def options(argv: list[str]) -> list[Option]:
    """The settings entries of `onegpu ARGV --help` (not -h), in order."""
    entries: list[list[str]] = []
    section = False
    for line in help_text(argv).splitlines():
        if not line.startswith(" "):  # a heading, or the epilog's text
            section = line in ("options:", "positional arguments:")
        elif section and line.startswith("   "):  # the help of the entry above
            entries[-1].append(line.strip())
        elif section:
            entries.append(re.split(r"\s{2,}", line.strip(), maxsplit=1))
    found = []
    for invocation, *text in entries:
        if invocation.startswith("-h"):
            continue
        match = ENTRY.fullmatch(" ".join(text))
        assert match, f"{invocation}: no [default ...; env ...] in {text!r}"
        found.append(Option(invocation, match["text"], match["default"], match["env"]))
    return found


def parsed(shown: str, settings: type[JobSettings], name: str):
    """The value a default shown in `--help` stands for, read as the field's type reads it."""
    field = settings.model_fields[name]
    if shown == "none":
        return None
    if field.annotation is bool:
        return {"on": True, "off": False}[shown]
    if shown.startswith("["):
        return TypeAdapter(field.annotation).validate_python(json.loads(shown))
    return TypeAdapter(field.annotation).validate_python(shown)


@pytest.mark.parametrize("prefix", [[], ["config"]], ids=["job", "config"])
@pytest.mark.parametrize("job", list(JOBS))
def test_help_shows_exactly_the_fields_with_their_defaults(job, prefix):
    settings = JOBS[job].settings
    listed = options([*prefix, job])
    shown = {opt.flags[0].removeprefix("--").replace("-", "_").lower(): opt for opt in listed}
    assert len(shown) == len(listed)
    assert set(shown) == set(settings.model_fields)
    for name, field in settings.model_fields.items():
        opt = shown[name]
        if name in settings.cli_positional:
            assert opt.flags == [name.upper()]
        elif field.annotation is bool:
            assert opt.flags == [f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}"]
        else:
            assert opt.flags == [f"--{name.replace('_', '-')}"]
        assert (
            opt.env
            == settings.env_name(name)
            == f"{settings.model_config['env_prefix']}{name}".upper()
        )
        assert opt.text == field.description
        if field.is_required():
            assert opt.default is None, name
        else:
            assert parsed(opt.default, settings, name) == field.get_default(
                call_default_factory=True
            )


def test_every_env_variable_belongs_to_one_job():
    # A variable set for the server must never change what quantize or train do.
    names = [
        JOBS[job].settings.env_name(f) for job in JOBS for f in JOBS[job].settings.model_fields
    ]
    assert len(names) == len(set(names))


# -- the README's tables ------------------------------------------------------------------------


def table(job: str) -> str:
    """The README's option table of `onegpu JOB`, from its `--help`."""
    rows = ["| option | environment | default | what it sets |", "| --- | --- | --- | --- |"]
    for opt in options([job]):
        names = ", ".join(f"`{f}`" for f in opt.flags)
        default = "required" if opt.default is None else f"`{opt.default}`"
        rows.append(f"| {names} | `{opt.env}` | {default} | {opt.text} |")
    return "\n".join(rows)


def block(job: str) -> re.Pattern:
    return re.compile(rf"(<!-- options: {job} -->\n)(.*?)(<!-- /options -->)", re.DOTALL)


@pytest.mark.parametrize("job", list(JOBS))
def test_readme_tables_match_help(job):
    match = block(job).search(README.read_text(encoding="utf-8"))
    assert match, f"README.md has no <!-- options: {job} --> block"
    assert match[2] == table(job) + "\n", (
        "README tables differ from --help: python -m tests.test_cli_help"
    )


def rewrite_readme() -> None:
    text = README.read_text(encoding="utf-8")
    for job in JOBS:
        text = block(job).sub(lambda m, job=job: m[1] + table(job) + "\n" + m[3], text)
    README.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    rewrite_readme()
    sys.exit(0)
