"""A tiny GPTBigCode fine-tuned for a few dozen steps: the loss falls, the checkpoint serves, resume is exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reference_checkpoints import REPO, write_hf_checkpoint
from starchat.train.sft import run_sft
from train_helpers import STEPS, sft_options, write_dialogues

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    write_hf_checkpoint(root / "base", seed=11)
    write_dialogues(root / "dialogues.jsonl")
    return root


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    output = workspace / "uninterrupted"
    result = run_sft(sft_options(workspace / "base", workspace / "dialogues.jsonl", output))
    return result, output


def test_loss_falls(uninterrupted):
    result, _ = uninterrupted
    assert result.steps == STEPS and len(result.losses) == STEPS
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.6 * first, result.losses
    eval_losses = [loss for _, loss in result.eval_losses]
    assert [step for step, _ in result.eval_losses] == [8, 16, 24]
    assert eval_losses[-1] < eval_losses[0] < result.losses[0]


def test_logs_and_layout(uninterrupted):
    _, output = uninterrupted
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "dialogue_template.json", "training_args.json"):
        assert (output / name).is_file(), name
    assert json.loads((output / "dialogue_template.json").read_text())["end_token"] == "<|end|>"
    config = json.loads((output / "config.json").read_text())
    assert config["dtype"] == "float32" and config["use_cache"] is True  # the base's dtype; serving wants the cache
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_second"] > 0 and r["loss_tokens"] > 0 for r in train_records)
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 16, 24]
    # Warm-up (3% of 24 steps -> 1 step) then cosine decay to ~0.
    rates = [r["learning_rate"] for r in train_records]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(1e-2) and rates[-1] < 5e-4
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["step-0000008", "step-0000016"]  # the last two; the final model is the output folder


def test_checkpoint_serves_in_our_engine_and_transformers_with_equal_logits(uninterrupted):
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat import LLM, SamplingParams

    _, output = uninterrupted
    reference = HFModel.from_pretrained(output, dtype=torch.float32).eval()
    llm = LLM(model=str(output), dtype="float32", device="cpu", progress=False)
    prompt = llm.engine.chat_template.render([{"role": "user", "content": "Write a Python function that adds 3 and 4."}])
    ids = llm.tokenizer.encode(prompt)
    completion = llm.generate([ids], SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=5))[0]
    with torch.no_grad():
        logits = reference(torch.tensor([ids + completion.token_ids])).logits[0, len(ids) - 1:-1]  # (12, V)
    expected_logprobs = torch.log_softmax(logits.float(), dim=-1)
    assert completion.token_ids == expected_logprobs.argmax(-1).tolist()  # same greedy path
    for step, logprob in enumerate(completion.logprobs):
        assert logprob.logprob == pytest.approx(expected_logprobs[step, completion.token_ids[step]].item(), abs=1e-4)
        assert len(logprob.top) == 5
        for token_id, _, alternative_logprob in logprob.top:
            assert alternative_logprob == pytest.approx(expected_logprobs[step, token_id].item(), abs=1e-4)
    reply = llm.chat([{"role": "user", "content": "Write a Python function that adds 3 and 4."}],
                     SamplingParams(max_new_tokens=24)).text
    assert reply.startswith("```")  # it learned where an answer starts: the assistant turn, not the prompt


def test_resume_after_kill_matches_an_uninterrupted_run(workspace, uninterrupted):
    """SIGKILL at step 13 (checkpoints at 8 and 16): resume restarts at 8 and ends on the same weights."""
    _, reference_output = uninterrupted
    output = workspace / "killed"
    script = f"""
import os, signal, sys
import torch
torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py: same kernels, same numbers
sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]
from pathlib import Path
from train_helpers import sft_options
from starchat.train.sft import run_sft

def kill_at_13(step, metrics):
    if step == 13:
        os.kill(os.getpid(), signal.SIGKILL)

options = sft_options(Path({str(workspace / 'base')!r}), Path({str(workspace / 'dialogues.jsonl')!r}), Path({str(output)!r}))
options.callbacks.append(kill_at_13)
run_sft(options)
"""
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert not (output / "model.safetensors").exists()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-0000008"]

    result = run_sft(sft_options(workspace / "base", workspace / "dialogues.jsonl", output,
                                 training={"resume": True}))
    assert result.steps == STEPS and len(result.losses) == STEPS - 8
    resumed, reference = load_file(str(output / "model.safetensors")), load_file(str(reference_output / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, STEPS + 1))  # the killed run's steps 9-13 were dropped from the log


def test_sigterm_ends_the_run_after_a_whole_step_saved_and_resume_matches_an_uninterrupted_run(
        workspace, uninterrupted):
    """A scheduler's SIGTERM at step 13 (checkpoints every 8): the run stops after step 13 with a
    checkpoint of it, so nothing is lost; --resume starts at 13 and ends on the same weights."""
    from starchat.train.stopping import TrainingInterrupted

    _, reference_output = uninterrupted
    output = workspace / "stopped"
    options = sft_options(workspace / "base", workspace / "dialogues.jsonl", output)
    options.callbacks.append(lambda step, metrics: step == 13 and os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or a handler an earlier test's library left
    with pytest.raises(TrainingInterrupted) as stopped:
        run_sft(options)
    assert (stopped.value.step, stopped.value.total_steps) == (13, STEPS)
    assert stopped.value.checkpoint == output / "checkpoints" / "step-0000013" and stopped.value.checkpoint.is_dir()
    assert not (output / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with it

    result = run_sft(sft_options(workspace / "base", workspace / "dialogues.jsonl", output,
                                 training={"resume": True}))
    assert result.steps == STEPS and len(result.losses) == STEPS - 13
    resumed, reference = load_file(str(output / "model.safetensors")), load_file(str(reference_output / "model.safetensors"))
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=0, msg=name)


def test_cli_ctrl_c_exits_130_naming_the_checkpoint_to_resume_from(workspace, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "starchat.cli.main", "train", "sft", "--base", str(workspace / "base"),
               "--data", str(workspace / "dialogues.jsonl"), "--output", str(output), "--max-steps", "500",
               "--global-batch-size", "2", "--micro-batch-size", "2", "--max-seq-len", "64", "--save-steps", "0",
               "--no-progress", "--device", "cpu"]
    job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    log = output / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 2):
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[1][-3000:]
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"interrupted after step (\d+) of 500: checkpoint saved in {re.escape(str(output))}/checkpoints/"
                        r"step-0*\1; run the same command with --resume to continue from it", last), last
    assert len(list((output / "checkpoints").glob("step-*"))) == 1


def test_resume_refuses_a_changed_run(workspace, uninterrupted, tmp_path):
    _, reference_output = uninterrupted
    shutil.copytree(reference_output / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="global_batch_size: 4 -> 8"):
        run_sft(sft_options(workspace / "base", workspace / "dialogues.jsonl", tmp_path,
                            training={"resume": True, "global_batch_size": 8}))


def test_lora_merged_on_save(workspace):
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat import LLM, SamplingParams
    from starchat.train.lora import LoraSettings

    output = workspace / "lora"
    result = run_sft(sft_options(workspace / "base", workspace / "dialogues.jsonl", output, lora=LoraSettings(r=4, dropout=0.0),
                                 training={"max_steps": 4, "eval_steps": 4, "save_steps": 2}))
    assert result.losses[-1] < result.losses[0]
    base, tuned = load_file(str(workspace / "base" / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert tuned.keys() == base.keys()
    for name in base:
        changed = not torch.equal(base[name], tuned[name])
        adapted = any(f".{target}.weight" in name for target in ("c_attn", "c_proj", "c_fc"))
        assert changed == adapted, name  # LoRA moved exactly the adapted matrices; embeddings, biases, norms frozen
    # The merged weights reproduce the adapter model's logits, and serve in our engine.
    reference = HFModel.from_pretrained(output, dtype=torch.float32).eval()
    llm = LLM(model=str(output), dtype="float32", device="cpu", progress=False)
    ids = llm.tokenizer.encode("def add():")
    completion = llm.generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=0))[0]
    with torch.no_grad():
        expected = reference(torch.tensor([ids + completion.token_ids])).logits[0, len(ids) - 1:-1].log_softmax(-1)
    assert completion.token_ids == expected.argmax(-1).tolist()
    assert (output / "checkpoints" / "step-0000002" / "adapter_model.safetensors").is_file()


def test_cli_sft_with_padding_bf16_and_gradient_checkpointing(workspace):
    from typer.testing import CliRunner

    from starchat.cli.train import train_app

    output = workspace / "cli"
    arguments = ["sft", "--base", str(workspace / "base"), "--data", str(workspace / "dialogues.jsonl"), "--output", str(output),
                 "--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "1", "--max-seq-len", "64",
                 "--padding", "--bf16", "--gradient-checkpointing", "--save-steps", "0", "--no-progress", "--device", "cpu",
                 "--save-dtype", "float16"]
    outcome = CliRunner().invoke(train_app, arguments)
    assert outcome.exit_code == 0, outcome.output
    assert "done: 2 steps" in outcome.output
    assert json.loads((output / "config.json").read_text())["dtype"] == "float16"
    assert load_file(str(output / "model.safetensors"))["transformer.wte.weight"].dtype == torch.float16
    args = json.loads((output / "training_args.json").read_text())
    assert args["packing"] is False and args["bf16"] is True and args["accumulation_steps"] == 2


def test_cli_reports_a_malformed_record_by_file_and_line(workspace, tmp_path):
    from typer.testing import CliRunner

    from starchat.cli.train import train_app

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n{not json\n")
    outcome = CliRunner().invoke(train_app, ["sft", "--base", str(workspace / "base"), "--data", str(data),
                                             "--output", str(tmp_path / "out"), "--no-progress"])
    assert outcome.exit_code == 2
    assert f"{data}:2: not valid JSON" in outcome.output and "--on-bad-record skip" in outcome.output


def test_lora_on_a_starcoder_base_trains_the_new_token_rows(workspace, tmp_path):
    """A base without StarChat's tokens: they are added, and under LoRA their embedding rows train too."""
    from starchat.train.lora import LoraSettings
    from train_helpers import write_starcoder_base

    base = write_starcoder_base(tmp_path / "starcoder")
    output = tmp_path / "out"
    run_sft(sft_options(base, workspace / "dialogues.jsonl", output, lora=LoraSettings(r=2, dropout=0.0),
                        training={"max_steps": 2, "eval_steps": 2, "save_steps": 0}))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert after["transformer.wte.weight"].shape == (49156, 64)
    torch.testing.assert_close(after["transformer.wte.weight"][:49152], before["transformer.wte.weight"], rtol=0, atol=0)
    mean_row = before["transformer.wte.weight"].mean(0)
    for token_id in (49152, 49153, 49154, 49155):  # all four appear in every dialogue
        assert not torch.allclose(after["transformer.wte.weight"][token_id], mean_row), token_id
    assert json.loads((output / "config.json").read_text())["vocab_size"] == 49156


def test_pretrain_on_code_files(workspace, tmp_path):
    from starchat.train.loop import TrainingArguments
    from starchat.train.pretrain import PretrainOptions, run_pretrain

    code = tmp_path / "code"
    for folder in ("pkg", "held_out"):
        (code / folder).mkdir(parents=True)
    for index in range(9):
        body = "".join(f"def function_{index}_{k}(x):\n    return x * {k} + {index}\n\n\n" for k in range(6))
        (code / ("held_out" if index == 8 else "pkg") / f"module_{index}.py").write_text(body)
    (code / "pkg" / "notes.txt").write_text("not python")
    (code / "pkg" / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped, counted
    output = tmp_path / "pretrained"
    training = TrainingArguments(output_dir=output, learning_rate=1e-2, global_batch_size=4, micro_batch_size=4,
                                 max_steps=6, eval_steps=3, save_steps=0, progress=False, device="cpu")
    result = run_pretrain(PretrainOptions(base=str(workspace / "base"), data=[code / "pkg"], eval_data=[code / "held_out"],
                                          training=training, max_seq_len=64))
    assert result.steps == 6 and result.losses[-1] < result.losses[0]
    assert len(result.eval_losses) == 2 and result.eval_losses[-1][1] < result.eval_losses[0][1]
    info = json.loads((output / "training_args.json").read_text())
    assert info["command"] == "pretrain" and info["train_files"] == 8 and info["skipped_files"] == 1
    assert info["eval_files"] == [str(code / "held_out" / "module_8.py")]
    from transformers import GPTBigCodeForCausalLM as HFModel

    HFModel.from_pretrained(output)  # a complete HF checkpoint


def test_cli_refuses_a_device_it_cannot_train_on(workspace, tmp_path):
    from typer.testing import CliRunner

    from starchat.cli.train import train_app

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    outcome = CliRunner().invoke(train_app, ["sft", "--base", str(workspace / "base"), "--data", str(data),
                                             "--output", str(tmp_path / "out"), "--no-progress", "--device", "tpu"])
    assert outcome.exit_code == 2, outcome.output
    assert "device: 'tpu' is not supported" in outcome.output
    assert isinstance(outcome.exception, SystemExit)  # an exit with the message, not a traceback
