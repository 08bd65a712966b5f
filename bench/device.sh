#!/usr/bin/env bash
# One call on a lent device machine (16 cores + one GPU, no network, 15 minutes a session, start included):
#   1. issue 11's many-core floor on the CPU: the default server (LEVIT_DEVICE=cpu) at 1, 32 and 128 clients
#      over HTTP and gRPC, against the best model-only processes x threads of the same round;
#   2. the server on the GPU (issue 16's process model), the same load plus 12 MP photos.
# Prepare here:  bash scripts/device_wheels.sh         (what the machine lacks, as cp312 wheels, into .whl/)
# Run there:     device `run` with carry [".whl"], command "bash bench/device.sh", timeout_s 590 (the steps: at
#                most 140 + 230 + 120 s, 10-20 s more each to stop, plus the install and the checks)
# Rehearse here: PYTHON=.venv/bin/python DEVICE_GRID=1x2,2x1 bash bench/device.sh
# Every log goes under $OUT (./device-out when OUT is unset). Each step has its own time limit, so a step
# that hangs leaves the others their time; a step's log ends with what it printed before it was stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-out}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$out/failed.txt"; exit 1; }
  export PYTHONPATH=/tmp/site
else
  echo "no .whl/ or not Python 3.12: the wheels are not installed" | tee "$out/wheels.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Everything the server and the benchmark import, before any step spends minutes: a missing package ends here.
"$py" -c "import service.server, service.frontend, service.batching.instance, bench.server" >"$out/imports.txt" 2>&1 \
  || { cat "$out/imports.txt"; echo "imports failed" | tee "$out/failed.txt"; exit 1; }
{
  date -u
  echo "cores: $(nproc)"
  lscpu | grep -E "Model name|^Thread|^Core|^Socket|^NUMA node|^Flags" | cut -c1-400
  nvidia-smi -L 2>&1 || true
  "$py" -c "import torch, grpc, fastapi; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'grpcio', grpc.__version__, 'fastapi', fastapi.__version__)"
  command -v g++ c++ gcc || echo "no C++ compiler: LEVIT_ENGINE=auto serves trace"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# 0. The server's first start on this machine builds the engine's artifacts (torch there is not the pinned one,
#    and Inductor needs a C++ compiler): once here, so the steps below find them; if the default engine cannot
#    start at all, they fall back to `trace` rather than lose the run. bench.server's own ServerProcess starts,
#    waits for and stops it; `timeout` is the backstop that takes a build cut short, compilers and all, with it.
start_s=${DEVICE_START_S:-140}
engine=()
echo "== start (at most ${start_s}s)"
if timeout --signal=TERM --kill-after=10 $((start_s + 30)) "$py" - "$start_s" "$out" <<'PY'
import json, shutil, sys
from bench.server import ServerProcess, model_info
seconds, out = float(sys.argv[1]), sys.argv[2]
server = ServerProcess({"LEVIT_DEVICE": "cpu", "LEVIT_LOG_LEVEL": "INFO"})
server.start()
try:
    server.wait_ready(timeout=seconds)  # SystemExit with the log's tail if it dies or is not ready in time
    with open(f"{out}/model-cpu.json", "w") as f:
        json.dump(model_info(server), f)
finally:
    server.stop()
    shutil.copy(server.log_path, f"{out}/start-cpu.txt")
PY
then
  head -c 600 "$out/model-cpu.json"; echo
else
  engine=(--engine trace)
  echo "the default engine did not start in time: the steps below use trace" | tee -a "$out/start-cpu.txt"
fi

step() {  # step NAME SECONDS ARGS...: one bench.server run, its output in $out/NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s)"
  timeout --signal=TERM --kill-after=20 "$seconds" "$py" -m bench.server "$@" >"$out/$name.txt" 2>&1
  echo "exit $? ($name)" | tee -a "$out/$name.txt"
  grep -E "^(PASS|FAIL)|ready after|^\| (http|grpc)" "$out/$name.txt" || tail -5 "$out/$name.txt"
}

step issue11-cpu "${DEVICE_CPU_S:-230}" "${engine[@]}" --rounds 2 --seconds 4 --protocols http,grpc-unary --payloads photos \
  --concurrency 1,32,128 --instance-grid "${DEVICE_GRID:-1x16,2x8,4x4,8x2}" --configs "cpu:LEVIT_DEVICE=cpu"
if nvidia-smi -L >/dev/null 2>&1; then
  step gpu "${DEVICE_GPU_S:-120}" --rounds 1 --seconds 4 --protocols http,grpc-unary --payloads photos,12MP \
    --concurrency 1,32,128 --max-batch-size 64 --configs "gpu:LEVIT_DEVICE=cuda"
fi
