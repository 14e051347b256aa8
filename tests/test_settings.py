"""The settings classes: each default once, and the choices they offer are the jobs' own."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest

from onegpu.engine.config import EngineConfig
from onegpu.settings import QuantizeSettings, ServeSettings, TrainSettings


@pytest.fixture(autouse=True)
def no_onegpu_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("ONEGPU_"):
            monkeypatch.delenv(name)


def test_serve_defaults_are_the_engines():
    # Every EngineConfig field is a serve setting of the same name and default, converted in one
    # method: a new engine knob needs a field in both and nothing else.
    assert ServeSettings().engine_config() == EngineConfig()
    settings = ServeSettings(model="m", max_batch=3, default_stop=["###"], cuda_graphs=False)
    config = settings.engine_config()
    assert (config.model, config.max_batch, config.default_stop) == ("m", 3, ("###",))
    assert config.cuda_graphs is False
    assert {f.name for f in fields(EngineConfig)} <= set(ServeSettings.model_fields)


def test_an_empty_model_serves_the_embedded_one(monkeypatch):
    monkeypatch.setenv("ONEGPU_MODEL", "")
    assert ServeSettings().engine_config().model is None


def test_train_choices_are_the_jobs_own():
    from onegpu.train.format import TEMPLATES
    from onegpu.train.loop import OPTIMIZERS
    from onegpu.train.model import QUANTIZATIONS

    def choices(name):
        return typing.get_args(TrainSettings.model_fields[name].annotation)

    assert choices("template") == tuple(TEMPLATES)
    assert choices("optimizer") == OPTIMIZERS
    assert choices("quantization") == QUANTIZATIONS


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"target_modules": ["q_proj, v_proj"]}, ["q_proj", "v_proj"]),
        ({"target_modules": ["q_proj", "o_proj,"]}, ["q_proj", "o_proj"]),
        ({"target_modules": "up_proj,down_proj"}, ["up_proj", "down_proj"]),
    ],
)
def test_target_modules_split_on_commas(given, expected):
    settings = TrainSettings(model="m", data=["d"], output="o", **given)
    assert settings.target_modules == expected


def test_quantize_rejects_what_gptq_cannot_write():
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantizeSettings(output="o", group_size=100)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizeSettings(output="o", bits=3)
    assert QuantizeSettings(output="o", group_size="64").group_size == 64


def test_the_dtype_choices_are_the_devices_dtypes():
    from typing import get_args

    from onegpu.device import DTYPES
    from onegpu.engine.config import Dtype

    assert set(get_args(Dtype)) == {"auto", *DTYPES}
