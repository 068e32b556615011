"""Examples -> rows -> batches: packing without attention across dialogues, or padding.

A `Row` is one sequence of a batch. Packing concatenates short examples into rows of at most
`max_seq_len` tokens; every token keeps a segment id (which example it came from) and a position
that restarts at 0 for each example, and the attention mask is block-diagonal causal, so each
example sees only itself: a packed row gives each example the logits it would have alone.
Padding puts one example per row and pads the batch to its longest row; pad tokens form their
own segment (they attend only to pads, never the reverse) and carry no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from starchat.train.tokenization import IGNORE_INDEX, TokenizedExample

PAD_SEGMENT = -1


@dataclass(frozen=True)
class Row:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]
    segment_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Targets that count in the loss: labels are shifted, so the first position never does."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where no loss
    position_ids: torch.Tensor | None  # (B, T); None: 0..T-1 in every row
    segment_ids: torch.Tensor | None  # (B, T); None: one segment per row, no padding (plain causal mask)
    num_tokens: int  # real (non-pad) tokens, for throughput

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.segment_ids),
                     self.num_tokens)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.segment_ids is None else block_causal_mask(self.segment_ids, dtype)

    def model_attention_mask(self, attn_implementation: str) -> torch.Tensor | None:
        """The mask in the form transformers' attention wants: boolean (True = attend) for SDPA,
        additive for eager. Other kernels (flash attention) get none: transformers finds the
        packed sequences from the restarting position_ids itself."""
        if self.segment_ids is None or attn_implementation not in ("sdpa", "eager"):
            return None
        additive = self.attention_mask(torch.float32)
        return additive == 0 if attn_implementation == "sdpa" else additive


def pack_examples(examples: Sequence[TokenizedExample], max_seq_len: int) -> list[Row]:
    """Greedy in order: fill a row until the next example does not fit, then start another.

    Examples longer than max_seq_len must be truncated first (`tokenization.truncate`).
    """
    rows: list[Row] = []
    current: list[TokenizedExample] = []
    current_length = 0
    for example in examples:
        if len(example) > max_seq_len:
            raise ValueError(f"an example of {len(example)} tokens does not fit max_seq_len {max_seq_len}; truncate it first")
        if current and current_length + len(example) > max_seq_len:
            rows.append(_row_of(current))
            current, current_length = [], 0
        current.append(example)
        current_length += len(example)
    if current:
        rows.append(_row_of(current))
    return rows


def pad_examples(examples: Sequence[TokenizedExample]) -> list[Row]:
    """One example per row; the padding is added per batch by `collate`."""
    return [_row_of([example]) for example in examples]


def _row_of(examples: Sequence[TokenizedExample]) -> Row:
    input_ids, labels, positions, segments = [], [], [], []
    for segment, example in enumerate(examples):
        input_ids.extend(example.input_ids)
        labels.extend(example.labels)
        positions.extend(range(len(example)))
        segments.extend([segment] * len(example))
    return Row(tuple(input_ids), tuple(labels), tuple(positions), tuple(segments))


def chunk_token_stream(token_ids: Sequence[int], seq_len: int, drop_last: bool = False) -> list[Row]:
    """Pre-training rows: the concatenated corpus cut into seq_len pieces, loss on every token."""
    rows = []
    for start in range(0, len(token_ids), seq_len):
        piece = tuple(token_ids[start:start + seq_len])
        if len(piece) < 2 or (drop_last and len(piece) < seq_len):
            continue
        rows.append(Row(piece, piece, tuple(range(len(piece))), (0,) * len(piece)))
    return rows


def collate(rows: Sequence[Row], pad_token_id: int = 0) -> Batch:
    """Stack rows, right-padding to the longest; positions and segments only when they are needed."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segment_ids = torch.full((len(rows), length), PAD_SEGMENT, dtype=torch.long)
    for index, row in enumerate(rows):
        n = len(row)
        input_ids[index, :n] = torch.tensor(row.input_ids)
        labels[index, :n] = torch.tensor(row.labels)
        position_ids[index, :n] = torch.tensor(row.position_ids)
        segment_ids[index, :n] = torch.tensor(row.segment_ids)
    num_tokens = sum(len(row) for row in rows)
    plain = all(len(row) == length and not any(row.segment_ids) for row in rows)
    if plain:  # every row is one whole sequence: the model's own causal path (and SDPA's fast kernels)
        return Batch(input_ids, labels, None, None, num_tokens)
    return Batch(input_ids, labels, position_ids, segment_ids, num_tokens)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, T): 0 where query i may see key j (same segment, j <= i), else -inf-like.

    transformers passes a 4D mask through unchanged to eager and SDPA attention; a pad token
    (segment -1) still sees itself, so no softmax row is empty.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    allowed = same_segment & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]  # (B, 1, T, T)
