"""Packing boundaries: positions restart, the mask is block-diagonal causal, and packed logits equal unpacked ones."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeForCausalLM as HFModel

from starchat.train.collate import PAD_SEGMENT, chunk_token_stream, collate, pack_examples, pad_examples
from starchat.train.objective import LossModel, token_loss_sum
from starchat.train.tokenization import IGNORE_INDEX, TokenizedExample


def example(ids, learn_from=0):
    return TokenizedExample(tuple(ids), tuple(IGNORE_INDEX if i < learn_from else t for i, t in enumerate(ids)))


EXAMPLES = [example(range(100, 105), 2), example(range(200, 203), 1), example(range(300, 307), 3), example(range(400, 402), 1)]


def test_pack_fills_rows_in_order_with_restarting_positions():
    rows = pack_examples(EXAMPLES, max_seq_len=10)
    assert [len(row) for row in rows] == [8, 9]  # 5+3 | 7+2
    first = rows[0]
    assert first.input_ids == tuple(range(100, 105)) + tuple(range(200, 203))
    assert first.position_ids == (0, 1, 2, 3, 4, 0, 1, 2)
    assert first.segment_ids == (0, 0, 0, 0, 0, 1, 1, 1)
    assert first.labels == (IGNORE_INDEX, IGNORE_INDEX, 102, 103, 104, IGNORE_INDEX, 201, 202)
    with pytest.raises(ValueError, match="truncate"):
        pack_examples([example(range(20))], max_seq_len=10)


def test_block_causal_mask_never_crosses_a_boundary():
    batch = collate(pack_examples(EXAMPLES, max_seq_len=10))
    assert batch.input_ids.shape == (2, 9)
    assert batch.segment_ids[0, 8].item() == PAD_SEGMENT and batch.labels[0, 8].item() == IGNORE_INDEX
    allowed = batch.attention_mask(torch.float32)[:, 0] == 0  # (B, T, T)
    segments = batch.segment_ids
    for b in range(2):
        for i in range(9):
            for j in range(9):
                expected = j <= i and segments[b, i] == segments[b, j]
                assert allowed[b, i, j].item() == expected, (b, i, j)
    assert allowed[0, 8, 8]  # a pad token sees itself: no empty softmax row


def test_plain_rows_use_the_models_own_causal_path():
    rows = chunk_token_stream(list(range(1, 21)), seq_len=5)
    assert [row.input_ids for row in rows][1] == (6, 7, 8, 9, 10) and rows[0].labels == rows[0].input_ids
    batch = collate(rows)
    assert batch.position_ids is None and batch.segment_ids is None
    assert chunk_token_stream(list(range(12)), seq_len=5, drop_last=True)[-1].input_ids == (5, 6, 7, 8, 9)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_each_dialogue_alone(tiny_model_dir, attn_implementation):
    model = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn_implementation).eval()
    packed_rows = pack_examples(EXAMPLES, max_seq_len=10)
    padded_rows = pad_examples(EXAMPLES)
    for rows in (packed_rows, padded_rows):
        batch = collate(rows)
        mask = batch.model_attention_mask(attn_implementation)
        assert mask.dtype == (torch.bool if attn_implementation == "sdpa" else torch.float32)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits
        for b, row in enumerate(rows):
            for segment in sorted(set(row.segment_ids)):
                positions = [i for i, s in enumerate(row.segment_ids) if s == segment]
                alone_ids = torch.tensor([[row.input_ids[i] for i in positions]])
                with torch.no_grad():
                    alone = model(input_ids=alone_ids).logits[0]
                torch.testing.assert_close(logits[b, positions], alone, rtol=1e-5, atol=1e-5)


def test_loss_sum_counts_only_labelled_targets():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    expected = -(torch.log_softmax(logits[0, 0], -1)[3] + torch.log_softmax(logits[0, 2], -1)[5])
    torch.testing.assert_close(token_loss_sum(logits, labels), expected)


def test_loss_model_projects_only_labelled_positions_with_the_same_loss_and_gradients(tiny_model_dir):
    model = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate(pack_examples(EXAMPLES, max_seq_len=10))
    mask = batch.model_attention_mask("sdpa")
    full = token_loss_sum(model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits,
                          batch.labels)
    full.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    selective = LossModel(model)(batch.input_ids, batch.labels, position_ids=batch.position_ids, attention_mask=mask)
    selective.backward()
    torch.testing.assert_close(selective, full)
    for name, parameter in model.named_parameters():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
