"""GGUF files as models: converted once by content hash; every bad file is one typed error and
leaves nothing in the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from onegpu import gguf
from onegpu.engine.embedded import gguf_path
from tests.test_cli import fails


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ONEGPU_CACHE_DIR", str(root))
    return root


def left_in(cache: Path) -> list[str]:
    folder = cache / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("model.gguf", True),
        ("/models/Qwen2.5-0.5B.Q4_K_M.GGUF", True),
        ("Qwen/Qwen-14B", False),
        ("models/folder", False),
        (None, False),
    ],
)
def test_a_gguf_is_named_by_its_suffix(model, expected):
    assert gguf.is_gguf(model) is expected


def test_a_missing_file(cache, tmp_path):
    with pytest.raises(gguf.GGUFError, match="does not exist"):
        gguf.converted(tmp_path / "absent.gguf")


def test_a_file_that_is_not_gguf(cache, tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello")
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.converted(path)
    assert left_in(cache) == []


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1000, 40 * 2**20])  # cut in the metadata, in the tensors
def test_a_truncated_file_is_refused_and_nothing_is_cached(cache, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    with gguf_path().open("rb") as source, path.open("wb") as out:
        out.write(source.read(keep))
    with pytest.raises(gguf.GGUFError, match="corrupt, truncated or unreadable"):
        gguf.converted(path)
    assert left_in(cache) == []


def test_another_architecture_is_refused(cache, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf.GGUFError, match="holds a gpt2 model; GGUF input supports llama"):
        gguf.converted(path)
    assert left_in(cache) == []


@pytest.mark.slow
def test_converted_once_by_content_then_reused(cache, tmp_path, monkeypatch):
    copy = tmp_path / "renamed.gguf"
    shutil.copy(gguf_path(), copy)
    folder = gguf.converted(copy)
    assert folder.parent == cache / "gguf" and folder.name.startswith("renamed-")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    record = (folder / gguf.SOURCE_FILE).read_text()
    assert gguf.sha256_of(copy) in record and '"architecture": "llama"' in record

    def never(*args):
        raise AssertionError("a cached conversion was redone")

    monkeypatch.setattr(gguf, "_convert", never)
    assert gguf.converted(copy) == folder  # same bytes: the cache answers


def test_serving_a_bad_gguf_is_one_line(capsys, cache, tmp_path, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 16)
    line = fails(capsys, ["serve", "--model", str(path), "--device", "cpu"])
    assert "model.gguf is corrupt, truncated or unreadable" in line
    assert left_in(cache) == []


def test_quantizing_a_missing_gguf_is_one_line(capsys, cache, tmp_path):
    argv = ["quantize", str(tmp_path / "absent.gguf"), "--output", str(tmp_path / "q")]
    assert "absent.gguf does not exist" in fails(capsys, argv)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
