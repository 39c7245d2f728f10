#!/usr/bin/env bash
# The GPU benchmark of issue 6 in one command: a random-weight LLaMA-7B-shaped model in bf16 with the
# chatmed-consult (r=8) and chatmed-tcm (r=16) adapters on one CUDA GPU: copy bandwidth, the batch-1
# decode step against the memory floor, output tokens/s at 64 and 256 concurrent requests (adapters
# mixed 50/50 and base alone), and transformers `generate` on the same card, as one table.
#
#   bash bench/gpu.sh [flags of python -m bench.gpu, which override the defaults below]
#
# Needs torch with CUDA, transformers and peft (none of the web packages). PYTHON picks the interpreter
# (default: python3). The checkpoint (about 14 GB) is written once to /tmp/chatmed-gpu and reused; the
# figures also go to bench/results/gpu.json. Phases that would pass 5.5 minutes are skipped, saying so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import importlib.util
import sys

needed = ("torch", "transformers", "peft", "safetensors", "tokenizers", "jinja2")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing Python packages: {' '.join(missing)} (pip install torch transformers peft)")
PY

# Large short-lived tensors (the decode gather at batch 256) fragment the caching allocator less this way.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec "$PYTHON" -m bench.gpu --preset 7b --device cuda --json bench/results/gpu.json "$@"
