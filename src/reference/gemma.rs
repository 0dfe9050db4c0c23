//! Gemma 2 / Gemma 3 forward pass (see [`crate::arch::gemma`] for the recipe and tensor
//! names). Norm weights are read as the model multiplies by them (`1 + w`: the weight source
//! shifts a checkpoint's, a GGUF holds them so).

use ndarray::{Array1, Array2, Axis};

use super::kv_cache::{KvCache, RaggedBatch};
use super::ops::{gelu_tanh_mul, rms_norm, HeadLayout, Linear, Rope, Scores};
use super::{attend, load_linear, load_matrix, load_vector};
use crate::arch::gemma::{GemmaGeneration, GemmaSpec};
use crate::arch::GemmaConfig;
use crate::error::Result;
use crate::model::WeightSource;

struct GemmaLayer {
    input_layernorm: Array1<f32>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    qk_norm: Option<(Array1<f32>, Array1<f32>)>,
    post_attention_layernorm: Array1<f32>,
    pre_feedforward_layernorm: Array1<f32>,
    post_feedforward_layernorm: Array1<f32>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A Gemma model with f32 weights.
pub struct GemmaModel {
    config: GemmaConfig,
    embed_tokens: Array2<f32>,
    layers: Vec<GemmaLayer>,
    norm: Array1<f32>,
    lm_head: Option<Array2<f32>>,
}

impl GemmaModel {
    /// Loads every tensor of `spec` from `source`, decoding to f32.
    pub fn load(config: &GemmaConfig, spec: &GemmaSpec, source: &dyn WeightSource) -> Result<Self> {
        let linear = |s| load_linear(s, None, source);
        let vector = |s| load_vector(s, source);
        let layers = spec
            .layers
            .iter()
            .map(|l| {
                Ok(GemmaLayer {
                    input_layernorm: vector(&l.input_layernorm)?,
                    q_proj: linear(&l.q_proj)?,
                    k_proj: linear(&l.k_proj)?,
                    v_proj: linear(&l.v_proj)?,
                    o_proj: linear(&l.o_proj)?,
                    qk_norm: match (&l.q_norm, &l.k_norm) {
                        (Some(q), Some(k)) => Some((vector(q)?, vector(k)?)),
                        _ => None,
                    },
                    post_attention_layernorm: vector(&l.post_attention_layernorm)?,
                    pre_feedforward_layernorm: vector(&l.pre_feedforward_layernorm)?,
                    post_feedforward_layernorm: vector(&l.post_feedforward_layernorm)?,
                    gate_proj: linear(&l.gate_proj)?,
                    up_proj: linear(&l.up_proj)?,
                    down_proj: linear(&l.down_proj)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: config.clone(),
            embed_tokens: load_matrix(&spec.embed_tokens, source)?,
            layers,
            norm: vector(&spec.norm)?,
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

    /// Gemma 2's final soft-cap, applied to logits by the caller.
    pub fn logit_softcap(&self) -> Option<f32> {
        self.config.final_logit_softcapping.map(|v| v as f32)
    }

    /// Final (normed) hidden states `[rows, hidden]` of the batch's new tokens.
    pub(crate) fn forward(
        &self,
        batch: &RaggedBatch,
        tokens: &[usize],
        caches: &mut [KvCache],
    ) -> Array2<f32> {
        let c = &self.config;
        let (eps, d) = (c.rms_norm_eps as f32, c.head_dim);
        let layout = HeadLayout {
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: d,
        };
        let positions = batch.positions();
        let (global, local) = (
            Rope::new(&positions, &c.rope_inv_freq()),
            Rope::new(&positions, &c.local_inv_freq()),
        );
        let mut x = self.embed_tokens.select(Axis(0), tokens);
        x *= (c.hidden_size as f32).sqrt();
        for (i, layer) in self.layers.iter().enumerate() {
            let is_local = c.is_local(i);
            let scores = Scores {
                scale: (c.query_pre_attn_scalar as f32).powf(-0.5),
                window: c.sliding_window.filter(|_| is_local),
                softcap: c.attn_logit_softcapping.map(|v| v as f32),
            };
            let h = rms_norm(x.view(), &layer.input_layernorm, eps);
            let mut q = layer.q_proj.forward(h.view());
            let mut k = layer.k_proj.forward(h.view());
            let v = layer.v_proj.forward(h.view());
            if let Some((qn, kn)) = &layer.qk_norm {
                q = super::llama::head_norm(&q, qn, d, eps);
                k = super::llama::head_norm(&k, kn, d, eps);
            }
            let rope = if is_local { &local } else { &global };
            rope.apply(q.view_mut(), d);
            rope.apply(k.view_mut(), d);
            let a = attend(batch, &q, &k, &v, caches, i, layout, scores);
            let o = layer.o_proj.forward(a.view());
            x += &rms_norm(o.view(), &layer.post_attention_layernorm, eps);

            let h = rms_norm(x.view(), &layer.pre_feedforward_layernorm, eps);
            let mut gate = layer.gate_proj.forward(h.view());
            let up = layer.up_proj.forward(h.view());
            gelu_tanh_mul(&mut gate, &up);
            let m = layer.down_proj.forward(gate.view());
            x += &rms_norm(m.view(), &layer.post_feedforward_layernorm, eps);
        }
        debug_assert!(matches!(
            c.generation,
            GemmaGeneration::Gemma2 | GemmaGeneration::Gemma3
        ));
        rms_norm(x.view(), &self.norm, eps)
    }
}
