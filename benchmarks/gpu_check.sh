#!/usr/bin/env bash
# One call on a machine with a CUDA device (a few minutes): the CUDA tests, then the GPU learner-scaling rows.
#   bash benchmarks/gpu_check.sh            # writes gpu_check.log beside where it runs ($OUT if set)
# The CUDA tests are the `gpu`-marked ones (skipped elsewhere): CPU/GPU agreement, deferred host reads, bf16.
# The scaling rows are the bare update loop of the Nature CNN and IMPALA networks at batch 32..512 on one device
# (and 2 ranks over NCCL where a second device exists); BENCHMARKS.md "Learner scaling" says what to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
py=.venv/bin/python
devices=$($py -c "import torch; print(torch.cuda.device_count())")
if [ "$devices" -lt 1 ]; then
  echo "no CUDA device visible: nothing to check here" >&2
  exit 2
fi
ranks=1
[ "$devices" -ge 2 ] && ranks=1,2
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $py -m pytest -q -m gpu tests/unit
  $py benchmarks/learner_scaling.py --device cuda --networks nature_cnn,impala --batches 32,64,128,256,512 \
      --ranks "$ranks" --seconds 5 --no-system
} 2>&1 | tee "$out/gpu_check.log"
