#!/usr/bin/env python3
"""GGUF fixtures as people download them: tiny random checkpoints of the Llama-shaped families,
converted by llama.cpp's convert_hf_to_gguf.py and quantized by llama-quantize into the usual
mixes, with expected numbers from transformers loading each GGUF file (dequantized) in float64.

Each model gets tests/fixtures/gguf/<name>/ holding <MIX>.gguf and <MIX>.json, the JSON with
  - "sequences": random token lists (up to 40 tokens) and every token's logprob;
  - "texts": test texts (several scripts, code, digits, runs of whitespace, special tokens) with
    the token ids transformers' GGUF tokenizer gives and their logprobs;
  - "greedy": a prompt and its greedy continuation;
  - "chat": messages, the text the file's chat template renders from them with the assistant's
    turn opened (transformers' apply_chat_template), and its token ids.
Rows are 256 wide (hidden, heads x head_dim, intermediate), so that K-quants apply to every
linear weight (llama-quantize falls back to other types for narrower rows).

The models:
  - llama-spm: Llama with a SentencePiece vocabulary (byte fallback), untied, 2 layers, in
    Q4_K_M, Q5_K_M, Q6_K, Q2_K and IQ4_XS;
  - llama3-bpe: Llama 3's pre-tokenizer (`llama-bpe`) and RoPE scaling (in GGUF, the
    `rope_freqs.weight` factors), Q4_K_M;
  - qwen2-bpe: Qwen2 (q/k/v biases, `qwen2` pre-tokenizer), Q4_K_M;
  - qwen3-bpe: Qwen3 (q/k norms), Q4_K_M;
  - phi3-spm: Phi-3 (fused qkv and gate_up, a window of 8), SentencePiece, Q4_K_M;
  - gemma2-spm, gemma3-spm: Gemma 2 (soft-caps, local and global layers) and Gemma 3 (q/k norms,
    local layers), SentencePiece read as Gemma's, Q4_K_M.

Usage: python3 scripts/make_gguf_fixtures.py [--llama-cpp DIR] [--out tests/fixtures/gguf]
Needs: pip install torch transformers gguf sentencepiece, and llama.cpp's converter and
llama-quantize (the peers' build script puts both in ~/.cache/ferrogen-peers/llama.cpp).
"""
import argparse
import json
import math
import os
import pathlib
import random
import subprocess
import sys
import tempfile

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Gemma2Config,
                          Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 3.14159 again!",
    "Shakespeare was baptized in the parish church of Stratford-upon-Avon in 1564.",
    "def score(model, texts):\n    for t in texts:\n        yield model(t)  # 42\n",
    "Offloading weights to disk lets a small machine run a large model, slowly but surely.",
    "Les modèles de langue prédisent le mot suivant; Die Übersetzung ist schön.",
    "Числа и слова: один, два, три. Ελληνικά γράμματα. 日本語のテキストと中文。",
    "    indented\tlines\n\n\nwith   runs of   spaces and 1,000,000 digits 0123456789.",
]
TEXTS = [
    "The lazy fox was baptized in 1564, it's said.",
    "Übersetzung: 日本語 и русский текст, Ελληνικά!\n\n\tdef f(x):\n        return x ** 2  # 12345",
    "<|im_start|>user\nHi   there<|im_end|>\n  trailing  ",
]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Chat templates in the styles these families ship (ChatML; Llama 2's [INST] with its role
# check; Llama 3's headers), written here for the fixtures.
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message.role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
HEADERS = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
ROLE_TAGS = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA_TURNS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CHAT = [
    {"role": "user", "content": "  What is 12 x 7?  "},
    {"role": "assistant", "content": "84 — ganz einfach."},
    {"role": "user", "content": "Und auf 日本語?\n"},
]
CHAT_WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}] + CHAT


def bpe_tokenizer(d, split, chat_template, vocab=480):
    """A byte-level BPE trained on CORPUS with `split` before the byte mapping."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False, "chat_template": chat_template}))
    return tok.get_vocab_size()


def spm_tokenizer(d, chat_template, vocab=512):
    """A SentencePiece BPE with byte fallback trained on CORPUS (tokenizer.model)."""
    import sentencepiece as spm
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(CORPUS * 5))
    spm.SentencePieceTrainer.train(
        input=f.name, model_prefix=str(d / "tokenizer"), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=SPECIALS[1:],
        minloglevel=2)
    os.unlink(f.name)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False,
        "chat_template": chat_template}))
    return vocab


def scale_weights(model, gen):
    # Gemma's norms multiply by 1 + w (drawn around 0), and it scales its embedding by
    # sqrt(hidden) (drawn that much smaller)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                spread = 1.0 / math.sqrt(p.shape[1]) if gemma else 1.0
                p.copy_(spread * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def convert(llama_cpp, hf_dir, out, pre):
    """convert_hf_to_gguf.py with the pre-tokenizer named (our trained vocabularies have no
    hash llama.cpp knows)."""
    code = (
        "import sys; sys.path.insert(0, %r); sys.argv = %r\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: %r\n"
        "import convert_hf_to_gguf as c; c.main()\n"
    ) % (str(llama_cpp), ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f32",
                          "--outfile", str(out)], pre)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=llama_cpp,
                   stdout=subprocess.DEVNULL)


def quantize(llama_cpp, src, dst, mix):
    bin_dir = pathlib.Path(llama_cpp) / "build" / "bin"
    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    subprocess.run([str(bin_dir / "llama-quantize"), str(src), str(dst), mix, "2"], check=True,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logprobs(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def expected(gguf, seed, chat, overrides):
    """What transformers computes from the file, with `overrides` of the configuration it reads
    from it: the checkpoint's own values where transformers' GGUF reader drops them (Llama 3's
    RoPE scaling, which the file holds as the per-frequency factors of `rope_freqs.weight` and
    llama.cpp applies; Phi-3's sliding window, `phi3.attention.sliding_window`)."""
    d, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(d, gguf_file=name)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, config=config, torch_dtype=torch.float64,
        attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    sequences = []
    for n in [2, 5, 17, 40]:
        ids = [rng.randrange(vocab) for _ in range(n)]
        sequences.append({"tokens": ids, "token_logprobs": logprobs(model, ids)})
    texts = []
    for t in TEXTS:
        ids = tok(t)["input_ids"]
        texts.append({"text": t, "tokens": ids, "token_logprobs": logprobs(model, ids)})
    prompt = sequences[2]["tokens"][:6]
    with torch.no_grad():
        g = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return {"sequences": sequences, "texts": texts,
            "greedy": {"prompt": prompt, "new_tokens": g[0, len(prompt):].tolist()},
            "chat": {"messages": chat, "text": text, "tokens": ids}}


def models_():
    shape = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    return [
        ("llama-spm", "spm", None, INST, CHAT, LlamaForCausalLM,
         lambda v: LlamaConfig(vocab_size=v, num_hidden_layers=2, tie_word_embeddings=False,
                               **shape),
         ["Q4_K_M", "Q5_K_M", "Q6_K", "Q2_K", "IQ4_XS"]),
        ("llama3-bpe", "bpe", ("llama-bpe", LLAMA3_SPLIT), HEADERS, CHAT_WITH_SYSTEM,
         LlamaForCausalLM,
         lambda v: LlamaConfig(vocab_size=v, num_hidden_layers=1, tie_word_embeddings=False,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16},
                               **shape),
         ["Q4_K_M"]),
        ("qwen2-bpe", "bpe", ("qwen2", QWEN2_SPLIT), CHATML, CHAT, Qwen2ForCausalLM,
         lambda v: Qwen2Config(vocab_size=v, num_hidden_layers=1, tie_word_embeddings=False,
                               **shape),
         ["Q4_K_M"]),
        ("qwen3-bpe", "bpe", ("qwen2", QWEN2_SPLIT), CHATML, CHAT_WITH_SYSTEM,
         Qwen3ForCausalLM,
         # (transformers reads a Qwen3 GGUF with heads of 128, whatever the file says)
         lambda v: Qwen3Config(vocab_size=v, num_hidden_layers=1, tie_word_embeddings=False,
                               **dict(shape, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=128)),
         ["Q4_K_M"]),
        # local then global layer (a window of 8), soft-caps, a query scalar of the head width
        # (what llama.cpp assumes below 27B)
        ("gemma2-spm", "spm", None, GEMMA_TURNS, CHAT, Gemma2ForCausalLM,
         lambda v: Gemma2Config(vocab_size=v, num_hidden_layers=2, head_dim=64,
                                query_pre_attn_scalar=64, sliding_window=8,
                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                pad_token_id=0, **shape),
         ["Q4_K_M"]),
        # two local layers (a window of 8), q/k norms
        ("gemma3-spm", "spm", None, GEMMA_TURNS, CHAT, Gemma3ForCausalLM,
         lambda v: Gemma3TextConfig(vocab_size=v, num_hidden_layers=2, head_dim=64,
                                    query_pre_attn_scalar=64, sliding_window=8, pad_token_id=0,
                                    **shape),
         ["Q4_K_M"]),
        ("phi3-spm", "spm", None, ROLE_TAGS, CHAT_WITH_SYSTEM, Phi3ForCausalLM,
         lambda v: Phi3Config(vocab_size=v, num_hidden_layers=1, tie_word_embeddings=False,
                              sliding_window=8, pad_token_id=0, **shape),
         ["Q4_K_M"]),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/gguf")
    ap.add_argument("--llama-cpp", default=os.path.expanduser("~/.cache/ferrogen-peers/llama.cpp"))
    args = ap.parse_args()
    for i, (name, kind, pre, template, chat, cls, config, mixes) in enumerate(models_()):
        out = pathlib.Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            hf = pathlib.Path(tmp) / "hf"
            hf.mkdir()
            if kind == "spm":
                vocab = spm_tokenizer(hf, template)
            else:
                vocab = bpe_tokenizer(hf, pre[1], template)
            gen = torch.Generator().manual_seed(i)
            hf_config = config(vocab)
            overrides = {}
            if hf_config.rope_parameters.get("rope_type", "default") != "default":
                overrides["rope_parameters"] = hf_config.rope_parameters
            # (transformers' GGUF reader takes Gemma's defaults for these)
            for key in ["sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                        "final_logit_softcapping"]:
                if getattr(hf_config, key, None):
                    overrides[key] = getattr(hf_config, key)
            model = cls(hf_config).float()
            scale_weights(model, gen)
            model.save_pretrained(hf, safe_serialization=True)
            f32 = pathlib.Path(tmp) / "f32.gguf"
            convert(args.llama_cpp, hf, f32, pre[0] if pre else "default")
            for mix in mixes:
                gguf = out / f"{mix}.gguf"
                quantize(args.llama_cpp, f32, gguf, mix)
                exp = expected(gguf, seed=i, chat=chat, overrides=overrides)
                exp["model"] = f"{name}/{mix}"
                (out / f"{mix}.json").write_text(json.dumps(exp) + "\n")
                print(f"{name} {mix}: {gguf.stat().st_size} bytes, text ids "
                      f"{[len(t['tokens']) for t in exp['texts']]}")


if __name__ == "__main__":
    main()
