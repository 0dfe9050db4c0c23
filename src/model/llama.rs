//! Llama's tensors: Hugging Face names and shapes, per layer and global.
//!
//! Layer recipe:
//! ```text
//! x = embed(ids)
//! per layer:  x = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))   with n1 = rmsnorm1(x)
//!             x = x + down(silu(gate(n2)) * up(n2))                with n2 = rmsnorm2(x)
//! logits = lm_head(rmsnorm(x))     (lm_head = embed when tied; GQA: kv head = q head / group)
//! ```

use super::config::LlamaConfig;
use super::TensorSpec;

/// The tensors of one Llama decoder layer.
#[derive(Debug, Clone)]
pub struct LlamaLayerSpec {
    /// RMSNorm before attention `[hidden]`.
    pub input_layernorm: TensorSpec,
    /// `[heads * head_dim, hidden]`.
    pub q_proj: TensorSpec,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: TensorSpec,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: TensorSpec,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: TensorSpec,
    /// RMSNorm before the MLP `[hidden]`.
    pub post_attention_layernorm: TensorSpec,
    /// `[intermediate, hidden]`.
    pub gate_proj: TensorSpec,
    /// `[intermediate, hidden]`.
    pub up_proj: TensorSpec,
    /// `[hidden, intermediate]`.
    pub down_proj: TensorSpec,
}

/// All of a Llama model's tensors.
#[derive(Debug, Clone)]
pub struct LlamaSpec {
    /// `[vocab, hidden]`.
    pub embed_tokens: TensorSpec,
    /// The decoder layers.
    pub layers: Vec<LlamaLayerSpec>,
    /// Final RMSNorm `[hidden]`.
    pub norm: TensorSpec,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<TensorSpec>,
}

impl LlamaSpec {
    /// The tensors of `c` under transformers' names.
    pub fn new(c: &LlamaConfig) -> Self {
        let (h, i, q, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads * c.head_dim(),
            c.kv_heads() * c.head_dim(),
        );
        let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
        let layers = (0..c.num_hidden_layers)
            .map(|n| {
                let l = format!("model.layers.{n}.");
                LlamaLayerSpec {
                    input_layernorm: t(format!("{l}input_layernorm.weight"), &[h]),
                    q_proj: t(format!("{l}self_attn.q_proj.weight"), &[q, h]),
                    k_proj: t(format!("{l}self_attn.k_proj.weight"), &[kv, h]),
                    v_proj: t(format!("{l}self_attn.v_proj.weight"), &[kv, h]),
                    o_proj: t(format!("{l}self_attn.o_proj.weight"), &[h, q]),
                    post_attention_layernorm: t(
                        format!("{l}post_attention_layernorm.weight"),
                        &[h],
                    ),
                    gate_proj: t(format!("{l}mlp.gate_proj.weight"), &[i, h]),
                    up_proj: t(format!("{l}mlp.up_proj.weight"), &[i, h]),
                    down_proj: t(format!("{l}mlp.down_proj.weight"), &[h, i]),
                }
            })
            .collect();
        Self {
            embed_tokens: t("model.embed_tokens.weight".into(), &[c.vocab_size, h]),
            layers,
            norm: t("model.norm.weight".into(), &[h]),
            lm_head: (!c.tie_word_embeddings)
                .then(|| t("lm_head.weight".into(), &[c.vocab_size, h])),
        }
    }
}
