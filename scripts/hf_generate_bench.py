#!/usr/bin/env python3
"""Hugging Face `generate` on the batch-generation benchmark's prompts (scripts/make_gen_bench.py):
greedy, exactly 64 new tokens each, float32 on the CPU with 2 threads, in batches.

    python3 scripts/hf_generate_bench.py PROMPTS.jsonl [BATCH] [CACHE_DIR]

Needs `pip install torch transformers gguf`.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    prompts = [json.loads(line)["tokens"] for line in open(sys.argv[1])]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    cache = sys.argv[3] if len(sys.argv) > 3 else "/root/.cache/ferrogen"
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        cache, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    model.eval()
    start, new = time.time(), 0
    with torch.no_grad():
        for b in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[b : b + batch])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=False,
                pad_token_id=0,
            )
            new += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    t = time.time() - start
    print(f"hf generate: {new} new tokens in {t:.2f} s = {new / t:.1f} tokens/s (batch {batch})")


if __name__ == "__main__":
    main()
