"""The decode-product choices of tuned_linear kept on disk, so that later starts skip the timing.

Tuning a model's decode products on a GPU compiles every Triton candidate on a machine's first
start (some 100 kernels for StarChat-beta; Triton caches the binaries) and, on every start, times
each candidate against cuBLAS at four row counts for every weight shape. The winners depend only
on the GPU, the software that compiles and runs the kernels, starchat's kernel source and how
kernels are launched, so they are stored per environment: one JSON file per key of
  GPU name, compute capability, SM count and memory; PyTorch, CUDA and Triton versions;
  a hash of the kernel and tuning sources; dependent launch on or off; the activation dtype,
with one entry per layer shape (weight dtype, out x in features, bias, GELU epilogue) holding
the choice per row bucket and the timings it was made from. A change of any of those makes a new
file, so a stale choice is never read. A choice read back is still run once against PyTorch's
product before use (tuned_linear), which also compiles it before the first request.

Files live in `$STARCHAT_CACHE_DIR/tuning` (default ~/.cache/starchat/tuning) and are replaced
atomically; two processes that tune at once may each write their own result, and both are right.
`STARCHAT_TUNING_CACHE=0` turns the cache off (every start times again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("starchat.model")

DISABLE_VARIABLE = "STARCHAT_TUNING_CACHE"
FORMAT = 1  # bumped when the file's layout changes
# The sources whose change can change which candidate wins, or what a candidate's blocks mean
_SOURCES = ("triton_linear.py", "tuned_linear.py", "triton_support.py")


def enabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("STARCHAT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "starchat")
    return Path(root) / "tuning"


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()[:16]


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """What the choices for a model's products on `device` with activations of `dtype` depend on."""
    from starchat.model import triton_support

    triton = triton_support.triton
    described: dict = {"format": FORMAT, "device_type": device.type, "dtype": str(dtype),
                       "torch": torch.__version__, "triton": getattr(triton, "__version__", None),
                       "sources": _sources_hash(), "dependent_launch": bool(triton_support.dependent_launch(device)),
                       "interpreter": triton_support.interpreting()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        described.update(gpu=properties.name, capability=list(torch.cuda.get_device_capability(index)),
                         multiprocessors=properties.multi_processor_count, memory=properties.total_memory,
                         cuda=torch.version.cuda)
    return described


def layer_key(weight_dtype: torch.dtype, out_features: int, in_features: int, bias: bool, gelu: bool) -> str:
    return f"{weight_dtype}:{out_features}x{in_features}:bias={int(bias)}:gelu={int(gelu)}"


class TuningCache:
    """The stored choices of one environment: `get` a layer's entry, `put` new ones, `save` them."""

    def __init__(self, device: torch.device, dtype: torch.dtype, directory: Path | None = None):
        self.environment = environment(device, dtype)
        key = hashlib.sha256(json.dumps(self.environment, sort_keys=True).encode()).hexdigest()[:20]
        self.path = (directory or cache_dir()) / f"{key}.json"
        self.layers: dict[str, dict] = self._read()
        self._changed = False

    def _read(self) -> dict[str, dict]:
        try:
            stored = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("tuning cache %s is unreadable (%s): timing the decode products again", self.path, error)
            return {}
        if not isinstance(stored, dict) or stored.get("environment") != self.environment \
                or not isinstance(stored.get("layers"), dict):
            logger.warning("tuning cache %s does not hold this environment's choices: timing again", self.path)
            return {}
        return stored["layers"]

    def get(self, key: str) -> dict | None:
        """{"choices": {row bucket: blocks or None}, "report": [rows]} as stored, or None."""
        entry = self.layers.get(key)
        try:
            choices = {int(rows): (tuple(blocks) if blocks is not None else None)
                       for rows, blocks in entry["choices"].items()}
            report = [{**row, "shape": tuple(row["shape"]), "blocks": tuple(row["blocks"])} for row in entry["report"]]
            return {"choices": choices, "report": report}
        except (TypeError, KeyError, ValueError, AttributeError):
            return None  # absent, or not in this format

    def put(self, key: str, choices: dict[int, tuple | None], report: list[dict]) -> None:
        self.layers[key] = {"choices": {str(rows): (list(blocks) if blocks is not None else None)
                                        for rows, blocks in choices.items()},
                            "report": report}
        self._changed = True

    def save(self) -> None:
        """Write the file if anything changed, merged with what another process stored meanwhile
        (this process's entries win); a cache that cannot be written is logged and skipped."""
        if not self._changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            layers = {**self._read(), **self.layers}
            handle, partial = tempfile.mkstemp(dir=self.path.parent, suffix=".json.partial")
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump({"environment": self.environment, "layers": layers}, file, indent=1, sort_keys=True)
                os.replace(partial, self.path)  # atomic: a reader never sees half a file
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
            self._changed = False
        except OSError as error:
            logger.warning("could not write the tuning cache %s (%s); the next start times again", self.path, error)
