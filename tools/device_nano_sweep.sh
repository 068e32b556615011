#!/usr/bin/env bash
# One lent-GPU call: build starchat-nano with several epoch counts at once, keep the best.
#
#   bash tools/device_nano_sweep.sh   (repo root; .carry/nano-corpus.tar.xz = corpus/ and dialogues/
#                                       of `tools/build_starchat_nano.py corpus`; $OUT set by the device tool)
#
# Each configuration is the documented pipeline (init, train --profile gpu, eval --batched-eval) in
# its own work folder; they share the GPU (a 18 M-parameter model leaves it mostly idle). At
# DEADLINE seconds whatever still runs is stopped; the best finished build (most parseable replies,
# then lowest held-out loss) is packed into $OUT as best.tar.* parts, with summary.json and logs.txt.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
DEADLINE=${DEADLINE:-300}
CONFIGS=${CONFIGS:-"A:4:6 B:8:8 C:8:16 D:16:10"}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
started=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > /tmp/gpu.txt 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> /tmp/gpu.txt 2>&1
for config in $CONFIGS; do
  IFS=: read -r name pretrain_epochs sft_epochs <<< "$config"
  work=/tmp/nano-$name
  mkdir -p "$work" && tar xJf .carry/nano-corpus.tar.xz -C "$work"
  echo "python3 tools/build_starchat_nano.py corpus --work-dir $work" > "$work/commands.sh"
  ( python3 tools/build_starchat_nano.py init --work-dir "$work" \
    && python3 tools/build_starchat_nano.py train --work-dir "$work" --device "${DEVICE:-cuda}" ${BF16:---bf16} --profile gpu \
         --pretrain-epochs "$pretrain_epochs" --sft-epochs "$sft_epochs" \
    && { python3 tools/build_starchat_nano.py eval --work-dir "$work" --batched-eval \
         || python3 tools/eval_starchat_nano.py --model "$work/sft" --held-out "$work/corpus/held_out" \
              --requests "$work/dialogues/eval_requests.jsonl" --output "$work/eval.json" --batched --no-cuda-graphs; } \
  ) > "/tmp/log-$name.txt" 2>&1 &
done
# The GPU engine checks run beside the (light) training jobs; so does a pipeline check of the
# GPU benchmark on a small shape (its timings mean nothing here).
timeout 200 python3 -m pytest -q -s tests/test_cuda.py > /tmp/log-cuda-tests.txt 2>&1
timeout 120 python3 bench/gpu_suite.py --shape tiny_starcoder --quick --json /tmp/quick-suite.json > /tmp/log-quick-suite.txt 2>&1
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - started )) -lt "$DEADLINE" ]; do sleep 5; done
pkill -f starchat.cli.train; pkill -f eval_starchat_nano; sleep 2
python3 - <<'PY'
import json, os, pathlib, subprocess, tarfile
out = pathlib.Path(os.environ.get("OUT", "/tmp/out"))
summary = {"gpu": pathlib.Path("/tmp/gpu.txt").read_text(), "configs": {}}
best = None
for work in sorted(pathlib.Path("/tmp").glob("nano-*")):
    entry = {}
    for stage in ("pretrain", "sft"):
        log = work / stage / "train_log.jsonl"
        if log.is_file():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            train = [l for l in lines if "loss" in l]
            entry[stage] = {"steps": train[-1]["step"] if train else None,
                            "seconds": train[-1].get("elapsed_seconds") if train else None,
                            "tokens_per_second": train[-1].get("tokens_per_second") if train else None,
                            "eval_losses": [l["eval_loss"] for l in lines if "eval_loss" in l]}
    evaluation = work / "eval.json"
    if evaluation.is_file():
        report = json.loads(evaluation.read_text())
        entry["eval"] = {k: v for k, v in report.items() if k != "results"}
        key = (report["share_parseable"], -report["held_out_loss"])
        if best is None or key > best[0]:
            best = (key, work)
    summary["configs"][work.name] = entry
summary["best"] = best[1].name if best else None
(out / "summary.json").write_text(json.dumps(summary, indent=2))
if best:
    work = best[1]
    names = ["commands.sh", "eval.json", "corpus/summary.json"] + [f"{stage}/{name}" for stage in ("pretrain", "sft")
             for name in ("train_log.jsonl", "training_args.json")] + [f"sft/{name}" for name in (
             "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "dialogue_template.json")]
    with tarfile.open("/tmp/best.tar", "w") as archive:
        for name in names:
            if (work / name).exists():
                archive.add(work / name, arcname=name)
    subprocess.run(["split", "-b", "15m", "/tmp/best.tar", str(out / "best.tar.")], check=True)
print(json.dumps(summary, indent=2))
PY
for f in /tmp/log-cuda-tests.txt /tmp/log-*.txt; do echo "=== $f"; tail -c 6000 "$f"; done > "$OUT/logs.txt" 2>&1
cat /tmp/log-cuda-tests.txt | tail -20
