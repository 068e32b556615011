"""Build starchat-nano, the embedded default model, from CPython's standard library on this machine.

    python3 tools/build_starchat_nano.py all --work-dir /tmp/nano --device cuda --bf16 --profile gpu --batched-eval

Stages (each also runs alone; `all` prints and records every command in <work>/commands.sh):
  corpus   the stdlib's .py files (PSF licence; test folders left out), split into train and
           held-out *by file*; dialogues from documented functions and methods: the user asks
           "Write a Python function that <docstring summary>", the assistant answers with the
           function in a ```python fenced block. Held-out files give the eval loss and the 50
           eval requests, so both measure code the model never saw.
  init     a random GPTBigCode: multi-query attention, StarCoder + StarChat tokenizer (49,156
           tokens), 8 layers x 256 wide: ~18 M parameters, ~37 MB in float16 (the repo allows 40).
  pretrain `starchat train pretrain` on the train files (causal LM).
  sft      `starchat train sft` on the train dialogues, float16 weights.
  eval     tools/eval_starchat_nano.py: held-out loss, share of replies with a parseable code block.
  install  copy the model into --model-dir with its model card (README.md) and sources.tsv.

`--smoke` shrinks everything (a 2-layer model, a few files, a few steps) to check the pipeline.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install` too (e.g. on a lent GPU machine)
DEFAULT_MODEL_DIR = REPO / "starchat" / "models" / "starchat-nano"
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
LICENSE = "PSF-2.0"
MAX_MODEL_BYTES = 40_000_000
SEED = 42
EVAL_REQUESTS = 50
MAX_FUNCTION_LINES = 40
MAX_FUNCTION_CHARS = 1600
# Shipped as generation_config.json: `starchat chat` decodes with it, and the eval measures it.
# A 18 M-parameter model loops under plain greedy decoding; a mild penalty stops most loops.
GENERATION_CONFIG = {"do_sample": False, "repetition_penalty": 1.1}

MODEL_SHAPE = dict(vocab_size=49156, n_positions=1024, n_embd=256, n_layer=8, n_head=8, n_inner=1024)
SMOKE_SHAPE = dict(vocab_size=49156, n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=256)

# Hyper-parameters of the two stages, per profile (the smoke run overrides the step counts and sizes).
# cpu: sized for about 50 minutes on a 2-core CPU (~500 training tokens/s): pretraining sees ~0.9 M
#      tokens (55 steps of 32 x 512), a third of one epoch. Not enough for a useful model.
# gpu: whole epochs in one forward pass per step (32 x 512 tokens); about 3 minutes on one H100.
#      8 pre-training epochs is where held-out loss stops falling; 2 fine-tuning epochs gave the
#      most parseable replies of 2, 3, 5 (more over-fits the 5,025 dialogues).
PROFILES = {
    "cpu": (dict(max_seq_len=512, learning_rate=1e-3, global_batch_size=32, micro_batch_size=4, num_epochs=2,
                 max_steps=55, warmup_ratio=0.03, eval_steps=25, save_steps=25),
            dict(max_seq_len=512, learning_rate=3e-4, global_batch_size=32, micro_batch_size=4, num_epochs=3,
                 warmup_ratio=0.03, eval_steps=10, save_steps=10)),
    "gpu": (dict(max_seq_len=512, learning_rate=1e-3, global_batch_size=32, micro_batch_size=32, num_epochs=8,
                 warmup_ratio=0.03, eval_steps=200, save_steps=0),
            dict(max_seq_len=512, learning_rate=3e-4, global_batch_size=32, micro_batch_size=32, num_epochs=2,
                 warmup_ratio=0.03, eval_steps=50, save_steps=0)),
}

# Leading verbs of docstring summaries, put in the third person after "a function that".
_VERBS = set("""add append apply build calculate call check clear close collect combine compare compile compute
construct convert copy count create decode delete determine dump emit encode ensure escape evaluate execute
expand extract fetch filter find flush format generate get guess handle initialize insert install iterate join
list load locate look make map match merge move normalize open pack parse print process produce quote raise read
register remove rename replace reset resolve retrieve return run save search send set sort split start stop
strip test translate try turn unpack unquote update validate walk wrap write yield""".split())


def stdlib_files(limit: int | None = None) -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & SKIPPED_FOLDERS)
    return root, files[:limit] if limit else files


def third_person(summary: str) -> str:
    first, _, rest = summary.partition(" ")
    word = first.lower()
    if word.rstrip("s") in _VERBS or word in _VERBS:
        if word not in _VERBS:  # already "Returns"
            verb = word
        elif word.endswith(("sh", "ch", "x", "z", "ss", "o")):
            verb = word + "es"
        elif word.endswith("y") and word[-2:-1] not in "aeiou":
            verb = word[:-1] + "ies"
        else:
            verb = word + "s"
        return f"{verb} {rest}".strip()
    return "does the following: " + summary


def docstring_summary(docstring: str) -> str | None:
    paragraph = " ".join(line.strip() for line in docstring.strip().split("\n\n")[0].splitlines())
    sentence = paragraph.split(". ")[0].strip().rstrip(".")
    if not 10 <= len(sentence) <= 200 or not sentence[0].isalpha() or ">>>" in sentence:
        return None
    return sentence


def _dialogue(source: str, node: ast.AST, relative: str) -> dict | None:
    if node.decorator_list:
        return None
    docstring = ast.get_docstring(node)
    summary = docstring_summary(docstring) if docstring else None
    segment = ast.get_source_segment(source, node, padded=True)  # a method keeps its class indentation
    code = textwrap.dedent(segment) if segment else None
    if not summary or not code or code.count("\n") >= MAX_FUNCTION_LINES or len(code) > MAX_FUNCTION_CHARS:
        return None
    request = f"Write a Python function that {third_person(summary)}."
    answer = f"```python\n{code}\n```"
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}],
            "source": f"{relative}:{node.lineno}"}


def dialogues_from_file(path: Path, relative: str) -> tuple[list[dict], list[dict]]:
    """(top-level functions, methods): one dialogue per documented, undecorated, short one."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return [], []
    functions, methods = [], []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append(_dialogue(source, node, relative))
        elif isinstance(node, ast.ClassDef):
            methods.extend(_dialogue(source, child, relative) for child in node.body
                           if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [d for d in functions if d], [d for d in methods if d]


def build_corpus(work: Path, smoke: bool) -> dict:
    """Copy the stdlib into train/ and held_out/ (by file), write dialogues and sources.tsv."""
    root, files = stdlib_files(limit=60 if smoke else None)
    rng = random.Random(SEED)
    order = files[:]
    rng.shuffle(order)
    both = {path: dialogues_from_file(path, str(path.relative_to(root))) for path in order}
    per_file = {path: functions for path, (functions, _) in both.items()}  # eval requests: top-level functions
    held_out, held_out_dialogues = [], 0
    minimum_files = max(1, round(0.05 * len(order)))
    wanted_requests = 8 if smoke else EVAL_REQUESTS + 10
    for path in order:  # held-out files until both 5% of the files and enough eval requests
        if len(held_out) >= minimum_files and held_out_dialogues >= wanted_requests:
            break
        held_out.append(path)
        held_out_dialogues += len(per_file[path])
    held_out_set = set(held_out)
    corpus = work / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    rows = []
    split_dialogues: dict[str, list[dict]] = {"train": [], "held_out": []}
    held_out_functions: list[dict] = []
    for path in files:
        split = "held_out" if path in held_out_set else "train"
        relative = path.relative_to(root)
        target = corpus / split / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        target.write_bytes(data)
        rows.append(f"{relative}\t{split}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t{LICENSE}")
        split_dialogues[split].extend(per_file[path] + both[path][1])  # functions, then methods
        if split == "held_out":
            held_out_functions.extend(per_file[path])
    (corpus / "sources.tsv").write_text("path\tsplit\tbytes\tsha256\tlicense\n" + "\n".join(rows) + "\n")
    dialogues = work / "dialogues"
    dialogues.mkdir(parents=True, exist_ok=True)
    for split, items in split_dialogues.items():
        with (dialogues / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in items)
    requests = held_out_functions[:]
    rng.shuffle(requests)
    with (dialogues / "eval_requests.jsonl").open("w", encoding="utf-8") as handle:
        for item in requests[:8 if smoke else EVAL_REQUESTS]:
            handle.write(json.dumps({"request": item["messages"][0]["content"], "source": item["source"]}) + "\n")
    summary = {"python": sys.version.split()[0], "stdlib": str(root), "files": len(files), "held_out_files": len(held_out),
               "bytes": sum(int(r.split("\t")[2]) for r in rows), "train_dialogues": len(split_dialogues["train"]),
               "held_out_dialogues": len(split_dialogues["held_out"]), "license": LICENSE}
    (corpus / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def write_init(work: Path, smoke: bool) -> Path:
    import torch

    from starchat.config import ModelConfig
    from starchat.model.random_checkpoint import write_random_checkpoint

    config = ModelConfig(**(SMOKE_SHAPE if smoke else MODEL_SHAPE), multi_query=True, bos_token_id=0, eos_token_id=0)
    fp16_bytes = config.num_parameters() * 2
    if fp16_bytes > MAX_MODEL_BYTES:
        raise SystemExit(f"{config.num_parameters()} parameters = {fp16_bytes} bytes in float16, over {MAX_MODEL_BYTES}")
    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(DEFAULT_MODEL_DIR / name, tokenizer_dir / name)
    output = work / "init"
    write_random_checkpoint(output, config, dtype=torch.float32, seed=SEED, tokenizer_dir=tokenizer_dir)
    print(f"init: {config.num_parameters():,} parameters ({fp16_bytes / 1e6:.1f} MB in float16) -> {output}")
    return output


def _flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def training_commands(work: Path, smoke: bool, device: str, bf16: bool, profile: str = "cpu",
                      pretrain_steps: int | None = None, pretrain_epochs: float | None = None,
                      sft_epochs: float | None = None) -> list[list[str]]:
    pretrain, sft = (dict(settings) for settings in PROFILES[profile])
    if pretrain_epochs is not None:
        pretrain["num_epochs"] = pretrain_epochs
        pretrain.pop("max_steps", None)
    if pretrain_steps is not None:
        pretrain.pop("max_steps", None)
        if pretrain_steps:
            pretrain["max_steps"] = pretrain_steps
    if sft_epochs is not None:
        sft["num_epochs"] = sft_epochs
    if smoke:
        pretrain.update(max_seq_len=128, global_batch_size=4, micro_batch_size=4, eval_steps=2, save_steps=2)
        sft.update(max_seq_len=256, global_batch_size=4, micro_batch_size=4, eval_steps=2, save_steps=2)
        pretrain["max_steps"] = sft["max_steps"] = 3
    common = ["--device", device, "--no-progress"] + (["--bf16"] if bf16 else [])
    train = [sys.executable, "-m", "starchat.cli.train"]
    return [
        train + ["pretrain", "--base", str(work / "init"), "--data", str(work / "corpus" / "train"),
                 "--eval-data", str(work / "corpus" / "held_out"), "--output", str(work / "pretrain")]
        + _flags(pretrain) + common,
        train + ["sft", "--base", str(work / "pretrain"), "--data", str(work / "dialogues" / "train.jsonl"),
                 "--eval-data", str(work / "dialogues" / "held_out.jsonl"), "--output", str(work / "sft"),
                 "--save-dtype", "float16"] + _flags(sft) + common,
    ]


def eval_command(work: Path, smoke: bool, batched: bool = False, repetition_penalty: float = 1.0) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "eval_starchat_nano.py"), "--model", str(work / "sft"),
            "--held-out", str(work / "corpus" / "held_out"), "--requests", str(work / "dialogues" / "eval_requests.jsonl"),
            "--output", str(work / "eval.json"), "--repetition-penalty", str(repetition_penalty)] \
        + (["--max-rows", "4", "--max-new-tokens", "32", "--seq-len", "128"] if smoke else []) + (["--batched"] if batched else [])


def run(command: list[str], work: Path) -> None:
    # Recorded as one would type it in the repository root: python3, repository-relative paths.
    line = shlex.join("python3" if part == sys.executable else part.replace(f"{REPO}/", "") for part in command)
    print(f"$ {line}", flush=True)
    with (work / "commands.sh").open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    subprocess.run(command, cwd=REPO, check=True)


def install(work: Path, model_dir: Path) -> None:
    """Copy the fine-tuned model into model_dir and write its model card."""
    from model_card import write_model_card  # tools/model_card.py

    source = work / "sft"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "dialogue_template.json"):
        target = model_dir / name
        if name.endswith(".json") and target.is_file() and json.loads(target.read_text()) == json.loads((source / name).read_text()):
            continue  # same content, other formatting: keep the file (and the repository's history) as is
        shutil.copyfile(source / name, target)
    shutil.copyfile(work / "corpus" / "sources.tsv", model_dir / "sources.tsv")
    (model_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    size = (model_dir / "model.safetensors").stat().st_size
    if size > MAX_MODEL_BYTES:
        raise SystemExit(f"{model_dir / 'model.safetensors'} is {size} bytes, over the {MAX_MODEL_BYTES} allowed")
    write_model_card(work, model_dir)
    print(f"installed {model_dir} ({size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["corpus", "init", "train", "pretrain", "sft", "eval", "install", "all"])
    parser.add_argument("--work-dir", type=Path, required=True, help="where the corpus, runs and logs go")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"install target [default: {DEFAULT_MODEL_DIR.relative_to(REPO)}; with --smoke: <work>/model]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few files, 3 steps per stage")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                        help="hyper-parameter set: cpu (one session on 2 cores; too short for quality) or gpu")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pretraining steps [default: the profile's]; 0 = whole epochs")
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="pretraining epochs [default: the profile's]")
    parser.add_argument("--sft-epochs", type=float, default=None, help="fine-tuning epochs [default: the profile's]")
    parser.add_argument("--repetition-penalty", type=float, default=GENERATION_CONFIG["repetition_penalty"],
                        help="eval decoding: greedy with this penalty [default: the one the model ships in generation_config.json]")
    parser.add_argument("--batched-eval", action="store_true",
                        help="eval: generate the replies as one batch (fast on a GPU; no per-reply timing)")
    options = parser.parse_args()
    work = options.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "tools"))
    model_dir = options.model_dir or (work / "model" if options.smoke else DEFAULT_MODEL_DIR)
    if options.stage in ("corpus", "init", "all"):  # record this tool's own stages with the training commands
        stages = ["corpus", "init"] if options.stage == "all" else [options.stage]
        with (work / "commands.sh").open("w" if options.stage in ("corpus", "all") else "a", encoding="utf-8") as handle:
            for stage in stages:
                handle.write(shlex.join(["python3", "tools/build_starchat_nano.py", stage, "--work-dir", str(work)]
                                        + (["--smoke"] if options.smoke else [])) + "\n")
    if options.stage in ("corpus", "all"):
        build_corpus(work, options.smoke)
    if options.stage in ("init", "all"):
        write_init(work, options.smoke)
    if options.stage in ("train", "pretrain", "sft", "all"):
        pretrain, sft = training_commands(work, options.smoke, options.device, options.bf16, options.profile,
                                          options.pretrain_steps, options.pretrain_epochs, options.sft_epochs)
        if options.stage != "sft":
            run(pretrain, work)
        if options.stage != "pretrain":
            run(sft, work)
    if options.stage in ("eval", "all"):
        run(eval_command(work, options.smoke, options.batched_eval, options.repetition_penalty), work)
    if options.stage in ("install", "all"):
        install(work, model_dir.resolve())


if __name__ == "__main__":
    main()
