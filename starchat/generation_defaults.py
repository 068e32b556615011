"""Sampling defaults of a checkpoint: its `generation_config.json` (Hugging Face's file), then StarChat's.

`starchat chat` starts from these; a flag given on the command line wins. StarChat-beta's own
playground sampled at temperature 0.2, top-p 0.95, top-k 50, repetition penalty 1.2; a model
may ship other values (the embedded starchat-nano decodes greedily with a penalty of 1.1,
the setting its evaluation used).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("starchat")

STARCHAT_CHAT_DEFAULTS = {"temperature": 0.2, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.2}
_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def generation_config(model_dir: Path) -> dict:
    """The sampling keys of model_dir/generation_config.json; {} when absent or unreadable (with a warning)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s is unreadable (%s); using StarChat's sampling defaults", path, error)
        return {}
    return {key: data[key] for key in _KEYS if data.get(key) is not None} if isinstance(data, dict) else {}


def chat_sampling_defaults(model_dir: Path) -> dict:
    """temperature, top_p, top_k, repetition_penalty for a chat with this model (temperature 0 = greedy)."""
    values = dict(STARCHAT_CHAT_DEFAULTS) | generation_config(model_dir)
    if values.pop("do_sample", True) is False:
        values["temperature"] = 0.0
    return values
