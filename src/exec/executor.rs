//! Carries out a [`ZigzagPlan`] for one block of sequences: each step's loads and stores run on
//! I/O worker threads while the calling thread drives the compute on the wgpu queue, then all
//! join (the step's synchronization). With overlap off, a step's operations run one after
//! another on the calling thread.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::trace::{Trace, Track};
use super::weights::{PlacedModel, UnitWeights, WeightSlot};
use crate::cpu::ops::causal_attention;
use crate::error::{Error, Result};
use crate::gpu::kernels::attention::Attention;
use crate::gpu::model::{CacheSlot, GpuRunner, LayerCache, RowBatch};
use crate::gpu::GpuTensor;
use crate::policy::Policy;
use crate::schedule::{Cell, Op, PlanShape, UnitKind, ZigzagPlan};
use crate::storage::offload::{align_up, OffloadFile, StagingPool};
use crate::storage::{split_sequences, MemoryLedger, Reservation, RowSplit, Tier};

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
    /// token.
    pub logprobs: Vec<f32>,
    /// Generation: the new tokens.
    pub tokens: Vec<u32>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The hidden rows of one batch between units.
enum Activation {
    /// All rows on the GPU.
    Gpu(GpuTensor, Reservation),
    /// Rows split by sequence: the first rows on the GPU, then RAM, then the activation file.
    Parked {
        width: usize,
        rows: [usize; 3],
        gpu: Option<GpuTensor>,
        cpu: Vec<f32>,
        _held: Vec<Reservation>,
    },
}

/// One GPU batch of the block.
struct Batch {
    /// Sequence indices in the block.
    seqs: Range<usize>,
    /// Tokens so far per sequence (prompt, then generated).
    tokens: Vec<Vec<u32>>,
    /// Rows cached per sequence before the current token step.
    filled: Vec<usize>,
    /// Cache capacity per sequence; the cache holds sequences back to back.
    capacity: Vec<usize>,
    rows: Option<RowBatch>,
    x: Option<Activation>,
    results: Vec<SeqResult>,
}

impl Batch {
    fn firsts(&self) -> Vec<usize> {
        self.capacity
            .iter()
            .scan(0, |acc, &c| {
                let f = *acc;
                *acc += c;
                Some(f)
            })
            .collect()
    }

    /// The new tokens of token step `token`.
    fn new_tokens(&self, token: usize) -> Vec<&[u32]> {
        self.tokens
            .iter()
            .zip(&self.filled)
            .map(|(t, &f)| if token == 0 { &t[..] } else { &t[f..] })
            .collect()
    }
}

/// One layer's cache for one batch: sequences on the GPU keep their rows in `gpu`; the
/// others' rows live in RAM or the cache file and are brought into `working` for a step.
struct CacheCell {
    /// Sequences per tier (within the batch, in order).
    split: RowSplit,
    gpu: Option<LayerCache>,
    /// RAM rows per segment (as words, so they view as f32 without copying).
    cpu: Vec<Vec<u32>>,
    /// With attention on the CPU: the disk sequences' rows, read for one decode step.
    disk_host: Option<(Vec<Vec<u32>>, Reservation)>,
    working: Option<(LayerCache, Option<Reservation>)>,
    _held: Vec<Reservation>,
    /// Byte offset of this cell's disk rows in the cache file, per segment.
    disk: Vec<u64>,
}

/// Everything a block's operations touch, each behind its own lock so that operations on
/// different batches, layers or weight slots run at the same time.
struct BlockState<'a> {
    exec: &'a Executor,
    plan: ZigzagPlan,
    task: Task,
    batches: Vec<Mutex<Batch>>,
    /// `[cache layer][batch]`.
    caches: Vec<Vec<Mutex<CacheCell>>>,
    act_split: RowSplit,
    act_file: Option<OffloadFile>,
    act_extent: Vec<u64>,
    cache_file: Option<OffloadFile>,
}

/// Runs plans over a placed model.
pub(crate) struct Executor {
    pub runner: GpuRunner,
    pub model: PlacedModel,
    pub policy: Policy,
    pub ledger: Arc<MemoryLedger>,
    pub staging: StagingPool,
    /// Threads reading one unit's disk pieces.
    pub io_threads: usize,
    pub slots: [Mutex<WeightSlot>; 2],
    pub offload_dir: Option<std::path::PathBuf>,
    pub trace: Option<Mutex<Trace>>,
}

impl Executor {
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

    /// Runs one block of at most `gbs * nb` sequences through the zig-zag schedule.
    pub(crate) fn run_block(&self, seqs: &[&[u32]], task: Task) -> Result<Vec<SeqResult>> {
        let gbs = self.policy.gpu_batch_size.max(1);
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        if seqs.len() > gbs * self.policy.num_gpu_batches.max(1) {
            return Err(Error::invalid("block", "more sequences than gbs * nb"));
        }
        let config = &self.runner.config;
        let gen_len = match task {
            Task::Score => {
                crate::batch::check_scorable(seqs)?;
                1
            }
            Task::Generate(0) => return Ok(vec![SeqResult::default(); seqs.len()]),
            Task::Generate(n) => n,
        };
        for s in seqs {
            let need = s.len() + gen_len - 1;
            if need > config.max_context() {
                return Err(Error::SequenceTooLong {
                    len: need,
                    max: config.max_context(),
                });
            }
            if s.is_empty() {
                return Err(Error::SequenceTooShort {
                    len: 0,
                    needed: 1,
                    what: "run the model",
                });
            }
        }
        let layers = config.num_layers();
        let plan = ZigzagPlan::new(PlanShape {
            layers,
            num_batches: seqs.len().div_ceil(gbs),
            gen_len,
            sep_layer: self.policy.sep_layer,
        });
        let n = seqs.len();
        let cache_split = split_sequences(n, self.policy.cache());
        let act_split = split_sequences(n, self.policy.activations());
        let tier_count = |split: &RowSplit, r: &Range<usize>| -> RowSplit {
            let count = |t: Range<usize>| t.end.min(r.end).saturating_sub(t.start.max(r.start));
            let [g, c, d] = split.ranges().map(|(_, t)| count(t));
            RowSplit {
                gpu: g,
                cpu: c,
                disk: d,
            }
        };

        // batches, and the working set one batch's compute needs
        let mut batches = Vec::new();
        for (b, chunk) in seqs.chunks(gbs).enumerate() {
            let first = b * gbs;
            batches.push(Batch {
                seqs: first..first + chunk.len(),
                tokens: chunk.iter().map(|s| s.to_vec()).collect(),
                filled: vec![0; chunk.len()],
                capacity: chunk.iter().map(|s| s.len() + gen_len - 1).collect(),
                rows: None,
                x: None,
                results: vec![SeqResult::default(); chunk.len()],
            });
        }
        let max_rows = batches
            .iter()
            .map(|b| b.tokens.iter().map(Vec::len).sum::<usize>())
            .max()
            .unwrap_or(0);
        let _workspace = self.ledger.reserve(
            Tier::Gpu,
            self.workspace_bytes(max_rows),
            "one batch's compute workspace",
        )?;

        // KV caches: GPU rows persistent, RAM rows allocated now, disk rows in a cache file
        let bpr_segments: Vec<u64> = {
            let probe = self.runner.layer_cache(1)?;
            probe.segments().iter().map(|s| s.1).collect()
        };
        let bpr: u64 = bpr_segments.iter().sum();
        let stores_cache = gen_len > 1;
        let mut disk_cache_bytes = 0u64;
        let mut caches = Vec::new();
        for _ in 0..layers {
            let mut row = Vec::new();
            for b in &batches {
                let split = tier_count(&cache_split, &b.seqs);
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
        let width = config.hidden_size();
        let mut act_extent = Vec::new();
        let mut act_bytes = 0u64;
        for b in &batches {
            act_extent.push(act_bytes);
            let split = tier_count(&act_split, &b.seqs);
            let rows: usize = b.tokens[split.gpu + split.cpu..].iter().map(Vec::len).sum();
            act_bytes += align_up((rows * width * 4) as u64);
        }
        let file = |name: &str, bytes: u64| -> Result<Option<(OffloadFile, Reservation)>> {
            if bytes == 0 {
                return Ok(None);
            }
            let dir = self.offload_dir.as_deref().ok_or_else(|| {
                Error::invalid(
                    "--offload-dir",
                    format!("the policy puts the {name} on disk: give an offload directory"),
                )
            })?;
            let held = self.ledger.reserve(Tier::Disk, bytes, name)?;
            let path = dir.join(format!(
                "ferrogen-{}-{}.bin",
                name.replace(' ', "-"),
                std::process::id()
            ));
            Ok(Some((OffloadFile::create(&path, bytes)?, held)))
        };
        let cache_file = file("KV cache", disk_cache_bytes)?;
        let act_file = file("activations", act_bytes)?;
        let state = BlockState {
            exec: self,
            task,
            batches: batches.into_iter().map(Mutex::new).collect(),
            caches,
            act_split,
            act_file: act_file
                .as_ref()
                .map(|f| OffloadFile::open(f.0.path()))
                .transpose()?,
            act_extent,
            cache_file: cache_file
                .as_ref()
                .map(|f| OffloadFile::open(f.0.path()))
                .transpose()?,
            plan,
        };
        let result = state.run();
        for f in [&cache_file, &act_file].into_iter().flatten() {
            let _ = std::fs::remove_file(f.0.path());
        }
        result?;
        let mut out = Vec::with_capacity(n);
        for b in state.batches {
            out.extend(b.into_inner().unwrap_or_else(|e| e.into_inner()).results);
        }
        Ok(out)
    }

    /// GPU bytes of one batch's intermediate tensors at the widest unit: per row the
    /// normalized input, q, k, v, attention output and projection (hidden and kv widths), the
    /// MLP's two intermediate tensors, plus one chunk of logits.
    pub(crate) fn workspace_bytes(&self, rows: usize) -> u64 {
        let c = &self.runner.config;
        let per_row = 6 * c.hidden_size() + 2 * c.kv_width() + 2 * c.intermediate_size();
        ((rows * per_row + self.runner.logit_rows * c.vocab_size()) * 4) as u64
    }
}

impl BlockState<'_> {
    fn run(&self) -> Result<()> {
        let overlap = self.exec.policy.overlap;
        for step in &self.plan.steps {
            let (compute, io): (Vec<Op>, Vec<Op>) = step
                .ops
                .iter()
                .partition(|op| matches!(op, Op::Compute(_) | Op::ReleaseWeight { .. }));
            if overlap && io.len() + compute.len() > 1 {
                std::thread::scope(|s| -> Result<()> {
                    let handles: Vec<_> =
                        io.iter().map(|&op| s.spawn(move || self.op(op))).collect();
                    let mut first_err = None;
                    for &op in compute.iter().filter(|o| matches!(o, Op::Compute(_))) {
                        if let Err(e) = self.op(op) {
                            first_err.get_or_insert(e);
                        }
                    }
                    for h in handles {
                        match h.join() {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                first_err.get_or_insert(e);
                            }
                            Err(_) => {
                                first_err.get_or_insert(Error::invalid(
                                    "executor",
                                    "an I/O thread panicked",
                                ));
                            }
                        }
                    }
                    first_err.map_or(Ok(()), Err)
                })?;
            } else {
                for &op in io
                    .iter()
                    .chain(compute.iter().filter(|o| matches!(o, Op::Compute(_))))
                {
                    self.op(op)?;
                }
            }
            for &op in compute
                .iter()
                .filter(|o| matches!(o, Op::ReleaseWeight { .. }))
            {
                self.op(op)?;
            }
        }
        Ok(())
    }

    fn unit_slot(&self, token: usize, unit: usize) -> usize {
        (token * self.plan.units.len() + unit) % 2
    }

    /// Whether cell `c`'s attention runs on the CPU for the sequences whose cache is not on the
    /// GPU (`cpu_cache_compute`, decode tokens only: the prefill runs on the GPU).
    fn delegated(&self, c: Cell, cell: &CacheCell) -> bool {
        self.exec.policy.cpu_cache_compute && c.token > 0 && cell.split.gpu < cell.split.rows()
    }

    /// Decode attention with the GPU sequences' rows on the device cache and the others on all
    /// CPU cores against their RAM (or just-read disk) rows, new keys and values appended where
    /// each sequence's cache lives. Returns `[rows, heads * head_dim]` on the device.
    fn cpu_attention(
        &self,
        cell: &mut CacheCell,
        rb: &RowBatch,
        [q, k, v]: [&GpuTensor; 3],
    ) -> Result<GpuTensor> {
        let r = &self.exec.runner;
        let ctx = &r.ctx;
        let layout = r.head_layout();
        let scale = 1.0 / (layout.head_dim as f32).sqrt();
        let (g, cs) = (cell.split.gpu, cell.split.cpu);
        let appends = rb.appends();
        let infos = rb.infos();
        let a = GpuTensor::zeros(ctx, &q.shape)?;
        let qw = q.shape[1];
        if g > 0 {
            // the GPU sequences' rows come first: attend them against the device cache
            let rows = appends[g - 1].0 + appends[g - 1].2;
            let cache = cell
                .gpu
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no GPU cache"))?;
            let head = |t: &GpuTensor| -> Result<GpuTensor> {
                let out = GpuTensor::zeros(ctx, &[rows, t.shape[1]])?;
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                let bytes = (rows * t.shape[1] * 4) as u64;
                enc.copy_buffer_to_buffer(&t.buffer, 0, &out.buffer, 0, bytes);
                ctx.queue.submit([enc.finish()]);
                Ok(out)
            };
            let info = Attention::upload_info(ctx, &infos[..rows]);
            let (qg, kg, vg) = (head(q)?, head(k)?, head(v)?);
            let ag = r.attend_cache(cache, &info, &appends[..g], [&qg, &kg, &vg])?;
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&ag.buffer, 0, &a.buffer, 0, (rows * qw * 4) as u64);
            ctx.queue.submit([enc.finish()]);
        }
        if g == appends.len() {
            return Ok(a);
        }
        let (qh, kh, vh) = (q.download(ctx)?, k.download(ctx)?, v.download(ctx)?);
        let kvw = k.shape[1];
        // each sequence's first cache row, and where the RAM and disk sequences' rows start
        let firsts: Vec<usize> = appends
            .iter()
            .map(|&(row, _, _)| infos[row].first as usize)
            .collect();
        let base_c = firsts.get(g).copied().unwrap_or(0);
        let base_d = firsts.get(g + cs).copied().unwrap_or(0);
        let mut disk = cell.disk_host.take();
        let missing = || Error::invalid("executor", "disk cache rows not loaded");
        // append the new keys and values where each sequence's cache lives
        for (i, &(row, at, n)) in appends.iter().enumerate().skip(g) {
            let (segs, base) = if i < g + cs {
                (&mut cell.cpu, base_c)
            } else {
                (&mut disk.as_mut().ok_or_else(missing)?.0, base_d)
            };
            let dst = (at - base) * kvw;
            let src = row * kvw..(row + n) * kvw;
            segs[0][dst..dst + n * kvw].copy_from_slice(bytemuck::cast_slice(&kh[src.clone()]));
            segs[1][dst..dst + n * kvw].copy_from_slice(bytemuck::cast_slice(&vh[src]));
        }
        let outputs: Vec<Result<Vec<f32>>> = {
            let (cpu, disk) = (&cell.cpu, disk.as_ref());
            let one = |i: usize| -> Result<Vec<f32>> {
                let (row, at, n) = appends[i];
                let (segs, base) = if i < g + cs {
                    (cpu, base_c)
                } else {
                    (&disk.ok_or_else(missing)?.0, base_d)
                };
                let (first, len) = (firsts[i] - base, at + n - firsts[i]);
                let shape_err = |e: ndarray::ShapeError| Error::invalid("executor", e.to_string());
                let span = first * kvw..(first + len) * kvw;
                let kr: &[f32] = bytemuck::cast_slice(&segs[0][span.clone()]);
                let vr: &[f32] = bytemuck::cast_slice(&segs[1][span]);
                let kk = ndarray::ArrayView2::from_shape((len, kvw), kr).map_err(shape_err)?;
                let vv = ndarray::ArrayView2::from_shape((len, kvw), vr).map_err(shape_err)?;
                let qq = ndarray::ArrayView2::from_shape((n, qw), &qh[row * qw..(row + n) * qw])
                    .map_err(shape_err)?;
                let out = causal_attention(qq, kk, vv, len - n, layout, scale);
                Ok(out.iter().copied().collect())
            };
            // the sequences, split over all cores
            let todo: Vec<usize> = (g..appends.len()).collect();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per = todo.len().div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let handles: Vec<_> = todo
                    .chunks(per)
                    .map(|chunk| s.spawn(move || chunk.iter().map(|&i| one(i)).collect::<Vec<_>>()))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| {
                        h.join().unwrap_or_else(|_| {
                            vec![Err(Error::invalid(
                                "executor",
                                "a CPU attention thread panicked",
                            ))]
                        })
                    })
                    .collect()
            })
        };
        cell.disk_host = disk;
        for (i, out) in (g..appends.len()).zip(outputs) {
            let row = appends[i].0;
            ctx.queue.write_buffer(
                &a.buffer,
                (row * qw * 4) as u64,
                bytemuck::cast_slice(&out?),
            );
        }
        Ok(a)
    }

    fn cache_layer(&self, unit: usize) -> Option<usize> {
        match self.plan.units[unit] {
            UnitKind::Attention(l) | UnitKind::Layer(l) => Some(l),
            _ => None,
        }
    }

    fn op(&self, op: Op) -> Result<()> {
        let exec = self.exec;
        let name = || op.to_string();
        match op {
            Op::LoadWeight { token, unit } => exec.span(Track::LoadWeight, name, || {
                let mut slot = lock(&exec.slots[self.unit_slot(token, unit)]);
                let placed = &exec.model.units[unit];
                let file = exec.model.file.as_deref();
                let weights = slot.load(
                    &exec.runner.ctx,
                    &exec.ledger,
                    placed,
                    file,
                    &exec.staging,
                    exec.io_threads,
                )?;
                slot.loaded = Some((token, unit, weights));
                Ok(())
            }),
            Op::ReleaseWeight { token, unit } => {
                let mut slot = lock(&exec.slots[self.unit_slot(token, unit)]);
                slot.loaded = None;
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
                self.compute(c)?;
                exec.runner.ctx.wait()
            }),
        }
    }

    fn compute(&self, c: Cell) -> Result<()> {
        let r = &self.exec.runner;
        let weights = {
            let slot = lock(&self.exec.slots[self.unit_slot(c.token, c.unit)]);
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
        fn working<'c>(cache: &'c Option<MutexGuard<'_, CacheCell>>) -> Result<&'c LayerCache> {
            let cell = cache
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "a cache unit without a cache"))?;
            cell.working
                .as_ref()
                .map(|w| &w.0)
                .or(cell.gpu.as_ref())
                .ok_or_else(|| Error::invalid("executor", "the KV cache is not loaded"))
        }
        let result = (|| -> Result<Option<GpuTensor>> {
            Ok(Some(match &weights {
                UnitWeights::Embed(w) => r.input(w, x.clone(), &rb)?,
                UnitWeights::Attention(w) if delegated => {
                    let cell = cache
                        .as_deref_mut()
                        .ok_or_else(|| Error::invalid("executor", "no cache"))?;
                    r.attention_with(w, x.clone(), &rb, |q, k, v| {
                        self.cpu_attention(cell, &rb, [q, k, v])
                    })?
                }
                UnitWeights::Layer(a, m) if delegated => {
                    let cell = cache
                        .as_deref_mut()
                        .ok_or_else(|| Error::invalid("executor", "no cache"))?;
                    let y = r.attention_with(a, x.clone(), &rb, |q, k, v| {
                        self.cpu_attention(cell, &rb, [q, k, v])
                    })?;
                    r.mlp(m, y)?
                }
                UnitWeights::Attention(w) => r.attention(w, x.clone(), working(&cache)?, &rb)?,
                UnitWeights::Mlp(w) => r.mlp(w, x.clone())?,
                UnitWeights::Layer(a, m) => {
                    let y = r.attention(a, x.clone(), working(&cache)?, &rb)?;
                    r.mlp(m, y)?
                }
                UnitWeights::Output(head, output) => {
                    let h = r.head(head, x.clone())?;
                    let mut batch = lock(&self.batches[c.batch]);
                    self.finish(&mut batch, c.token, output, &h)?;
                    return Ok(None);
                }
            }))
        })();
        if let Some(cell) = cache.as_mut() {
            // without a later token to read it, the step's cache is done with
            if c.token + 1 >= self.plan.shape.gen_len {
                r.ctx.wait()?;
                cell.working = None;
            }
        }
        drop(cache);
        let y = result?;
        drop(held);
        let mut batch = lock(&self.batches[c.batch]);
        if let Some(y) = y {
            let bytes = (y.numel() * 4) as u64;
            batch.x = Some(Activation::Gpu(
                y,
                self.exec.ledger.reserve(Tier::Gpu, bytes, "activations")?,
            ));
        }
        batch.rows = Some(rb);
        Ok(())
    }

    /// The output unit: scoring logprobs, or the next tokens and their logprobs.
    fn finish(
        &self,
        batch: &mut Batch,
        token: usize,
        output: &crate::gpu::model::GpuLinear,
        h: &GpuTensor,
    ) -> Result<()> {
        let r = &self.exec.runner;
        let new = batch.new_tokens(token);
        match self.task {
            Task::Score => {
                let (rows, targets) = crate::batch::scoring_rows(&new);
                let flat = r.reduce_logits(output, h, &rows, Some(&targets))?;
                let per = crate::batch::split_per_sequence(&flat, &new);
                for (res, lp) in batch.results.iter_mut().zip(per) {
                    res.logprobs = lp;
                }
            }
            Task::Generate(_) => {
                let last = crate::batch::last_rows(&new);
                let ids: Vec<u32> = r
                    .reduce_logits(output, h, &last, None)?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let lps = r.reduce_logits(output, h, &last, Some(&ids))?;
                for (i, res) in batch.results.iter_mut().enumerate() {
                    res.tokens.push(ids[i]);
                    res.logprobs.push(lps[i]);
                }
            }
        }
        // the cache now holds this step's tokens; the next step feeds the new ones
        for i in 0..batch.tokens.len() {
            batch.filled[i] = batch.tokens[i].len();
            if let Task::Generate(_) = self.task {
                let t = batch.results[i].tokens[token];
                batch.tokens[i].push(t);
            }
        }
        Ok(())
    }

    fn load_activation(&self, c: Cell) -> Result<()> {
        let exec = self.exec;
        let r = &exec.runner;
        let mut batch = lock(&self.batches[c.batch]);
        if c.unit == 0 {
            // the embedding lookup, on the CPU from the table's tiers
            let firsts = batch.firsts();
            let slots: Vec<CacheSlot> = (0..batch.tokens.len())
                .map(|i| CacheSlot {
                    first: firsts[i],
                    capacity: batch.capacity[i],
                    filled: if c.token == 0 { 0 } else { batch.filled[i] },
                })
                .collect();
            let new = batch.new_tokens(c.token);
            let rb = r.row_batch(&new, &slots)?;
            let values = exec.staging.with(|staging| {
                exec.model
                    .table
                    .gather(&rb.ids, exec.model.file.as_deref(), staging)
            })?;
            let width = values.len() / rb.rows.max(1);
            let held = exec
                .ledger
                .reserve(Tier::Gpu, (values.len() * 4) as u64, "activations")?;
            let x = GpuTensor::upload(&r.ctx, &values, &[rb.rows, width])?;
            batch.rows = Some(rb);
            batch.x = Some(Activation::Gpu(x, held));
            return Ok(());
        }
        if !matches!(batch.x, Some(Activation::Parked { .. })) {
            return Ok(()); // already on the GPU
        }
        let Some(Activation::Parked {
            width,
            rows,
            gpu,
            cpu,
            _held,
        }) = batch.x.take()
        else {
            return Ok(());
        };
        let total: usize = rows.iter().sum();
        let held = exec
            .ledger
            .reserve(Tier::Gpu, (total * width * 4) as u64, "activations")?;
        let x = GpuTensor::zeros(&r.ctx, &[total, width])?;
        let row_bytes = (width * 4) as u64;
        if let Some(g) = &gpu {
            let mut enc = r.ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&g.buffer, 0, &x.buffer, 0, rows[0] as u64 * row_bytes);
            r.ctx.queue.submit([enc.finish()]);
        }
        if rows[1] > 0 {
            r.ctx.queue.write_buffer(
                &x.buffer,
                rows[0] as u64 * row_bytes,
                bytemuck::cast_slice(&cpu),
            );
        }
        if rows[2] > 0 {
            let file = self
                .act_file
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no activation file"))?;
            let mut bytes = vec![0u8; rows[2] * width * 4];
            exec.staging
                .with(|s| file.read_into(self.act_extent[c.batch], &mut bytes, s))?;
            r.ctx
                .queue
                .write_buffer(&x.buffer, (rows[0] + rows[1]) as u64 * row_bytes, &bytes);
        }
        drop(_held);
        batch.x = Some(Activation::Gpu(x, held));
        Ok(())
    }

    fn store_activation(&self, c: Cell) -> Result<()> {
        if c.unit + 1 == self.plan.units.len() {
            return Ok(()); // results are on the host already
        }
        let exec = self.exec;
        let r = &exec.runner;
        let mut batch = lock(&self.batches[c.batch]);
        let split = {
            let s = &self.act_split;
            let count = |t: Range<usize>| {
                t.end
                    .min(batch.seqs.end)
                    .saturating_sub(t.start.max(batch.seqs.start))
            };
            let [g, cc, d] = s.ranges().map(|(_, t)| count(t));
            [g, cc, d]
        };
        if split[0] == batch.seqs.len() {
            return Ok(()); // all on the GPU: nothing moves
        }
        let Some(Activation::Gpu(x, held)) = batch.x.take() else {
            return Err(Error::invalid(
                "executor",
                "activations to store are not on the GPU",
            ));
        };
        let rows_of = |r: Range<usize>| -> usize {
            batch.tokens[r.clone()]
                .iter()
                .zip(&batch.filled[r])
                .map(|(t, &f)| if c.token == 0 { t.len() } else { t.len() - f })
                .sum()
        };
        let rows = [
            rows_of(0..split[0]),
            rows_of(split[0]..split[0] + split[1]),
            rows_of(split[0] + split[1]..batch.seqs.len()),
        ];
        let width = x.shape[1];
        let row_bytes = (width * 4) as u64;
        let mut kept = Vec::new();
        let gpu = if rows[0] > 0 {
            kept.push(
                exec.ledger
                    .reserve(Tier::Gpu, rows[0] as u64 * row_bytes, "activations")?,
            );
            let g = GpuTensor::zeros(&r.ctx, &[rows[0], width])?;
            let mut enc = r.ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&x.buffer, 0, &g.buffer, 0, rows[0] as u64 * row_bytes);
            r.ctx.queue.submit([enc.finish()]);
            Some(g)
        } else {
            None
        };
        let host = download_range(
            r,
            &x.buffer,
            rows[0] as u64 * row_bytes,
            (rows[1] + rows[2]) as u64 * row_bytes,
        )?;
        let split_at = rows[1] * width * 4;
        kept.push(
            exec.ledger
                .reserve(Tier::Cpu, split_at as u64, "activations")?,
        );
        let cpu: Vec<f32> = bytemuck::pod_collect_to_vec(&host[..split_at]);
        if rows[2] > 0 {
            let file = self
                .act_file
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no activation file"))?;
            exec.staging
                .with(|s| file.write_at(self.act_extent[c.batch], &host[split_at..], s))?;
        }
        drop(held);
        batch.x = Some(Activation::Parked {
            width,
            rows,
            gpu,
            cpu,
            _held: kept,
        });
        Ok(())
    }

    /// Per sequence of the batch: `(first cache row, rows filled before this step, rows new)`.
    fn cache_rows(&self, batch: &Batch, token: usize) -> Vec<(usize, usize, usize)> {
        let firsts = batch.firsts();
        (0..batch.tokens.len())
            .map(|i| {
                let before = if token == 0 { 0 } else { batch.filled[i] };
                (firsts[i], before, batch.tokens[i].len() - before)
            })
            .collect()
    }

    fn load_cache(&self, c: Cell) -> Result<()> {
        let Some(layer) = self.cache_layer(c.unit) else {
            return Ok(());
        };
        let exec = self.exec;
        let r = &exec.runner;
        let (seq_rows, total) = {
            let b = lock(&self.batches[c.batch]);
            (
                self.cache_rows(&b, c.token),
                b.capacity.iter().sum::<usize>(),
            )
        };
        let mut cell = lock(&self.caches[layer][c.batch]);
        if cell.split.gpu == cell.split.rows() {
            return Ok(()); // the persistent cache is the working cache
        }
        if self.delegated(c, &cell) {
            return self.load_disk_rows_to_host(&mut cell, &seq_rows, total);
        }
        let held = exec.ledger.reserve(
            Tier::Gpu,
            total as u64 * r.cache_bytes_per_row(),
            "KV cache being computed",
        )?;
        let working = r.layer_cache(total)?;
        let (gs, cs) = (cell.split.gpu, cell.split.cpu);
        let segs: Vec<(wgpu::Buffer, u64)> = working
            .segments()
            .into_iter()
            .map(|(b, s)| (b.clone(), s))
            .collect();
        // GPU sequences 0..gs sit at the same rows in both caches
        if let Some(g) = &cell.gpu {
            let mut enc = r.ctx.device.create_command_encoder(&Default::default());
            for ((src, s), (dst, _)) in g.segments().into_iter().zip(&segs) {
                for &(first, before, _) in &seq_rows[..gs] {
                    let at = first as u64 * s;
                    enc.copy_buffer_to_buffer(src, at, dst, at, before as u64 * s);
                }
            }
            r.ctx.queue.submit([enc.finish()]);
        }
        // RAM rows: sequences gs..gs+cs, stored from the first of them
        let base_c = seq_rows.get(gs).map_or(0, |s| s.0);
        for (i, (dst, s)) in segs.iter().enumerate() {
            for &(first, before, _) in &seq_rows[gs..gs + cs] {
                let at = (first - base_c) * *s as usize;
                let bytes: &[u8] = bytemuck::cast_slice(&cell.cpu[i]);
                let bytes = &bytes[at..at + before * *s as usize];
                if !bytes.is_empty() {
                    r.ctx.queue.write_buffer(dst, first as u64 * s, bytes);
                }
            }
        }
        // disk rows: the rest, from the cache file
        let base_d = seq_rows.get(gs + cs).map_or(0, |s| s.0);
        if cell.split.disk > 0 {
            let file = self
                .cache_file
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no cache file"))?;
            exec.staging.with(|staging| {
                for (i, (dst, s)) in segs.iter().enumerate() {
                    for &(first, before, _) in &seq_rows[gs + cs..] {
                        let mut bytes = vec![0u8; before * *s as usize];
                        file.read_into(
                            cell.disk[i] + ((first - base_d) as u64 * s),
                            &mut bytes,
                            staging,
                        )?;
                        if !bytes.is_empty() {
                            r.ctx.queue.write_buffer(dst, first as u64 * s, &bytes);
                        }
                    }
                }
                Ok(())
            })?;
        }
        cell.working = Some((working, Some(held)));
        Ok(())
    }

    /// Bytes per row of each cache segment.
    fn segment_bytes(&self) -> Result<Vec<usize>> {
        let probe = self.exec.runner.layer_cache(1)?;
        Ok(probe.segments().iter().map(|s| s.1 as usize).collect())
    }

    /// With attention on the CPU: the disk sequences' cached rows into RAM for this step.
    fn load_disk_rows_to_host(
        &self,
        cell: &mut CacheCell,
        seq_rows: &[(usize, usize, usize)],
        total: usize,
    ) -> Result<()> {
        let exec = self.exec;
        let first_disk = cell.split.gpu + cell.split.cpu;
        if cell.split.disk == 0 {
            return Ok(());
        }
        let seg_bytes = self.segment_bytes()?;
        // rows from the first disk sequence's first row to the end of the batch's cache
        let base = seq_rows[first_disk].0;
        let rows = total - base;
        let held = exec.ledger.reserve(
            Tier::Cpu,
            (rows * seg_bytes.iter().sum::<usize>()) as u64,
            "KV cache read for CPU attention",
        )?;
        let file = self
            .cache_file
            .as_ref()
            .ok_or_else(|| Error::invalid("executor", "no cache file"))?;
        let mut segs: Vec<Vec<u32>> = seg_bytes
            .iter()
            .map(|&s| vec![0u32; rows * s / 4])
            .collect();
        exec.staging.with(|staging| {
            for (i, &s) in seg_bytes.iter().enumerate() {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut segs[i]);
                for &(first, before, _) in &seq_rows[first_disk..] {
                    let at = (first - base) * s;
                    file.read_into(
                        cell.disk[i] + at as u64,
                        &mut bytes[at..at + before * s],
                        staging,
                    )?;
                }
            }
            Ok(())
        })?;
        cell.disk_host = Some((segs, held));
        Ok(())
    }

    fn store_cache(&self, c: Cell) -> Result<()> {
        let Some(layer) = self.cache_layer(c.unit) else {
            return Ok(());
        };
        let exec = self.exec;
        let r = &exec.runner;
        let rows = self.new_rows(c)?;
        let mut cell = lock(&self.caches[layer][c.batch]);
        if self.delegated(c, &cell) {
            // RAM rows were appended in place; the disk sequences' new rows go to the file
            let Some((segs, _held)) = cell.disk_host.take() else {
                return Ok(());
            };
            let first_disk = cell.split.gpu + cell.split.cpu;
            let base = rows[first_disk].0;
            let file = self
                .cache_file
                .as_ref()
                .ok_or_else(|| Error::invalid("executor", "no cache file"))?;
            let seg_bytes = self.segment_bytes()?;
            return exec.staging.with(|staging| {
                for (i, seg) in segs.iter().enumerate() {
                    let s = seg_bytes[i];
                    let bytes: &[u8] = bytemuck::cast_slice(seg);
                    for &(first, from, n) in &rows[first_disk..] {
                        let at = (first - base + from) * s;
                        file.write_at(cell.disk[i] + at as u64, &bytes[at..at + n * s], staging)?;
                    }
                }
                Ok(())
            });
        }

        let [gs, cs, _] = [cell.split.gpu, cell.split.cpu, cell.split.disk];
        if gs == cell.split.rows() {
            return Ok(());
        }
        let Some((working, held)) = cell.working.take() else {
            return Err(Error::invalid("executor", "no cache rows to store"));
        };
        let segs: Vec<(wgpu::Buffer, u64)> = working
            .segments()
            .into_iter()
            .map(|(b, s)| (b.clone(), s))
            .collect();
        if let Some(g) = &cell.gpu {
            let mut enc = r.ctx.device.create_command_encoder(&Default::default());
            for ((dst, s), (src, _)) in g.segments().into_iter().zip(&segs) {
                for &(first, from, n) in &rows[..gs] {
                    let at = (first + from) as u64 * s;
                    enc.copy_buffer_to_buffer(src, at, dst, at, n as u64 * s);
                }
            }
            r.ctx.queue.submit([enc.finish()]);
        }
        let base_c = rows.get(gs).map_or(0, |s| s.0);
        let base_d = rows.get(gs + cs).map_or(0, |s| s.0);
        let ranges: Vec<(usize, usize, u64, u64)> = segs
            .iter()
            .enumerate()
            .flat_map(|(i, (_, s))| {
                rows[gs..]
                    .iter()
                    .enumerate()
                    .map(move |(j, &(first, from, n))| {
                        (i, gs + j, (first + from) as u64 * s, n as u64 * s)
                    })
            })
            .filter(|r| r.3 > 0)
            .collect();
        let host = download_ranges(r, &segs, &ranges)?;
        for ((i, seq, _, _), bytes) in ranges.iter().zip(host) {
            let (first, from, _) = rows[*seq];
            let s = segs[*i].1 as usize;
            if *seq < gs + cs {
                let at = (first - base_c + from) * s;
                let words: &mut [u8] = bytemuck::cast_slice_mut(&mut cell.cpu[*i]);
                words[at..at + bytes.len()].copy_from_slice(&bytes);
            } else {
                let file = self
                    .cache_file
                    .as_ref()
                    .ok_or_else(|| Error::invalid("executor", "no cache file"))?;
                let at = cell.disk[*i] + ((first - base_d + from) * s) as u64;
                exec.staging.with(|st| file.write_at(at, &bytes, st))?;
            }
        }
        drop(held);
        drop(working);
        Ok(())
    }

    /// Per sequence: `(first cache row, first new row, new rows)` of cell `c`'s token step.
    fn new_rows(&self, c: Cell) -> Result<Vec<(usize, usize, usize)>> {
        let b = lock(&self.batches[c.batch]);
        let firsts = b.firsts();
        Ok((0..b.tokens.len())
            .map(|i| {
                // prefill: the prompt's rows; decode token t: one row at prompt + t - 1
                let prompt = b.tokens[i].len()
                    - match self.task {
                        Task::Generate(_) => b.results[i].tokens.len(),
                        Task::Score => 0,
                    };
                if c.token == 0 {
                    (firsts[i], 0, prompt)
                } else {
                    (firsts[i], prompt + c.token - 1, 1)
                }
            })
            .collect())
    }
}

/// Copies `len` bytes at `offset` of `buffer` to the host.
fn download_range(r: &GpuRunner, buffer: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<u8>> {
    let segs = [(buffer.clone(), 0u64)];
    let mut out = download_ranges(r, &segs, &[(0, 0, offset, len)])?;
    Ok(out.pop().unwrap_or_default())
}

/// Copies byte ranges `(segment, _, offset, len)` of `segs` to the host in one transfer.
fn download_ranges(
    r: &GpuRunner,
    segs: &[(wgpu::Buffer, u64)],
    ranges: &[(usize, usize, u64, u64)],
) -> Result<Vec<Vec<u8>>> {
    let total: u64 = ranges.iter().map(|r| r.3).sum();
    if total == 0 {
        return Ok(ranges.iter().map(|_| Vec::new()).collect());
    }
    let ctx = &r.ctx;
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("download"),
        size: total,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let mut at = 0;
    for &(seg, _, offset, len) in ranges {
        if len > 0 {
            enc.copy_buffer_to_buffer(&segs[seg].0, offset, &staging, at, len);
        }
        at += len;
    }
    ctx.queue.submit([enc.finish()]);
    let words = crate::gpu::tensor::map_read(ctx, &staging)?;
    let mut out = Vec::with_capacity(ranges.len());
    let mut at = 0usize;
    for &(_, _, _, len) in ranges {
        out.push(words[at..at + len as usize].to_vec());
        at += len as usize;
    }
    Ok(out)
}
