"""Checkpoints in Hugging Face layout, plus the training state that makes `--resume` exact.

A model folder holds config.json, model.safetensors (sharded past 5 GB, with an index as HF
does), the tokenizer files and dialogue_template.json: our engine and transformers both load it.
Intermediate checkpoints (`<output>/checkpoints/step-NNNNNNN/`) add training_state.pt (optimizer,
scheduler, step, a fingerprint of the run), one rng-rank<R>.pt per process, and, for LoRA, the
adapter weights. A checkpoint is written under a temporary name and renamed when complete, so a
kill while saving leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from starchat.chat_template import DialogueTemplate

MAX_SHARD_BYTES = 5 << 30
CHECKPOINTS_DIR_NAME = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def save_model_folder(state_dict: dict[str, torch.Tensor], hf_config, output_dir: Path, dtype: torch.dtype,
                      tokenizer_dir: Path, template: DialogueTemplate) -> Path:
    """Write a servable model folder from a full (unsharded, HF-named) state dict."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(hf_config, "tie_word_embeddings", True))
    tensors = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state_dict.items()
               if not (tied and name == "lm_head.weight") and tensor.is_floating_point()}
    config = hf_config.to_diff_dict()
    dtype_name = str(dtype).removeprefix("torch.")
    # use_cache is switched off for training only; a served model wants its KV cache.
    config.update(dtype=dtype_name, torch_dtype=dtype_name, vocab_size=tensors["transformer.wte.weight"].shape[0],
                  use_cache=True)
    config.pop("_name_or_path", None)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for stale in list(output_dir.glob("model*.safetensors")) + list(output_dir.glob("model.safetensors.index.json")):
        stale.unlink()
    shards = _split_into_shards(tensors, MAX_SHARD_BYTES)
    if len(shards) == 1:
        save_file(shards[0], str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, shard in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(output_dir / name), metadata={"format": "pt"})
            weight_map.update({tensor_name: name for tensor_name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = Path(tokenizer_dir) / name
        if source.is_file() and source.resolve() != (output_dir / name).resolve():
            shutil.copyfile(source, output_dir / name)
    (output_dir / "dialogue_template.json").write_text(json.dumps(template.to_json_dict(), indent=2) + "\n", encoding="utf-8")
    return output_dir


def _split_into_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        tensor_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + tensor_bytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor_bytes
    return shards


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR_NAME


def step_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:07d}"


def temporary_dir(final_dir: Path) -> Path:
    return final_dir.with_name(final_dir.name + ".tmp")


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (a `.tmp` folder is an interrupted save)."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return None
    complete = [(int(match.group(1)), path) for path in folder.iterdir()
                if (match := _STEP_DIR.match(path.name)) and (path / TRAINING_STATE_FILE).is_file()]
    return max(complete)[1] if complete else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (and any interrupted `.tmp` saves)."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return
    for leftover in folder.glob("*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def rng_file(checkpoint_dir: Path, rank: int) -> Path:
    return Path(checkpoint_dir) / f"rng-rank{rank}.pt"


def save_training_state(checkpoint_dir: Path, state: dict) -> None:
    torch.save(state, Path(checkpoint_dir) / TRAINING_STATE_FILE)


def load_training_state(checkpoint_dir: Path) -> dict:
    # Our own file (optimizer tensors, python RNG tuples): not a third-party download.
    return torch.load(Path(checkpoint_dir) / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)


def save_adapter(checkpoint_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(checkpoint_dir) / ADAPTER_FILE))


def load_adapter(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint_dir) / ADAPTER_FILE))


def publish(temporary: Path, final: Path) -> None:
    """Atomic on one file system: the checkpoint appears complete or not at all."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
