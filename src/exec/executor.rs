//! Carries out a [`ZigzagPlan`] for one block of sequences: each step's loads and stores run on
//! I/O worker threads (one per track, started once per block, with reader threads that share
//! each weight load's reads) while the calling thread drives the compute on the device, and are
//! waited for at the end of the step (its synchronization). A weight load is the exception: it
//! runs on until the first compute that needs it, so weights stream during all `nb` batches of
//! the units before, not only the first (with `sep_layer` a layer ahead: the plan's
//! `load_trigger`). The CPU device computes each unit on one of its own threads
//! (`Device::run_unit`). With overlap off, a step's operations run one after another on the
//! calling thread.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::io_workers::{IoWorkers, Pending, Readers};
use super::state::{lock, Activation, Batch, BlockState, CacheCell, Executor, GenControl};
pub use super::state::{SeqResult, Task};
use super::trace::Track;
use super::weights::WeightSlot;
use crate::arch::{Linear, UnitWeights};
use crate::batch::PrefixGroup;
use crate::device::{Device, LogitState};
use crate::error::{Error, Result};
use crate::plan::workspace_bytes;
use crate::sampling::{Decoding, FinishReason, Sampling};
use crate::schedule::{Cell, Op, PlanShape, Step, UnitKind, ZigzagPlan};
use crate::storage::offload::{align_up, OffloadFile};
use crate::storage::{split_sequences, Reservation, RowSplit, Tier};

/// Whether `op` runs on the calling thread (computes, and weight releases after them).
fn is_compute_side(op: &Op) -> bool {
    matches!(op, Op::Compute(_) | Op::ReleaseWeight { .. })
}

/// A unit's weights for one token: `(token, unit)`.
type WeightKey = (usize, usize);

impl<D: Device> Executor<D> {
    fn span<T>(
        &self,
        track: Track,
        name: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let out = f();
        if let Some(t) = &self.trace {
            lock(t).span(track, name(), start, Instant::now());
        }
        out
    }

    /// Runs one block of at most `nb` GPU batches through the zig-zag schedule: the batches
    /// are `batch_sizes[i]` consecutive sequences each (`gbs`, or as many as a batch's tokens
    /// hold when the engine packs short records). A sequence may be a prefix group of several
    /// members (scoring only); the results are one per member, in order. Generation follows
    /// `control` (greedy for `n` tokens without it); the block ends when every sequence has
    /// stopped.
    pub(crate) fn run_block(
        &self,
        seqs: &[PrefixGroup],
        batch_sizes: &[usize],
        task: Task,
        control: Option<GenControl<'_>>,
    ) -> Result<Vec<SeqResult>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // validate
        let gen_len = self.block_gen_len(seqs, batch_sizes, task, control)?;
        if gen_len == 0 {
            let none = SeqResult {
                finish: Some(FinishReason::Length),
                ..SeqResult::default()
            };
            return Ok(vec![none; seqs.len()]);
        }
        // allocate: batches, the compute workspace, KV cache cells, the block's files
        let plan = ZigzagPlan::new(PlanShape {
            layers: self.runner.config.num_layers(),
            num_batches: batch_sizes.len(),
            gen_len,
            sep_layer: self.policy.sep_layer,
            logit_panels: self.model.logit_panels,
        });
        let n = seqs.len();
        let act_split = split_sequences(n, self.policy.activations());
        let batches = new_batches(seqs, batch_sizes, gen_len);
        let _workspace = self.reserve_workspace(&batches, batch_sizes)?;
        let (caches, disk_cache_bytes) = self.allocate_caches(&batches, gen_len > 1)?;
        let (act_extent, act_bytes) =
            activation_extents(&batches, &act_split, self.runner.config.hidden_size());
        // the files and their disk reservations live for the block
        let unzip = |f: Option<(OffloadFile, Reservation)>| {
            f.map_or((None, None), |(f, r)| (Some(f), Some(r)))
        };
        let (cache_file, _cache_held) = unzip(self.block_file("KV cache", disk_cache_bytes)?);
        let (act_file, _act_held) = unzip(self.block_file("activations", act_bytes)?);
        let state = BlockState {
            exec: self,
            task,
            control,
            batches: batches.into_iter().map(Mutex::new).collect(),
            caches,
            act_split,
            act_file,
            act_extent,
            cache_file,
            plan,
        };
        // run (the block's files are removed when dropped, whatever the result)
        state.run()?;
        let mut out = Vec::with_capacity(n);
        for b in state.batches {
            out.extend(b.into_inner().unwrap_or_else(|e| e.into_inner()).results);
        }
        Ok(out)
    }

    /// The tokens a block computes per sequence (1 when scoring; the longest `max_tokens` of
    /// the block's sequences when generating), after checking the block: batches that
    /// partition the sequences into at most nb non-empty batches, prefix groups only when
    /// scoring, and every sequence long enough and within the context.
    fn block_gen_len(
        &self,
        seqs: &[PrefixGroup],
        batch_sizes: &[usize],
        task: Task,
        control: Option<GenControl<'_>>,
    ) -> Result<usize> {
        if batch_sizes.len() > self.policy.num_gpu_batches.max(1)
            || batch_sizes.iter().sum::<usize>() != seqs.len()
            || batch_sizes.contains(&0)
        {
            return Err(Error::invalid(
                "block",
                "the batches must partition the sequences into at most nb non-empty batches",
            ));
        }
        let gen_len = match task {
            Task::Score => 1,
            _ if seqs.iter().any(|g| g.branches.len() != 1) => {
                return Err(Error::invalid(
                    "block",
                    "prefix groups are for scoring: generate from one sequence each",
                ))
            }
            Task::Generate(n) => match control {
                // (the plan runs as long as the block's longest)
                Some(c) => c.decoding[c.first..c.first + seqs.len()]
                    .iter()
                    .map(|d| d.max_tokens)
                    .max()
                    .unwrap_or(0),
                None => n,
            },
        };
        if gen_len == 0 {
            return Ok(0);
        }
        let max_context = self.runner.config.max_context();
        for g in seqs {
            // positions go up to the longest member (rows may be more: the cache holds them)
            let longest = g.shared + g.branches.iter().max().copied().unwrap_or(0);
            let shortest = g.shared + g.branches.iter().min().copied().unwrap_or(0);
            if task == Task::Score && shortest < 2 {
                return Err(Error::SequenceTooShort {
                    len: shortest,
                    needed: 2,
                    what: "score a sequence",
                });
            }
            let need = longest + gen_len - 1;
            if need > max_context {
                return Err(Error::SequenceTooLong {
                    len: need,
                    max: max_context,
                });
            }
            if g.is_empty() {
                return Err(Error::SequenceTooShort {
                    len: 0,
                    needed: 1,
                    what: "run the model",
                });
            }
        }
        Ok(gen_len)
    }

    /// Reserves the working set one batch's compute needs: a unit computes at most
    /// `chunk_rows` rows at once (decode steps with CPU attention: one row per sequence of the
    /// batch), with the logits of `logit_rows` rows.
    fn reserve_workspace(
        &self,
        batches: &[Batch<D>],
        batch_sizes: &[usize],
    ) -> Result<Reservation> {
        let config = &self.runner.config;
        let max_rows = batches
            .iter()
            .map(|b| b.groups.iter().map(PrefixGroup::len).sum::<usize>())
            .max()
            .unwrap_or(0);
        let delegated_rows = if self.policy.cpu_cache_compute {
            batch_sizes.iter().copied().max().unwrap_or(0)
        } else {
            0
        };
        let compute_rows = max_rows.min(self.runner.chunk_rows.max(delegated_rows));
        let logit_width = self
            .runner
            .dev
            .logit_width(config.vocab_size().div_ceil(self.model.logit_panels.max(1)));
        self.ledger.reserve(
            Tier::Gpu,
            workspace_bytes(config, compute_rows, self.runner.logit_rows, logit_width),
            "one batch's compute workspace",
        )
    }

    /// The block's KV cache cells, `[layer][batch]`, split by sequence over the tiers: GPU
    /// rows allocated on the device, RAM rows now, disk rows at offsets of the block's cache
    /// file (whose length is returned). Nothing is held when the block stores no cache
    /// (scoring: one token).
    #[allow(clippy::type_complexity)]
    fn allocate_caches(
        &self,
        batches: &[Batch<D>],
        stores_cache: bool,
    ) -> Result<(Vec<Vec<Mutex<CacheCell<D>>>>, u64)> {
        let n = batches.iter().map(|b| b.seqs.len()).sum();
        let cache_split = split_sequences(n, self.policy.cache());
        let bpr_segments = self.runner.cache_segment_bytes();
        let bpr: u64 = bpr_segments.iter().sum();
        let mut disk_cache_bytes = 0u64;
        let mut caches = Vec::new();
        for _ in 0..self.runner.config.num_layers() {
            let mut row = Vec::new();
            for b in batches {
                let split = cache_split.within(b.seqs.clone());
                let rows_of = |r: Range<usize>| -> usize { b.capacity[r].iter().sum() };
                let [g, c, d] = split.ranges().map(|(_, r)| rows_of(r));
                let mut held = Vec::new();
                let mut gpu = None;
                let mut cpu = Vec::new();
                let mut disk = Vec::new();
                if stores_cache {
                    if g > 0 {
                        held.push(self.ledger.reserve(Tier::Gpu, g as u64 * bpr, "KV cache")?);
                        gpu = Some(self.runner.layer_cache(g)?);
                    }
                    if c > 0 {
                        held.push(self.ledger.reserve(Tier::Cpu, c as u64 * bpr, "KV cache")?);
                        cpu = bpr_segments
                            .iter()
                            .map(|&s| vec![0u32; c * s as usize / 4])
                            .collect();
                    }
                    if d > 0 {
                        for &s in &bpr_segments {
                            disk.push(disk_cache_bytes);
                            disk_cache_bytes += align_up(d as u64 * s);
                        }
                    }
                }
                row.push(Mutex::new(CacheCell {
                    split,
                    gpu,
                    cpu,
                    disk_host: None,
                    working: None,
                    _held: held,
                    disk,
                }));
            }
            caches.push(row);
        }
        Ok((caches, disk_cache_bytes))
    }

    /// A file of the block in the offload directory, `bytes` long and reserved on the disk
    /// tier (`None` when nothing goes to disk).
    fn block_file(&self, name: &str, bytes: u64) -> Result<Option<(OffloadFile, Reservation)>> {
        if bytes == 0 {
            return Ok(None);
        }
        let dir = self.offload_dir.as_deref().ok_or_else(|| {
            Error::invalid(
                "EngineOptions::offload_dir",
                format!("the policy puts the {name} on disk: give an offload directory"),
            )
        })?;
        let held = self.ledger.reserve(Tier::Disk, bytes, name)?;
        let path = dir.join(crate::storage::offload::private_file_name(&format!(
            "ferrogen-{}",
            name.replace(' ', "-")
        )));
        Ok(Some((OffloadFile::create(&path, bytes)?, held)))
    }
}

/// The block's GPU batches: `batch_sizes[i]` consecutive sequences each, every sequence's
/// cache capacity its tokens plus the `gen_len - 1` it will add.
fn new_batches<D: Device>(
    seqs: &[PrefixGroup],
    batch_sizes: &[usize],
    gen_len: usize,
) -> Vec<Batch<D>> {
    let mut batches = Vec::new();
    let mut first = 0;
    for &size in batch_sizes {
        let chunk = &seqs[first..first + size];
        batches.push(Batch {
            seqs: first..first + chunk.len(),
            groups: chunk.to_vec(),
            capacity: chunk.iter().map(|g| g.len() + gen_len - 1).collect(),
            rows: None,
            x: None,
            logits: Vec::new(),
            sampled: Vec::new(),
            sampled_held: None,
            done: vec![false; chunk.len()],
            results: vec![SeqResult::default(); chunk.iter().map(|g| g.branches.len()).sum()],
        });
        first += size;
    }
    batches
}

/// Where each batch's disk activations start in the block's activation file, and its length:
/// the rows of the batch's sequences past its GPU and RAM ones, `width` f32 values each.
fn activation_extents<D: Device>(
    batches: &[Batch<D>],
    act_split: &RowSplit,
    width: usize,
) -> (Vec<u64>, u64) {
    let mut act_extent = Vec::new();
    let mut act_bytes = 0u64;
    for b in batches {
        act_extent.push(act_bytes);
        let split = act_split.within(b.seqs.clone());
        let rows: usize = b.groups[split.gpu + split.cpu..]
            .iter()
            .map(PrefixGroup::len)
            .sum();
        act_bytes += align_up((rows * width * 4) as u64);
    }
    (act_extent, act_bytes)
}

impl<D: Device> BlockState<'_, D> {
    /// Runs the plan's steps, until every sequence of a generating block has stopped.
    fn run(&self) -> Result<()> {
        let result = self.run_steps();
        // a block that ended early leaves weights in the slots
        for slot in &self.exec.slots {
            lock(slot).loaded = None;
        }
        result
    }

    /// Whether every sequence of the block has stopped generating.
    fn all_done(&self) -> bool {
        self.batches.iter().all(|b| lock(b).done.iter().all(|&d| d))
    }

    fn run_steps(&self) -> Result<()> {
        // the threads that share each weight load's reads, for the whole block
        std::thread::scope(|rs| {
            let readers = Readers::start(rs, self.exec.io_threads.saturating_sub(1));
            self.run_steps_with(&readers)
        })
    }

    fn run_steps_with<'env>(&self, readers: &Readers<'_, 'env>) -> Result<()>
    where
        Self: 'env,
    {
        if !self.exec.policy.overlap {
            for step in &self.plan.steps {
                if self.all_done() {
                    break;
                }
                for &op in step.ops.iter().filter(|o| !is_compute_side(o)) {
                    self.op(op, readers)?;
                }
                for &op in step.ops.iter().filter(|o| matches!(o, Op::Compute(_))) {
                    self.op(op, readers)?;
                }
                self.release_weights(step, readers)?;
            }
            return Ok(());
        }
        let run = |op: Op| self.op(op, readers);
        std::thread::scope(|s| -> Result<()> {
            let workers = IoWorkers::start(s, &run);
            // weight loads run from their step until the first compute that needs them (they
            // stream during all batches of the units before, not only the first); other loads
            // and stores are waited for at the end of their step
            let mut pending: Vec<(WeightKey, Pending)> = Vec::new();
            let mut first_err = None;
            for step in &self.plan.steps {
                if self.all_done() {
                    break;
                }
                let mut this_step = Vec::new();
                for &op in step.ops.iter().filter(|o| !is_compute_side(o)) {
                    let done = workers.submit(op);
                    match op {
                        Op::LoadWeight { token, unit } => pending.push(((token, unit), done)),
                        _ => this_step.push(done),
                    }
                }
                for &op in &step.ops {
                    let Op::Compute(c) = op else { continue };
                    if let Some(i) = pending.iter().position(|p| p.0 == (c.token, c.unit)) {
                        if let Err(e) = pending.swap_remove(i).1.wait() {
                            first_err.get_or_insert(e);
                        }
                    }
                    if first_err.is_none() {
                        if let Err(e) = self.op(op, readers) {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                for done in this_step {
                    if let Err(e) = done.wait() {
                        first_err.get_or_insert(e);
                    }
                }
                if first_err.is_some() {
                    break;
                }
                self.release_weights(step, readers)?;
            }
            for (_, done) in pending {
                if let Err(e) = done.wait() {
                    first_err.get_or_insert(e);
                }
            }
            let finished = workers.finish();
            first_err.map_or(finished, Err)
        })
    }

    /// A step's weight releases (after the computes that used them).
    fn release_weights<'env>(&self, step: &Step, readers: &Readers<'_, 'env>) -> Result<()>
    where
        Self: 'env,
    {
        for &op in step
            .ops
            .iter()
            .filter(|o| matches!(o, Op::ReleaseWeight { .. }))
        {
            self.op(op, readers)?;
        }
        Ok(())
    }

    fn op<'env>(&self, op: Op, readers: &Readers<'_, 'env>) -> Result<()>
    where
        Self: 'env,
    {
        let exec = self.exec;
        let name = || op.to_string();
        match op {
            Op::LoadWeight { token, unit } => exec.span(Track::LoadWeight, name, || {
                let mut slot = lock(&exec.slots[self.plan.weight_slot(token, unit)]);
                let placed = &exec.model.units[unit];
                let file = exec.model.file.as_deref();
                let weights = slot.load(
                    &exec.runner.dev,
                    &exec.ledger,
                    placed,
                    file,
                    &exec.staging,
                    readers,
                )?;
                slot.loaded = Some((token, unit, weights));
                Ok(())
            }),
            Op::ReleaseWeight { token, unit } => {
                let mut slot = lock(&exec.slots[self.plan.weight_slot(token, unit)]);
                slot.loaded = None;
                // an MLP slot no later MLP of this token uses gives its buffers back, so that
                // the output head's panels load with at most the layers' two MLPs' bytes held
                if let UnitKind::Mlp(layer) = self.plan.units[unit] {
                    if !self.plan.units.contains(&UnitKind::Mlp(layer + 2)) {
                        *slot = WeightSlot::default();
                    }
                }
                Ok(())
            }
            Op::LoadActivation(c) => {
                exec.span(Track::LoadActivation, name, || self.load_activation(c))
            }
            Op::StoreActivation(c) => {
                exec.span(Track::StoreActivation, name, || self.store_activation(c))
            }
            Op::LoadCache(c) => exec.span(Track::LoadCache, name, || self.load_cache(c)),
            Op::StoreCache(c) => exec.span(Track::StoreCache, name, || self.store_cache(c)),
            Op::Compute(c) => exec.span(Track::Compute, name, || {
                exec.runner.dev.run_unit(|| self.compute(c))?;
                exec.runner.dev.wait()
            }),
        }
    }

    fn compute(&self, c: Cell) -> Result<()> {
        let r = &self.exec.runner;
        let weights = {
            let slot = lock(&self.exec.slots[self.plan.weight_slot(c.token, c.unit)]);
            match &slot.loaded {
                Some((t, u, w)) if (*t, *u) == (c.token, c.unit) => w.clone(),
                _ => {
                    return Err(Error::invalid(
                        "executor",
                        format!("{} ran before its weights loaded", Op::Compute(c)),
                    ))
                }
            }
        };
        let (x, held, rb) = {
            let mut batch = lock(&self.batches[c.batch]);
            let Some(Activation::Gpu(x, held)) = batch.x.take() else {
                return Err(Error::invalid(
                    "executor",
                    format!("activations not on the GPU for {}", Op::Compute(c)),
                ));
            };
            let rb = batch
                .rows
                .take()
                .ok_or_else(|| Error::invalid("executor", "rows of the batch not prepared"))?;
            if rb.rows == 0 {
                // every sequence of the batch has stopped: nothing to compute
                batch.x = Some(Activation::Gpu(x, held));
                batch.rows = Some(rb);
                return Ok(());
            }
            (x, held, rb)
        };
        let mut cache = self
            .cache_layer(c.unit)
            .map(|l| lock(&self.caches[l][c.batch]));
        let delegated = cache.as_ref().is_some_and(|cell| self.delegated(c, cell));
        if let Some(cell) = cache.as_mut().filter(|_| !delegated) {
            let persistent = cell.split.gpu == cell.split.rows() && cell.gpu.is_some();
            if cell.working.is_none() && !persistent {
                // the prefill (or a scoring step) starts from an empty cache of the batch
                let total: usize = lock(&self.batches[c.batch]).capacity.iter().sum();
                let held = self.exec.ledger.reserve(
                    Tier::Gpu,
                    total as u64 * r.cache_bytes_per_row(),
                    "KV cache being computed",
                )?;
                cell.working = Some((r.layer_cache(total)?, Some(held)));
            }
        }
        fn working<'c, D: Device>(
            cache: &'c Option<MutexGuard<'_, CacheCell<D>>>,
        ) -> Result<&'c D::Cache> {
            let cell = cache
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "a cache unit without a cache"))?;
            cell.working
                .as_ref()
                .map(|w| &w.0)
                .or(cell.gpu.as_ref())
                .ok_or_else(|| Error::invalid("executor", "the KV cache is not loaded"))
        }
        let result = (|| -> Result<Option<D::Tensor>> {
            Ok(Some(match &weights {
                UnitWeights::Embed(w) => r.input(w, x.clone(), &rb)?,
                UnitWeights::Attention(w) if delegated => {
                    let cell = cache
                        .as_deref_mut()
                        .ok_or_else(|| Error::invalid("executor", "no cache"))?;
                    r.attention_with(w, x.clone(), &rb, |rows, q, k, v| {
                        self.cpu_attention(cell, rows, [q, k, v])
                    })?
                }
                UnitWeights::Layer(a, m) if delegated => {
                    let cell = cache
                        .as_deref_mut()
                        .ok_or_else(|| Error::invalid("executor", "no cache"))?;
                    let y = r.attention_with(a, x.clone(), &rb, |rows, q, k, v| {
                        self.cpu_attention(cell, rows, [q, k, v])
                    })?;
                    r.mlp(m, y)?
                }
                UnitWeights::Attention(w) => r.attention(w, x.clone(), working(&cache)?, &rb)?,
                UnitWeights::Mlp(w) => r.mlp(w, x.clone())?,
                UnitWeights::Layer(a, m) => {
                    let y = r.attention(a, x.clone(), working(&cache)?, &rb)?;
                    r.mlp(m, y)?
                }
                UnitWeights::Head(head) => r.head(head, x.clone())?,
                UnitWeights::Logits(output, cols) => {
                    let mut batch = lock(&self.batches[c.batch]);
                    self.fold_panel(&mut batch, c.token, output, cols.clone(), &x)?;
                    x.clone() // the head's rows go on to the next panel
                }
            }))
        })();
        if let Some(cell) = cache.as_mut() {
            // without a later token to read it, the step's cache is done with
            if c.token + 1 >= self.plan.shape.gen_len {
                r.dev.wait()?;
                cell.working = None;
            }
        }
        drop(cache);
        let y = result?;
        drop(held);
        let mut batch = lock(&self.batches[c.batch]);
        if let Some(y) = y {
            let [rows, width] = r.dev.dims(&y);
            let bytes = (rows * width * 4) as u64;
            batch.x = Some(Activation::Gpu(
                y,
                self.exec.ledger.reserve(Tier::Gpu, bytes, "activations")?,
            ));
        }
        batch.rows = Some(rb);
        Ok(())
    }

    /// A panel of the output projection: its logits folded into the rows' states; after the
    /// last panel, the scoring logprobs, or the next tokens and their logprobs.
    fn fold_panel(
        &self,
        batch: &mut Batch<D>,
        token: usize,
        output: &Linear<D>,
        cols: Range<usize>,
        h: &D::Tensor,
    ) -> Result<()> {
        let r = &self.exec.runner;
        let mut states = std::mem::take(&mut batch.logits);
        let (rows, targets, active) = self.logit_rows(batch, token);
        let specs: Vec<Decoding> = active.iter().map(|&i| self.decoding(batch, i)).collect();
        // the rows drawn from (not greedy) need their logits on the host
        let drawn: Vec<usize> = (0..active.len())
            .filter(|&k| !specs[k].sampling.is_greedy())
            .collect();
        if cols.start == 0 {
            states = vec![LogitState::EMPTY; rows.len()];
            batch.sampled_held = None;
            batch.sampled = vec![Vec::new(); drawn.len()];
            if !drawn.is_empty() {
                let bytes = (drawn.len() * r.config.vocab_size() * 4) as u64;
                batch.sampled_held = Some(self.exec.ledger.reserve(
                    Tier::Cpu,
                    bytes,
                    "logits to draw from",
                )?);
            }
        }
        r.fold_logits(
            output,
            cols.clone(),
            h,
            &rows,
            targets.as_deref(),
            &mut states,
        )?;
        if !drawn.is_empty() {
            let ids: Vec<usize> = drawn.iter().map(|&k| rows[k]).collect();
            let held = self.exec.ledger.reserve(
                Tier::Gpu,
                (ids.len() * cols.len() * 4) as u64,
                "logits to draw from",
            )?;
            let panel = r.logits(output, cols.clone(), h, &ids)?;
            drop(held);
            for (k, row) in panel.chunks(cols.len().max(1)).enumerate() {
                batch.sampled[k].extend_from_slice(row);
            }
        }
        if cols.end < r.config.vocab_size() {
            batch.logits = states;
            return Ok(());
        }
        // the last panel: the scores, or each sequence's next token and whether it stops
        match self.task {
            Task::Score => set_scores(batch, &states),
            Task::Generate(_) => self.choose_and_stop(batch, &active, &specs, &drawn, &states),
        }
        Ok(())
    }

    /// The rows of the batch whose logits are read at token step `token`, with their targets
    /// when scoring (each group's scoring rows, offset by the rows before it); when
    /// generating, the last row of each sequence still going, and those sequences.
    fn logit_rows(
        &self,
        batch: &Batch<D>,
        token: usize,
    ) -> (Vec<usize>, Option<Vec<u32>>, Vec<usize>) {
        match self.task {
            Task::Score => {
                let (mut rows, mut targets, mut at) = (Vec::new(), Vec::new(), 0);
                for g in &batch.groups {
                    let (r, t) = g.scoring_rows();
                    rows.extend(r.iter().map(|r| r + at));
                    targets.extend(t);
                    at += g.len();
                }
                (rows, Some(targets), Vec::new())
            }
            Task::Generate(_) => {
                let (mut rows, mut active, mut end) = (Vec::new(), Vec::new(), 0);
                for (i, n) in batch.new_tokens(token).iter().map(|t| t.len()).enumerate() {
                    end += n;
                    if n > 0 {
                        active.push(i);
                        rows.push(end - 1);
                    }
                }
                (rows, None, active)
            }
        }
    }

    /// How sequence `i` of the batch chooses its tokens and stops (greedy for the plan's
    /// length without a control).
    fn decoding(&self, batch: &Batch<D>, i: usize) -> Decoding {
        match &self.control {
            Some(c) => c.decoding[c.first + batch.seqs.start + i].clone(),
            None => Decoding {
                max_tokens: self.plan.shape.gen_len,
                sampling: Sampling::GREEDY,
                stop_tokens: Vec::new(),
            },
        }
    }

    /// Generation, after the last panel: each active sequence's next token (drawn from its
    /// sampled logits, or the greedy one), then whether it stops (a stop token, its length,
    /// or the control's stop rule); the token is fed to the next step.
    fn choose_and_stop(
        &self,
        batch: &mut Batch<D>,
        active: &[usize],
        specs: &[Decoding],
        drawn: &[usize],
        states: &[LogitState],
    ) {
        let sampled = std::mem::take(&mut batch.sampled);
        batch.sampled_held = None;
        let mut drawn_rows = drawn.iter().zip(&sampled);
        let mut next_drawn = drawn_rows.next();
        for (k, (&i, spec)) in active.iter().zip(specs).enumerate() {
            let step = batch.results[i].tokens.len();
            let (id, lp) = match next_drawn {
                Some((&dk, logits)) if dk == k => {
                    next_drawn = drawn_rows.next();
                    spec.sampling.pick(logits, step)
                }
                _ => states[k].greedy(),
            };
            let res = &mut batch.results[i];
            res.tokens.push(id);
            res.logprobs.push(lp);
            let finish = if spec.stop_tokens.contains(&id) {
                Some(FinishReason::Eos)
            } else if res.tokens.len() >= spec.max_tokens {
                Some(FinishReason::Length)
            } else {
                match &self.control {
                    Some(c) if (c.stop)(c.first + batch.seqs.start + i, &res.tokens) => {
                        Some(FinishReason::Stop)
                    }
                    _ => None,
                }
            };
            if finish.is_some() {
                res.finish = finish;
                batch.done[i] = true;
            }
            // the next step feeds the new token
            batch.groups[i].push(id);
        }
    }
}

/// Scoring, after the last panel: each member's logprobs and argmax tokens from the folded
/// logit states of its group's scoring rows.
fn set_scores<D: Device>(batch: &mut Batch<D>, states: &[LogitState]) {
    let (flat, argmax): (Vec<f32>, Vec<u32>) = states
        .iter()
        .map(|s| (s.target_logprob(), s.greedy().0))
        .unzip();
    let mut at = 0;
    let mut per_member = Vec::new();
    for g in &batch.groups {
        let n = g.scoring_row_count();
        per_member.extend(
            g.per_member(&flat[at..at + n])
                .into_iter()
                .zip(g.per_member(&argmax[at..at + n])),
        );
        at += n;
    }
    for (res, (lp, am)) in batch.results.iter_mut().zip(per_member) {
        res.logprobs = lp;
        res.tokens = am;
    }
}
