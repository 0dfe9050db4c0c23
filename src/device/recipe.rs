//! The Llama and OPT forward pass, written once over [`Device`]: one method per unit of the
//! schedule (input, attention, MLP, head, logits), with the unit's weights passed in, so the
//! same code runs resident models ([`crate::exec::ResidentModel`]) and streamed ones
//! (`crate::exec`) on every device.
//!
//! A batch of sequences is laid out as in the CPU reference: their new tokens stacked as rows.
//! The caches of a batch hold every sequence's rows back to back (`first` row and capacity
//! per sequence), so attention reads one cache per layer and new keys and values are appended
//! where each sequence's rows live.

use std::ops::Range;

use super::{CacheFormat, Device, HostRows, LogitState, RowInfo};
use crate::batch::PrefixGroup;
use crate::error::{Error, Result};
use crate::layout::{HeadLayout, RunOptions, CHUNK_ROWS, LOGIT_ROWS};
use crate::model::opt::{LAYER_NORM_EPS, POSITION_OFFSET};
use crate::model::ModelConfig;

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

/// OPT's LayerNorm parameters (`[1, width]` each).
#[derive(Clone)]
pub struct OptNorm<D: Device> {
    /// Scale.
    pub weight: D::Tensor,
    /// Shift.
    pub bias: D::Tensor,
}

/// The attention half of a layer: norm, projections.
#[derive(Clone)]
pub enum AttnWeights<D: Device> {
    /// RMSNorm, then q, k, v (RoPE on q and k) and o.
    Llama {
        /// RMSNorm weight.
        norm: D::Tensor,
        /// Query projection.
        q: Linear<D>,
        /// Key projection.
        k: Linear<D>,
        /// Value projection.
        v: Linear<D>,
        /// Output projection.
        o: Linear<D>,
    },
    /// LayerNorm (before or after the residual), q, k, v and out.
    Opt {
        /// The LayerNorm.
        ln: OptNorm<D>,
        /// Query projection.
        q: Linear<D>,
        /// Key projection.
        k: Linear<D>,
        /// Value projection.
        v: Linear<D>,
        /// Output projection.
        out: Linear<D>,
    },
}

/// The MLP half of a layer.
#[derive(Clone)]
pub enum MlpWeights<D: Device> {
    /// RMSNorm, `down(silu(gate(x)) * up(x))`.
    Llama {
        /// RMSNorm weight.
        norm: D::Tensor,
        /// Gate projection.
        gate: Linear<D>,
        /// Up projection.
        up: Linear<D>,
        /// Down projection.
        down: Linear<D>,
    },
    /// LayerNorm, `fc2(relu(fc1(x)))`.
    Opt {
        /// The LayerNorm.
        ln: OptNorm<D>,
        /// First projection.
        fc1: Linear<D>,
        /// Second projection.
        fc2: Linear<D>,
    },
}

/// What turns embedded tokens into the first layer's input.
#[derive(Clone)]
pub enum InputWeights<D: Device> {
    /// The embeddings themselves.
    Llama,
    /// Learned positions added, after an optional projection.
    Opt {
        /// The position table `[max positions + 2, width]`.
        positions: D::Tensor,
        /// `project_in` (when the embedding is narrower than the model).
        project_in: Option<Linear<D>>,
    },
}

/// What turns the last layer's output into the rows the output projection reads.
#[derive(Clone)]
pub enum HeadWeights<D: Device> {
    /// The final RMSNorm.
    Llama {
        /// Its weight.
        norm: D::Tensor,
    },
    /// The final LayerNorm and `project_out`, each when present.
    Opt {
        /// The final LayerNorm.
        final_norm: Option<OptNorm<D>>,
        /// `project_out`.
        project_out: Option<Linear<D>>,
    },
}

/// One unit's weights, ready to compute with.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a handful per model: the size difference costs nothing
pub enum UnitWeights<D: Device> {
    /// The input (the embedding lookup itself happens before, on the host).
    Embed(InputWeights<D>),
    /// A layer's attention half.
    Attention(AttnWeights<D>),
    /// A layer's MLP half.
    Mlp(MlpWeights<D>),
    /// A whole layer.
    Layer(AttnWeights<D>, MlpWeights<D>),
    /// The head: the final norm (OPT: and `project_out`).
    Head(HeadWeights<D>),
    /// The rows of the output projection that hold output columns `cols` (a panel of the
    /// vocabulary, or all of it).
    Logits(Linear<D>, Range<usize>),
}

impl<D: Device> AttnWeights<D> {
    /// The linear layers, in a fixed order.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear<D>> {
        match self {
            AttnWeights::Llama { q, k, v, o, .. } => vec![q, k, v, o],
            AttnWeights::Opt { q, k, v, out, .. } => vec![q, k, v, out],
        }
    }
}

impl<D: Device> MlpWeights<D> {
    /// The linear layers, in a fixed order.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear<D>> {
        match self {
            MlpWeights::Llama { gate, up, down, .. } => vec![gate, up, down],
            MlpWeights::Opt { fc1, fc2, .. } => vec![fc1, fc2],
        }
    }
}

impl<D: Device> UnitWeights<D> {
    /// The linear layers, in a fixed order (the placement's order).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear<D>> {
        match self {
            UnitWeights::Embed(InputWeights::Opt {
                project_in: Some(p),
                ..
            }) => vec![p],
            UnitWeights::Embed(_) => Vec::new(),
            UnitWeights::Attention(a) => a.linears_mut(),
            UnitWeights::Mlp(m) => m.linears_mut(),
            UnitWeights::Layer(a, m) => {
                let mut v = a.linears_mut();
                v.extend(m.linears_mut());
                v
            }
            UnitWeights::Head(HeadWeights::Opt {
                project_out: Some(p),
                ..
            }) => vec![p],
            UnitWeights::Head(_) => Vec::new(),
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
}

/// RoPE tables `[rows, head_dim / 2]` for the given positions, in f64 then rounded (exactly as
/// the CPU reference): `theta_i = p * base^(-2i/d)`.
pub fn rope_tables(positions: &[u32], head_dim: usize, base: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for i in 0..half {
            let angle = p as f64 / base.powf(2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// A model's recipe on a device: the configuration, options and sizes, with one method per
/// unit of the forward pass.
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
}

impl<D: Device> Runner<D> {
    /// The recipe of `config` on `dev`.
    pub fn new(dev: D, config: &ModelConfig, options: RunOptions) -> Self {
        Self {
            dev,
            options,
            config: config.clone(),
            logit_rows: LOGIT_ROWS,
            chunk_rows: CHUNK_ROWS,
        }
    }

    /// Attention heads of the model.
    pub fn head_layout(&self) -> HeadLayout {
        HeadLayout::of(&self.config)
    }

    /// How cache rows are stored.
    pub fn cache_format(&self) -> CacheFormat {
        CacheFormat::of(&self.config, self.options)
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

    /// Adds the RoPE tables and the device side.
    fn finish_rows(
        &self,
        mut host: HostRows,
        appends: Vec<(usize, usize, usize)>,
    ) -> Result<RowBatch<D>> {
        if let ModelConfig::Llama(c) = &self.config {
            host.rope = Some(rope_tables(&host.positions, c.head_dim(), c.rope_theta));
        }
        Ok(RowBatch {
            rows: host.ids.len(),
            dev: self.dev.rows(&host)?,
            host,
            appends,
        })
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
        };
        self.finish_rows(host, appends)
    }

    /// Runs `f` on row chunks of at most [`Runner::chunk_rows`] rows of `x` (with their row
    /// range), in order, so that a unit's intermediate tensors are bounded by the chunk, not
    /// by the batch. Chunks go back into `x` when `f` keeps the width, else into a new tensor.
    /// Attention stays causal: a chunk appends its keys and values to the cache before it
    /// attends, and later chunks see them there.
    fn by_chunks(
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

    /// Embedded tokens `e` -> the first layer's input (OPT: `project_in`, learned positions),
    /// in row chunks.
    pub fn input(&self, w: &InputWeights<D>, e: D::Tensor, rb: &RowBatch<D>) -> Result<D::Tensor> {
        if matches!(w, InputWeights::Llama) {
            return Ok(e);
        }
        self.by_chunks(e, |ec, range| {
            self.input_rows(w, ec, &rb.host.positions[range])
        })
    }

    /// [`Runner::input`] on rows at `row_positions`, unchunked.
    fn input_rows(
        &self,
        w: &InputWeights<D>,
        e: D::Tensor,
        row_positions: &[u32],
    ) -> Result<D::Tensor> {
        let InputWeights::Opt {
            positions,
            project_in,
        } = w
        else {
            return Ok(e);
        };
        let x = match project_in {
            Some(p) => self.linear(&e, p)?,
            None => e,
        };
        // learned positions: rows pos + 2 of the position table, added
        let shifted: Vec<u32> = row_positions
            .iter()
            .map(|&q| q + POSITION_OFFSET as u32)
            .collect();
        let p = self.dev.gather(positions, &shifted)?;
        self.dev.add(&x, &p)?;
        Ok(x)
    }

    fn opt_norm(&self, n: &OptNorm<D>, x: &D::Tensor) -> Result<D::Tensor> {
        self.dev.layer_norm(x, &n.weight, &n.bias, LAYER_NORM_EPS)
    }

    fn rms_norm(&self, weight: &D::Tensor, x: &D::Tensor) -> Result<D::Tensor> {
        let ModelConfig::Llama(c) = &self.config else {
            return Err(Error::invalid("model", "RMSNorm outside a Llama model"));
        };
        self.dev.rms_norm(x, weight, c.rms_norm_eps as f32)
    }

    fn opt_pre_norm(&self) -> bool {
        matches!(&self.config, ModelConfig::Opt(c) if c.do_layer_norm_before)
    }

    /// `x + attention(x)` (OPT post-LN: the norm after the residual), appending the rows' keys
    /// and values to `cache`, in row chunks (query tiles) taken in order.
    pub fn attention(
        &self,
        w: &AttnWeights<D>,
        x: D::Tensor,
        cache: &D::Cache,
        rb: &RowBatch<D>,
    ) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, range| {
            let sub;
            let rows = if range.len() == rb.rows {
                rb
            } else {
                sub = self.chunk(rb, range)?;
                &sub
            };
            self.attention_with(w, xc, rows, |q, k, v| {
                self.dev
                    .attend(cache, &rows.dev, &rows.appends, q, k, v, self.head_layout())
            })
        })
    }

    /// [`Runner::attention`] on all rows at once, with the attention itself done by
    /// `attend(q, k, v)`, which returns `[rows, heads * head_dim]` (before the output
    /// projection). The executor's split attention uses it for decode steps.
    pub fn attention_with(
        &self,
        w: &AttnWeights<D>,
        x: D::Tensor,
        rb: &RowBatch<D>,
        attend: impl FnOnce(&D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
    ) -> Result<D::Tensor> {
        let (h, [q, kw, v, out], pre) = match w {
            AttnWeights::Llama { norm, q, k, v, o } => {
                (self.rms_norm(norm, &x)?, [q, k, v, o], true)
            }
            AttnWeights::Opt { ln, q, k, v, out } => {
                let pre = self.opt_pre_norm();
                let h = if pre {
                    self.opt_norm(ln, &x)?
                } else {
                    x.clone()
                };
                (h, [q, k, v, out], pre)
            }
        };
        let (qt, kt, vt) = (
            self.linear(&h, q)?,
            self.linear(&h, kw)?,
            self.linear(&h, v)?,
        );
        if matches!(self.config, ModelConfig::Llama(_)) {
            let hd = self.head_layout().head_dim;
            self.dev.rope(&qt, &rb.dev, hd)?;
            self.dev.rope(&kt, &rb.dev, hd)?;
        }
        let a = attend(&qt, &kt, &vt)?;
        let o = self.linear(&a, out)?;
        self.dev.add(&x, &o)?;
        match w {
            AttnWeights::Opt { ln, .. } if !pre => self.opt_norm(ln, &x),
            _ => Ok(x),
        }
    }

    /// `x + mlp(x)` (OPT post-LN: the norm after the residual), in row chunks.
    pub fn mlp(&self, w: &MlpWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, _| self.mlp_rows(w, xc))
    }

    fn mlp_rows(&self, w: &MlpWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        let dev = &self.dev;
        match w {
            MlpWeights::Llama {
                norm,
                gate,
                up,
                down,
            } => {
                let h = self.rms_norm(norm, &x)?;
                let (g, u) = (self.linear(&h, gate)?, self.linear(&h, up)?);
                dev.silu_mul(&g, &u)?;
                let d = self.linear(&g, down)?;
                dev.add(&x, &d)?;
                Ok(x)
            }
            MlpWeights::Opt { ln, fc1, fc2 } => {
                let pre = self.opt_pre_norm();
                let h = if pre {
                    self.opt_norm(ln, &x)?
                } else {
                    x.clone()
                };
                let f = self.linear(&h, fc1)?;
                dev.relu(&f)?;
                let d = self.linear(&f, fc2)?;
                dev.add(&x, &d)?;
                if pre {
                    Ok(x)
                } else {
                    self.opt_norm(ln, &x)
                }
            }
        }
    }

    /// The last layer's output -> the rows the output projection reads, in row chunks.
    pub fn head(&self, w: &HeadWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, _| self.head_rows(w, xc))
    }

    fn head_rows(&self, w: &HeadWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        match w {
            HeadWeights::Llama { norm } => self.rms_norm(norm, &x),
            HeadWeights::Opt {
                final_norm,
                project_out,
            } => {
                let x = match final_norm {
                    Some(n) => self.opt_norm(n, &x)?,
                    None => x,
                };
                match project_out {
                    Some(p) => self.linear(&x, p),
                    None => Ok(x),
                }
            }
        }
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
        self.dev.download(&y, 0..row_ids.len())
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
