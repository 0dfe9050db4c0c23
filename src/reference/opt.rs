//! OPT forward pass (see [`crate::arch::opt`] for the recipe and tensor names).

use ndarray::{Array1, Array2, ArrayView2, Axis};

use super::kv_cache::{KvCache, RaggedBatch};
use super::ops::{layer_norm, HeadLayout, Linear, Scores};
use super::{attend, load_linear, load_matrix, load_vector};
use crate::arch::opt::{self, OptSpec, LAYER_NORM_EPS, POSITION_OFFSET};
use crate::arch::OptConfig;
use crate::error::Result;
use crate::model::WeightSource;

struct Norm {
    weight: Array1<f32>,
    bias: Array1<f32>,
}

impl Norm {
    fn load(spec: &opt::LayerNormSpec, source: &dyn WeightSource) -> Result<Self> {
        Ok(Self {
            weight: load_vector(&spec.weight, source)?,
            bias: load_vector(&spec.bias, source)?,
        })
    }
    fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        layer_norm(x, &self.weight, &self.bias, LAYER_NORM_EPS)
    }
}

fn linear(spec: &opt::LinearSpec, source: &dyn WeightSource) -> Result<Linear> {
    load_linear(&spec.weight, spec.bias.as_ref(), source)
}

struct OptLayer {
    self_attn_layer_norm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    final_layer_norm: Norm,
    fc1: Linear,
    fc2: Linear,
}

/// An OPT model with f32 weights.
pub struct OptModel {
    config: OptConfig,
    embed_tokens: Array2<f32>,
    embed_positions: Array2<f32>,
    project_in: Option<Array2<f32>>,
    project_out: Option<Array2<f32>>,
    final_layer_norm: Option<Norm>,
    layers: Vec<OptLayer>,
}

impl OptModel {
    /// Loads every tensor of `spec` from `source`, decoding to f32.
    pub fn load(config: &OptConfig, spec: &OptSpec, source: &dyn WeightSource) -> Result<Self> {
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                Ok(OptLayer {
                    self_attn_layer_norm: Norm::load(&l.self_attn_layer_norm, source)?,
                    q_proj: linear(&l.q_proj, source)?,
                    k_proj: linear(&l.k_proj, source)?,
                    v_proj: linear(&l.v_proj, source)?,
                    out_proj: linear(&l.out_proj, source)?,
                    final_layer_norm: Norm::load(&l.final_layer_norm, source)?,
                    fc1: linear(&l.fc1, source)?,
                    fc2: linear(&l.fc2, source)?,
                })
            })
            .collect::<Result<_>>()?;
        let optional = |s: &Option<crate::model::TensorSpec>| {
            s.as_ref().map(|s| load_matrix(s, source)).transpose()
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens: load_matrix(&spec.embed_tokens, source)?,
            embed_positions: load_matrix(&spec.embed_positions, source)?,
            project_in: optional(&spec.project_in)?,
            project_out: optional(&spec.project_out)?,
            final_layer_norm: spec
                .final_layer_norm
                .as_ref()
                .map(|n| Norm::load(n, source))
                .transpose()?,
            layers,
        })
    }

    /// The output projection `[vocab, embed_dim]` (tied to the token embedding).
    pub fn output_weight(&self) -> &Array2<f32> {
        &self.embed_tokens
    }

    /// Final hidden states `[rows, embed_dim]` of the batch's new tokens (`tokens` stacked).
    pub(crate) fn forward(
        &self,
        batch: &RaggedBatch,
        tokens: &[usize],
        caches: &mut [KvCache],
    ) -> Array2<f32> {
        let c = &self.config;
        let mut x = self.embed_tokens.select(Axis(0), tokens);
        if let Some(w) = &self.project_in {
            x = x.dot(&w.t());
        }
        let positions: Vec<usize> = batch
            .positions()
            .into_iter()
            .map(|p| p + POSITION_OFFSET)
            .collect();
        x += &self.embed_positions.select(Axis(0), &positions);

        let layout = HeadLayout {
            heads: c.num_attention_heads,
            kv_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        };
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        let pre_ln = c.do_layer_norm_before;
        for (i, layer) in self.layers.iter().enumerate() {
            // attention block
            let h = if pre_ln {
                layer.self_attn_layer_norm.forward(x.view())
            } else {
                x.clone()
            };
            let q = layer.q_proj.forward(h.view());
            let k = layer.k_proj.forward(h.view());
            let v = layer.v_proj.forward(h.view());
            let a = attend(batch, &q, &k, &v, caches, i, layout, Scores::scaled(scale));
            x += &layer.out_proj.forward(a.view());
            if !pre_ln {
                x = layer.self_attn_layer_norm.forward(x.view());
            }
            // FFN block
            let h = if pre_ln {
                layer.final_layer_norm.forward(x.view())
            } else {
                x.clone()
            };
            let mut f = layer.fc1.forward(h.view());
            f.mapv_inplace(|v| v.max(0.0));
            x += &layer.fc2.forward(f.view());
            if !pre_ln {
                x = layer.final_layer_norm.forward(x.view());
            }
        }
        if let Some(norm) = &self.final_layer_norm {
            x = norm.forward(x.view());
        }
        if let Some(w) = &self.project_out {
            x = x.dot(&w.t());
        }
        x
    }
}
