//! [`ModelShape`]: a model's sizes as the cost model needs them (each architecture in
//! `crate::arch` says its own).

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
