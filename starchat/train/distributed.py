"""One process or many: the process group, DDP / FSDP wrapping, and full state dicts.

Launch with `torchrun`; it sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address. The
backend is NCCL on GPUs and gloo on CPUs, so the same command runs on a laptop. With no
WORLD_SIZE (or 1) nothing distributed is created: a plain process, as the tests run it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from starchat.engine.devices import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_training_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    resolved = resolve_device(device)  # refuses what is neither cpu nor a visible GPU, saying what to pass
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device(f"cuda:{local_rank}")
    return resolved


def init_distributed(device: str = "auto") -> DistributedContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_training_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, resolved)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def _collective_device(context: DistributedContext) -> torch.device:
    return context.device if context.device.type == "cuda" else torch.device("cpu")


def wrap_model(model: torch.nn.Module, context: DistributedContext, fsdp: bool) -> torch.nn.Module:
    """DDP (every rank holds the whole model) or FSDP (parameters sharded per transformer block)."""
    if fsdp:
        if not context.is_distributed:
            return model  # one process: nothing to shard
        from torch.distributed.fsdp import fully_shard

        for block in _transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if not context.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # The only buffer is the constant causal-mask table: syncing it before every forward would also
    # make a forward on one rank alone (uneven eval shards) wait forever for the others.
    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.models.gpt_bigcode.modeling_gpt_bigcode import GPTBigCodeBlock

    return [module for module in model.modules() if isinstance(module, GPTBigCodeBlock)]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def is_fsdp(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the CPU (FSDP gathers shards: all ranks must call this)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.detach().cpu() for name, tensor in unwrap(model).state_dict().items()}


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
