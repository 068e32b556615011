"""torchrun with 2 CPU processes (gloo) ends on the same weights as one process with the same global batch.

One process: global batch 4 = micro-batch 2 x 2 accumulation steps. Two processes: each takes 2
rows as 2 micro-batches of 1. Only the order of floating-point sums differs; after 4 AdamW steps
at lr 1e-2 the weights agree to 5e-5 absolute (observed: ~5e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from reference_checkpoints import REPO, write_hf_checkpoint
from starchat.train.sft import run_sft
from train_helpers import sft_options, write_dialogues

STEPS = 4
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    write_hf_checkpoint(root / "base", seed=5)
    write_dialogues(root / "dialogues.jsonl", count=32)
    output = root / "single"
    # max_seq_len 128 packs 3 dialogues per row: the block-diagonal masks go through DDP/FSDP too.
    run_sft(sft_options(root / "base", root / "dialogues.jsonl", output, max_seq_len=128,
                        training={"max_steps": STEPS, "micro_batch_size": 2, "save_steps": 0, "eval_steps": STEPS,
                                  "save_dtype": "float32"}))
    return root, load_file(str(output / "model.safetensors"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(single_process, mode):
    root, expected = single_process
    output = root / mode
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "starchat.cli.train", "sft", "--base", str(root / "base"), "--data", str(root / "dialogues.jsonl"),
               "--output", str(output), "--max-seq-len", "128", "--eval-fraction", "0.1", "--learning-rate", "1e-2",
               "--global-batch-size", "4", "--micro-batch-size", "1", "--max-steps", str(STEPS), "--save-steps", "0",
               "--eval-steps", str(STEPS), "--save-dtype", "float32", "--device", "cpu", "--no-progress"]
    if mode == "fsdp":
        command.append("--fsdp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    assert f"done: {STEPS} steps" in process.stdout
    actual = load_file(str(output / "model.safetensors"))
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=TOLERANCE, msg=name)
    assert not torch.equal(expected["transformer.h.0.attn.c_attn.weight"],
                           load_file(str(root / "base" / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"])
