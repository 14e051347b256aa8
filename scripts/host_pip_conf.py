#!/usr/bin/env python3
"""This machine's pip configuration, made usable inside a container build (scripts/container-test).

A build step's pip sees neither the host's PIP_* variables nor its config files, so it would
download the CUDA torch from PyPI (GBs) instead of the CPU wheel on local disk, and miss the local
mirrors. This writes one pip.conf with what `pip config list` reports (environment variables
winning over files, as in pip), and prints the local folders and files it names, which the build
bind-mounts read-only at the same paths:

    python3 scripts/host_pip_conf.py OUT.conf      # writes OUT.conf; prints one path per line

`cert` is pointed at the container's own CA bundle: the test base trusts the host's CA
certificates already (a TLS-intercepting proxy's included).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# Options whose values name local files or folders (space-separated lists for the URL ones).
FIND_LINKS = ("find-links",)
INDEXES = ("index-url", "extra-index-url")
FILES = ("constraint", "build-constraint", "requirement", "client-cert")
CONTAINER_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def parse_config_list(text: str) -> dict[tuple[str, str], str]:
    """`pip config list` lines (`global.find-links='/opt/wheels'`, `:env:.cert='...'`) to
    {(section, option): value}. Environment variables (`:env:`) override the files' options of
    any section, as they do in pip."""
    files: dict[tuple[str, str], str] = {}
    env: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, _, option = key.rpartition(".")
        value = ast.literal_eval(raw) if raw[:1] in "'\"" else raw
        if section == ":env:":
            env[option] = value
        else:
            files[(section, option)] = value
    merged = {k: v for k, v in files.items() if k[1] not in env}
    merged.update({("global", option): value for option, value in env.items()})
    return merged


def local_path(value: str) -> Path | None:
    """The local path a find-links/index/file value names: a file:// URL or an absolute path."""
    if value.startswith("file:"):
        return Path(unquote(urlparse(value).path))
    if value.startswith("/"):
        return Path(value)
    return None  # http(s) URLs; relative paths (relative to pip's working directory) are left


def mounts(options: dict[tuple[str, str], str]) -> list[Path]:
    """Local paths the build needs: find-links folders (the folder of a find-links page), files,
    and for a file:// index its parent folder (a PEP 503 index links its files relatively, e.g.
    simple/x/ -> ../../files/)."""
    paths: list[Path] = []
    for (_section, option), value in options.items():
        for word in value.split():
            path = local_path(word)
            if path is None:
                continue
            if option in INDEXES:
                paths.append(path.parent)
            elif option in FIND_LINKS:
                paths.append(path.parent if path.suffix in (".html", ".htm") else path)
            elif option in FILES:
                paths.append(path)
    return list(dict.fromkeys(paths))


def render(options: dict[tuple[str, str], str]) -> str:
    """The pip.conf text: one [section] per section, `cert` pointing at the container's bundle."""
    sections: dict[str, list[str]] = {}
    for (section, option), value in sorted(options.items()):
        if option == "cert":
            value = CONTAINER_CA_BUNDLE
        sections.setdefault(section, []).append(f"{option} = {value}")
    return "".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    options = parse_config_list(listed)
    Path(argv[0]).write_text(render(options))
    for path in mounts(options):
        if path.exists():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
