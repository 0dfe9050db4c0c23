#!/usr/bin/env python3
"""Writes the batch-generation benchmark's prompts: 256 records of 64 tokens each, cut from the
1911 Britannica text (its clean part) as SmolLM2's tokenizer encodes it (transformers reads
the tokenizer from the GGUF file), as {"id", "tokens"} JSONL for `generate --input`.

    python3 scripts/make_gen_bench.py OUT.jsonl [CACHE_DIR]

Needs `pip install transformers gguf`.
"""
import json
import re
import sys

from transformers import AutoTokenizer


def main():
    out = sys.argv[1]
    cache = sys.argv[2] if len(sys.argv) > 2 else "/root/.cache/ferrogen"
    tok = AutoTokenizer.from_pretrained(cache, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    words = open(f"{cache}/britannica-11th.txt", encoding="utf-8").read().split()
    words = words[len(words) // 20 : len(words) * 7 // 10]
    words = [w for w in words if re.fullmatch(r"[A-Za-z][A-Za-z,.;:'-]*", w)]
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    with open(out, "w") as f:
        for i in range(256):
            f.write(json.dumps({"id": i, "tokens": ids[i * 97 : i * 97 + 64]}) + "\n")


if __name__ == "__main__":
    main()
