#!/usr/bin/env python3
"""Golden references for the real test model, from Hugging Face transformers.

Loads SmolLM2-135M-Instruct.Q4_1.gguf through transformers' GGUF support (it dequantizes the
weights), runs it in float64, and writes tests/fixtures/smollm2/reference.json with:
  - the token ids of the first 512 tokens of britannica-11th.txt and every token's logprob, and
    the perplexity over them;
  - the greedy continuation of "The capital of France is";
  - token ids of assorted strings (digits, unicode, whitespace, special tokens) for the tokenizer;
  - a chat: messages, the text the file's chat template renders from them (apply_chat_template,
    with the assistant's turn opened), its token ids and its greedy continuation.

Usage: python3 scripts/make_smollm2_reference.py [--cache ~/.cache/ferrogen]
Needs: pip install torch transformers gguf   (run scripts/fetch-model.sh first)
"""
import argparse
import json
import math
import os
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_STRINGS = [
    "The capital of France is",
    "In 1564, 23 April; 3.14159 and 1,000,000 pounds.",
    "  leading spaces\tand tabs\n\nnew lines   ",
    "Ünïcödé — “quotes” — 日本語のテキスト — emoji 🙂",
    "<|im_start|>user\nHello!<|im_end|>",
    "don't won't it's we'll they've",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ferrogen"))
    ap.add_argument("--out", default="tests/fixtures/smollm2/reference.json")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    cache = pathlib.Path(args.cache)

    tok = AutoTokenizer.from_pretrained(cache, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(cache, gguf_file=GGUF, torch_dtype=torch.float64)
    model.eval()

    text = (cache / "britannica-11th.txt").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        token_logprobs = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    ppl = math.exp(-sum(token_logprobs) / len(token_logprobs))
    print(f"britannica first {len(ids)} tokens: ppl {ppl:.4f}")

    prompt = "The capital of France is"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    new_ids = gen[0, len(prompt_ids):].tolist()
    print(f"greedy: {prompt!r} -> {tok.decode(new_ids)!r}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([chat_ids]), max_new_tokens=12, do_sample=False)
    chat_new = gen[0, len(chat_ids):].tolist()
    print(f"chat: {tok.decode(chat_new)!r}")

    out = {
        "source": "transformers %s, torch %s, float64, GGUF dequantized" % (
            __import__("transformers").__version__, torch.__version__),
        "britannica": {"tokens": ids, "token_logprobs": token_logprobs, "ppl": ppl},
        "greedy": {"prompt": prompt, "prompt_tokens": prompt_ids, "new_tokens": new_ids,
                   "text": tok.decode(new_ids)},
        "tokenizer": [{"text": s, "tokens": tok(s, add_special_tokens=False)["input_ids"]}
                      for s in TOKENIZER_STRINGS],
        "chat": {"messages": messages, "text": chat_text, "tokens": chat_ids,
                 "new_tokens": chat_new},
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
