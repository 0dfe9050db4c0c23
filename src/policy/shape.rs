//! [`ModelShape`]: a model's sizes as the cost model needs them.

use crate::model::ModelConfig;

/// A model's sizes as the cost model needs them (element counts; bytes depend on compression).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Decoder layers.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Width of all query heads (`heads * head_dim`).
    pub q_width: usize,
    /// Width of all key (or value) heads (`kv_heads * head_dim`).
    pub kv_width: usize,
    /// FFN hidden width.
    pub ffn: usize,
    /// FFN activations alive at once per token (OPT: fc1's output; SwiGLU: gate and up).
    pub ffn_live: usize,
    /// Linear layers (matrix products) per transformer layer: 7 for Llama, 6 for OPT.
    pub linear_calls: usize,
    /// Weight values of one decoder layer.
    pub layer_values: f64,
    /// Weight values outside the layers (embeddings, output head, final norm).
    pub head_values: f64,
    /// Output-projection multiply-adds per token (`vocab * embed_dim`).
    pub head_macs: f64,
    /// Values of the small tensors kept resident on the device (norms, biases, OPT's learned
    /// positions).
    pub resident_values: f64,
}

impl ModelShape {
    /// Sizes of `config`.
    pub fn of(config: &ModelConfig) -> Self {
        match config {
            ModelConfig::Opt(c) => {
                let (h, f, e) = (c.hidden_size as f64, c.ffn_dim as f64, c.embed_dim() as f64);
                // q, k, v, out (+ biases), fc1, fc2 (+ biases), two LayerNorms
                let layer = 4.0 * h * h + 4.0 * h + 2.0 * h * f + f + h + 4.0 * h;
                let proj = if c.has_projections() {
                    2.0 * h * e
                } else {
                    0.0
                };
                let positions = (c.max_position_embeddings + 2) as f64 * h;
                Self {
                    layers: c.num_hidden_layers,
                    hidden: c.hidden_size,
                    heads: c.num_attention_heads,
                    q_width: c.hidden_size,
                    kv_width: c.hidden_size,
                    ffn: c.ffn_dim,
                    ffn_live: 1,
                    linear_calls: 6,
                    layer_values: layer,
                    head_values: c.vocab_size as f64 * e + positions + proj + 2.0 * h,
                    head_macs: c.vocab_size as f64 * e,
                    // per layer two LayerNorms, the q, k, v, out and fc2 biases and fc1's;
                    // the final LayerNorm and the positions
                    resident_values: c.num_hidden_layers as f64 * (9.0 * h + f)
                        + 2.0 * h
                        + positions,
                }
            }
            ModelConfig::Llama(c) => {
                let h = c.hidden_size as f64;
                let (qw, kvw) = (
                    (c.num_attention_heads * c.head_dim()) as f64,
                    (c.kv_heads() * c.head_dim()) as f64,
                );
                let f = c.intermediate_size as f64;
                // q, k, v, o, gate, up, down, two RMSNorms
                let layer = h * qw + 2.0 * h * kvw + qw * h + 3.0 * h * f + 2.0 * h;
                let tables = if c.tie_word_embeddings { 1.0 } else { 2.0 };
                Self {
                    layers: c.num_hidden_layers,
                    hidden: c.hidden_size,
                    heads: c.num_attention_heads,
                    q_width: qw as usize,
                    kv_width: kvw as usize,
                    ffn: c.intermediate_size,
                    ffn_live: 2,
                    linear_calls: 7,
                    layer_values: layer,
                    head_values: tables * c.vocab_size as f64 * h + h,
                    head_macs: c.vocab_size as f64 * h,
                    // two RMSNorms per layer and the final one
                    resident_values: (2 * c.num_hidden_layers + 1) as f64 * h,
                }
            }
        }
    }
}
