#!/usr/bin/env python3
"""Golden GGUF block decodings: random blocks of every block format ferrogen reads, decoded by
the `gguf` package's own `dequantize` (the Python twin of ggml's `dequantize_row_*`).

Writes <out>/<TYPE>.bin for each type: a little-endian u32 block count n, then n blocks as the
file stores them, then the n * block_len f32 values `gguf.quants.dequantize` gives. Every byte
of a block is random except its f16 super-scales (d, dmin, m), drawn as finite halves of either
sign over a wide range of magnitudes, so every bit of codes, sub-block scales and high-bit masks
is exercised. The Rust test (tests/gguf.rs) decodes the blocks and compares bit for bit.

Usage: python3 scripts/make_block_fixtures.py --out tests/fixtures/blocks
Needs: pip install gguf numpy
"""
import argparse
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# type -> byte offsets of the block's f16 super-scales
TYPES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0],
}


def blocks_of(qtype, n, rng):
    block_len, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    for at in TYPES[qtype]:
        scale = rng.choice([-1.0, 1.0], size=n) * np.exp(rng.uniform(np.log(1e-6), np.log(4.0), size=n))
        raw[:, at:at + 2] = scale.astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw, block_len


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=33)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for qtype in TYPES:
        n = 6
        raw, block_len = blocks_of(qtype, n, rng)
        values = dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
        assert values.shape == (n * block_len,), (qtype, values.shape)
        assert np.isfinite(values).all()
        path = out / f"{qtype.name}.bin"
        path.write_bytes(np.uint32(n).tobytes() + raw.tobytes() + values.astype("<f4").tobytes())
        print(path, n, "blocks")


if __name__ == "__main__":
    main()
