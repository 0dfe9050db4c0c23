//! The CPU reference forward pass: f32, ndarray, short and readable. It is the oracle that every
//! faster path is tested against, and is itself tested against Hugging Face transformers.
//!
//! [`ReferenceModel`] runs a ragged batch of sequences, each with its own [`KvCache`], so one call
//! serves prefill (empty caches, whole prompts) and decode (one new token per sequence) alike.

pub(crate) mod gemma;
pub(crate) mod kv_cache;
pub(crate) mod llama;
pub(crate) mod ops;
pub(crate) mod opt;

use ndarray::{s, Array1, Array2, ArrayView2};

pub use kv_cache::KvCache;
use kv_cache::RaggedBatch;
use ops::{causal_attention, HeadLayout, Linear, Scores};

use crate::arch::gemma::GemmaSpec;
use crate::arch::llama::LlamaSpec;
use crate::arch::opt::OptSpec;
use crate::arch::{ModelConfig, ModelFiles};
use crate::batch::TokenScores;
use crate::error::Result;
use crate::model::{TensorSpec, WeightSource};

/// Rows of logits computed at once when scoring (bounds memory to `rows x vocab` floats).
const LOGIT_ROWS: usize = 128;

/// A model loaded for the CPU reference.
pub struct ReferenceModel {
    config: ModelConfig,
    arch: Arch,
}

enum Arch {
    Opt(opt::OptModel),
    Llama(llama::LlamaModel),
    Gemma(gemma::GemmaModel),
}

impl ReferenceModel {
    /// Loads all weights of an opened model, decoding quantized ones exactly to f32.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        Self::from_source(&files.config, files.weights.as_ref())
    }

    /// Loads from a configuration and a weight source.
    pub fn from_source(config: &ModelConfig, source: &dyn WeightSource) -> Result<Self> {
        let arch = match config {
            ModelConfig::Opt(c) => Arch::Opt(opt::OptModel::load(
                c,
                &OptSpec::new(c, crate::arch::opt::prefix(source)),
                source,
            )?),
            ModelConfig::Llama(c) => {
                Arch::Llama(llama::LlamaModel::load(c, &LlamaSpec::new(c), source)?)
            }
            ModelConfig::Gemma(c) => {
                Arch::Gemma(gemma::GemmaModel::load(c, &GemmaSpec::new(c), source)?)
            }
        };
        Ok(Self {
            config: config.clone(),
            arch,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// An empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers(), self.config.kv_width())
    }

    /// Runs each sequence's new tokens after what its cache holds, appending their keys and
    /// values to the cache. Returns the final hidden states of all new tokens, stacked in batch
    /// order (`[total new tokens, d]`), ready for [`ReferenceModel::logits`].
    pub fn forward(&self, batch: &[&[u32]], caches: &mut [KvCache]) -> Result<Array2<f32>> {
        let layout = RaggedBatch::new(
            batch,
            caches,
            self.config.vocab_size(),
            self.config.max_context(),
        )?;
        let tokens: Vec<usize> = batch
            .iter()
            .flat_map(|t| t.iter().map(|&id| id as usize))
            .collect();
        let hidden = match &self.arch {
            Arch::Opt(m) => m.forward(&layout, &tokens, caches),
            Arch::Llama(m) => m.forward(&layout, &tokens, caches),
            Arch::Gemma(m) => m.forward(&layout, &tokens, caches),
        };
        for (cache, seq) in caches.iter_mut().zip(batch) {
            cache.advance(seq.len());
        }
        Ok(hidden)
    }

    fn output_weight(&self) -> &Array2<f32> {
        match &self.arch {
            Arch::Opt(m) => m.output_weight(),
            Arch::Llama(m) => m.output_weight(),
            Arch::Gemma(m) => m.output_weight(),
        }
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, hidden: ArrayView2<f32>) -> Array2<f32> {
        let mut logits = hidden.dot(&self.output_weight().t());
        if let Arch::Gemma(m) = &self.arch {
            if let Some(cap) = m.logit_softcap() {
                // Gemma 2's final soft-cap, in f64
                let cap = f64::from(cap);
                logits.mapv_inplace(|l| (cap * (f64::from(l) / cap).tanh()) as f32);
            }
        }
        logits
    }

    /// For each sequence of `n` tokens, `ln p(t_i | t_<i)` for `i = 1..n` (`n - 1` values),
    /// computed in one prefill of the whole batch.
    pub fn token_logprobs(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        self.token_scores(batch).map(TokenScores::logprobs_of)
    }

    /// [`ReferenceModel::token_logprobs`] with, for each `t_i`, whether it is the argmax of the
    /// logits that predict it (the first largest, on ties).
    pub fn token_scores(&self, batch: &[&[u32]]) -> Result<Vec<TokenScores>> {
        crate::batch::check_scorable(batch)?;
        let mut caches: Vec<KvCache> = batch.iter().map(|_| self.new_cache()).collect();
        let hidden = self.forward(batch, &mut caches)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(batch.len());
        for seq in batch {
            // row j predicts token j + 1
            let rows = hidden.slice(s![start..start + seq.len() - 1, ..]);
            let (logprobs, argmax) = self.scores_of(rows, &seq[1..]);
            out.push(TokenScores::new(logprobs, &argmax, seq));
            start += seq.len();
        }
        Ok(out)
    }

    /// `ln p(targets[r])` and the argmax under the logits of `hidden` row `r`, a chunk of rows
    /// at a time.
    fn scores_of(&self, hidden: ArrayView2<f32>, targets: &[u32]) -> (Vec<f32>, Vec<u32>) {
        let (mut logprobs, mut argmax) = (Vec::with_capacity(targets.len()), Vec::new());
        for (chunk, tgt) in hidden
            .axis_chunks_iter(ndarray::Axis(0), LOGIT_ROWS)
            .zip(targets.chunks(LOGIT_ROWS))
        {
            let logits = self.logits(chunk);
            for (row, &t) in logits.rows().into_iter().zip(tgt) {
                logprobs.push(ops::log_softmax_at(row, t as usize));
                argmax.push(ops::argmax(row) as u32);
            }
        }
        (logprobs, argmax)
    }

    /// Greedy generation: up to `max_new_tokens` new tokens per prompt, stopping a sequence
    /// after it emits `stop` (included in its output). Prompts are prefilled as one batch, then
    /// decoded one token per unfinished sequence per step.
    pub fn generate_greedy(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        stop: Option<u32>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| self.new_cache()).collect();
        let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        if max_new_tokens == 0 {
            return Ok(outputs);
        }
        let hidden = self.forward(prompts, &mut caches)?;
        let mut next = self.argmax_rows(&hidden, &crate::batch::last_rows(prompts));
        // Parallel vectors over the unfinished sequences.
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        for step in 1..=max_new_tokens {
            for (&seq, &tok) in active.iter().zip(&next) {
                outputs[seq].push(tok);
            }
            let keep: Vec<bool> = next
                .iter()
                .zip(&caches)
                .map(|(&t, cache)| {
                    Some(t) != stop
                        && step < max_new_tokens
                        && cache.len() < self.config.max_context()
                })
                .collect();
            let mut flags = keep.iter();
            active.retain(|_| *flags.next().unwrap_or(&false));
            let mut flags = keep.iter();
            caches.retain(|_| *flags.next().unwrap_or(&false));
            let mut flags = keep.iter();
            next.retain(|_| *flags.next().unwrap_or(&false));
            if active.is_empty() {
                break;
            }
            let batch: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
            let hidden = self.forward(&batch, &mut caches)?;
            let rows: Vec<usize> = (0..active.len()).collect();
            next = self.argmax_rows(&hidden, &rows);
        }
        Ok(outputs)
    }

    fn argmax_rows(&self, hidden: &Array2<f32>, rows: &[usize]) -> Vec<u32> {
        let picked = hidden.select(ndarray::Axis(0), rows);
        let logits = self.logits(picked.view());
        logits
            .rows()
            .into_iter()
            .map(|r| ops::argmax(r) as u32)
            .collect()
    }
}

/// Appends each sequence's new keys and values to its cache in `layer`, then runs causal
/// attention of its queries over the whole cache. Returns `[rows, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
fn attend(
    batch: &RaggedBatch,
    q: &Array2<f32>,
    k: &Array2<f32>,
    v: &Array2<f32>,
    caches: &mut [KvCache],
    layer: usize,
    layout: HeadLayout,
    scores: Scores,
) -> Array2<f32> {
    let mut out = Array2::zeros((batch.total_rows(), layout.heads * layout.head_dim));
    for (i, cache) in caches.iter_mut().enumerate() {
        let rows = batch.rows(i);
        let (keys, values) = cache.append(
            layer,
            k.slice(s![rows.clone(), ..]),
            v.slice(s![rows.clone(), ..]),
        );
        let o = causal_attention(
            q.slice(s![rows.clone(), ..]),
            keys,
            values,
            batch.past[i],
            layout,
            scores,
        );
        out.slice_mut(s![rows, ..]).assign(&o);
    }
    out
}

fn load_matrix(spec: &TensorSpec, source: &dyn WeightSource) -> Result<Array2<f32>> {
    let data = spec.load_f32(source)?;
    Ok(Array2::from_shape_vec((spec.shape[0], spec.shape[1]), data).expect("shape checked"))
}

fn load_vector(spec: &TensorSpec, source: &dyn WeightSource) -> Result<Array1<f32>> {
    Ok(Array1::from_vec(spec.load_f32(source)?))
}

fn load_linear(
    weight: &TensorSpec,
    bias: Option<&TensorSpec>,
    source: &dyn WeightSource,
) -> Result<Linear> {
    Ok(Linear {
        weight: load_matrix(weight, source)?,
        bias: bias.map(|b| load_vector(b, source)).transpose()?,
    })
}

impl crate::scorer::Scorer for ReferenceModel {
    fn config(&self) -> &ModelConfig {
        ReferenceModel::config(self)
    }
    fn token_scores(&self, batch: &[&[u32]]) -> Result<Vec<TokenScores>> {
        ReferenceModel::token_scores(self, batch)
    }
}
