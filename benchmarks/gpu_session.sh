#!/usr/bin/env bash
# What a development session with a lent GPU runs, as one call (about 9.5 min).
#
#   1. the CUDA inference benchmark (benchmarks/dl_speed.py --device cuda),
#   2. the CUDA tests (shipped networks on CUDA match the CPU; iLSQR on CUDA),
#   3. fine-tuning of the three shipped networks on 128^3 hybrid patches, all
#      at once on the one GPU, each sized by a time budget (qsmprep-train
#      --time-budget), exported with their cards into a copy of the models
#      folder.
#
# Everything that must come back is written under $OUT (at most 8 files):
# models.tar.gz (models folder + each run's metrics.csv/config.json/log),
# benchmarks.md and dl_speed_cuda.json, and the logs.
#
# The GPU image has torch, numpy, scipy, numba, tqdm and pytest but neither
# nibabel (the simulator reads the packaged head with it), nilearn (the MNI
# head of dl_speed.py) nor tomli_w (qsmprep.config): carry their wheels in
# .whl/ (see the device tool's README). Usage, from the repository root:
#   OUT=/tmp/out BUDGET_S=330 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
BUDGET_S=${BUDGET_S:-330}       # seconds of training steps per model
DEADLINE_S=${DEADLINE_S:-555}   # whole script, from its start
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu PATCH=32 BUDGET_S=10 SPEED_ARGS=--quick: a CPU dry run
PATCH=${PATCH:-128}
SPEED_ARGS=${SPEED_ARGS:---repeats 3}
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
log() { echo "[$(elapsed) s] $*" | tee -a "$OUT/session.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
for module in nibabel nilearn tomli_w; do  # say early what is missing (both were, on 2026-11-26)
    python3 -c "import $module" 2>/dev/null || log "missing $module: carry its wheel in .whl/"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/session.log" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$OUT/session.log"

log "dl_speed --device $DEVICE"
python3 benchmarks/dl_speed.py --device "$DEVICE" $SPEED_ARGS >"$OUT/dl_speed.log" 2>&1
log "dl_speed rc=$?"
cp docs/benchmarks.md "$OUT/benchmarks.md"
cp benchmarks/results/dl_speed_cuda.json "$OUT/" 2>/dev/null

MODELS=/tmp/models
rm -rf "$MODELS" /tmp/runs && cp -r qsmprep/data/models "$MODELS" && mkdir -p /tmp/runs
train() {  # model workers
    python3 -m qsmprep.train.cli "$1" --out "/tmp/runs/$1" --device "$DEVICE" --patch "$PATCH" \
        --batch 1 --steps 100000 --time-budget "$BUDGET_S" --time-limit $((BUDGET_S + 60)) \
        --lr 5e-4 --init "qsmprep/data/models/$1.pt" --seed 0 --validation 4 \
        --validate-every 50 --checkpoint-every 120 --workers "$2" --threads 2 \
        --no-progress --export --models-dir "$MODELS" >"/tmp/runs/$1.log" 2>&1
    echo "$1 rc=$?" >>"$OUT/session.log"
}
log "training (budget $BUDGET_S s each)"
mkdir -p /tmp/runs
train ir2qsm 5 & train unet 5 & train nextqsm 4 &

log "CUDA tests"
python3 -m pytest -q -p no:cacheprovider tests/test_dl.py tests/test_inversion.py -k cuda \
    >"$OUT/pytest.log" 2>&1
log "pytest rc=$?"

while [ -n "$(jobs -r)" ] && [ "$(elapsed)" -lt "$DEADLINE_S" ]; do sleep 5; done
[ -n "$(jobs -r)" ] && log "deadline: stopping $(jobs -r | wc -l) job(s)" && kill $(jobs -rp)
nvidia-smi --query-gpu=memory.used --format=csv >>"$OUT/session.log" 2>&1
# the runs' logs, and best.pt without its optimiser state (float16), in case
# an export did not finish: qsmprep-train's export can then run elsewhere
python3 - <<'PY'
import pathlib, torch
for run in pathlib.Path("/tmp/runs").iterdir():
    if (run / "best.pt").exists():
        s = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
        s.pop("optimizer", None)
        s["model"] = {k: v.half() if v.is_floating_point() else v for k, v in s["model"].items()}
        torch.save(s, run / "best_slim.pt")
PY
tar -czf "$OUT/runs.tar.gz" -C /tmp/runs --exclude=best.pt --exclude=checkpoint.pt .
tar -czf "$OUT/models.tar.gz" -C "$MODELS" .
ls -la "$OUT" >>"$OUT/session.log"
log "done"
