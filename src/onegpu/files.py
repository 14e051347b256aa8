"""Where onegpu keeps what it makes once (converted models, fetched assets), and how it writes a
folder so that an interrupted job never leaves something that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """`ONEGPU_CACHE_DIR`, else `$XDG_CACHE_HOME/onegpu`, else `~/.cache/onegpu`."""
    root = os.environ.get("ONEGPU_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onegpu"


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield `<target>.partial` to write into; on success it replaces `target`, on any failure
    (Ctrl-C included) it is removed, so `target` is either absent or complete."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)


def readable_by_all(folder: Path) -> None:
    """Give every file in `folder` the umask's mode: safetensors writes its files 0600, so a copy
    made for another user (the image's UID) could not be read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
