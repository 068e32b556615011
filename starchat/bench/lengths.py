"""Request lengths drawn around a given one, as vLLM's random dataset does with --random-range-ratio:
long and short sequences sharing a server's batches, where equal lengths can hide costs that grow
with the longest sequence of a batch. Used by the load generator (`starchat bench serve`) and the
offline concurrent runs (`bench/throughput.py --range-ratio`)."""

from __future__ import annotations

import math
import random
from typing import Callable


def length_drawer(rng: random.Random, ratio: float) -> Callable[[int], int]:
    """A function of a length giving the length of one request: the length itself with ratio 0,
    else uniform over [length * (1 - ratio), length * (1 + ratio)], at least 1."""
    if not ratio:
        return lambda length: length
    return lambda length: rng.randint(max(1, math.floor(length * (1 - ratio))), max(1, math.ceil(length * (1 + ratio))))
