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
def staged(target: Path, *, folder: bool = True, partial: Path | None = None) -> Iterator[Path]:
    """Yield a sibling `<target>.partial` (or `partial`) to write `target` into: a fresh folder,
    or for `folder=False` a file path. On success it replaces `target`; on any failure (Ctrl-C
    included) it is removed. So `target` is either absent, as it was, or complete."""
    partial = partial or target.with_name(target.name + ".partial")
    _remove(partial)
    if folder:
        partial.mkdir(parents=True)
    else:
        partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    _remove(target)
    partial.rename(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def readable_by_all(folder: Path) -> None:
    """Give every file in `folder` the umask's mode: safetensors writes its files 0600, so a copy
    made for another user (the image's UID) could not be read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
