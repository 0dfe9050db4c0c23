#!/usr/bin/env python3
"""Golden fixtures from Hugging Face transformers: tiny random checkpoints of each architecture
(OPT; Llama, Llama 3 RoPE scaling, Mistral with a sliding window, Qwen2, Qwen3, Phi-3,
Gemma 2, Gemma 3).

For each model this writes <out>/<name>/ with config.json, *.safetensors (some sharded, some in
f16 or bf16), sometimes a tokenizer.json, and expected.json holding, computed in float64 from the
weights exactly as saved:
  - "sequences": token lists of ragged lengths with every token's log-probability
    (ln p(t_i | t_<i), i = 1..n-1);
  - "texts": strings with their token ids and logprobs (models that ship a tokenizer);
  - "greedy": a prompt and its greedy continuation.

Weights are drawn so that logits are far from uniform (unit-variance embeddings, 1/sqrt(fan_in)
matrices, norms around 1, small biases).

Usage:
  python3 scripts/make_fixtures.py --out tests/fixtures           # the committed fixtures
  python3 scripts/make_fixtures.py --out /tmp/fx --random-shapes --seed 7   # fresh shapes
Needs: pip install torch transformers
"""
import argparse
import json
import math
import pathlib
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Shakespeare was baptized in the parish church of Stratford-upon-Avon in 1564.",
    "Offloading weights to disk lets a small machine run a large model, slowly but surely.",
    "Throughput matters more than latency for offline scoring of a whole dataset.",
    "Numbers like 3.14159, 2048 and 1,000,000 appear in text too!",
]
TEXTS = [
    "The lazy fox was baptized in 1564.",
    "Offloading a large dataset: slowly, surely!",
]
VOCAB = 320


def build_tokenizer(path):
    """A byte-level BPE with a few hundred tokens, trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 20, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(path))
    return tok


def scale_weights(model, gen):
    # Gemma's norms multiply by 1 + w: its weights are drawn around 0, the others' around 1
    norm_center = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(norm_center + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_positions" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                # (Gemma scales its embedding by sqrt(hidden) and ties it to the output)
                spread = 0.25 if norm_center == 0.0 else 1.0
                p.copy_(spread * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def token_logprobs(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def make(out, name, config, cls, dtype, seed, tokenizer=False, shard=False):
    d = pathlib.Path(out) / name
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).float()
    scale_weights(model, gen)
    model = model.to(dtype)
    kwargs = {"max_shard_size": "100KB"} if shard else {}
    model.save_pretrained(d, safe_serialization=True, **kwargs)
    # Reload what was saved and compute in float64: references see the stored rounding.
    ref = cls.from_pretrained(d, torch_dtype=torch.float64, attn_implementation="eager").eval()

    rng = random.Random(seed)
    max_len = min(config.max_position_embeddings, 40)
    lengths = [2, 5, 17, max_len]
    sequences = []
    for n in lengths:
        ids = [rng.randrange(config.vocab_size) for _ in range(n)]
        sequences.append({"tokens": ids, "token_logprobs": token_logprobs(ref, ids)})
    texts = []
    if tokenizer:
        tok = build_tokenizer(d / "tokenizer.json")
        for t in TEXTS:
            ids = tok.encode(t).ids
            texts.append({"text": t, "tokens": ids, "token_logprobs": token_logprobs(ref, ids)})
    prompt = sequences[2]["tokens"][:6]
    with torch.no_grad():
        g = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    expected = {
        "model": name,
        "sequences": sequences,
        "texts": texts,
        "greedy": {"prompt": prompt, "new_tokens": g[0, len(prompt):].tolist()},
    }
    (d / "expected.json").write_text(json.dumps(expected) + "\n")
    spread = [lp for s in sequences for lp in s["token_logprobs"]]
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logprob mean "
          f"{sum(spread) / len(spread):.2f} (uniform would be {-math.log(config.vocab_size):.2f})")


def fixed_models():
    return [
        ("opt-pre-ln-proj", OPTConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=48,
            do_layer_norm_before=True, bos_token_id=0, eos_token_id=0, pad_token_id=1),
         OPTForCausalLM, torch.float32, dict(tokenizer=True, shard=True)),
        ("opt-post-ln", OPTConfig(
            vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, ffn_dim=80,
            num_attention_heads=3, max_position_embeddings=48, word_embed_proj_dim=40,
            do_layer_norm_before=False, bos_token_id=0, eos_token_id=0, pad_token_id=1),
         OPTForCausalLM, torch.float16, {}),
        ("llama-gqa-untied", LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0),
         LlamaForCausalLM, torch.bfloat16, dict(tokenizer=True)),
        ("llama-tied", LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=48,
            rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
         LlamaForCausalLM, torch.float32, {}),
        # Llama 3's RoPE scaling, with a short original context so that it matters at 40
        ("llama3-rope", LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=10000.0, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
         LlamaForCausalLM, torch.float32, {}),
        # a window of 8 keys, shorter than the 17- and 40-token sequences
        ("mistral-window", MistralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, sliding_window=8, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0),
         MistralForCausalLM, torch.bfloat16, {}),
        ("qwen2-bias", Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=1e6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
         Qwen2ForCausalLM, torch.float32, dict(tokenizer=True)),
        ("qwen3-qknorm", Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0),
         Qwen3ForCausalLM, torch.bfloat16, {}),
        # fused qkv and gate_up projections, a window of 12 keys
        ("phi3-fused", Phi3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            sliding_window=12, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
            pad_token_id=0),
         Phi3ForCausalLM, torch.float16, {}),
        # local and global layers in turn (a window of 8), soft-caps low enough to bite, and a
        # query scalar that is not the head width
        ("gemma2-softcap", Gemma2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, sliding_window=8, query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, bos_token_id=0,
            eos_token_id=0, pad_token_id=0),
         Gemma2ForCausalLM, torch.float32, {}),
        # five local layers (a window of 8, RoPE base 10^4) to one global (10^6, linear x8)
        ("gemma3-local-global", Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, sliding_window=8, query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            bos_token_id=0, eos_token_id=0, pad_token_id=0),
         Gemma3ForCausalLM, torch.bfloat16, {}),
    ]


def random_models(seed):
    """Other shapes of both families, for checking against checkpoints not in the repo."""
    r = random.Random(seed)
    heads = r.choice([2, 3, 4])
    kv = r.choice([h for h in range(1, heads + 1) if heads % h == 0])
    head_dim = r.choice([8, 12, 16])
    opt_heads = r.choice([2, 4])
    opt_hidden = opt_heads * r.choice([8, 12, 16])
    return [
        (f"opt-random-{seed}", OPTConfig(
            vocab_size=r.randrange(300, 400), hidden_size=opt_hidden,
            num_hidden_layers=r.randrange(1, 4), ffn_dim=r.randrange(20, 120),
            num_attention_heads=opt_heads, max_position_embeddings=r.randrange(40, 80),
            word_embed_proj_dim=r.choice([opt_hidden, opt_hidden // 2]),
            do_layer_norm_before=r.choice([True, False]), bos_token_id=0, eos_token_id=0,
            pad_token_id=1),
         OPTForCausalLM, r.choice([torch.float32, torch.float16]), dict(tokenizer=True)),
        (f"llama-random-{seed}", LlamaConfig(
            vocab_size=r.randrange(300, 400), hidden_size=heads * r.choice([6, 10, 16, 20]),
            intermediate_size=r.randrange(20, 120), num_hidden_layers=r.randrange(1, 4),
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            max_position_embeddings=r.randrange(40, 80), rope_theta=r.choice([1e4, 5e5, 100.0]),
            tie_word_embeddings=r.choice([True, False]), bos_token_id=0, eos_token_id=0),
         LlamaForCausalLM, r.choice([torch.float32, torch.bfloat16]), dict(tokenizer=True)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-shapes", action="store_true")
    args = ap.parse_args()
    models_ = random_models(args.seed) if args.random_shapes else fixed_models()
    for i, (name, config, cls, dtype, opts) in enumerate(models_):
        make(args.out, name, config, cls, dtype, seed=args.seed * 100 + i, **opts)


if __name__ == "__main__":
    main()
