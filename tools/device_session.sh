#!/usr/bin/env bash
# One lent-GPU call: starchat-nano (one pretraining run, several fine-tuning lengths, eval of each),
# then the GPU benchmark table (bench/gpu_suite.py) on a quiet GPU.
#
#   bash tools/device_session.sh   (repo root; .carry/nano-corpus.tar.xz = corpus/ and dialogues/
#                                   of `tools/build_starchat_nano.py corpus`; $OUT set by the device tool)
#
# Every configuration runs the documented stages (init, pretrain, sft --profile gpu, eval); the best
# (most parseable replies at the card's decoding, then lowest held-out loss) is packed into $OUT as
# best.tar.* parts with summary.json and logs.txt; the benchmark writes gpu_suite.json.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
NANO_DEADLINE=${NANO_DEADLINE:-220}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-230}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-8}
SFT_EPOCHS=${SFT_EPOCHS:-"2 3 5"}
PENALTY=${PENALTY:-1.1}   # the card's decoding; greedy without a penalty is measured beside it
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
started=$(date +%s)
build="python3 tools/build_starchat_nano.py"
base=/tmp/nano-base
mkdir -p $base && tar xJf .carry/nano-corpus.tar.xz -C $base
echo "python3 tools/build_starchat_nano.py corpus --work-dir $base" > $base/commands.sh
{ $build init --work-dir $base && $build pretrain --work-dir $base --device "${DEVICE:-cuda}" ${BF16---bf16} --profile gpu \
    --pretrain-epochs "$PRETRAIN_EPOCHS"; } > /tmp/log-pretrain.txt 2>&1
for epochs in $SFT_EPOCHS; do
  work=/tmp/nano-sft$epochs
  mkdir -p $work && for part in corpus dialogues init pretrain tokenizer; do ln -s $base/$part $work/$part; done
  cp $base/commands.sh $work/commands.sh
  ( $build sft --work-dir $work --device "${DEVICE:-cuda}" ${BF16---bf16} --profile gpu --sft-epochs "$epochs" \
    && { python3 tools/eval_starchat_nano.py --model $work/sft --held-out $work/corpus/held_out \
           --requests $work/dialogues/eval_requests.jsonl --output $work/eval-no-penalty.json --batched & \
         $build eval --work-dir $work --batched-eval --repetition-penalty "$PENALTY"; wait; } ) > /tmp/log-sft$epochs.txt 2>&1 &
done
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - started )) -lt "$NANO_DEADLINE" ]; do sleep 3; done
pkill -f starchat.cli.train; pkill -f eval_starchat_nano; sleep 2
echo "nano done after $(( $(date +%s) - started )) s"
python3 - <<'PY'
import json, os, pathlib, subprocess, tarfile
out = pathlib.Path(os.environ.get("OUT", "/tmp/out"))
summary, best = {"configs": {}}, None
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
    for name in ("eval.json", "eval-no-penalty.json"):
        if (work / name).is_file():
            report = json.loads((work / name).read_text())
            entry[name] = {k: v for k, v in report.items() if k != "results"}
    if "eval.json" in entry:
        key = (entry["eval.json"]["share_parseable"], -entry["eval.json"]["held_out_loss"])
        if best is None or key > best[0]:
            best = (key, work)
    summary["configs"][work.name] = entry
summary["best"] = best[1].name if best else None
(out / "summary.json").write_text(json.dumps(summary, indent=2))
if best:
    work = best[1]
    names = ["commands.sh", "eval.json", "eval-no-penalty.json", "corpus/summary.json"] + [
        f"{stage}/{name}" for stage in ("pretrain", "sft") for name in ("train_log.jsonl", "training_args.json")] + [
        f"sft/{name}" for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                   "special_tokens_map.json", "dialogue_template.json")]
    with tarfile.open("/tmp/best.tar", "w") as archive:
        for name in names:
            if (work / name).exists():
                archive.add(work / name, arcname=name)
    subprocess.run(["split", "-b", "15m", "/tmp/best.tar", str(out / "best.tar.")], check=True)
print(json.dumps(summary, indent=2))
PY
for f in /tmp/log-*.txt; do echo "=== $f"; tail -c 5000 "$f"; done > "$OUT/logs.txt" 2>&1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout "$BENCH_TIMEOUT" python3 bench/gpu_suite.py --json "$OUT/gpu_suite.json" --latency-tokens 64 > /tmp/log-suite.txt 2>&1
echo "bench rc $? after $(( $(date +%s) - started )) s"
tail -c 4000 /tmp/log-suite.txt; cat /tmp/log-suite.txt >> "$OUT/logs.txt"
