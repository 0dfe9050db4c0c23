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
//! Here, in order: its `config.json`, its tensors (Hugging Face names), how they form the
//! schedule's units (`parts`), its attention heads, its sizes for the cost model, and its
//! forward pass over the [`Device`] seam, one function per part.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::common::{bounded, malformed, ModelParts, PartSpec, PartWeights, RowBatch, Runner};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::HeadLayout;
use crate::model::{TensorSpec, WeightSource};
use crate::policy::cost::ModelShape;

/// OPT's learned position table is indexed from position + 2 (a fairseq legacy).
pub const POSITION_OFFSET: usize = 2;
/// LayerNorm epsilon used throughout OPT.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// OPT's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Width of the FFN's hidden layer.
    pub ffn_dim: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Context window (learned positions).
    pub max_position_embeddings: usize,
    /// Pre-LN (`true`, most OPTs) or post-LN (`false`, OPT-350m).
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// Width of the token embedding; differs from `hidden_size` when project_in/out exist.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    /// FFN activation; only `relu` is used by OPT.
    #[serde(default = "relu")]
    pub activation_function: String,
    /// Whether linear layers have biases.
    #[serde(default = "yes")]
    pub enable_bias: bool,
    /// Drops the final layer norm even in pre-LN models (a few converted checkpoints).
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Whether the output projection shares the token embedding (always true for OPT).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
}

impl OptConfig {
    /// Width of the token embedding (`word_embed_proj_dim`, or `hidden_size`).
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
    /// Whether project_in / project_out exist.
    pub fn has_projections(&self) -> bool {
        self.embed_dim() != self.hidden_size
    }
    /// Whether the decoder ends with a final layer norm (HF: pre-LN and not removed).
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks that the configuration describes a model ferrogen can run; `path` names the
    /// file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let c = self;
        let positive = |name: &str, v: usize| bounded(path, name, v);
        positive("vocab_size", c.vocab_size)?;
        positive("hidden_size", c.hidden_size)?;
        positive("num_hidden_layers", c.num_hidden_layers)?;
        positive("ffn_dim", c.ffn_dim)?;
        positive("num_attention_heads", c.num_attention_heads)?;
        positive("max_position_embeddings", c.max_position_embeddings)?;
        positive("word_embed_proj_dim", c.embed_dim())?;
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::config(
                path,
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    c.hidden_size, c.num_attention_heads
                ),
            ));
        }
        if c.activation_function != "relu" {
            return Err(Error::Unsupported {
                what: format!(
                    "{}: OPT activation `{}` (only relu)",
                    path.display(),
                    c.activation_function
                ),
            });
        }
        if !c.tie_word_embeddings {
            return Err(Error::Unsupported {
                what: format!("{}: OPT with untied output embedding", path.display()),
            });
        }
        Ok(())
    }
}

/// A weight and its optional bias.
#[derive(Debug, Clone)]
pub struct LinearSpec {
    /// `[out, in]`.
    pub weight: TensorSpec,
    /// `[out]`, when the model has biases.
    pub bias: Option<TensorSpec>,
}

/// LayerNormSpec scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNormSpec {
    /// `[dim]`.
    pub weight: TensorSpec,
    /// `[dim]`.
    pub bias: TensorSpec,
}

/// The tensors of one OPT decoder layer.
#[derive(Debug, Clone)]
pub struct OptLayerSpec {
    /// Norm before (pre-LN) or after (post-LN) attention.
    pub self_attn_layer_norm: LayerNormSpec,
    /// Query projection.
    pub q_proj: LinearSpec,
    /// Key projection.
    pub k_proj: LinearSpec,
    /// Value projection.
    pub v_proj: LinearSpec,
    /// Attention output projection.
    pub out_proj: LinearSpec,
    /// Norm before (pre-LN) or after (post-LN) the FFN.
    pub final_layer_norm: LayerNormSpec,
    /// FFN up projection.
    pub fc1: LinearSpec,
    /// FFN down projection.
    pub fc2: LinearSpec,
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
    pub final_layer_norm: Option<LayerNormSpec>,
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
        let linear = |name: String, out: usize, inp: usize| LinearSpec {
            weight: t(format!("{name}.weight"), &[out, inp]),
            bias: c.enable_bias.then(|| t(format!("{name}.bias"), &[out])),
        };
        let norm = |name: String| LayerNormSpec {
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

/// The name prefix of an OPT checkpoint's tensors in `source`: `"model."` (as transformers
/// saves them) or `""` (checkpoints whose names start at `decoder.`).
pub fn prefix(source: &dyn WeightSource) -> &'static str {
    if source.info("decoder.embed_tokens.weight").is_some() {
        ""
    } else {
        "model."
    }
}

/// The units' tensors, named with `prefix` (`"model."` or `""`). Input: vectors
/// `[positions]`, linears `[project_in?]`; attention: `[ln weight, ln bias]`,
/// `[q, k, v, out]`; MLP: `[ln weight, ln bias]`, `[fc1, fc2]`; head: `[final ln weight?,
/// final ln bias?]`, `[project_out?]`. Linears carry their biases.
pub(super) fn parts(c: &OptConfig, prefix: &str) -> ModelParts {
    let s = OptSpec::new(c, prefix);
    let lin = |l: &LinearSpec| Some((l.weight.clone(), l.bias.clone()));
    let norm =
        |n: Option<&LayerNormSpec>| vec![n.map(|n| n.weight.clone()), n.map(|n| n.bias.clone())];
    let layers = s
        .layers
        .iter()
        .map(|l| {
            [
                PartSpec {
                    sliding: false,
                    vectors: norm(Some(&l.self_attn_layer_norm)),
                    linears: vec![
                        lin(&l.q_proj),
                        lin(&l.k_proj),
                        lin(&l.v_proj),
                        lin(&l.out_proj),
                    ],
                },
                PartSpec {
                    sliding: false,
                    vectors: norm(Some(&l.final_layer_norm)),
                    linears: vec![lin(&l.fc1), lin(&l.fc2)],
                },
            ]
        })
        .collect();
    ModelParts {
        input: PartSpec {
            sliding: false,
            vectors: vec![Some(s.embed_positions.clone())],
            linears: vec![s.project_in.clone().map(|w| (w, None))],
        },
        layers,
        head: PartSpec {
            sliding: false,
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::arch::ModelConfig;

    /// facebook/opt-350m's config.json: projections in and out, no final norm.
    pub(in crate::arch) const OPT_350M: &str = r#"{"model_type": "opt", "vocab_size": 50272, "hidden_size": 1024,
        "num_hidden_layers": 24, "ffn_dim": 4096, "num_attention_heads": 16,
        "max_position_embeddings": 2048, "do_layer_norm_before": false, "word_embed_proj_dim": 512,
        "activation_function": "relu", "eos_token_id": 2}"#;

    #[test]
    fn opt_350m_has_projections_and_no_final_norm() {
        let c = ModelConfig::from_json_str(OPT_350M, Path::new("config.json")).unwrap();
        let ModelConfig::Opt(opt) = c else {
            panic!("not OPT")
        };
        assert!(opt.has_projections());
        assert!(!opt.has_final_layer_norm());
        assert_eq!(opt.embed_dim(), 512);
        assert_eq!(opt.head_dim(), 64);
    }
}
