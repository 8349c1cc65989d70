#!/bin/bash
# The wheels `kiln serve`, `kiln bench` and bench/serve_gpu.py need on the lent GPU machine beyond what it has
# (torch, transformers and their dependencies, triton, requests), for its Python 3.12:
#   .whl/serve/                    pure-Python wheels, plus cp312 builds of pydantic-core and rpds-py
#   .whl/serve/fast/               httptools and uvloop (what uvicorn[standard] adds; uvicorn uses them when present)
#   .whl/serve/tokenizer-smollm2/  SmolLM2's tokenizer files (bench/serve_gpu.py extends them to the model's vocabulary)
# Versions are the dev venv's (.venv), where the serve and bench tests run. Run from the repo root (after
# scripts/setup.sh); /.whl/ is git-ignored through .git/info/exclude. Then carry [".whl/serve"] and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/serve/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fast .whl/serve/fast/*.whl
set -euo pipefail
out=.whl/serve
mkdir -p "$out/fast" "$out/tokenizer-smollm2"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
pin() { .venv/bin/python -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }
# fastapi + starlette + uvicorn (the server), httpx (kiln bench --url), typer + rich (the CLI), prometheus_client,
# pydantic (kiln's profiles, fastapi), jsonschema (kiln.validation's result schema), and what each imports
for name in fastapi starlette annotated-doc opentelemetry-api uvicorn h11 click anyio sniffio idna httpx httpcore certifi \
            typer rich shellingham markdown-it-py mdurl pygments prometheus_client pydantic pydantic-core annotated-types \
            typing-inspection typing-extensions jsonschema jsonschema-specifications referencing rpds-py attrs; do
  python3 -m pip download --no-deps --only-binary=:all: "${plat[@]}" -q -d "$out" "$(pin "$name")"
done
for spec in httptools==0.9.0 uvloop==0.23.0; do
  python3 -m pip download --no-deps --only-binary=:all: "${plat[@]}" -q -d "$out/fast" "$spec"
done
smollm2="${KILN_HOME:-$HOME/.kiln}/assets/SmolLM2-135M-Instruct"
cp "$smollm2"/{tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} "$out/tokenizer-smollm2/"
du -sh "$out" && ls "$out" "$out/fast"
