//! What every architecture's forward pass shares: a unit's weights as the placer fills them
//! ([`PartSpec`] -> [`PartWeights`]), linear layers over row parts, a batch of rows against its
//! cache slots ([`RowBatch`]), and the [`Runner`]'s arch-free machinery (row chunks, logits).
//!
//! A batch of sequences is laid out as in the CPU reference: their new tokens stacked as rows.
//! The caches of a batch hold every sequence's rows back to back (`first` row and capacity
//! per sequence), so attention reads one cache per layer and new keys and values are appended
//! where each sequence's rows live.

use std::ops::Range;
use std::path::Path;

use crate::arch::ModelConfig;
use crate::batch::PrefixGroup;
use crate::device::{rope_tables, CacheFormat, Device, HostRows, LogitState, RowInfo};
use crate::error::{Error, Result};
use crate::layout::{HeadLayout, RunOptions};
use crate::model::gguf::{GgufFile, GgufValue};
use crate::model::TensorSpec;

/// A linear layer's weight `[out, in]`, as row ranges, and its bias.
#[derive(Clone)]
pub struct Linear<D: Device> {
    /// `(rows of W, first output column)` per part.
    pub parts: Vec<(D::Part, usize)>,
    /// `[1, out]`.
    pub bias: Option<D::Tensor>,
    /// Output features.
    pub out: usize,
}

/// Which tensors make up one part of the schedule's units (the input, a layer's attention or
/// MLP half, the head), as an architecture lists them for the placer: the small tensors kept
/// resident on the device (norm weights and biases, position tables) and the linear weights
/// (each with its optional bias), both in the architecture's own order. `None` marks a tensor
/// this model lacks (OPT's `project_in`), so that positions keep their meaning.
#[derive(Debug, Clone, Default)]
pub struct PartSpec {
    /// An attention part whose rows see only the model's sliding window of keys, rotated by
    /// its local RoPE ([`LocalAttention`]): Gemma's local layers, every layer of Mistral.
    pub sliding: bool,
    /// Small tensors, resident.
    pub vectors: Vec<Option<TensorSpec>>,
    /// Linear weights and their biases, placed by rows over the tiers.
    pub linears: Vec<Option<(TensorSpec, Option<TensorSpec>)>>,
}

impl PartSpec {
    /// The linear weights present, in order.
    pub fn weights(&self) -> impl Iterator<Item = &TensorSpec> {
        self.linears.iter().flatten().map(|(w, _)| w)
    }
}

/// A [`PartSpec`]'s tensors on a device: the same order, the same gaps.
#[derive(Clone)]
pub struct PartWeights<D: Device> {
    /// As [`PartSpec::sliding`].
    pub sliding: bool,
    /// Small tensors (`[1, n]` vectors or `[rows, width]` tables).
    pub vectors: Vec<Option<D::Tensor>>,
    /// Linear layers.
    pub linears: Vec<Option<Linear<D>>>,
}

impl<D: Device> PartWeights<D> {
    /// The linear layers present, in order (the placement's order).
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear<D>> {
        self.linears.iter_mut().flatten()
    }
}

/// Checks a count or size of a configuration: positive, and no larger than any model has
/// (a lying file must not make the process allocate terabytes); `path` names the file.
pub(super) fn bounded(path: &Path, name: &str, v: usize) -> Result<()> {
    let most = match name {
        "num_hidden_layers" | "num_attention_heads" | "num_key_value_heads" => 1 << 14,
        "head_dim" => 1 << 14,
        "hidden_size" | "word_embed_proj_dim" => 1 << 18,
        "intermediate_size" | "ffn_dim" => 1 << 20,
        _ => 1 << 26, // vocab_size, max_position_embeddings
    };
    if v == 0 {
        Err(Error::config(path, format!("`{name}` must be positive")))
    } else if v > most {
        Err(Error::config(
            path,
            format!("`{name}` is {v}, more than any model has (at most {most}): a damaged file?"),
        ))
    } else {
        Ok(())
    }
}

/// The sizes of a decoder's configuration that every architecture checks: each positive and
/// bounded ([`bounded`]), query heads a multiple of key/value heads, heads of an even width
/// (RoPE rotates pairs).
pub(super) struct DecoderSizes {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
}

impl DecoderSizes {
    /// Checks the sizes; `path` names the file in errors.
    pub(super) fn check(&self, path: &Path) -> Result<()> {
        let s = self;
        for (name, v) in [
            ("vocab_size", s.vocab_size),
            ("hidden_size", s.hidden_size),
            ("intermediate_size", s.intermediate_size),
            ("num_hidden_layers", s.num_hidden_layers),
            ("num_attention_heads", s.num_attention_heads),
            ("num_key_value_heads", s.num_key_value_heads),
            ("head_dim", s.head_dim),
            ("max_position_embeddings", s.max_position_embeddings),
        ] {
            bounded(path, name, v)?;
        }
        if !s.num_attention_heads.is_multiple_of(s.num_key_value_heads) {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    s.num_attention_heads, s.num_key_value_heads
                ),
            ));
        }
        if !s.head_dim.is_multiple_of(2) {
            return Err(Error::config(path, "head_dim must be even for RoPE"));
        }
        Ok(())
    }
}

/// A GGUF file's metadata under its architecture's prefix (`llama.*`, `gemma2.*`, ...).
pub(super) struct ArchKeys<'a> {
    pub file: &'a GgufFile,
    pub arch: &'a str,
}

impl ArchKeys<'_> {
    /// `<arch>.<key>`.
    pub(super) fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }
    /// A required count.
    pub(super) fn count(&self, key: &str) -> Result<usize> {
        self.file.require_u64(&self.key(key))
    }
    /// An optional count.
    pub(super) fn optional(&self, key: &str) -> Result<Option<usize>> {
        self.file.optional_u64(&self.key(key))
    }
    /// An optional number (bad when present but not a number).
    pub(super) fn float(&self, key: &str) -> Result<Option<f64>> {
        let key = self.key(key);
        self.file
            .get(&key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| Error::config(self.file.path(), format!("bad metadata `{key}`")))
            })
            .transpose()
    }
    /// A token id of the tokenizer's metadata (`tokenizer.ggml.<name>_token_id`).
    pub(super) fn token_id(&self, name: &str) -> Option<u32> {
        self.file
            .get(&format!("tokenizer.ggml.{name}_token_id"))
            .and_then(GgufValue::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }
    /// The vocabulary: the rows of `token_embd.weight`, whose width must be `hidden`.
    pub(super) fn vocabulary(&self, hidden: usize) -> Result<usize> {
        let path = self.file.path();
        let embed =
            self.file
                .tensor_shape("token_embd.weight")
                .ok_or_else(|| Error::MissingTensor {
                    path: path.to_path_buf(),
                    name: "token_embd.weight".into(),
                })?;
        if embed.len() != 2 || embed[1] != hidden {
            return Err(Error::config(
                path,
                format!("`token_embd.weight` has shape {embed:?}, not [vocabulary, {hidden}]"),
            ));
        }
        Ok(embed[0])
    }
}

/// The error for a part whose tensors are not what its architecture lists: a bug, not a user's.
pub(super) fn malformed(what: &str) -> Error {
    Error::invalid(
        "model",
        format!("{what}: the weights do not match the architecture's list"),
    )
}

/// One unit's weights, ready to compute with.
#[derive(Clone)]
pub enum UnitWeights<D: Device> {
    /// The input (the embedding lookup itself happens before, on the host).
    Embed(PartWeights<D>),
    /// A layer's attention half.
    Attention(PartWeights<D>),
    /// A layer's MLP half.
    Mlp(PartWeights<D>),
    /// A whole layer: its attention half, then its MLP half.
    Layer(PartWeights<D>, PartWeights<D>),
    /// The head: what turns the last layer's output into the rows the output projection reads.
    Head(PartWeights<D>),
    /// The rows of the output projection that hold output columns `cols` (a panel of the
    /// vocabulary, or all of it).
    Logits(Linear<D>, Range<usize>),
}

impl<D: Device> UnitWeights<D> {
    /// The linear layers, in a fixed order (the placement's order).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear<D>> {
        match self {
            UnitWeights::Embed(p)
            | UnitWeights::Attention(p)
            | UnitWeights::Mlp(p)
            | UnitWeights::Head(p) => p.linears_mut().collect(),
            UnitWeights::Layer(a, m) => a.linears_mut().chain(m.linears_mut()).collect(),
            UnitWeights::Logits(o, _) => vec![o],
        }
    }
}

/// Where one sequence's new tokens go in a cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSlot<'a> {
    /// The sequence's first cache row.
    pub first: usize,
    /// Rows it may hold.
    pub capacity: usize,
    /// Rows it holds already.
    pub filled: usize,
    /// When the new tokens are a prefix group of several members (into an empty slot): its
    /// layout, which sets each row's position and the keys it sees.
    pub group: Option<&'a PrefixGroup>,
}

impl CacheSlot<'_> {
    /// A slot of one sequence.
    pub fn new(first: usize, capacity: usize, filled: usize) -> Self {
        Self {
            first,
            capacity,
            filled,
            group: None,
        }
    }
}

/// The rows of one forward call: new tokens of several sequences, stacked, with where each
/// sequence's keys and values live in the cache.
pub struct RowBatch<D: Device> {
    /// Rows.
    pub rows: usize,
    /// The host side.
    pub host: HostRows,
    /// `(first new row, first cache row, rows)` per sequence.
    pub appends: Vec<(usize, usize, usize)>,
    /// The device side.
    pub dev: D::Rows,
    /// The same rows as sliding-window layers see them ([`LocalAttention`]), when the model
    /// has such layers.
    pub local: Option<Box<RowBatch<D>>>,
}

impl<D: Device> RowBatch<D> {
    /// The rows as `part` attends with them: the local ones for a sliding-window layer.
    pub fn for_part(&self, part: &PartWeights<D>) -> &RowBatch<D> {
        match (&self.local, part.sliding) {
            (Some(local), true) => local,
            _ => self,
        }
    }
}

/// How a model's sliding-window layers attend: a query sees its own key and the `window - 1`
/// before it, rotated by `inv_freq` (Gemma 3's local RoPE base) or by the model's RoPE.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAttention {
    /// Keys a query sees, its own included.
    pub window: usize,
    /// RoPE's inverse frequencies on these layers (`None`: the model's own).
    pub inv_freq: Option<Vec<f64>>,
}

/// A model's recipe on a device: the configuration, options and sizes. The machinery every
/// architecture shares is here (row batches, chunking, linears, logits); the methods per unit
/// (input, attention, MLP, head) are in `arch/mod.rs`, which hands each to its architecture.
#[derive(Clone)]
pub struct Runner<D: Device> {
    /// The device.
    pub dev: D,
    /// Weight and cache formats.
    pub options: RunOptions,
    /// The model.
    pub config: ModelConfig,
    /// Rows of logits computed at once (`rows x vocab` floats of workspace).
    pub logit_rows: usize,
    /// Rows of a batch one unit computes at once: longer prompts run in chunks of this many
    /// rows (query tiles for attention, row chunks for the MLP, input and head), so that the
    /// intermediate tensors are bounded by it whatever the record's length.
    pub chunk_rows: usize,
    /// Attention heads of the model.
    pub(super) heads: HeadLayout,
    /// RoPE's inverse frequencies when the architecture rotates queries and keys (`None`:
    /// learned or no positions).
    pub(super) rope: Option<Vec<f64>>,
    /// How sliding-window layers attend, when the model has them.
    pub(super) local: Option<LocalAttention>,
    /// Attention scores soft-capped at this (Gemma 2).
    pub(super) attn_softcap: Option<f32>,
    /// Logits soft-capped at this (Gemma 2).
    pub(super) logit_softcap: Option<f32>,
}

impl<D: Device> Runner<D> {
    /// Attention heads of the model.
    pub fn head_layout(&self) -> HeadLayout {
        self.heads
    }

    /// How cache rows are stored.
    pub fn cache_format(&self) -> CacheFormat {
        CacheFormat::new(self.heads, self.options)
    }

    /// An empty cache of `rows` rows for one layer.
    pub fn layer_cache(&self, rows: usize) -> Result<D::Cache> {
        self.dev.cache(self.cache_format(), rows.max(1))
    }

    /// Bytes per cached token of one layer in each cache segment.
    pub fn cache_segment_bytes(&self) -> Vec<u64> {
        self.cache_format().segment_bytes()
    }

    /// Bytes per cached token of one layer.
    pub fn cache_bytes_per_row(&self) -> u64 {
        self.cache_format().row_bytes()
    }

    /// Checks a batch of new tokens against their cache slots and prepares the per-row data.
    pub fn row_batch(&self, batch: &[&[u32]], slots: &[CacheSlot<'_>]) -> Result<RowBatch<D>> {
        let vocab = self.config.vocab_size();
        let mut host = HostRows::default();
        let mut appends = Vec::new();
        for (seq, slot) in batch.iter().zip(slots) {
            if seq.is_empty() && slot.filled > 0 {
                // a sequence that stopped generating: no rows this step
                appends.push((host.ids.len(), slot.first + slot.filled, 0));
                continue;
            }
            if seq.is_empty() {
                return Err(Error::SequenceTooShort {
                    len: 0,
                    needed: 1,
                    what: "run the model",
                });
            }
            // per new row: its position and the earlier rows it does not see
            let places: Vec<(usize, Range<usize>)> = match slot.group {
                Some(g) if g.branches.len() > 1 => {
                    if slot.filled > 0 || g.tokens[..] != seq[..] {
                        return Err(Error::invalid(
                            "batch",
                            "a prefix group's rows go into an empty cache slot, all at once",
                        ));
                    }
                    g.row_places()
                }
                _ => (slot.filled..slot.filled + seq.len())
                    .map(|p| (p, 0..0))
                    .collect(),
            };
            let last = places.iter().map(|p| p.0 + 1).max().unwrap_or(0);
            let max = self.config.max_context();
            if slot.filled + seq.len() > slot.capacity || last > max {
                return Err(Error::SequenceTooLong {
                    len: last.max(slot.filled + seq.len()),
                    max: slot.capacity.min(max),
                });
            }
            appends.push((host.ids.len(), slot.first + slot.filled, seq.len()));
            for (i, (&t, (position, skip))) in seq.iter().zip(places).enumerate() {
                if t as usize >= vocab {
                    return Err(Error::TokenOutOfRange {
                        token: t,
                        position,
                        vocab_size: vocab,
                    });
                }
                host.ids.push(t);
                host.positions.push(position as u32);
                host.infos.push(RowInfo {
                    first: slot.first as u32,
                    visible: (slot.filled + i + 1) as u32,
                    skip_from: skip.start as u32,
                    skip_to: skip.end as u32,
                });
            }
        }
        self.finish_rows(host, appends)
    }

    /// Adds the RoPE tables and the device side, and the rows as sliding-window layers see
    /// them.
    fn finish_rows(
        &self,
        host: HostRows,
        appends: Vec<(usize, usize, usize)>,
    ) -> Result<RowBatch<D>> {
        let local = match &self.local {
            Some(l) => Some(Box::new(self.local_rows(l, &host, appends.clone())?)),
            None => None,
        };
        self.on_device(host, appends, self.rope.as_ref(), local)
    }

    /// `host` with its RoPE tables (of `inv_freq`) and soft-cap, and its device side.
    fn on_device(
        &self,
        mut host: HostRows,
        appends: Vec<(usize, usize, usize)>,
        inv_freq: Option<&Vec<f64>>,
        local: Option<Box<RowBatch<D>>>,
    ) -> Result<RowBatch<D>> {
        if let Some(inv_freq) = inv_freq {
            host.rope = Some(rope_tables(&host.positions, inv_freq));
        }
        host.softcap = self.attn_softcap;
        Ok(RowBatch {
            rows: host.ids.len(),
            dev: self.dev.rows(&host)?,
            host,
            appends,
            local,
        })
    }

    /// The rows of `global` as a sliding-window layer sees them: the keys before
    /// `visible - window` out of sight, rotated by the layer's RoPE.
    fn local_rows(
        &self,
        local: &LocalAttention,
        global: &HostRows,
        appends: Vec<(usize, usize, usize)>,
    ) -> Result<RowBatch<D>> {
        let mut host = global.clone();
        for info in &mut host.infos {
            let cut = info.visible.saturating_sub(local.window as u32);
            if cut > 0 && info.skip_from < info.skip_to {
                return Err(Error::NotBuilt {
                    what: "prefix groups with a sliding window".into(),
                });
            }
            if cut > 0 {
                (info.skip_from, info.skip_to) = (0, cut);
            }
        }
        let inv_freq = local.inv_freq.as_ref().or(self.rope.as_ref());
        self.on_device(host, appends, inv_freq, None)
    }

    /// Rows `range` of a batch as a batch of their own: the same tokens, positions and cache
    /// rows, each sequence's appends cut to the rows inside the range.
    pub fn chunk(&self, rb: &RowBatch<D>, range: Range<usize>) -> Result<RowBatch<D>> {
        let appends = rb
            .appends
            .iter()
            .filter_map(|&(row, at, n)| {
                let (lo, hi) = (row.max(range.start), (row + n).min(range.end));
                (lo < hi).then(|| (lo - range.start, at + (lo - row), hi - lo))
            })
            .collect();
        let host = HostRows {
            ids: rb.host.ids[range.clone()].to_vec(),
            positions: rb.host.positions[range.clone()].to_vec(),
            infos: rb.host.infos[range].to_vec(),
            rope: None,
            softcap: rb.host.softcap,
        };
        self.finish_rows(host, appends)
    }

    /// Runs `f` on row chunks of at most [`Runner::chunk_rows`] rows of `x` (with their row
    /// range), in order, so that a unit's intermediate tensors are bounded by the chunk, not
    /// by the batch. Chunks go back into `x` when `f` keeps the width, else into a new tensor.
    /// Attention stays causal: a chunk appends its keys and values to the cache before it
    /// attends, and later chunks see them there.
    pub(super) fn by_chunks(
        &self,
        x: D::Tensor,
        f: impl Fn(D::Tensor, Range<usize>) -> Result<D::Tensor>,
    ) -> Result<D::Tensor> {
        let [rows, width] = self.dev.dims(&x);
        if rows <= self.chunk_rows.max(1) {
            return f(x, 0..rows);
        }
        let mut out: Option<D::Tensor> = None;
        for range in crate::layout::passes(rows, self.chunk_rows) {
            let part = self.dev.zeros(range.len(), width)?;
            self.dev.copy_rows(&x, range.clone(), &part, 0)?;
            let y = f(part, range.clone())?;
            let y_width = self.dev.dims(&y)[1];
            let dest = match &out {
                Some(t) => t,
                None => out.insert(if y_width == width {
                    x.clone()
                } else {
                    self.dev.zeros(rows, y_width)?
                }),
            };
            self.dev.copy_rows(&y, 0..range.len(), dest, range.start)?;
        }
        out.ok_or_else(|| Error::invalid("model", "no rows"))
    }

    /// RMSNorm of each head of `x [rows, heads * head_dim]` with the one weight
    /// `w [head_dim]`: the rows seen as `[rows * heads, head_dim]`, normalized, seen back.
    pub(super) fn head_norm(&self, x: &D::Tensor, w: &D::Tensor, eps: f32) -> Result<D::Tensor> {
        let [rows, width] = self.dev.dims(x);
        let d = self.heads.head_dim.max(1);
        let heads = self.dev.reshape(x, rows * width / d, d)?;
        let normed = self.dev.rms_norm(&heads, w, eps)?;
        self.dev.reshape(&normed, rows, width)
    }

    /// `x W^T + b`.
    pub fn linear(&self, x: &D::Tensor, l: &Linear<D>) -> Result<D::Tensor> {
        let y = self.dev.linear(x, &l.parts, l.out)?;
        if let Some(b) = &l.bias {
            self.dev.add_bias(&y, b)?;
        }
        Ok(y)
    }

    /// Folds the logits of output columns `cols` (the rows of `output` that hold them) into
    /// `states`, one per row of `row_ids` of `hidden`, [`Runner::logit_rows`] rows at a time:
    /// a vocabulary panel of the streamed output projection, or all of it.
    pub fn fold_logits(
        &self,
        output: &Linear<D>,
        cols: Range<usize>,
        hidden: &D::Tensor,
        row_ids: &[usize],
        targets: Option<&[u32]>,
        states: &mut [LogitState],
    ) -> Result<()> {
        let rows = self.dev.dims(hidden)[0];
        let vocab = self.config.vocab_size();
        if output.bias.is_some() {
            return Err(Error::NotBuilt {
                what: "an output projection with a bias".into(),
            });
        }
        if states.len() != row_ids.len() || targets.is_some_and(|t| t.len() != row_ids.len()) {
            return Err(Error::invalid("logits", "one state and target per row"));
        }
        if let Some(&bad) = targets
            .into_iter()
            .flatten()
            .find(|&&t| t as usize >= vocab)
        {
            return Err(Error::TokenOutOfRange {
                token: bad,
                position: 0,
                vocab_size: vocab,
            });
        }
        if let Some(&bad) = row_ids.iter().find(|&&r| r >= rows) {
            return Err(Error::invalid(
                "logits",
                format!("row {bad} of {rows} hidden rows"),
            ));
        }
        let per = self.logit_rows.max(1);
        for (ci, chunk) in row_ids.chunks(per).enumerate() {
            let at = ci * per..ci * per + chunk.len();
            // the chunk's rows, gathered on the device (unless they are all of them, in order)
            let picked;
            let whole = chunk.len() == rows && chunk.iter().enumerate().all(|(i, &r)| i == r);
            let h = if whole {
                hidden
            } else {
                let ids: Vec<u32> = chunk.iter().map(|&r| r as u32).collect();
                picked = self.dev.gather(hidden, &ids)?;
                &picked
            };
            self.dev.fold_logits(
                h,
                &output.parts,
                cols.clone(),
                targets.map(|t| &t[at.clone()]),
                self.logit_softcap,
                &mut states[at],
            )?;
        }
        Ok(())
    }

    /// `ln p(target)` and the argmax token per row of `row_ids` of `hidden`, over the whole
    /// vocabulary.
    pub fn target_scores(
        &self,
        output: &Linear<D>,
        hidden: &D::Tensor,
        row_ids: &[usize],
        targets: &[u32],
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let mut states = vec![LogitState::EMPTY; row_ids.len()];
        let vocab = 0..self.config.vocab_size();
        self.fold_logits(output, vocab, hidden, row_ids, Some(targets), &mut states)?;
        Ok(states
            .iter()
            .map(|s| (s.target_logprob(), s.greedy().0))
            .unzip())
    }

    /// The logits of output columns `cols` (a panel: `output` holds exactly those rows of the
    /// projection) for rows `row_ids` of `hidden`, on the host, `[row_ids.len(), cols.len()]`.
    pub fn logits(
        &self,
        output: &Linear<D>,
        cols: Range<usize>,
        hidden: &D::Tensor,
        row_ids: &[usize],
    ) -> Result<Vec<f32>> {
        let ids: Vec<u32> = row_ids.iter().map(|&r| r as u32).collect();
        let h = self.dev.gather(hidden, &ids)?;
        // the parts' columns, counted from the panel's first
        let parts: Vec<(D::Part, usize)> = output
            .parts
            .iter()
            .map(|(p, c)| (p.clone(), c - cols.start))
            .collect();
        let y = self.dev.linear(&h, &parts, cols.len())?;
        let mut logits = self.dev.download(&y, 0..row_ids.len())?;
        if let Some(cap) = self.logit_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        Ok(logits)
    }

    /// The greedy token and its logprob per row of `row_ids` of `hidden`.
    pub fn greedy(
        &self,
        output: &Linear<D>,
        hidden: &D::Tensor,
        row_ids: &[usize],
    ) -> Result<Vec<(u32, f32)>> {
        let mut states = vec![LogitState::EMPTY; row_ids.len()];
        let vocab = 0..self.config.vocab_size();
        self.fold_logits(output, vocab, hidden, row_ids, None, &mut states)?;
        Ok(states.iter().map(LogitState::greedy).collect())
    }
}

/// A model's tensors grouped as the schedule's units use them: what the placer places, the
/// planner sizes and the runner computes with, listed by the model's architecture.
#[derive(Debug, Clone)]
pub struct ModelParts {
    /// What turns embedded tokens into the first layer's input.
    pub input: PartSpec,
    /// Per decoder layer: its attention half, then its MLP half.
    pub layers: Vec<[PartSpec; 2]>,
    /// What turns the last layer's output into the rows the output projection reads.
    pub head: PartSpec,
    /// The output projection `[vocab, width]` (streamed in vocabulary panels).
    pub output: TensorSpec,
    /// The embedding table `[vocab, width]` (looked up on the host).
    pub embedding: TensorSpec,
}

impl ModelParts {
    /// Every tensor, each once: the embedding, the parts' vectors, weights and biases in
    /// order, and the output projection when it is not the embedding.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = vec![self.embedding.clone()];
        let parts = std::iter::once(&self.input)
            .chain(self.layers.iter().flatten())
            .chain(std::iter::once(&self.head));
        for part in parts {
            out.extend(part.vectors.iter().flatten().cloned());
            for (w, b) in part.linears.iter().flatten() {
                out.push(w.clone());
                out.extend(b.clone());
            }
        }
        if self.output.name != self.embedding.name {
            out.push(self.output.clone());
        }
        out
    }
}
