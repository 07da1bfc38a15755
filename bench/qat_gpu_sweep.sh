# QAT at training scale on a GPU machine: 2 backends x the (batch, lr) pairs in GRID, in
# parallel on one GPU (each run is launch-bound), steps sized by a 40-step probe to fit
# BUDGET seconds, held-out agreement / KL logged 10 times along the way; the
# best run per backend (lowest held-out KL) is written to $OUT in two parts per model (the
# device tool returns files of at most 16 MB). Here, reassemble them (cat the parts into
# model.onnx.pt = model.tflite.pt and model.coreml.pt, merge the two facts.json "trained"
# entries) and score with `bench/bench_qat.py --qat-models DIR`.
# On the lent machine (no network): .whl holds the torchao / coremltools wheels and .gpu the
# CIFAR-10 archive and the reference checkpoint, both carried; LOCAL=1 skips that set-up
# (e.g. a dry run here: LOCAL=1 PY=.venv/bin/python IMAGES=1500 BUDGET=3 PROBE=3 MINSTEPS=3).
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ -z "${LOCAL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  mkdir -p ../shared/data/reference
  cp .gpu/cifar10-jpg.tar.gz ../shared/data/ && cp .gpu/repvit_m0_9_cifar10_64px.pth ../shared/data/reference/
  nvidia-smi --query-gpu=name,memory.total --format=csv
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, torchao, coremltools; print('torch', torch.__version__, 'torchao', torchao.__version__, 'coremltools', coremltools.__version__, 'cuda', torch.cuda.is_available())" || exit 1
$PY -c "from bench.shared import unpacked; unpacked('cifar10-jpg.tar.gz', 'cifar10')" || exit 1
IMAGES=${IMAGES:-49500}; BUDGET=${BUDGET:-240}; PROBE=${PROBE:-40}; GRID=${GRID:-1024:1e-4 2048:1.4e-4}
NGRID=$(echo $GRID | wc -w); PROBE_BATCH=$(for g in $GRID; do echo ${g%:*}; done | sort -n | tail -1)
probe="--set qat.train_images=2048 --set qat.batch_size=$PROBE_BATCH --set qat.steps=$PROBE --set qat.warmup_steps=10 --set qat.freeze_observers_step=$PROBE --set qat.checkpoint_every=100000"
rm -rf .gpu_runs .gpu_runs_*.log; t0=$(date +%s)
$PY bench/bench_qat.py --train-only .gpu_runs/probe_t $probe --set 'qat.formats=[onnx,tflite]' > .gpu_runs_probe_t.log 2>&1 &
$PY bench/bench_qat.py --train-only .gpu_runs/probe_c $probe --set 'qat.formats=[coreml]' > .gpu_runs_probe_c.log 2>&1 &
wait
tail -n 3 .gpu_runs_probe_t.log .gpu_runs_probe_c.log
STEPS=$($PY - <<PYEOF
import json
rates = []
for r in ("probe_t", "probe_c"):
    for t in json.load(open(f".gpu_runs/{r}/facts.json"))["trained"].values():
        rates.append($PROBE / t["seconds_this_run"])
        print("probe", r, t["device"], f"{rates[-1]:.1f} steps/s", file=__import__("sys").stderr)
# 2 x NGRID runs share the GPU where the probe had two: each gets 1/NGRID of a probe's rate
print(max(${MINSTEPS:-100}, min(6000, int($BUDGET * min(rates) / $NGRID / 50) * 50)))
PYEOF
) || exit 1
echo "probe took $(( $(date +%s) - t0 )) s; steps per run: $STEPS"
FREEZE=$(( STEPS * 4 / 5 ))
common="--set qat.train_images=$IMAGES --set qat.steps=$STEPS --set qat.holdout_every=$(( STEPS / 10 )) --set qat.warmup_steps=$(( STEPS / 20 )) --set qat.freeze_observers_step=$FREEZE --set qat.checkpoint_every=100000"
t0=$(date +%s); 
pids=
for bl in $GRID; do
  b=${bl%:*}; lr=${bl#*:}
  $PY bench/bench_qat.py --train-only .gpu_runs/t_${b}_$lr $common --set qat.batch_size=$b --set qat.lr=$lr --set 'qat.formats=[onnx,tflite]' > .gpu_runs_t_${b}_$lr.log 2>&1 & pids="$pids $!"
  $PY bench/bench_qat.py --train-only .gpu_runs/c_${b}_$lr $common --set qat.batch_size=$b --set qat.lr=$lr --set 'qat.formats=[coreml]' > .gpu_runs_c_${b}_$lr.log 2>&1 & pids="$pids $!"
done
# a run past the hard limit is stopped, so that the finished ones still come back
( sleep ${HARD:-420}; echo "hard limit: stopping runs"; kill $pids ) > .gpu_runs_watchdog.log 2>&1 & wd=$!
wait $pids
kill $wd 2>/dev/null
echo "runs took $(( $(date +%s) - t0 )) s"
for f in .gpu_runs_*.log; do echo "== $f"; grep -v "QAT images\|QAT steps" $f | tail -25; done > $OUT/log.txt
$PY - <<'PYEOF'
import json, os, shutil
out = os.environ["OUT"]
facts = {r: json.load(open(f".gpu_runs/{r}/facts.json")) for r in sorted(os.listdir(".gpu_runs"))
         if os.path.exists(f".gpu_runs/{r}/facts.json")}
json.dump(facts, open(f"{out}/facts_all.json", "w"), indent=1)
for prefix, backend, fmt in (("t_", "torchao", "onnx"), ("c_", "coremltools", "coreml")):
    runs = [r for r in facts if r.startswith(prefix)]
    if not runs:
        continue
    best = min(runs, key=lambda r: facts[r]["trained"][backend]["holdout_kl_after"])
    for r in runs:
        t = facts[r]["trained"][backend]
        print(r, t["steps"], "steps", t["seconds_this_run"], "s; agreement", t["holdout_agreement_before"], "->",
              t["holdout_agreement_after"], "KL", t["holdout_kl_before"], "->", t["holdout_kl_after"],
              "BEST" if r == best else "")
    blob = open(f".gpu_runs/{best}/model.{fmt}.pt", "rb").read()
    half = len(blob) // 2 + 1
    for i in range(2):
        open(f"{out}/{backend}.part{i}", "wb").write(blob[i * half:(i + 1) * half])
    shutil.copy(f".gpu_runs/{best}/facts.json", f"{out}/{backend}.facts.json")
PYEOF
ls -la $OUT
