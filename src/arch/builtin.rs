//! Built-in model shapes for policy search without weight files (`--config NAME`): the published
//! configurations of OPT (Zhang et al., 2022) and Llama 2/3, as their `config.json` files give them.

use super::{LlamaConfig, ModelConfig, OptConfig};

/// Names accepted by [`builtin_config`].
pub const BUILTIN_NAMES: [&str; 9] = [
    "opt-1.3b",
    "opt-6.7b",
    "opt-13b",
    "opt-30b",
    "opt-66b",
    "opt-175b",
    "llama-2-7b",
    "llama-2-70b",
    "llama-3-8b",
];

fn opt(layers: usize, hidden: usize, heads: usize) -> ModelConfig {
    ModelConfig::Opt(OptConfig {
        vocab_size: 50272,
        hidden_size: hidden,
        num_hidden_layers: layers,
        ffn_dim: 4 * hidden,
        num_attention_heads: heads,
        max_position_embeddings: 2048,
        do_layer_norm_before: true,
        word_embed_proj_dim: None,
        activation_function: "relu".into(),
        enable_bias: true,
        remove_final_layer_norm: false,
        tie_word_embeddings: true,
        bos_token_id: Some(2),
        eos_token_id: Some(2),
    })
}

#[allow(clippy::too_many_arguments)]
fn llama(
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    context: usize,
    theta: f64,
) -> ModelConfig {
    ModelConfig::Llama(LlamaConfig {
        num_key_value_heads: Some(kv_heads),
        max_position_embeddings: context,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        ..LlamaConfig::new(vocab, hidden, ffn, layers, heads)
    })
}

/// The configuration of a built-in shape, or `None` for an unknown name.
pub fn builtin_config(name: &str) -> Option<ModelConfig> {
    Some(match name {
        "opt-1.3b" => opt(24, 2048, 32),
        "opt-6.7b" => opt(32, 4096, 32),
        "opt-13b" => opt(40, 5120, 40),
        "opt-30b" => opt(48, 7168, 56),
        "opt-66b" => opt(64, 9216, 72),
        "opt-175b" => opt(96, 12288, 96),
        "llama-2-7b" => llama(32, 4096, 32, 32, 11008, 32000, 4096, 1e4),
        "llama-2-70b" => llama(80, 8192, 64, 8, 28672, 32000, 4096, 1e4),
        "llama-3-8b" => llama(32, 4096, 32, 8, 14336, 128256, 8192, 5e5),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_builtin_is_valid() {
        for name in BUILTIN_NAMES {
            let c = builtin_config(name).unwrap();
            c.validate(Path::new(name)).unwrap();
        }
        assert!(builtin_config("gpt-5").is_none());
    }
}
