from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import make_engine


@pytest.fixture(scope="module")
def tiny_client(tiny_qwen_model, qwen_tokenizer):
    engine = make_engine(tiny_qwen_model, qwen_tokenizer, max_context=256)
    with TestClient(create_app(ServeSettings(), engine=engine)) as client:
        yield client
