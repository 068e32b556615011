"""The Azure `/score` parameter names -> SamplingParams (shared with the real-time server)."""

from __future__ import annotations

import pytest

from starchat.azureml_params import AzureMLParametersError, merge_azureml_parameters, sampling_params_from_azureml
from starchat.sampling_params import SamplingParamsError


def test_model_card_parameters_map_onto_sampling_params():
    params, full_text = sampling_params_from_azureml(
        {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": True, "top_k": 50,
         "repetition_penalty": 1.2, "seed": 7, "stop": "<|end|>", "return_full_text": False})
    assert (params.temperature, params.top_p, params.max_new_tokens, params.do_sample, params.top_k) == (0.5, 0.5, 10, True, 50)
    assert (params.repetition_penalty, params.seed, params.stop, full_text) == (1.2, 7, ["<|end|>"], False)
    default, full_text = sampling_params_from_azureml(None)
    assert full_text is True and default.greedy  # HF generate: no sampling unless do_sample


def test_aliases_and_their_merge():
    assert sampling_params_from_azureml({"max_gen_len": 3, "stop_sequences": ["a"]})[0].max_new_tokens == 3
    assert merge_azureml_parameters({"max_new_tokens": 5, "top_k": 2}, {"max_gen_len": 3}) == {"top_k": 2, "max_gen_len": 3}


@pytest.mark.parametrize("parameters, field", [
    ({"max_tokens": 5}, "max_tokens"),  # an OpenAI name: unknown here
    ({"max_gen_len": 0}, "max_gen_len"),  # the bad value is reported under the name the client used
    ({"max_new_tokens": 2, "max_gen_len": 3}, "max_gen_len"),
    ({"temperature": "hot"}, "temperature"),
    ({"return_full_text": "yes"}, "return_full_text"),
    ({"stop": 5}, "stop"),
    ([1, 2], "parameters"),
])
def test_bad_parameters_name_the_key(parameters, field):
    with pytest.raises(AzureMLParametersError) as caught:
        sampling_params_from_azureml(parameters)
    assert caught.value.field == field and field in str(caught.value)
    assert isinstance(caught.value, (ValueError, SamplingParamsError))
