#!/usr/bin/env python3
"""Checks `score` on SmolLM2 against Hugging Face transformers on any text records.

Runs the score example (--per-token, reference backend) on a JSONL file of {"id", "text"}
records, computes the same logprobs with transformers (GGUF dequantized, float64), and reports
token agreement and the largest per-token difference per record.

Usage: python3 scripts/check_smollm2.py [--input data/sample.jsonl] [--cache ~/.cache/ferrogen]
           [--gguf FILE] [--engine "--cpu-mem 40MiB --offload-dir /tmp/off"]
--gguf checks another GGUF of the model (a requantized one: Q4_K_M, IQ4_XS, ...); --engine runs
the engine on the default device with those flags instead of the reference backend.
Needs: pip install torch transformers gguf accelerate; scripts/fetch-model.sh run first.
"""
import argparse
import json
import math
import os
import pathlib
import subprocess
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(ROOT / "data/sample.jsonl"))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ferrogen"))
    ap.add_argument("--gguf", default=None, help="a GGUF file (default: the cache's Q4_1)")
    ap.add_argument("--engine", default=None, help="run the engine with these flags")
    args = ap.parse_args()
    gguf = pathlib.Path(args.gguf) if args.gguf else pathlib.Path(args.cache, GGUF)
    backend = ["--backend", "reference"] if args.engine is None else args.engine.split()
    records = [json.loads(l) for l in open(args.input) if l.strip()]
    records = [r for r in records if "text" in r]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = pathlib.Path(tmp, "in.jsonl"), pathlib.Path(tmp, "out.jsonl")
        inp.write_text("".join(json.dumps(r) + "\n" for r in records))
        subprocess.run(["cargo", "run", "--quiet", "--release", "--", "score",
                        "--model", str(gguf), "--input", str(inp),
                        "--output", str(out), "--per-token", *backend],
                       check=True, cwd=ROOT)
        ours = [json.loads(l) for l in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float64)
    worst_all = 0.0
    for rec, got in zip(records, ours):
        ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        ref = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        assert got["scored_tokens"] == len(ref), (rec["id"], got["scored_tokens"], len(ref))
        worst = max(abs(a - b) for a, b in zip(got["token_logprobs"], ref))
        worst_all = max(worst_all, worst)
        hf_ppl = math.exp(-sum(ref) / len(ref))
        print(f"{rec['id']}: {len(ref)} scored tokens, ppl ours {got['ppl']:.4f} HF {hf_ppl:.4f}, "
              f"worst per-token diff {worst:.2e}")
    print(f"worst per-token difference over all records: {worst_all:.2e}")


if __name__ == "__main__":
    main()
