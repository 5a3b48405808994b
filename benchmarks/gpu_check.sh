#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, with no network, in under 8 minutes.
#
#   benchmarks/gpu_check.sh [--out FILE] [--python PY] [--vllm-python PY] [--work DIR]
#   benchmarks/gpu_check.sh --cpu        # the same plumbing on this CPU (tiny model, short runs)
#
# 1. builds a ~1B random-weight Llama locally (`slos-serve make-model --preset 1b`);
# 2. torch engine on CUDA: profiles it (fit error on held-out step shapes), then serves a short
#    chatbot scenario through the planner daemon at 0.7x and 1x the capacity the simulator
#    predicts from that profile, and simulates the same requests (benchmarks/bench_fidelity.py);
# 3. the vLLM engine on CUDA: the same, then the adapter's per-step overhead against vLLM's own
#    scheduler (benchmarks/bench_vllm.py); skipped, and said so, when no Python with vLLM is found;
# 4. writes fit error, attainment against the simulator's prediction, tokens/s and plan-wait share
#    of every run to one JSON file (and a readable summary next to it).
#
# Each stage has its own time limit; the whole check stops at 8 minutes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
OUT=""
PY="${PYTHON:-}"
VLLM_PY="${VLLM_PYTHON:-}"
WORK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) MODE=cpu; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --vllm-python) VLLM_PY="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
done

cd "$ROOT"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ -z "$VLLM_PY" ]]; then
  if "$PY" -c "import vllm" 2>/dev/null; then VLLM_PY="$PY"
  elif [[ -x .venv-vllm/bin/python ]]; then VLLM_PY=.venv-vllm/bin/python
  fi
fi
WORK="${WORK:-$(mktemp -d -t slos-gpu-check-XXXX)}"
mkdir -p "$WORK"
OUT="${OUT:-$WORK/gpu_check.json}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START_S=$(date +%s)
LIMIT_S=480

left_s() { echo $(( LIMIT_S - ($(date +%s) - START_S) )); }
log() { echo "[gpu_check $(( $(date +%s) - START_S ))s] $*"; }
# stage NAME LIMIT_S COMMAND...: run with the smaller of its limit and the time left.
stage() {
  local name="$1" limit="$2"; shift 2
  local left; left=$(left_s)
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then log "$name: skipped, the 8 minutes are spent"; echo skipped > "$WORK/$name.status"; return 0; fi
  log "$name: up to ${limit}s"
  if timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$WORK/$name.log" 2>&1; then
    echo ok > "$WORK/$name.status"; log "$name: done"
  else
    echo "failed (exit $?)" > "$WORK/$name.status"; log "$name: FAILED, see $WORK/$name.log"; tail -5 "$WORK/$name.log" || true
  fi
}

if [[ "$MODE" == gpu ]]; then
  if ! command -v nvidia-smi >/dev/null || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PY (use --cpu for the CPU dry run)" >&2; exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt"
  PRESET=1b; DEVICE=cuda; DURATION=25; REPEATS=2; PROFILE=()
  TORCH_FLAGS=(--kv-memory-gb 16 --num-threads 4)
  # One engine process at a time owns the GPU; vLLM gets a share so the CUDA context of a
  # finished run never starves the next. Block size 16, the GPU default.
  VLLM_ARGS=(--vllm-arg max_model_len=4096 --vllm-arg max_num_batched_tokens=16384
             --vllm-arg max_num_seqs=256 --vllm-arg gpu_memory_utilization=0.5
             --vllm-arg enable_prefix_caching=false --vllm-arg seed=0)
  OVERHEAD_ARGS=(--num-requests 16 --rounds 2
                 --vllm-arg block_size=16 --vllm-arg gpu_memory_utilization=0.2
                 --vllm-arg kv_cache_memory_bytes=4294967296 --vllm-arg max_model_len=2048
                 --vllm-arg max_num_batched_tokens=2048)
else
  echo "cpu" > "$WORK/gpu.txt"
  PRESET=tiny; DEVICE=cpu; DURATION=8; REPEATS=1; PROFILE=(--quick-profile)
  TORCH_FLAGS=(--kv-memory-gb 0.1 --num-threads 1)
  VLLM_ARGS=(--vllm-arg max_model_len=512 --vllm-arg max_num_batched_tokens=2048
             --vllm-arg max_num_seqs=64 --vllm-arg block_size=32
             --vllm-arg gpu_memory_utilization=0.1 --vllm-arg kv_cache_memory_bytes=67108864
             --vllm-arg dtype=float32 --vllm-arg seed=0)
  OVERHEAD_ARGS=(--num-requests 4 --max-new-tokens 8 --rounds 1)
fi
log "mode $MODE, work dir $WORK, python $PY, vLLM python ${VLLM_PY:-none}"

stage make_model 75 "$PY" -m commands.cli make-model --preset "$PRESET" --out "$WORK/model"

FIDELITY=(benchmarks/bench_fidelity.py --device "$DEVICE" --model-dir "$WORK/model"
          --scenario chatbot --rates auto --duration-s "$DURATION" --drain-s 20
          --repeats "$REPEATS" "${PROFILE[@]}" --no-write)
stage torch 150 "$PY" "${FIDELITY[@]}" --engine torch "${TORCH_FLAGS[@]}" --work-dir "$WORK/torch" --json "$WORK/torch.json"

if [[ -n "$VLLM_PY" ]]; then
  stage vllm 165 "$VLLM_PY" "${FIDELITY[@]}" --engine vllm "${VLLM_ARGS[@]}" --work-dir "$WORK/vllm" --json "$WORK/vllm.json"
  stage vllm_overhead 90 "$VLLM_PY" benchmarks/bench_vllm.py --model-dir "$WORK/model" \
    "${OVERHEAD_ARGS[@]}" --no-write
else
  log "vllm: skipped, no Python with vLLM (give --vllm-python)"; echo "skipped: no vLLM" > "$WORK/vllm.status"
fi

"$PY" - "$WORK" "$OUT" "$MODE" "$(( $(date +%s) - START_S ))" <<'EOF'
import json, sys
from pathlib import Path

work, out, mode, wall_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
result = {"mode": mode, "device": (work / "gpu.txt").read_text().strip(), "wall_s": wall_s,
          "engines": {}, "stages": {}}
for status in sorted(work.glob("*.status")):
    result["stages"][status.stem] = status.read_text().strip()
for engine in ("torch", "vllm"):
    path = work / f"{engine}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        result["engines"][engine] = {
            "fit_error_held_out_pct": data["profile"]["held_out_error_pct"],
            "fit_error_in_sample_pct": data["profile"]["in_sample_error_pct"],
            "model": data["profile"]["model"],
            "runs": [
                {k: run.get(k) for k in ("rate_rps", "num_requests", "attainment",
                                         "predicted_attainment", "gap_points",
                                         "hindsight_attainment", "served_step_error_pct",
                                         "tokens_per_s", "predicted_tokens_per_s",
                                         "plan_wait_share")}
                for run in data["runs"]
            ],
        }
overhead = work / "vllm_overhead.log"
if overhead.is_file():
    result["vllm_overhead_report"] = [ln for ln in overhead.read_text().splitlines() if ln.startswith("|")]
out.write_text(json.dumps(result, indent=2) + "\n")
lines = [f"gpu_check ({mode}, {result['device']}), {wall_s} s"]
for engine, data in result["engines"].items():
    lines.append(f"{engine}: fit error {data['fit_error_held_out_pct']:.1f}% held out")
    for run in data["runs"]:
        wait = run["plan_wait_share"]
        lines.append(
            f"  {run['rate_rps']:g} req/s: attainment {run['attainment']:.3f} served, "
            f"{run['predicted_attainment']:.3f} simulated ({run['gap_points']:+.1f} points), "
            f"{run['tokens_per_s']:.0f} tokens/s, plan wait "
            + ("n/a" if wait is None else f"{100 * wait:.1f}%")
        )
for stage, status in result["stages"].items():
    lines.append(f"stage {stage}: {status}")
summary = "\n".join(lines)
out.with_suffix(".txt").write_text(summary + "\n")
print(summary)
print(f"wrote {out}")
EOF
