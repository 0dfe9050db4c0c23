//! OPT: learned positions, LayerNorm before (pre-LN) or after (post-LN, OPT-350m) each half,
//! biased linears, a ReLU MLP, optional `project_in`/`project_out` around a narrower embedding.
//!
//! ```text
//! x = embed(ids) [project_in] + positions[pos + 2]
//! per layer:  pre-LN:  x = x + attn(ln1(x));  x = x + fc2(relu(fc1(ln2(x))))
//!             post-LN: x = ln1(x + attn(x));  x = ln2(x + fc2(relu(fc1(x))))
//! logits = embed^T [project_out] [final_ln] x        (all linears biased; LayerNorm eps 1e-5)
//! ```
//!
//! Here: how its tensors form the schedule's units (`parts`), its attention heads, its
//! sizes for the cost model, and its forward pass over the [`Device`] seam, one function per
//! part.

use super::common::{malformed, ModelParts, PartSpec, PartWeights, RowBatch, Runner};
use crate::device::Device;
use crate::error::Result;
use crate::layout::HeadLayout;
use crate::model::opt::{self as spec, OptSpec, LAYER_NORM_EPS, POSITION_OFFSET};
use crate::model::OptConfig;
use crate::policy::cost::ModelShape;

/// The units' tensors, named with `prefix` (`"model."` or `""`). Input: vectors
/// `[positions]`, linears `[project_in?]`; attention: `[ln weight, ln bias]`,
/// `[q, k, v, out]`; MLP: `[ln weight, ln bias]`, `[fc1, fc2]`; head: `[final ln weight?,
/// final ln bias?]`, `[project_out?]`. Linears carry their biases.
pub(super) fn parts(c: &OptConfig, prefix: &str) -> ModelParts {
    let s = OptSpec::new(c, prefix);
    let lin = |l: &spec::Linear| Some((l.weight.clone(), l.bias.clone()));
    let norm =
        |n: Option<&spec::LayerNorm>| vec![n.map(|n| n.weight.clone()), n.map(|n| n.bias.clone())];
    let layers = s
        .layers
        .iter()
        .map(|l| {
            [
                PartSpec {
                    vectors: norm(Some(&l.self_attn_layer_norm)),
                    linears: vec![
                        lin(&l.q_proj),
                        lin(&l.k_proj),
                        lin(&l.v_proj),
                        lin(&l.out_proj),
                    ],
                },
                PartSpec {
                    vectors: norm(Some(&l.final_layer_norm)),
                    linears: vec![lin(&l.fc1), lin(&l.fc2)],
                },
            ]
        })
        .collect();
    ModelParts {
        input: PartSpec {
            vectors: vec![Some(s.embed_positions.clone())],
            linears: vec![s.project_in.clone().map(|w| (w, None))],
        },
        layers,
        head: PartSpec {
            vectors: norm(s.final_layer_norm.as_ref()),
            linears: vec![s.project_out.clone().map(|w| (w, None))],
        },
        output: s.embed_tokens.clone(),
        embedding: s.embed_tokens,
    }
}

/// Query heads (one key/value head each) and their width.
pub(super) fn head_layout(c: &OptConfig) -> HeadLayout {
    HeadLayout {
        heads: c.num_attention_heads,
        kv_heads: c.num_attention_heads,
        head_dim: c.head_dim(),
    }
}

/// Sizes for the cost model.
pub(super) fn shape(c: &OptConfig) -> ModelShape {
    let (h, f, e) = (c.hidden_size as f64, c.ffn_dim as f64, c.embed_dim() as f64);
    // q, k, v, out (+ biases), fc1, fc2 (+ biases), two LayerNorms
    let layer = 4.0 * h * h + 4.0 * h + 2.0 * h * f + f + h + 4.0 * h;
    let proj = if c.has_projections() {
        2.0 * h * e
    } else {
        0.0
    };
    let positions = (c.max_position_embeddings + 2) as f64 * h;
    ModelShape {
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
        resident_values: c.num_hidden_layers as f64 * (9.0 * h + f) + 2.0 * h + positions,
    }
}

/// LayerNorm with the part's two vectors (weight, bias).
fn layer_norm<D: Device>(r: &Runner<D>, w: &PartWeights<D>, x: &D::Tensor) -> Result<D::Tensor> {
    let [Some(weight), Some(bias)] = &w.vectors[..] else {
        return Err(malformed("OPT LayerNorm"));
    };
    r.dev.layer_norm(x, weight, bias, LAYER_NORM_EPS)
}

/// Embedded tokens `e` -> `[project_in](e) + positions[pos + 2]`, in row chunks.
pub(super) fn input<D: Device>(
    r: &Runner<D>,
    w: &PartWeights<D>,
    e: D::Tensor,
    rb: &RowBatch<D>,
) -> Result<D::Tensor> {
    let ([Some(positions)], [project_in]) = (&w.vectors[..], &w.linears[..]) else {
        return Err(malformed("OPT input"));
    };
    r.by_chunks(e, |ec, range| {
        let x = match project_in {
            Some(p) => r.linear(&ec, p)?,
            None => ec,
        };
        // learned positions: rows pos + 2 of the position table, added
        let shifted: Vec<u32> = rb.host.positions[range]
            .iter()
            .map(|&q| q + POSITION_OFFSET as u32)
            .collect();
        let p = r.dev.gather(positions, &shifted)?;
        r.dev.add(&x, &p)?;
        Ok(x)
    })
}

/// Pre-LN `x + out(attend(q(n), k(n), v(n)))` with `n = ln(x)`; post-LN `ln(x + out(attend(..)))`
/// on `x` itself.
pub(super) fn attention<D: Device>(
    r: &Runner<D>,
    c: &OptConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
    attend: impl FnOnce(&D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
) -> Result<D::Tensor> {
    let [Some(q), Some(k), Some(v), Some(out)] = &w.linears[..] else {
        return Err(malformed("OPT attention"));
    };
    let pre = c.do_layer_norm_before;
    let h = if pre {
        layer_norm(r, w, &x)?
    } else {
        x.clone()
    };
    let (qt, kt, vt) = (r.linear(&h, q)?, r.linear(&h, k)?, r.linear(&h, v)?);
    let a = attend(&qt, &kt, &vt)?;
    let o = r.linear(&a, out)?;
    r.dev.add(&x, &o)?;
    if pre {
        Ok(x)
    } else {
        layer_norm(r, w, &x)
    }
}

/// Pre-LN `x + fc2(relu(fc1(ln(x))))`; post-LN `ln(x + fc2(relu(fc1(x))))`.
pub(super) fn mlp<D: Device>(
    r: &Runner<D>,
    c: &OptConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let [Some(fc1), Some(fc2)] = &w.linears[..] else {
        return Err(malformed("OPT MLP"));
    };
    let pre = c.do_layer_norm_before;
    let h = if pre {
        layer_norm(r, w, &x)?
    } else {
        x.clone()
    };
    let f = r.linear(&h, fc1)?;
    r.dev.relu(&f)?;
    let d = r.linear(&f, fc2)?;
    r.dev.add(&x, &d)?;
    if pre {
        Ok(x)
    } else {
        layer_norm(r, w, &x)
    }
}

/// The final LayerNorm, then `project_out`, each when present.
pub(super) fn head<D: Device>(
    r: &Runner<D>,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let ([weight, bias], [project_out]) = (&w.vectors[..], &w.linears[..]) else {
        return Err(malformed("OPT head"));
    };
    let x = match (weight, bias) {
        (Some(weight), Some(bias)) => r.dev.layer_norm(&x, weight, bias, LAYER_NORM_EPS)?,
        _ => x,
    };
    match project_out {
        Some(p) => r.linear(&x, p),
        None => Ok(x),
    }
}
