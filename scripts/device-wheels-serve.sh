#!/bin/bash
# The pure-Python (and two cp312) wheels `kiln serve` / `kiln bench` need on the lent GPU machine beyond what
# it has (torch, transformers, pytest, requests): run from the repo root after ../shared/device-wheels.sh,
# carry [".whl"], and install them there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls .whl/*.whl | grep -vE 'modelopt|pulp|omegaconf|antlr') && export PYTHONPATH=/tmp/site
# Versions are the ones the dev venv runs (bench/results/serve_gpu.md was measured with them).
set -euo pipefail
mkdir -p .whl
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for p in annotated-doc==0.0.7 anyio==4.16.0 certifi==2026.10.19.post1 click==8.5.1 fastapi==0.150.0 h11==0.16.0 \
         httpcore==1.0.9 httpx==0.29.0 idna==3.20 markdown-it-py==4.3.0 mdurl==0.1.2 opentelemetry-api==1.45.2 \
         prometheus_client==0.26.0 Pygments==2.21.0 rich==15.0.0 shellingham==1.5.4 sniffio==1.3.1 \
         starlette==1.10.0 typer==0.29.2 uvicorn==0.55.0 typing_extensions==4.16.0 jsonschema==4.26.0 \
         attrs==26.1.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1; do
  python3 -m pip download --no-deps --only-binary=:all: "${plat[@]}" -q -d .whl "$p"
done
# a tokenizer for the random-weight engine to be served with (kiln serve detokenizes what it streams)
mkdir -p .whl/tokenizer-smollm2
cp "${KILN_HOME:-$HOME/.kiln}"/assets/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .whl/tokenizer-smollm2/
