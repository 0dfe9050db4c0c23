//! Llama: RMSNorm, rotary positions, grouped-query attention, a SwiGLU MLP.
//!
//! ```text
//! x = embed(ids)
//! per layer:  x = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))   with n1 = rmsnorm1(x)
//!             x = x + down(silu(gate(n2)) * up(n2))                with n2 = rmsnorm2(x)
//! logits = lm_head(rmsnorm(x))     (lm_head = embed when tied; GQA: kv head = q head / group)
//! ```
//!
//! Here: how its tensors form the schedule's units (`parts`), its attention heads, its
//! sizes for the cost model, and its forward pass over the [`Device`] seam, one function per
//! part.

use super::common::{malformed, ModelParts, PartSpec, PartWeights, RowBatch, Runner};
use crate::device::Device;
use crate::error::Result;
use crate::layout::HeadLayout;
use crate::model::llama::LlamaSpec;
use crate::model::{LlamaConfig, TensorSpec};
use crate::policy::cost::ModelShape;

/// The units' tensors. Attention: vectors `[input_layernorm]`, linears `[q, k, v, o]`;
/// MLP: `[post_attention_layernorm]`, `[gate, up, down]`; head: `[norm]`; no input weights.
pub(super) fn parts(c: &LlamaConfig) -> ModelParts {
    let s = LlamaSpec::new(c);
    let lin = |t: &TensorSpec| Some((t.clone(), None));
    let layers = s
        .layers
        .iter()
        .map(|l| {
            [
                PartSpec {
                    vectors: vec![Some(l.input_layernorm.clone())],
                    linears: vec![
                        lin(&l.q_proj),
                        lin(&l.k_proj),
                        lin(&l.v_proj),
                        lin(&l.o_proj),
                    ],
                },
                PartSpec {
                    vectors: vec![Some(l.post_attention_layernorm.clone())],
                    linears: vec![lin(&l.gate_proj), lin(&l.up_proj), lin(&l.down_proj)],
                },
            ]
        })
        .collect();
    ModelParts {
        input: PartSpec::default(),
        layers,
        head: PartSpec {
            vectors: vec![Some(s.norm.clone())],
            linears: Vec::new(),
        },
        output: s.lm_head.unwrap_or_else(|| s.embed_tokens.clone()),
        embedding: s.embed_tokens,
    }
}

/// Query heads, key/value heads (GQA) and their width.
pub(super) fn head_layout(c: &LlamaConfig) -> HeadLayout {
    HeadLayout {
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        head_dim: c.head_dim(),
    }
}

/// Sizes for the cost model.
pub(super) fn shape(c: &LlamaConfig) -> ModelShape {
    let h = c.hidden_size as f64;
    let (qw, kvw) = (
        (c.num_attention_heads * c.head_dim()) as f64,
        (c.kv_heads() * c.head_dim()) as f64,
    );
    let f = c.intermediate_size as f64;
    // q, k, v, o, gate, up, down, two RMSNorms
    let layer = h * qw + 2.0 * h * kvw + qw * h + 3.0 * h * f + 2.0 * h;
    let tables = if c.tie_word_embeddings { 1.0 } else { 2.0 };
    ModelShape {
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

/// `x + o(attend(rope(q(n)), rope(k(n)), v(n)))` with `n = rmsnorm(x)`; `attend` returns
/// `[rows, heads * head_dim]`.
pub(super) fn attention<D: Device>(
    r: &Runner<D>,
    c: &LlamaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
    rb: &RowBatch<D>,
    attend: impl FnOnce(&D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
) -> Result<D::Tensor> {
    let ([Some(norm)], [Some(q), Some(k), Some(v), Some(o)]) = (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Llama attention"));
    };
    let n = r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)?;
    let (qt, kt, vt) = (r.linear(&n, q)?, r.linear(&n, k)?, r.linear(&n, v)?);
    let head_dim = r.head_layout().head_dim;
    r.dev.rope(&qt, &rb.dev, head_dim)?;
    r.dev.rope(&kt, &rb.dev, head_dim)?;
    let a = attend(&qt, &kt, &vt)?;
    let y = r.linear(&a, o)?;
    r.dev.add(&x, &y)?;
    Ok(x)
}

/// `x + down(silu(gate(n)) * up(n))` with `n = rmsnorm(x)`.
pub(super) fn mlp<D: Device>(
    r: &Runner<D>,
    c: &LlamaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let ([Some(norm)], [Some(gate), Some(up), Some(down)]) = (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Llama MLP"));
    };
    let n = r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)?;
    let (g, u) = (r.linear(&n, gate)?, r.linear(&n, up)?);
    r.dev.silu_mul(&g, &u)?;
    let d = r.linear(&g, down)?;
    r.dev.add(&x, &d)?;
    Ok(x)
}

/// The final RMSNorm.
pub(super) fn head<D: Device>(
    r: &Runner<D>,
    c: &LlamaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let [Some(norm)] = &w.vectors[..] else {
        return Err(malformed("Llama head"));
    };
    r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)
}
