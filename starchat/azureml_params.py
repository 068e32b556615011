"""Azure ML `/score` parameters -> SamplingParams, shared by the real-time server and the batch runner.

The names are those of the model catalog's scoring contract (docs: CONTRACTS.md, sections 1 and 2):
`temperature`, `top_p`, `top_k`, `max_new_tokens` (old alias `max_gen_len`), `min_new_tokens`,
`do_sample`, `repetition_penalty`, `return_full_text`, `stop` (alias `stop_sequences`), `seed`.
As in HF `generate`, sampling happens only when `do_sample` is true; otherwise decoding is greedy.
Unknown keys are refused, naming the key, so a typo never silently changes the output.
"""

from __future__ import annotations

from starchat.sampling_params import SamplingParams, SamplingParamsError

# Azure name -> SamplingParams field. Aliases map onto the same field.
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_new_tokens": "max_new_tokens",
    "max_gen_len": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "do_sample": "do_sample",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_sequences": "stop",
}
AZUREML_PARAMETER_NAMES = tuple(sorted([*_FIELDS, "return_full_text"]))


class AzureMLParametersError(SamplingParamsError):
    """A `parameters` entry that cannot be used; `field` is the key as the client wrote it."""


def merge_azureml_parameters(defaults: dict | None, overrides: dict | None) -> dict:
    """`overrides` on top of `defaults`; an alias in one replaces its twin in the other (max_gen_len, max_new_tokens)."""
    defaults, overrides = dict(defaults or {}), overrides or {}
    if not isinstance(overrides, dict):
        return overrides  # sampling_params_from_azureml reports it
    targets = {_FIELDS.get(key, key) for key in overrides}
    merged = {key: value for key, value in defaults.items() if _FIELDS.get(key, key) not in targets}
    merged.update(overrides)
    return merged


def sampling_params_from_azureml(parameters: dict | None, base: SamplingParams | None = None) -> tuple[SamplingParams, bool]:
    """(SamplingParams, return_full_text) for an Azure `parameters` object.

    `base` holds the defaults the keys override (SamplingParams() when None).
    Raises AzureMLParametersError naming the unknown or invalid key.
    """
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise AzureMLParametersError("parameters", "must be a JSON object of generation parameters, "
                                                   f"got {type(parameters).__name__}")
    unknown = sorted(key for key in parameters if key not in _FIELDS and key != "return_full_text")
    if unknown:
        raise AzureMLParametersError(unknown[0], f"unknown parameter {unknown[0]!r}; the supported parameters are "
                                                 f"{', '.join(AZUREML_PARAMETER_NAMES)}")
    given_as: dict[str, str] = {}  # SamplingParams field -> the Azure key that set it (for error messages)
    for key in parameters:
        if key in _FIELDS:
            target = _FIELDS[key]
            if target in given_as and parameters[given_as[target]] != parameters[key]:
                raise AzureMLParametersError(key, f"conflicts with {given_as[target]!r}: both set {target}; give one")
            given_as[target] = key
    return_full_text = parameters.get("return_full_text", True)
    if not isinstance(return_full_text, bool):
        raise AzureMLParametersError("return_full_text", f"must be true or false, got {return_full_text!r}")

    values = {target: parameters[key] for target, key in given_as.items()}
    stop = values.pop("stop", None)
    params = (base or SamplingParams()).copy(**values)
    if stop is not None:
        params.stop = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, list) else stop
    try:
        params.validate()
    except SamplingParamsError as error:
        key = given_as.get(error.field, error.field)
        raise AzureMLParametersError(key, error.message) from None
    return params, return_full_text
