#!/usr/bin/env bash
# Wheels the GPU image lacks for bench/infer.py's server part (FastAPI + uvicorn + pydantic), for Python 3.12 on
# x86-64, into .whl/ (git-ignored through .git/info/exclude). Then, in the device command (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:src
# Without them `bench/infer.py --parts server` fails on `import uvicorn`, and without opentelemetry-api on
# fastapi's `import opentelemetry`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
for pkg in fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
           typing-inspection==0.4.5 annotated-types==0.8.0 opentelemetry-api==1.45.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls .whl
