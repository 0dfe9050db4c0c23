//! What the executor holds: for the engine's lifetime ([`Executor`]: the model's recipe and
//! placed weights, the policy, the ledger, weight slots) and for one block ([`BlockState`]: its
//! GPU batches, their activations and KV cache cells, the block's files). The operations on
//! them live beside: `executor` (steps and compute), `activations`, `cache`.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::trace::Trace;
use super::weights::{PlacedModel, WeightSlot};
use crate::arch::{RowBatch, Runner};
use crate::batch::PrefixGroup;
use crate::device::{Device, LogitState};
use crate::policy::Policy;
use crate::sampling::{Decoding, FinishReason};
use crate::schedule::ZigzagPlan;
use crate::storage::offload::{OffloadFile, StagingPool};
use crate::storage::{MemoryLedger, Reservation, RowSplit};

/// What a block computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `ln p(t_i | t_<i)` of every token after the first.
    Score,
    /// Greedy generation of this many new tokens per sequence.
    Generate(usize),
}

/// One sequence's result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeqResult {
    /// Scoring: one logprob per token after the first. Generation: the logprob of each new
    /// token (under the model's distribution, before temperature and filtering).
    pub logprobs: Vec<f32>,
    /// Generation: the new tokens. Scoring: the argmax token at each scored position.
    pub tokens: Vec<u32>,
    /// Generation: why it stopped.
    pub finish: Option<FinishReason>,
}

/// What a generating block needs per sequence: how to choose its tokens and when to stop.
#[derive(Clone, Copy)]
pub(crate) struct GenControl<'a> {
    /// One per sequence of the call.
    pub decoding: &'a [Decoding],
    /// The call's index of the block's first sequence.
    pub first: usize,
    /// Whether the caller's stop condition holds for sequence `i` of the call, given its new
    /// tokens so far.
    pub stop: &'a (dyn Fn(usize, &[u32]) -> bool + Sync),
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One GPU batch of the block.
pub(super) struct Batch<D: Device> {
    /// Sequence indices in the block (a prefix group counts as one sequence: its rows run
    /// together and stay together on a tier).
    pub(super) seqs: Range<usize>,
    /// Tokens so far per sequence (prompt, then generated), with their layout.
    pub(super) groups: Vec<PrefixGroup>,
    /// Cache capacity per sequence; the cache holds sequences back to back.
    pub(super) capacity: Vec<usize>,
    pub(super) rows: Option<RowBatch<D>>,
    pub(super) x: Option<Activation<D>>,
    /// Per row that reads the logits: the vocabulary panels folded so far.
    pub(super) logits: Vec<LogitState>,
    /// Generation: per sampled row, its logits so far (the panels' columns in order), and
    /// their bytes on the ledger.
    pub(super) sampled: Vec<Vec<f32>>,
    pub(super) sampled_held: Option<Reservation>,
    /// Generation: the sequences that stopped (they add no more rows).
    pub(super) done: Vec<bool>,
    /// One per member of each group, in order.
    pub(super) results: Vec<SeqResult>,
}

impl<D: Device> Batch<D> {
    pub(super) fn firsts(&self) -> Vec<usize> {
        self.capacity
            .iter()
            .scan(0, |acc, &c| {
                let f = *acc;
                *acc += c;
                Some(f)
            })
            .collect()
    }

    /// Per sequence: `(first cache row, rows cached before token step `token`, rows it adds)`.
    /// The prefill adds the prompt; decode token `t` adds one row at `prompt + t - 1`, none
    /// once the sequence has stopped. (The prompt is what the sequence has beyond its
    /// generated tokens: both grow together under the batch's lock, so this holds whichever
    /// operation asks.)
    pub(super) fn cache_rows(&self, token: usize) -> Vec<(usize, usize, usize)> {
        self.firsts()
            .into_iter()
            .enumerate()
            .map(|(i, first)| {
                // (generation: one member per group)
                let prompt = self.groups[i].len() - self.results[i].tokens.len();
                if token == 0 {
                    (first, 0, prompt)
                } else {
                    (first, prompt + token - 1, usize::from(!self.done[i]))
                }
            })
            .collect()
    }

    /// The new tokens of token step `token`.
    pub(super) fn new_tokens(&self, token: usize) -> Vec<&[u32]> {
        self.groups
            .iter()
            .zip(self.cache_rows(token))
            // (a stopped sequence has no new tokens, and its tokens stopped growing)
            .map(|(g, (_, before, new))| match new {
                0 => &[][..],
                _ => &g.tokens[before..before + new],
            })
            .collect()
    }
}

/// Everything a block's operations touch, each behind its own lock so that operations on
/// different batches, layers or weight slots run at the same time.
pub(super) struct BlockState<'a, D: Device> {
    pub(super) exec: &'a Executor<D>,
    pub(super) plan: ZigzagPlan,
    pub(super) task: Task,
    /// Generation: choosing and stopping.
    pub(super) control: Option<GenControl<'a>>,
    pub(super) batches: Vec<Mutex<Batch<D>>>,
    /// `[cache layer][batch]`.
    pub(super) caches: Vec<Vec<Mutex<CacheCell<D>>>>,
    pub(super) act_split: RowSplit,
    pub(super) act_file: Option<OffloadFile>,
    pub(super) act_extent: Vec<u64>,
    pub(super) cache_file: Option<OffloadFile>,
}

/// Runs plans over a placed model.
pub(crate) struct Executor<D: Device> {
    pub runner: Runner<D>,
    pub model: PlacedModel<D>,
    pub policy: Policy,
    pub ledger: Arc<MemoryLedger>,
    pub staging: StagingPool,
    /// Threads reading one unit's disk pieces.
    pub io_threads: usize,
    pub slots: [Mutex<WeightSlot<D>>; 4],
    pub offload_dir: Option<std::path::PathBuf>,
    pub trace: Option<Mutex<Trace>>,
}

/// The hidden rows of one batch between units.
pub(super) enum Activation<D: Device> {
    /// All rows on the GPU.
    Gpu(D::Tensor, Reservation),
    /// Rows split by sequence: the first rows on the GPU, then RAM, then the activation file.
    Parked {
        width: usize,
        rows: [usize; 3],
        gpu: Option<D::Tensor>,
        cpu: Vec<f32>,
        _held: Vec<Reservation>,
    },
}

/// One layer's cache for one batch: sequences on the GPU keep their rows in `gpu`; the
/// others' rows live in RAM or the cache file and are brought into `working` for a step.
pub(super) struct CacheCell<D: Device> {
    /// Sequences per tier (within the batch, in order).
    pub(super) split: RowSplit,
    pub(super) gpu: Option<D::Cache>,
    /// RAM rows per segment (as words, so they view as f32 without copying).
    pub(super) cpu: Vec<Vec<u32>>,
    /// With attention on the CPU: the disk sequences' rows, read for one decode step.
    pub(super) disk_host: Option<(Vec<Vec<u32>>, Reservation)>,
    pub(super) working: Option<(D::Cache, Option<Reservation>)>,
    pub(super) _held: Vec<Reservation>,
    /// Byte offset of this cell's disk rows in the cache file, per segment.
    pub(super) disk: Vec<u64>,
}
