#!/usr/bin/env bash
# Train the toy model on a GPU machine lent through the device tool, two runs side by side on the one GPU:
#   scratch: the whole recipe from nothing (VAE, decoder, UNet + text encoder, VAE on every appearance);
#   continued: stage 3 continued from the shipped weights (attencraft_lab/toy/weights; its stage 4 is done).
# Each writes its export as a tar and its log under $OUT. MINUTES (default 6) is each run's budget of stages
# 1-3 (stage 4, 2,000 VAE steps, runs after it); VAE_ARGS sets the scratch run's VAE stages (steps are not
# bounded by the budget); RUNS picks the runs, INIT the model
# the continued run starts from, BATCH the UNet batch.
# The machine's image has torch but no diffusers: carry the wheels in .whl (docs/toy_model.md says which).
set -u
OUT=${OUT:-out/gpu-train}
MINUTES=${MINUTES:-6}
VAE_ARGS=${VAE_ARGS:---vae-steps 2000 --vae-batch 64 --decoder-steps 1000}
RUNS=${RUNS:-scratch continued}
INIT=${INIT:-attencraft_lab/toy/weights}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    > "$OUT/versions.txt" 2>&1
WORK=$(mktemp -d)
for run in $RUNS; do
    case $run in
        scratch) args="$VAE_ARGS" ;;
        continued) args="--init $INIT" ;;
    esac
    python3 -m attencraft_lab.toy.train --work "$WORK/$run" --minutes "$MINUTES" $args --batch "$BATCH" --workers 6 \
        --export "$WORK/$run-export" > "$OUT/$run.log" 2>&1 &
done
wait
for run in $RUNS; do
    [ -d "$WORK/$run-export" ] && tar -C "$WORK" -cf "$OUT/$run.tar" "$run-export"
    echo "== $run"; tail -c 1500 "$OUT/$run.log" | tr '\r' '\n' | tail -n 8
done
cat "$OUT/gpu.txt" "$OUT/versions.txt"
