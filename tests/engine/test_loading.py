import pytest

from onegpu.engine.loading import ModelLoadError, check_quantization


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"quant_method": "gptq", "bits": 8}, None),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, None),
        ({"quant_method": "gptq"}, "bits=None"),
        ({"quant_method": "gptq", "bits": 3}, "bits=3"),
        ({"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
        ({"quant_method": "gguf"}, "quant_method='gguf'"),
    ],
)
def test_check_quantization(metadata, problem):
    if problem is None:
        check_quantization(metadata)
    else:
        with pytest.raises(ModelLoadError, match=problem):
            check_quantization(metadata)
