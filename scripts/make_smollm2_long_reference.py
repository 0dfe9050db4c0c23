#!/usr/bin/env python3
"""Golden references for long sequences on the real test model, from Hugging Face transformers.

Loads SmolLM2-135M-Instruct.Q4_1.gguf through transformers' GGUF support and runs it in float64
(transformers 5.24 keeps the GGUF weights packed and does those matrix products in float32), and writes tests/fixtures/smollm2/long.json with, for windows of 500, 1,024 and
2,048 tokens of britannica-11th.txt taken well past its first 512 tokens:
  - the window's start (in tokens of the whole text), its token ids and every token's logprob;
  - the greedy continuation (16 tokens) of prompts that end just before 512, 1,024 and 2,048
    total tokens, so that generation crosses those lengths.

Usage: python3 scripts/make_smollm2_long_reference.py [--cache ~/.cache/ferrogen]
Needs: pip install torch transformers gguf accelerate  (run scripts/fetch-model.sh first)
"""
import argparse
import json
import os
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (first token, length) of each scored window
WINDOWS = [(1000, 500), (3000, 1024), (6000, 2048)]
# (first token, prompt length): prompts that end 8 tokens before 512, 1,024, 2,048
PROMPTS = [(9000, 504), (10000, 1016), (12000, 2040)]
NEW_TOKENS = 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ferrogen"))
    ap.add_argument("--out", default="tests/fixtures/smollm2/long.json")
    args = ap.parse_args()
    cache = pathlib.Path(args.cache)

    tok = AutoTokenizer.from_pretrained(cache, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(cache, gguf_file=GGUF, dtype=torch.float64)
    model.eval()
    text = (cache / "britannica-11th.txt").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]

    windows = []
    for start, n in WINDOWS:
        w = ids[start:start + n]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0], dim=-1)
        lps = [logp[i, w[i + 1]].item() for i in range(n - 1)]
        print(f"window at {start}, {n} tokens: mean logprob {sum(lps) / len(lps):.4f}")
        windows.append({"start": start, "tokens": w, "token_logprobs": lps})

    greedy = []
    for start, n in PROMPTS:
        p = ids[start:start + n]
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, n, dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
        new = out[0, n:].tolist()
        print(f"prompt at {start}, {n} tokens -> {tok.decode(new)!r}")
        greedy.append({"start": start, "prompt": p, "new_tokens": new})

    result = {
        # transformers >= 5.24 keeps GGUF weights packed and runs those matmuls in float32
        "source": "transformers %s, torch %s, float64 activations, GGUF weights" % (
            __import__("transformers").__version__, torch.__version__),
        "windows": windows,
        "greedy": greedy,
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
