"""The training objective: summed next-token cross-entropy, with logits only where a label is.

The vocabulary projection is the largest tensor of a step ((tokens, 49156) floats); in SFT only
assistant tokens carry loss, so `LossModel` runs the transformer, keeps the hidden states of
labelled positions, and projects only those: same loss and gradients, a fraction of the memory
and time. It is the module DDP/FSDP wrap, so their hooks see every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from starchat.train.tokenization import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled positions of full (B, T, V) logits, in float32."""
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1, :].float().reshape(-1, vocab)  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


class LossModel(torch.nn.Module):
    """Wraps a transformers GPTBigCodeForCausalLM (or a peft model of one); forward returns the loss sum."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def _causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        causal_lm = self._causal_lm()
        hidden = causal_lm.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state  # (B, T, C)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX  # (B, T-1)
        selected = hidden[:, :-1][keep]  # (N, C)
        logits = causal_lm.lm_head(selected)  # (N, V)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
