//! OPT's tensors: Hugging Face names and shapes, per layer and global.
//!
//! Layer recipe (`do_layer_norm_before` = pre-LN; OPT-350m is post-LN):
//! ```text
//! x = embed(ids) [project_in] + positions[pos + 2]
//! per layer:  pre-LN:  x = x + attn(ln1(x));  x = x + fc2(relu(fc1(ln2(x))))
//!             post-LN: x = ln1(x + attn(x));  x = ln2(x + fc2(relu(fc1(x))))
//! logits = embed^T [project_out] [final_ln] x        (all linears biased; LayerNorm eps 1e-5)
//! ```

use super::config::OptConfig;
use super::TensorSpec;

/// OPT's learned position table is indexed from position + 2 (a fairseq legacy).
pub const POSITION_OFFSET: usize = 2;
/// LayerNorm epsilon used throughout OPT.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// A weight and its optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: TensorSpec,
    /// `[out]`, when the model has biases.
    pub bias: Option<TensorSpec>,
}

/// LayerNorm scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[dim]`.
    pub weight: TensorSpec,
    /// `[dim]`.
    pub bias: TensorSpec,
}

/// The tensors of one OPT decoder layer.
#[derive(Debug, Clone)]
pub struct OptLayerSpec {
    /// Norm before (pre-LN) or after (post-LN) attention.
    pub self_attn_layer_norm: LayerNorm,
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Attention output projection.
    pub out_proj: Linear,
    /// Norm before (pre-LN) or after (post-LN) the FFN.
    pub final_layer_norm: LayerNorm,
    /// FFN up projection.
    pub fc1: Linear,
    /// FFN down projection.
    pub fc2: Linear,
}

/// All of an OPT model's tensors.
#[derive(Debug, Clone)]
pub struct OptSpec {
    /// Token embedding `[vocab, embed_dim]`; also the output projection (tied).
    pub embed_tokens: TensorSpec,
    /// Learned positions `[max_positions + 2, hidden]`.
    pub embed_positions: TensorSpec,
    /// `[hidden, embed_dim]` when `word_embed_proj_dim != hidden_size`.
    pub project_in: Option<TensorSpec>,
    /// `[embed_dim, hidden]` when `word_embed_proj_dim != hidden_size`.
    pub project_out: Option<TensorSpec>,
    /// Final norm of pre-LN models.
    pub final_layer_norm: Option<LayerNorm>,
    /// The decoder layers.
    pub layers: Vec<OptLayerSpec>,
}

impl OptSpec {
    /// The tensors of `c`, named with `prefix` (`"model."` as transformers saves them, or `""`
    /// for checkpoints whose names start at `decoder.`).
    pub fn new(c: &OptConfig, prefix: &str) -> Self {
        let d = format!("{prefix}decoder.");
        let (h, e, f) = (c.hidden_size, c.embed_dim(), c.ffn_dim);
        let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
        let linear = |name: String, out: usize, inp: usize| Linear {
            weight: t(format!("{name}.weight"), &[out, inp]),
            bias: c.enable_bias.then(|| t(format!("{name}.bias"), &[out])),
        };
        let norm = |name: String| LayerNorm {
            weight: t(format!("{name}.weight"), &[h]),
            bias: t(format!("{name}.bias"), &[h]),
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = format!("{d}layers.{i}.");
                OptLayerSpec {
                    self_attn_layer_norm: norm(format!("{l}self_attn_layer_norm")),
                    q_proj: linear(format!("{l}self_attn.q_proj"), h, h),
                    k_proj: linear(format!("{l}self_attn.k_proj"), h, h),
                    v_proj: linear(format!("{l}self_attn.v_proj"), h, h),
                    out_proj: linear(format!("{l}self_attn.out_proj"), h, h),
                    final_layer_norm: norm(format!("{l}final_layer_norm")),
                    fc1: linear(format!("{l}fc1"), f, h),
                    fc2: linear(format!("{l}fc2"), h, f),
                }
            })
            .collect();
        let projections = c.has_projections();
        Self {
            embed_tokens: t(format!("{d}embed_tokens.weight"), &[c.vocab_size, e]),
            embed_positions: t(
                format!("{d}embed_positions.weight"),
                &[c.max_position_embeddings + POSITION_OFFSET, h],
            ),
            project_in: projections.then(|| t(format!("{d}project_in.weight"), &[h, e])),
            project_out: projections.then(|| t(format!("{d}project_out.weight"), &[e, h])),
            final_layer_norm: c
                .has_final_layer_norm()
                .then(|| norm(format!("{d}final_layer_norm"))),
            layers,
        }
    }
}
