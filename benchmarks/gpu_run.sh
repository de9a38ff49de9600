#!/usr/bin/env bash
# The measurements a GPU machine is for, in stages that each take under ten minutes on an H100:
#
#     bash benchmarks/gpu_run.sh STAGE [OUT_DIR]      (from the repository root)
#
#   lease    one call for a short lease (about 9 minutes in all, LEASE_S=540 seconds; a 15-minute
#            lease spends 1-2 minutes starting the machine): the batch-256 sweep with the whole
#            network before and after (as `sweep`, at most 330 s; its output check keeps wrong configs
#            out of the table), then the quick gpu tests (as `check`, at most 120 s), then in what is
#            left the fp16 first call, cold and warm, with the new table (as `first`), and host times
#            (as `host`); a step that would not fit is skipped and said so. At most 8 files in OUT_DIR
#   check    install in place without network, then the quick gpu-marked tests (compiled kernels),
#            in four pytest processes at once
#   archs16  the slow gpu test: every architecture (and dilated resnet50 and resnext50_32x4d)
#            compiled and run in fp16 and bf16
#   archs32  the same in fp32, TF32 off and on
#   sweep    benchmarks/sweep_convs.py: every config on every distinct resnet50 conv against cuDNN,
#            the winners written to kernels/tuned_configs.json (a copy goes to OUT_DIR), and the
#            whole resnet50 timed before and after; a fault in the GPU ends the sweep's process, and
#            a new one resumes where it stopped, without the config that faulted
#   sweep1   the same sweep at batch 1, where split-K configs are timed too (few output tiles,
#            long loops); its winners join the table under their small M
#   host     host time per forward and batch-1 latency (eager and fused, with and without CUDA graphs),
#            resnet50 fp16 (test_host.py, test_network.py)
#   network  the whole resnet50 in fp16 at batch 256 beside eager, torch.compile and cuDNN
#   chain    the chained blocks' kernels (fuse(chain_blocks=True), fuse(chain_3x3=True)) layer by layer
#            against the same convs apart, fused and cuDNN's (test_layers.py -k chain); their network
#            figures are the sweep's (fused_chain, fused_chain3x3)
#   first    first forward of resnet50 fp16 at batch 256 in a new process, cold and warm caches
#
# With a 15-minute lease: `lease` (copy the table it returns to kernels/ and commit it). With more,
# in this order: check, sweep (its table serves every later stage), host, first, then sweep1,
# chain, network, archs16, archs32.
#
# Results files (JSON with provenance) go to OUT_DIR, default benchmarks/results/; each stage
# prints a short table last. Stages write as they go, so one stopped part-way keeps what it measured.
# Afterwards: `python benchmarks/report.py --readme README.md` renders the README's results table.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"usage: bash benchmarks/gpu_run.sh lease|check|archs16|archs32|sweep|sweep1|host|network|chain|first [OUT_DIR]"}
out=${2:-benchmarks/results}
mkdir -p "$out"
stages="lease check archs16 archs32 sweep sweep1 host network chain first"
if [[ " $stages " != *" $stage "* ]]; then
  echo "gpu_run.sh: unknown stage '$stage' (${stages// /, })" >&2
  exit 2
fi
# Installed in place, without network, by the first stage that runs on a fresh machine.
if [ "$stage" = check ] || [ "$stage" = lease ] || ! python3 -c "import fused_resnet" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
# Results files are named by date and GPU family, as the config table names it ("h100").
gpu=$(python3 -c "import torch; from fused_resnet.kernels import configs
print(configs.gpu_family(torch.cuda.get_device_name()).lower() if torch.cuda.is_available() else 'cpu')" \
  2>/dev/null || echo cpu)
tag="$(date -u +%F)-$gpu"
export out tag
export PYTHONUNBUFFERED=1  # logs keep their order, and a step cut at its limit keeps what it printed

# The quick gpu-marked tests in four pytest processes at once (their time is mostly compiling, one
# CPU core a process), each cut at $1 seconds; their logs are kept as one (a cut run writes no XML),
# and with a third argument their JUnit XML too, a file a shard. The shards split the tests by file
# and test: every quick gpu test runs in exactly one (tests/test_sweep.py checks it).
GPU_SHARDS=(
  "tests/test_conv2d.py::test_every_kernel_variant"
  "tests/test_conv2d.py --deselect tests/test_conv2d.py::test_every_kernel_variant"
  "tests/test_fusions.py"
  "tests --deselect tests/test_conv2d.py --deselect tests/test_fusions.py"
)
gpu_tests() {
  local logs i pids=() codes=""
  logs=$(mktemp -d)
  for i in "${!GPU_SHARDS[@]}"; do
    # shellcheck disable=SC2086  # a shard is its pytest arguments, split on spaces
    timeout "$1" python3 -m pytest ${GPU_SHARDS[$i]} -m "gpu and not slow" -v --durations=5 -p no:cacheprovider -rfE \
      ${3:+--junitxml "$out/$tag-gpu-tests-$i.xml"} > "$logs/$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; codes+=" $?"; done
  for i in "${!GPU_SHARDS[@]}"; do echo "== shard $i: ${GPU_SHARDS[$i]} =="; cat "$logs/$i.log"; done \
    > "$out/$tag-gpu-tests.log"
  rm -rf "$logs"
  echo "gpu tests: exit${codes} (a shard each) after $2; $(grep -cE ' PASSED' "$out/$tag-gpu-tests.log") passed," \
    "$(grep -cE ' (FAILED|ERROR)' "$out/$tag-gpu-tests.log") failed or errors (log: $tag-gpu-tests.log)"
  grep -E '^(FAILED|ERROR) ' "$out/$tag-gpu-tests.log" | head -n 20
  grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$out/$tag-gpu-tests.log"
}
# The sweep with the options after $1, its timing given $1 seconds over every try: where a fault in
# the GPU ends it (exit status 3), it runs again with --resume in a new process (at most 3 times),
# which keeps what was measured and never runs the config that faulted again.
sweep_resuming() {
  local end=$((SECONDS + $1)) resume="" rc tries=0
  shift
  while :; do
    python3 benchmarks/sweep_convs.py "$@" --budget $((end - SECONDS > 10 ? end - SECONDS : 10)) $resume
    rc=$?
    if [ "$rc" -ne 3 ] || [ "$tries" -ge 3 ]; then return "$rc"; fi
    tries=$((tries + 1))
    resume=--resume
    echo "sweep: a fault in the GPU ended it; resuming in a new process (try $tries)" >&2
  done
}
# The sweep at batch 256 (seconds for its timing: $1); it writes its results and the table as it goes.
sweep256() {
  sweep_resuming "$1" --json "$out/$tag-sweep.json" --write-table \
    --network fused cudnn_fused eager_channels_last --network-after fused_chain3x3 fused_chain
}
# The first forward of resnet50 fp16 at batch 256 in a new process, with cold caches (the shipped
# table in force) and then warm ones; each child cut at $1 seconds.
first_calls() {
  python3 benchmarks/first_call.py --arch resnet50 --dtype float16 --how $2 --timeout "$1" \
    --json "$out/$tag-first-call.json"
}
# Host time per forward and batch-1 latency, eager and fused, with and without CUDA graphs.
host_times() {
  python3 -m pytest benchmarks/test_host.py benchmarks/test_network.py -q -p no:cacheprovider --results "$out" \
    -k "test_host or (resnet50 and float16 and not bfloat16 and b1 and not compile)"
}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

case "$stage" in
  lease)
    deadline=$((SECONDS + ${LEASE_S:-540}))
    left() { echo $((deadline - SECONDS)); }
    # Each step's seconds, printed last, so that the next lease can be planned from this one's.
    mark=$SECONDS
    timeline=""
    took() { timeline+="lease: $1 took $((SECONDS - mark)) s, $(left) s left"$'\n'; mark=$SECONDS; }
    # The sweep saves layer by layer; stopped at its cut, what it measured and the table are kept.
    cut=$(( $(left) < 330 ? $(left) : 330 ))
    timeout "$cut" bash -c "$(declare -f sweep_resuming sweep256); sweep256 200" > "$out/$tag-sweep.log" 2>&1
    cp kernels/tuned_configs.json "$out/tuned_configs.json"
    took "the sweep"
    cut=$(( $(left) - 10 < 120 ? $(left) - 10 : 120 ))
    if [ "$cut" -ge 60 ]; then gpu_tests "$cut" "${cut} s at most"; else echo "gpu tests skipped: ${cut} s left"; fi
    took "the gpu tests"
    # The first call, now that the sweep's table is in force; then host times, which write
    # their results file only when they finish, so they run only with time for it.
    cut=$(( $(left) - 5 ))
    if [ "$cut" -ge 100 ]; then
      timeout "$cut" bash -c "$(declare -f first_calls); first_calls 80 forward"
    else
      echo "first calls skipped: ${cut} s left"
    fi
    took "the first calls"
    cut=$(( $(left) - 5 ))
    if [ "$cut" -ge 90 ]; then
      timeout "$cut" bash -c "$(declare -f host_times); host_times" > "$out/$tag-host.log" 2>&1
      tail -n 8 "$out/$tag-host.log"
    else
      echo "host times skipped: ${cut} s left"
    fi
    took "the host times"
    echo "== sweep (log: $tag-sweep.log) =="
    grep -E "WRONG|failed|fault|compiled|budget|no config" "$out/$tag-sweep.log" | head -20
    tail -n 40 "$out/$tag-sweep.log"
    printf "%s" "$timeline"
    ;;
  check)
    gpu_tests 540 "540 s at most" xml
    ;;
  archs16|archs32)
    if [ "$stage" = archs16 ]; then precisions="float16"; else precisions="float32 or tf32"; fi
    timeout 540 python3 -m pytest -m "gpu and slow" -k "$precisions" -v --durations=10 -p no:cacheprovider -rfE \
      --junitxml "$out/$tag-gpu-tests-$stage.xml" 2>&1 | tail -40
    ;;
  sweep)
    # The sweep writes its results file and the table layer by layer; stopped at 540 s, what it
    # measured is kept, and the table still reaches OUT_DIR.
    timeout 540 bash -c "$(declare -f sweep_resuming sweep256); sweep256 300"
    cp kernels/tuned_configs.json "$out/tuned_configs.json"
    ;;
  sweep1)
    timeout 540 bash -c "$(declare -f sweep_resuming); sweep_resuming 240 --batch 1 --json $out/$tag-sweep-b1.json --write-table"
    cp kernels/tuned_configs.json "$out/tuned_configs.json"
    ;;
  host)
    host_times 2>&1 | tail -40
    ;;
  network)
    # torch.compile (max-autotune) apart and last: its tuning may take minutes.
    timeout 280 python3 -m pytest benchmarks/test_network.py -q -p no:cacheprovider --results "$out" \
      -k "resnet50 and float16 and not bfloat16 and b256 and not compile" 2>&1 | tail -20
    timeout 280 python3 -m pytest benchmarks/test_network.py -q -p no:cacheprovider --results "$out" \
      -k "resnet50 and float16 and not bfloat16 and b256 and compile" 2>&1 | tail -20
    ;;
  chain)
    timeout 540 python3 -m pytest benchmarks/test_layers.py -q -p no:cacheprovider --results "$out" -k chain 2>&1 | tail -30
    ;;
  first)
    first_calls 240 "warmup forward"
    ;;
esac
