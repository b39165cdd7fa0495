#!/usr/bin/env bash
# Put the wheels `make gpu-check` needs but the GPU machines lack into .whl/ (ignored by git):
# bitsandbytes for Python 3.12 on x86-64 Linux (about 43 MB; the device tool carries up to 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d .whl "$(grep -i '^bitsandbytes==' constraints-dev.txt)"
ls -l .whl
