#!/usr/bin/env bash
# The checks only a CUDA GPU can run, on a machine with the project installed (`make install` with a CUDA
# TORCH_SPEC): the `7b` grounding and moe stages through bench.gpu_stage (DeepSpeed ZeRO-2 over NCCL, bf16, full
# shapes, ~40 GB of GPU memory), then the gpu-marked tests. Each part runs even if one before it failed.
#   bench/gpu_stage.sh [MINI_DIR]   (MINI_DIR: a MeCoVQA-mini folder, `medplib data build-mini`; default
#                                    work/mecovqa-mini; the tests build none there: MEDPLIB_MINI names it)
# Logs go to $OUT when it is set, else work/gpu-stage/; the exit status is 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${1:-work/mecovqa-mini}
LOGS=${OUT:-work/gpu-stage}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MEDPLIB_MINI="$DATA"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOGS/gpu.txt" || status=1
$PY -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" | tee -a "$LOGS/gpu.txt" || status=1
for stage in grounding moe; do
  $PY -m bench.gpu_stage --stage "configs/stages/7b/$stage.yaml" --data "$DATA" 2>&1 | tee "$LOGS/7b-$stage.log" \
    || status=1
done
$PY -m pytest -q -m gpu tests/test_bench.py 2>&1 | tee "$LOGS/pytest-gpu.log" || status=1
exit $status
