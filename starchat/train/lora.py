"""LoRA through peft: low-rank adapters on GPTBigCode's linear layers, merged into the weights on save.

Targets are `c_attn` (fused QKV), `c_proj` (attention and MLP outputs) and `c_fc`, so a 16B base
trains on one GPU with the base frozen (in bf16 with `--bf16`). When StarChat's tokens were added
to the base, their embedding rows train too (peft's trainable tokens), or the new tokens would
stay at their mean-row start. Merging is done out of place, tensor by tensor, so an intermediate
checkpoint does not disturb the weights being trained (merge-then-unmerge would, by rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_TARGET_MODULES = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float | None = None  # None: 2 * r
    dropout: float = 0.05

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"--lora-r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model: torch.nn.Module, settings: LoraSettings, new_token_ids: list[int]) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'starchat[train]' (or pip install peft)") from None
    if new_token_ids and "trainable_token_indices" not in LoraConfig.__dataclass_fields__:
        raise ImportError("training StarChat's new token rows under LoRA needs peft >= 0.15 (trainable_token_indices); "
                          "pip install -U peft")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.r,
        lora_dropout=settings.dropout,
        target_modules=list(LORA_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices={"wte": list(new_token_ids)} if new_token_ids else None,
    )
    return get_peft_model(model, config)


def adapter_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only (what `--resume` needs besides the frozen base)."""
    return {name: parameter.detach().cpu() for name, parameter in peft_model.named_parameters() if parameter.requires_grad}


def load_adapter_state_dict(peft_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    if set(tensors) != trainable:
        unexpected, missing = sorted(set(tensors) - trainable), sorted(trainable - set(tensors))
        raise ValueError(f"the checkpoint's adapter does not match this LoRA setup (unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}); resume with the same --lora-r and base")
    with torch.no_grad():
        parameters = dict(peft_model.named_parameters())
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def merged_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named full weights with every adapter folded in; the model itself is left untouched."""
    from peft.tuners.lora import LoraLayer

    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # older peft: no trainable tokens, nothing of that kind to merge
        TrainableTokensLayer = ()  # noqa: N806  (isinstance(x, ()) is always False)

    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(adapter).float() for adapter in module.active_adapters)
                merged[_hf_name(f"{name}.weight")] = (weight.float() + delta).cpu()
            elif isinstance(module, TrainableTokensLayer):
                merged[_hf_name(f"{name}.weight")] = module.get_merged_weights(module.active_adapters).detach().float().cpu()
        for name, tensor in base.state_dict().items():
            if "lora_" in name or "trainable_tokens_" in name:
                continue
            merged.setdefault(_hf_name(name), tensor.detach().cpu())
    return merged


def _hf_name(peft_name: str) -> str:
    """'transformer.wte.token_adapter.base_layer.weight' -> 'transformer.wte.weight'."""
    return ".".join(part for part in peft_name.split(".") if part not in ("base_layer", "token_adapter"))
