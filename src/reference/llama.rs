//! Llama forward pass (see [`crate::arch::llama`] for the recipe and tensor names).

use ndarray::{Array1, Array2, Axis};

use super::kv_cache::{KvCache, RaggedBatch};
use super::ops::{rms_norm, silu_mul, HeadLayout, Linear, Rope, Scores};
use super::{attend, load_linear, load_matrix, load_vector};
use crate::arch::llama::bias_of;
use crate::arch::llama::LlamaSpec;
use crate::arch::LlamaConfig;
use crate::error::Result;
use crate::model::{TensorSpec, WeightSource};

/// RMSNorm of each `head_dim`-wide head of every row of `x`, with the one weight `w`.
pub(super) fn head_norm(
    x: &Array2<f32>,
    w: &Array1<f32>,
    head_dim: usize,
    eps: f32,
) -> Array2<f32> {
    let (rows, width) = x.dim();
    let heads = x
        .to_shape((rows * width / head_dim, head_dim))
        .expect("rows of whole heads")
        .to_owned();
    rms_norm(heads.view(), w, eps)
        .into_shape_with_order((rows, width))
        .expect("same size")
}

struct LlamaLayer {
    input_layernorm: Array1<f32>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head norms of q and k.
    qk_norm: Option<(Array1<f32>, Array1<f32>)>,
    post_attention_layernorm: Array1<f32>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A Llama model with f32 weights.
pub struct LlamaModel {
    config: LlamaConfig,
    embed_tokens: Array2<f32>,
    layers: Vec<LlamaLayer>,
    norm: Array1<f32>,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Array2<f32>>,
}

impl LlamaModel {
    /// Loads every tensor of `spec` from `source`, decoding to f32.
    pub fn load(config: &LlamaConfig, spec: &LlamaSpec, source: &dyn WeightSource) -> Result<Self> {
        let linear = |s: &TensorSpec, biased: bool| {
            let bias = biased.then(|| bias_of(s));
            load_linear(s, bias.as_ref(), source)
        };
        let (qkv, o, mlp) = (config.qkv_bias(), config.attention_bias, config.mlp_bias);
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                Ok(LlamaLayer {
                    input_layernorm: load_vector(&l.input_layernorm, source)?,
                    q_proj: linear(&l.q_proj, qkv)?,
                    k_proj: linear(&l.k_proj, qkv)?,
                    v_proj: linear(&l.v_proj, qkv)?,
                    o_proj: linear(&l.o_proj, o)?,
                    qk_norm: match (&l.q_norm, &l.k_norm) {
                        (Some(q), Some(k)) => {
                            Some((load_vector(q, source)?, load_vector(k, source)?))
                        }
                        _ => None,
                    },
                    post_attention_layernorm: load_vector(&l.post_attention_layernorm, source)?,
                    gate_proj: linear(&l.gate_proj, mlp)?,
                    up_proj: linear(&l.up_proj, mlp)?,
                    down_proj: linear(&l.down_proj, mlp)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: config.clone(),
            embed_tokens: load_matrix(&spec.embed_tokens, source)?,
            layers,
            norm: load_vector(&spec.norm, source)?,
            lm_head: spec
                .lm_head
                .as_ref()
                .map(|s| load_matrix(s, source))
                .transpose()?,
        })
    }

    /// The output projection `[vocab, hidden]`.
    pub fn output_weight(&self) -> &Array2<f32> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Final (normed) hidden states `[rows, hidden]` of the batch's new tokens.
    pub(crate) fn forward(
        &self,
        batch: &RaggedBatch,
        tokens: &[usize],
        caches: &mut [KvCache],
    ) -> Array2<f32> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let layout = HeadLayout {
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        };
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        let rope = Rope::new(&batch.positions(), &c.rope_inv_freq());
        let scores = Scores {
            window: c.attention_window(),
            ..Scores::scaled(scale)
        };
        let mut x = self.embed_tokens.select(Axis(0), tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(x.view(), &layer.input_layernorm, eps);
            let mut q = layer.q_proj.forward(h.view());
            let mut k = layer.k_proj.forward(h.view());
            let v = layer.v_proj.forward(h.view());
            if let Some((qn, kn)) = &layer.qk_norm {
                q = head_norm(&q, qn, c.head_dim(), eps);
                k = head_norm(&k, kn, c.head_dim(), eps);
            }
            rope.apply(q.view_mut(), c.head_dim());
            rope.apply(k.view_mut(), c.head_dim());
            let a = attend(batch, &q, &k, &v, caches, i, layout, scores);
            x += &layer.o_proj.forward(a.view());

            let h = rms_norm(x.view(), &layer.post_attention_layernorm, eps);
            let mut gate = layer.gate_proj.forward(h.view());
            let up = layer.up_proj.forward(h.view());
            silu_mul(&mut gate, &up);
            x += &layer.down_proj.forward(gate.view());
        }
        rms_norm(x.view(), &self.norm, eps)
    }
}
