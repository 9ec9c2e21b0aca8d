#!/usr/bin/env bash
# One device call that checks and times the GPU path, after the wheel packs have been carried in
# earlier calls (../shared/gpu/README.md): kernels against the torch reference, the engine
# token-exact against transformers (eager and CUDA graphs), tensor parallelism over NCCL, the
# decode / cold-start benchmarks, KV transfer and the disaggregated pair; `node` serves a
# Llama-8B-shaped model through tandem serve on two GPUs (scripts/bench_node.py).
#
#   bash scripts/gpu_session.sh [step ...]     # default: every step; results under $OUT (or ./gpu-out)
#
# Each step has its own time limit and its own log; one failing step does not stop the others.
# A device call runs 10 minutes at most: split the steps, e.g. `kernels engine`, then `tp bench`.
# The first process that picks FlashInfer JIT-compiles its kernels (about 2 minutes on sm90).
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
bash .gpu/extra/install.sh > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
# Tandem itself from this tree (its folders are the tandem.* packages), no wheel to rebuild.
mkdir -p /tmp/pkg/tandem
for d in models kernels workers kvtransfer orchestrator proto; do ln -sfn "$PWD/$d" "/tmp/pkg/tandem/$d"; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpus.txt"
gpus=$(wc -l < "$out/gpus.txt")

run() {  # run NAME SECONDS COMMAND...: stdout+stderr to $out/NAME.log, JSON lines to $out/NAME.jsonl
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep '^{' "$out/$name.log" > "$out/$name.jsonl" || true
  echo "== $name: rc=$rc in $((SECONDS - started)) s"
  tail -n 4 "$out/$name.log"
}

steps=${*:-kernels engine tp bench transfer disagg}
for step in $steps; do
  case $step in
    kernels) run kernels 240 python3 scripts/gpu_kernels_check.py ;;
    engine) run engine 240 python3 scripts/gpu_engine_check.py ;;
    tp) if (( gpus >= 2 )); then run tp 300 python3 scripts/gpu_tp_check.py; else echo "== tp: skipped, one GPU"; fi ;;
    bench) run bench 360 python3 scripts/bench_gpu.py --out "$out/bench.jsonl" ;;
    transfer) if python3 -c "import nixl" 2>/dev/null; then
        run transfer 90 python3 scripts/bench_transfer.py --device cuda --src-gpu 0 --dst-gpu $(( gpus >= 2 ? 1 : 0 ))
      else echo "== transfer: skipped, nixl not installed"; fi ;;
    disagg) if python3 -c "import nixl" 2>/dev/null; then run disagg 300 python3 scripts/gpu_disagg_check.py
      else echo "== disagg: skipped, nixl not installed"; fi ;;
    node) if python3 -c "import ray, fastapi, nixl" 2>/dev/null && (( gpus >= 2 )); then  # ray, serve packs carried
        # shellcheck disable=SC2086  # NODE_CONFIGS: e.g. "agg:2xtp2 disagg:1xtp2+1xtp2" on four GPUs
        run node 570 python3 scripts/bench_node.py --shape llama-3.1-8b --configs ${NODE_CONFIGS:-agg:2xtp1 disagg:1xtp1+1xtp1} \
          --prompt-tokens 2048 --output-tokens 256 --num-requests 32 --rates 1 2 4 --predict --out "$out/node.json" \
          $( [[ -d .gpu/tokenizer ]] && echo --tokenizer .gpu/tokenizer )
      else echo "== node: skipped, needs two GPUs and the ray, serve and nixl packs"; fi ;;
    *) echo "unknown step: $step" >&2 ;;
  esac
done
