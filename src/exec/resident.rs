//! [`ResidentModel`]: every weight of a model on one device, with per-layer KV caches there;
//! the recipe ([`Runner`]) run unit by unit, as the executor does with streamed weights.
//! [`GpuModel`] is one on the WebGPU device.

use super::placer::Placer;
use super::weights::LookupTable;
use crate::arch::{CacheSlot, Linear, Runner, UnitWeights};
use crate::arch::{ModelConfig, ModelFiles};
use crate::batch::TokenScores;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, WgpuDevice};
use crate::layout::{RunOptions, WeightFormat};
use crate::storage::offload::AlignedBuf;
use crate::storage::MemoryLedger;
use crate::tier::TierSplit;

/// Per-layer KV caches of one batch on the device.
pub struct ResidentCache<D: Device> {
    layers: Vec<D::Cache>,
    /// `(first row, capacity, rows filled)` per sequence.
    slots: Vec<(usize, usize, usize)>,
}

impl<D: Device> ResidentCache<D> {
    /// Rows cached for each sequence.
    pub fn lens(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.2).collect()
    }
}

/// A model resident on a device.
pub struct ResidentModel<D: Device> {
    runner: Runner<D>,
    /// The embedding table for lookups (host RAM, the file's format).
    table: LookupTable,
    /// The units in order: input, layers, output.
    units: Vec<UnitWeights<D>>,
}

impl<D: Device> ResidentModel<D> {
    /// Places every weight of an opened model on `dev`, linear weights in `options.weights`
    /// (norms and biases f32; the embedding table for lookups stays in RAM as stored).
    pub fn new(dev: D, files: &ModelFiles, options: RunOptions) -> Result<Self> {
        let ledger = MemoryLedger::new(u64::MAX, u64::MAX, 0);
        let placed = Placer {
            dev: &dev,
            files,
            format: options.weights,
            split: TierSplit {
                gpu: 1.0,
                cpu: 0.0,
                disk: 0.0,
            },
            sep_layer: false,
            logit_panels: 1,
            ledger: &ledger,
            offload_dir: None,
            keep_offload: false,
        }
        .place()?;
        dev.wait()?;
        let units = placed
            .units
            .into_iter()
            .map(|u| {
                if u.linears.iter().any(|l| l.streamed().next().is_some()) {
                    Err(Error::invalid(
                        "placement",
                        "a resident model streams nothing",
                    ))
                } else {
                    Ok(u.template)
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            runner: Runner::new(dev, &files.config, options),
            table: placed.table,
            units,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.runner.dev
    }

    /// Computes at most `rows` rows of a batch at once (prompts longer than that run in
    /// chunks; the default is 512). Bounds the intermediate tensors, not the results.
    pub fn set_chunk_rows(&mut self, rows: usize) {
        self.runner.chunk_rows = rows.max(1);
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.runner.config
    }

    /// The weight format in use.
    pub fn weight_format(&self) -> WeightFormat {
        self.runner.options.weights
    }

    /// An empty cache for sequences that will hold at most `capacities[i]` tokens.
    pub fn new_cache(&self, capacities: &[usize]) -> Result<ResidentCache<D>> {
        let total: usize = capacities.iter().sum();
        let mut slots = Vec::with_capacity(capacities.len());
        let mut first = 0;
        for &cap in capacities {
            slots.push((first, cap, 0));
            first += cap;
        }
        let layers = (0..self.config().num_layers())
            .map(|_| self.runner.layer_cache(total))
            .collect::<Result<_>>()?;
        Ok(ResidentCache { layers, slots })
    }

    /// Runs each sequence's new tokens (`batch[i]`, appended to sequence `i` of `cache`) and
    /// returns the final hidden states of all new rows, stacked.
    pub fn forward(&self, batch: &[&[u32]], cache: &mut ResidentCache<D>) -> Result<D::Tensor> {
        if batch.len() != cache.slots.len() {
            return Err(Error::invalid("cache", "one cache slot per sequence"));
        }
        let slots: Vec<usize> = (0..batch.len()).collect();
        self.forward_slots(batch, cache, &slots)
    }

    /// [`ResidentModel::forward`] for sequences `slots[i]` of the cache only (`batch[i]`
    /// continues sequence `slots[i]`): the others stay as they are.
    pub fn forward_slots(
        &self,
        batch: &[&[u32]],
        cache: &mut ResidentCache<D>,
        slots: &[usize],
    ) -> Result<D::Tensor> {
        if slots.iter().any(|&s| s >= cache.slots.len()) || slots.len() != batch.len() {
            return Err(Error::invalid(
                "cache",
                "batch rows name slots the cache lacks",
            ));
        }
        let homes: Vec<CacheSlot> = slots
            .iter()
            .map(|&s| {
                let (first, capacity, filled) = cache.slots[s];
                CacheSlot::new(first, capacity, filled)
            })
            .collect();
        let r = &self.runner;
        let rb = r.row_batch(batch, &homes)?;
        let mut staging = AlignedBuf::new(4096);
        let e = self.table.gather(&rb.host.ids, None, &mut staging)?;
        let width = e.len() / rb.rows.max(1);
        let mut x = r.dev.upload_owned(e, rb.rows, width)?;
        let mut layer = 0;
        for unit in &self.units {
            x = match unit {
                UnitWeights::Embed(w) => r.input(w, x, &rb)?,
                UnitWeights::Layer(a, m) => {
                    let y = r.attention(a, x, &cache.layers[layer], &rb)?;
                    layer += 1;
                    r.mlp(m, y)?
                }
                UnitWeights::Head(h) => r.head(h, x)?,
                UnitWeights::Logits(..) => x,
                UnitWeights::Attention(_) | UnitWeights::Mlp(_) => {
                    return Err(Error::invalid(
                        "model",
                        "a resident model runs whole layers",
                    ))
                }
            };
        }
        for (&slot, seq) in slots.iter().zip(batch) {
            cache.slots[slot].2 += seq.len();
        }
        Ok(x)
    }

    fn output(&self) -> Result<&Linear<D>> {
        match self.units.last() {
            Some(UnitWeights::Logits(o, _)) => Ok(o),
            _ => Err(Error::invalid("model", "no output unit")),
        }
    }

    /// `ln p(targets[i])` and the argmax token under the logits of row `rows[i]` of `hidden`
    /// (from [`ResidentModel::forward`]).
    pub fn target_scores(
        &self,
        hidden: &D::Tensor,
        rows: &[usize],
        targets: &[u32],
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        self.runner
            .target_scores(self.output()?, hidden, rows, targets)
    }

    /// For each sequence of `n >= 2` tokens, `ln p(t_i | t_<i)` for `i = 1..n`.
    pub fn token_logprobs(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        self.token_scores(batch).map(TokenScores::logprobs_of)
    }

    /// For each sequence of `n >= 2` tokens, `ln p(t_i | t_<i)` for `i = 1..n` and whether
    /// each `t_i` is the greedy choice.
    pub fn token_scores(&self, batch: &[&[u32]]) -> Result<Vec<TokenScores>> {
        crate::batch::check_scorable(batch)?;
        let mut cache = self.new_cache(&batch.iter().map(|s| s.len()).collect::<Vec<_>>())?;
        let hidden = self.forward(batch, &mut cache)?;
        let (rows, targets) = crate::batch::scoring_rows(batch);
        let (logprobs, argmax) = self.target_scores(&hidden, &rows, &targets)?;
        let logprobs = crate::batch::split_per_sequence(&logprobs, batch);
        let argmax = crate::batch::split_per_sequence(&argmax, batch);
        Ok(logprobs
            .into_iter()
            .zip(&argmax)
            .zip(batch)
            .map(|((lp, am), seq)| TokenScores::new(lp, am, seq))
            .collect())
    }

    /// Greedy generation of up to `max_new_tokens` per prompt, stopping a sequence after `stop`.
    pub fn generate_greedy(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        stop: Option<u32>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut outputs = vec![Vec::new(); prompts.len()];
        if max_new_tokens == 0 {
            return Ok(outputs);
        }
        let max_context = self.config().max_context();
        let caps: Vec<usize> = prompts
            .iter()
            .map(|p| (p.len() + max_new_tokens).min(max_context))
            .collect();
        let mut cache = self.new_cache(&caps)?;
        let hidden = self.forward(prompts, &mut cache)?;
        let output = self.output()?;
        let first = self
            .runner
            .greedy(output, &hidden, &crate::batch::last_rows(prompts))?;
        let mut next: Vec<u32> = first.iter().map(|g| g.0).collect();
        let mut done = vec![false; prompts.len()];
        for step in 1..=max_new_tokens {
            for (i, &t) in next.iter().enumerate() {
                if !done[i] {
                    outputs[i].push(t);
                    done[i] = Some(t) == stop
                        || step == max_new_tokens
                        || cache.slots[i].2 >= cache.slots[i].1;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let live: Vec<usize> = (0..prompts.len()).filter(|&i| !done[i]).collect();
            let tokens: Vec<[u32; 1]> = live.iter().map(|&i| [next[i]]).collect();
            let batch: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
            let hidden = self.forward_slots(&batch, &mut cache, &live)?;
            let ids = self
                .runner
                .greedy(output, &hidden, &(0..live.len()).collect::<Vec<_>>())?;
            for (j, &i) in live.iter().enumerate() {
                next[i] = ids[j].0;
            }
        }
        Ok(outputs)
    }
}

impl<D: Device> crate::scorer::Scorer for ResidentModel<D> {
    fn config(&self) -> &ModelConfig {
        &self.runner.config
    }
    fn token_scores(&self, batch: &[&[u32]]) -> Result<Vec<TokenScores>> {
        ResidentModel::token_scores(self, batch)
    }
}

/// A model resident on the WebGPU device.
pub type GpuModel = ResidentModel<WgpuDevice>;

impl ResidentModel<WgpuDevice> {
    /// Uploads every weight of an opened model, linear weights in `options.weights` (norms
    /// and biases are f32; embedding lookups read the table from RAM).
    pub fn load(ctx: GpuContext, files: &ModelFiles, options: RunOptions) -> Result<Self> {
        Self::new(WgpuDevice::new(ctx)?, files, options)
    }

    /// The WebGPU context.
    pub fn context(&self) -> &GpuContext {
        self.device().context()
    }
}
