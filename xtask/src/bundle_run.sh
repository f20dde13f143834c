#!/usr/bin/env bash
# strata's GPU checks, from a bundle made by `cargo xtask device-bundle` (no Rust needed here).
# Runs every GPU test, the kernel benchmarks and the model benchmarks, and writes a summary,
# the logs and the JSON reports to $OUT (default ./gpu-out). Usage: bash bundle/run.sh [quick]
# ("quick": tests and kernel benchmarks only, no synthetic models).
set -uo pipefail
B="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
export STRATA_FIXTURES_DIR="$B/fixtures"
export RUST_BACKTRACE=1

# cuBLAS comes from the CUDA libraries the machine's Python packages carry, or a system CUDA.
for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib; do
  [ -e "$d/libcublas.so.13" ] || [ -e "$d/libcublas.so" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
ld="${LD_LIBRARY_PATH:-}"
if ! ls ${ld//:/ } 2>/dev/null | grep -q libcublas; then
  lib=$(find / -xdev -name 'libcublas.so.1*' -not -path '/proc/*' 2>/dev/null | head -n1)
  [ -n "$lib" ] && export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
fi
say "== $(date -u +%FT%TZ) $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1)"
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

# The kernel profile of a `strata bench --json --kernel-profile` report, as lines.
kernel_table() {
  python3 - "$1" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no report: {e}")
p = r.get("kernel_profile")
if not p:
    sys.exit("no kernel_profile in the report")
print(f"kernel profile of {r['model']}: decode {p['decode_us_per_token']:.1f} us/token, kernels "
      f"{p['kernel_us_per_token']:.1f} us/token ({p['launches_per_token']:.1f} launches), outside kernels "
      f"{p['outside_kernels_us_per_token']:.1f} us/token")
for k in p["kernels"][:15]:
    print(f"  {k['kernel']:<36} {k['launches_per_token']:6.2f} x {k['us_per_token'] / max(k['launches_per_token'], 1e-9):8.2f} us"
          f" = {k['us_per_token']:8.1f} us/token {100 * k['share_of_kernel_time']:5.1f}%")
PY
}

START=$(date +%s)
# Whether the run is still inside its time budget; else says what it skips.
in_time() {
  if [ $(($(date +%s) - START)) -lt "${STRATA_RUN_BUDGET_S:-450}" ]; then return 0; fi
  say "skipped, over the ${STRATA_RUN_BUDGET_S:-450} s budget: $*"
  return 1
}

fails=0
for t in "$B"/tests/*; do
  name=$(basename "$t")
  start=$(date +%s.%N)
  if timeout 240 "$t" --test-threads=1 --nocapture >"$OUT/test-$name.log" 2>&1; then status=ok; else status=FAIL; fails=$((fails + 1)); fi
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  counts=$(grep -E '^test result:' "$OUT/test-$name.log" | tail -n1)
  skipped=$(grep -ci 'skipping\|skipped' "$OUT/test-$name.log")
  say "test $name: $status ($counts) [${secs}s, skip messages: $skipped]"
  if [ $status = FAIL ]; then grep -E 'panicked|FAILED|failed|error' "$OUT/test-$name.log" | head -n 20 | tee -a "$SUMMARY"; fi
  # A failing model test runs again with the decoder's launch fusions off (same results by
  # design): whether a fused path or a kernel is at fault, without a rebuild.
  if [ $status = FAIL ] && [ "$name" = cuda_models ]; then
    if STRATA_CUDA_UNFUSED=1 timeout 240 "$t" --test-threads=1 --nocapture >"$OUT/test-$name-unfused.log" 2>&1; then
      say "test $name with STRATA_CUDA_UNFUSED=1: ok (a fused path is at fault)"
    else
      say "test $name with STRATA_CUDA_UNFUSED=1: FAIL too ($(grep -E '^test result:' "$OUT/test-$name-unfused.log" | tail -n1))"
    fi
  fi
done

say "== kernel benchmarks"
timeout 180 "$B/bin/kernel_bench" --json "$OUT/kernels.json" >"$OUT/kernel_bench.txt" 2>"$OUT/kernel_bench.log"
say "kernel_bench exit $?"
cat "$OUT/kernel_bench.txt" | tee -a "$SUMMARY"
tail -n 5 "$OUT/kernel_bench.log" >>"$SUMMARY"

if [ "${1:-}" != quick ]; then
  # Most telling first; each later step only while the run is inside its time budget
  # (STRATA_RUN_BUDGET_S, default 450 s from the start), so the summary always comes back.
  say "== model benchmarks (synthetic TinyLlama-1.1B and 4-layer Mixtral-8x7B shapes)"
  M=/tmp/strata-synth
  mkdir -p "$M"
  "$B/bin/xtask" synth-model --shape tinyllama-1.1b --dtype bf16 --out "$M/tinyllama-bf16" >"$OUT/synth.log" 2>&1
  "$B/bin/xtask" synth-model --shape tinyllama-1.1b --dtype q4_0 --out "$M/tinyllama-q4_0.gguf" >>"$OUT/synth.log" 2>&1
  # With one more decode whose kernels are each timed (--kernel-profile): where a token's time
  # goes, kernel by kernel, and how much of it is outside kernels (launches, host work).
  for m in "$M/tinyllama-bf16" "$M/tinyllama-q4_0.gguf"; do
    n=$(basename "$m")
    timeout 150 "$B/bin/strata" bench --model "$m" --device cuda --prompt-tokens 128 --gen-tokens 64 --json \
      --kernel-profile >"$OUT/bench-$n.json" 2>"$OUT/bench-$n.log"
    say "bench $n (cuda): exit $? $(cat "$OUT/bench-$n.json" 2>/dev/null | tr -d '\n' | head -c 900)"
    kernel_table "$OUT/bench-$n.json" | tee -a "$OUT/kernel-profiles.txt" | tee -a "$SUMMARY"
  done
  # The q4_0 decode with every group of rows taken by one warp (STRATA_MATVEC_SPLITS=0) rather
  # than shared among warps where the product has few groups (the default, unmeasured on a card
  # until this run): what the splits give a decode step.
  for n in tinyllama-q4_0.gguf tinyllama-bf16; do
    in_time "no splits $n" || continue
    STRATA_MATVEC_SPLITS=0 timeout 120 "$B/bin/strata" bench --model "$M/$n" --device cuda --prompt-tokens 128 \
      --gen-tokens 64 --json >"$OUT/bench-$n-no-splits.json" 2>"$OUT/bench-$n-no-splits.log"
    say "bench $n (cuda, STRATA_MATVEC_SPLITS=0): exit $? $(tr -d '\n' <"$OUT/bench-$n-no-splits.json" 2>/dev/null | head -c 900)"
  done
  # A Mixtral-8x7B-shaped MoE model cut to 4 layers (q4_0, about 3.4 GB, 3.2 GB of it routed
  # experts): decode routed on the device (the default, profiled); then under a GPU ceiling it
  # does not fit in, its experts in page-locked host memory with a device cache of those that
  # fit, copied in as the routers pick them: decode against the host-to-device copy bound of the
  # bytes a token copied in; then routed on the host and as CUDA graphs.
  if in_time "the Mixtral shape"; then
    "$B/bin/xtask" synth-model --shape mixtral-8x7b --dtype q4_0 --layers 4 --format gguf \
      --out "$M/mixtral-4l-q4_0.gguf" >>"$OUT/synth.log" 2>&1
    for mode in device expert-cache expert-disk expert-tier host graphs; do
      in_time "mixtral $mode" || continue
      extra=()
      case $mode in
        device) env=(); extra=(--kernel-profile) ;;
        expert-cache) env=(); extra=(--max-vram 2GB) ;;
        # The same cache with the experts read from images on disk on each miss (never run on a
        # card before); the images are written by this run.
        expert-disk) env=(); extra=(--max-vram 2GB --offload-dir "$M/offload-moe") ;;
        # Those images again, behind a host tier of the experts read last in what --max-ram
        # leaves beyond the staging buffers (about 27 of the 32 experts).
        expert-tier) env=(); extra=(--max-vram 2GB --offload-dir "$M/offload-moe" --max-ram 3GB) ;;
        host) env=(STRATA_CUDA_HOST_ROUTING=1) ;;
        graphs) env=(STRATA_CUDA_GRAPHS=1) ;;
      esac
      env "${env[@]}" timeout 150 "$B/bin/strata" bench --model "$M/mixtral-4l-q4_0.gguf" --device cuda \
        --prompt-tokens 128 --gen-tokens 64 --json "${extra[@]}" >"$OUT/bench-mixtral-$mode.json" 2>"$OUT/bench-mixtral-$mode.log"
      say "bench mixtral-4l-q4_0 (cuda, $mode ${extra[*]}): exit $? $(tr -d '\n' <"$OUT/bench-mixtral-$mode.json" 2>/dev/null | head -c 1500)"
      [ $mode = device ] && kernel_table "$OUT/bench-mixtral-$mode.json" | tee -a "$OUT/kernel-profiles.txt" | tee -a "$SUMMARY"
      [ $mode = expert-cache ] && tail -n 3 "$OUT/bench-mixtral-$mode.log" | tee -a "$SUMMARY"
      [ $mode = expert-disk ] && tail -n 4 "$OUT/bench-mixtral-$mode.log" | tee -a "$SUMMARY"
      [ $mode = expert-tier ] && tail -n 5 "$OUT/bench-mixtral-$mode.log" | tee -a "$SUMMARY"
    done
    rm -rf "$M/mixtral-4l-q4_0.gguf" "$M/offload-moe"
  fi
  # The q4_0 TinyLlama under a GPU ceiling it does not fit in (weights about 640 MB with the
  # head's f32 scratch and the activations of a 512-token pass counted): its last layers stream
  # from page-locked host memory, two device buffers taking them in turn. Decode against the
  # host-to-device copy bound the bench measures.
  n=tinyllama-q4_0.gguf
  if in_time "--max-vram 700MB"; then
    STRATA_CUDA_GRAPHS=0 timeout 120 "$B/bin/strata" bench --model "$M/$n" --device cuda --max-vram 700MB \
      --prompt-tokens 128 --gen-tokens 64 --json >"$OUT/bench-$n-max-vram.json" 2>"$OUT/bench-$n-max-vram.log"
    say "bench $n (cuda, --max-vram 700MB): exit $? $(tr -d '\n' <"$OUT/bench-$n-max-vram.json" 2>/dev/null | head -c 1200)"
    tail -n 3 "$OUT/bench-$n-max-vram.log" | tee -a "$SUMMARY"
  fi
  # The same placement with the streamed layers read from layer images on disk (--offload-dir)
  # instead of page-locked host copies: the first run writes the images, the second reuses them.
  # Decode against the disk's read rate the bench measures (never run on a card before).
  # Then with --max-ram 300MB: beyond the three staging buffers (about 75 MB), a host tier keeps
  # about 9 of the 18 streamed layers in page-locked memory, and only the others are read.
  for run in write reuse tier; do
    in_time "--max-vram 700MB --offload-dir ($run)" || continue
    ram=(); [ $run = tier ] && ram=(--max-ram 300MB)
    STRATA_CUDA_GRAPHS=0 timeout 150 "$B/bin/strata" bench --model "$M/$n" --device cuda --max-vram 700MB \
      --offload-dir "$M/offload" "${ram[@]}" --prompt-tokens 128 --gen-tokens 64 --json \
      >"$OUT/bench-$n-max-vram-disk-$run.json" 2>"$OUT/bench-$n-max-vram-disk-$run.log"
    say "bench $n (cuda, --max-vram 700MB --offload-dir, $run): exit $? $(tr -d '\n' <"$OUT/bench-$n-max-vram-disk-$run.json" 2>/dev/null | head -c 1500)"
    tail -n 4 "$OUT/bench-$n-max-vram-disk-$run.log" | tee -a "$SUMMARY"
  done
  rm -rf "$M/offload"
  # The same decodes with RMSNorm launched apart rather than inside the products after it (the
  # default), profiled: what the fused norms save, kernel by kernel.
  for m in "$M/tinyllama-q4_0.gguf" "$M/tinyllama-bf16"; do
    n=$(basename "$m")
    in_time "separate norms $n" || continue
    STRATA_CUDA_SEPARATE_NORMS=1 timeout 150 "$B/bin/strata" bench --model "$m" --device cuda --prompt-tokens 128 \
      --gen-tokens 64 --json --kernel-profile >"$OUT/bench-$n-separate-norms.json" 2>"$OUT/bench-$n-separate-norms.log"
    say "bench $n (cuda, STRATA_CUDA_SEPARATE_NORMS=1): exit $? $(tr -d '\n' <"$OUT/bench-$n-separate-norms.json" 2>/dev/null | head -c 900)"
    { echo "(STRATA_CUDA_SEPARATE_NORMS=1)"; kernel_table "$OUT/bench-$n-separate-norms.json"; } | tee -a "$OUT/kernel-profiles.txt" | tee -a "$SUMMARY"
  done
  # The same decode with each step one CUDA graph launch (off by default until measured here).
  for m in "$M/tinyllama-q4_0.gguf" "$M/tinyllama-bf16"; do
    n=$(basename "$m")
    in_time "graphs $n" || continue
    STRATA_CUDA_GRAPHS=1 timeout 120 "$B/bin/strata" bench --model "$m" --device cuda --prompt-tokens 128 \
      --gen-tokens 64 --json >"$OUT/bench-$n-graphs.json" 2>"$OUT/bench-$n-graphs.log"
    say "bench $n (cuda, STRATA_CUDA_GRAPHS=1): exit $? $(cat "$OUT/bench-$n-graphs.json" 2>/dev/null | tr -d '\n' | head -c 900)"
    grep -i "graph" "$OUT/bench-$n-graphs.log" | head -n 3 | tee -a "$SUMMARY"
  done
  # The q4_0 decode with attention's key chunks merged by a launch of their own rather than
  # inside the decode launch (the default): what the folded merge saves.
  n=tinyllama-q4_0.gguf
  if in_time "separate combine"; then
    STRATA_CUDA_SEPARATE_COMBINE=1 timeout 120 "$B/bin/strata" bench --model "$M/$n" --device cuda --prompt-tokens 128 \
      --gen-tokens 64 --json >"$OUT/bench-$n-separate-combine.json" 2>"$OUT/bench-$n-separate-combine.log"
    say "bench $n (cuda, STRATA_CUDA_SEPARATE_COMBINE=1): exit $? $(tr -d '\n' <"$OUT/bench-$n-separate-combine.json" 2>/dev/null | head -c 900)"
  fi
  # The kernel benchmark's decode rows with every group of rows on one warp: against the first
  # run's, what the splits give each product (the chained rows: back to back, device time).
  if in_time "kernel_bench without splits"; then
    STRATA_MATVEC_SPLITS=0 timeout 120 "$B/bin/kernel_bench" >"$OUT/kernel_bench-no-splits.txt" 2>/dev/null
    say "kernel_bench (STRATA_MATVEC_SPLITS=0) exit $?"
    grep -E "tinyllama|4096x14336|14336x4096" "$OUT/kernel_bench-no-splits.txt" | tee -a "$SUMMARY"
  fi
fi
# Nsight Compute on the large one-token q4_0 product (0.44 of the copy peak on an H200 against a
# 70% target, though its instructions per weight leave room) and bf16 beside it: which stall
# holds the warps. One launch each, past the warm-up; the report stays apart (ncu.txt).
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)
if [ -n "$NCU" ] && in_time "ncu"; then
  for k in "q4_0 t1 16384x8192:matvec_q4_0_i16_t1" "bf16 t1 16384x8192:matvec_bf16_t1"; do
    timeout 150 "$NCU" --kernel-name "regex:^${k#*:}\$" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      --section InstructionStats \
      "$B/bin/kernel_bench" --only "matvec ${k%%:*}" >>"$OUT/ncu.txt" 2>&1
    say "ncu ${k#*:}: exit $?"
  done
  grep -E "Duration|Memory Throughput|DRAM Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|Bank|Achieved Occupancy|Registers Per|Shared Memory Configuration" \
    "$OUT/ncu.txt" | head -n 60 | tee -a "$SUMMARY"
elif [ -z "$NCU" ]; then
  say "no ncu here: no Nsight Compute report"
fi
say "== done: $fails failing test binaries"
# Some callers take back only a few files: the summary, the kernel profiles and benchmarks stay
# apart, every other log and report goes into one archive.
(
  cd "$OUT" || exit
  list=$(mktemp)
  ls -A | grep -vE '^(summary.txt|kernel-profiles.txt|kernels.json|kernel_bench.txt|ncu.txt|all.tgz)$' >"$list"
  if [ -s "$list" ] && tar czf all.tgz -T "$list"; then xargs rm -rf <"$list"; fi
  rm -f "$list"
)
# The tests' lines again, last, where a caller that keeps only the end of the output sees them
# (and the device tool returns only the first files of $OUT by name).
echo "== tests"
grep -E '^(test |thread |called )' "$SUMMARY" | head -n 60
echo "== kernel profiles"
cat "$OUT/kernel-profiles.txt" 2>/dev/null
exit $fails
