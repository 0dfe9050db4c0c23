//! [`Engine`]: the public entry point. Open a model with a policy file or with memory budgets
//! (the policy search then picks the placement for a hardware profile), then score sequences or
//! generate. Weights, KV cache and activations are placed across GPU, CPU and disk as the policy
//! says, and every block of sequences runs through FlexGen's zig-zag schedule.
//!
//! ```no_run
//! use ferrogen::engine::{Engine, EngineOptions, Placement};
//! use ferrogen::policy::Policy;
//! use std::path::PathBuf;
//!
//! # fn main() -> ferrogen::Result<()> {
//! let policy = Policy::from_toml_file("my-policy.toml".as_ref())?;
//! let options =
//!     EngineOptions::new(Placement::Policy(policy)).offload_dir(PathBuf::from("/mnt/nvme/ferrogen"));
//! let engine = Engine::open("model.gguf".as_ref(), options)?;
//! let logprobs = engine.token_logprobs(&[&[1, 17, 42, 7]])?;
//! # Ok(()) }
//! ```

use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::arch::Runner;
use crate::arch::{ModelConfig, ModelFiles};
use crate::batch::{PrefixGroup, TokenScores};
use crate::device::{CpuDevice, Device, DeviceKind};
use crate::error::{Error, Result};
use crate::exec::placer::Placer;
use crate::exec::state::{Executor, GenControl};
use crate::exec::{SeqResult, Task, Trace};
use crate::gpu::{GpuContext, WgpuDevice};
use crate::plan::{plan, staging_buffers, PlanRequest};
pub use crate::plan::{runtime_bytes_per_value, Placement};
use crate::policy::{CostModel, HardwareProfile, Policy, Workload};
use crate::sampling::{Decoding, Sampling};
use crate::storage::offload::{OffloadDir, StagingPool};
use crate::storage::{MemoryLedger, Tier};

/// The hardware profile measured on the CI machine (2 cores, lavapipe), used when a search
/// is asked for without a profile.
pub const DEFAULT_PROFILE: &str = include_str!("../policies/lavapipe-2core.toml");

/// [`DEFAULT_PROFILE`], parsed.
pub fn default_profile() -> Result<HardwareProfile> {
    toml::from_str(DEFAULT_PROFILE)
        .map_err(|e| Error::invalid("built-in hardware profile", e.to_string()))
}

/// How an [`Engine`] is opened.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Policy or search.
    pub placement: Placement,
    /// GPU budget in bytes (`u64::MAX`: unlimited).
    pub gpu_budget: u64,
    /// CPU budget in bytes (`u64::MAX`: unlimited). A finite one also makes the C allocator
    /// return freed blocks to the system, for the whole process
    /// (the allocator is told to trim).
    pub cpu_budget: u64,
    /// Where disk-tier data goes; needed when the policy puts anything on disk.
    pub offload_dir: Option<PathBuf>,
    /// Keep the offloaded weights at exit (reused by the next run with the same model and
    /// policy).
    pub keep_offload: bool,
    /// Record a timeline of every load, compute and store.
    pub trace: bool,
    /// Disk read size (a policy search uses its profile's instead).
    pub io_chunk_bytes: u64,
    /// Threads reading one unit's disk pieces (a policy search uses its profile's instead).
    pub io_threads: usize,
    /// The compute device ([`Engine::open`]; [`Engine::open_on`] takes one instead).
    pub device: DeviceKind,
    /// Threads of the CPU device (0: one per core).
    pub cpu_threads: usize,
    /// Score sequences that begin with the same tokens as prefix groups, the common part
    /// computed once ([`crate::PrefixGroup`]; on by default).
    pub share_prefixes: bool,
    /// The most sequences a block will hold (a generation job's batch of records): the
    /// search tries no block larger, so memory is not planned for sequences that never
    /// come (`usize::MAX`: no limit).
    pub max_block_sequences: usize,
}

impl EngineOptions {
    /// Unlimited budgets, no offload directory, no trace.
    pub fn new(placement: Placement) -> Self {
        Self {
            placement,
            gpu_budget: u64::MAX,
            cpu_budget: u64::MAX,
            offload_dir: None,
            keep_offload: false,
            trace: false,
            io_chunk_bytes: 1 << 20,
            io_threads: 2,
            device: DeviceKind::Auto,
            cpu_threads: 0,
            share_prefixes: true,
            max_block_sequences: usize::MAX,
        }
    }

    /// Sets the GPU budget in bytes (on the CPU device, leave it unlimited).
    pub fn gpu_budget(mut self, bytes: u64) -> Self {
        self.gpu_budget = bytes;
        self
    }

    /// Sets the CPU (RAM) budget in bytes.
    pub fn cpu_budget(mut self, bytes: u64) -> Self {
        self.cpu_budget = bytes;
        self
    }

    /// Sets (or, with `None`, clears) the directory for disk-tier data.
    pub fn offload_dir(mut self, dir: impl Into<Option<PathBuf>>) -> Self {
        self.offload_dir = dir.into();
        self
    }

    /// Keeps the offloaded weights at exit for the next run with the same model and policy.
    pub fn keep_offload(mut self, keep: bool) -> Self {
        self.keep_offload = keep;
        self
    }

    /// Records a timeline of every load, compute and store ([`Engine::trace`]).
    pub fn trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }

    /// Sets the disk read size in bytes.
    pub fn io_chunk_bytes(mut self, bytes: u64) -> Self {
        self.io_chunk_bytes = bytes;
        self
    }

    /// Sets the number of threads reading one unit's disk pieces.
    pub fn io_threads(mut self, threads: usize) -> Self {
        self.io_threads = threads;
        self
    }

    /// Chooses the compute device for [`Engine::open`] and [`Engine::open_with`].
    pub fn device(mut self, device: DeviceKind) -> Self {
        self.device = device;
        self
    }

    /// Sets the CPU device's threads (0: one per core).
    pub fn cpu_threads(mut self, threads: usize) -> Self {
        self.cpu_threads = threads;
        self
    }

    /// Turns prefix groups on or off (on by default): off, every sequence is computed whole.
    pub fn share_prefixes(mut self, on: bool) -> Self {
        self.share_prefixes = on;
        self
    }

    /// Limits the blocks the policy search plans to `sequences` (at least 1).
    pub fn max_block_sequences(mut self, sequences: usize) -> Self {
        self.max_block_sequences = sequences.max(1);
        self
    }
}

/// What the engine needs from an executor, whatever its device.
trait BlockRunner: Send + Sync {
    fn run_block(
        &self,
        seqs: &[PrefixGroup],
        batch_sizes: &[usize],
        task: Task,
        control: Option<GenControl<'_>>,
    ) -> Result<Vec<SeqResult>>;
    fn policy(&self) -> &Policy;
    fn ledger(&self) -> &Arc<MemoryLedger>;
    fn placed_bytes(&self) -> [u64; 3];
    fn streamed_bytes(&self) -> u64;
    fn reused(&self) -> bool;
    fn damaged(&self) -> bool;
    fn check_seconds(&self) -> f64;
    fn trace(&self) -> Option<Trace>;
    fn describe(&self) -> String;
    fn is_host(&self) -> bool;
}

impl<D: Device> BlockRunner for Executor<D> {
    fn run_block(
        &self,
        seqs: &[PrefixGroup],
        batch_sizes: &[usize],
        task: Task,
        control: Option<GenControl<'_>>,
    ) -> Result<Vec<SeqResult>> {
        Executor::run_block(self, seqs, batch_sizes, task, control)
    }
    fn policy(&self) -> &Policy {
        &self.policy
    }
    fn ledger(&self) -> &Arc<MemoryLedger> {
        &self.ledger
    }
    fn placed_bytes(&self) -> [u64; 3] {
        self.model.placed_bytes
    }
    fn streamed_bytes(&self) -> u64 {
        self.model
            .units
            .iter()
            .flat_map(|u| &u.linears)
            .map(|l| l.streamed_bytes())
            .sum()
    }
    fn reused(&self) -> bool {
        self.model.reused
    }
    fn damaged(&self) -> bool {
        self.model.damaged
    }
    fn check_seconds(&self) -> f64 {
        self.model.check_seconds
    }
    fn trace(&self) -> Option<Trace> {
        self.trace
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
    fn describe(&self) -> String {
        self.runner.dev.describe()
    }
    fn is_host(&self) -> bool {
        self.runner.dev.is_host()
    }
}

/// A model placed across the tiers, ready to score or generate.
pub struct Engine {
    executor: Box<dyn BlockRunner>,
    /// Held while a block runs: blocks of calls from several threads run one at a time (they
    /// share the device, the weight slots and the budgets).
    block_lock: Mutex<()>,
    files: ModelFiles,
    /// The cost model the policy search placed the model with (`None`: a policy file): its
    /// workload is the records the placement was sized for, and its memory forms screen a
    /// call's longer records before any work.
    searched: Option<CostModel>,
    /// The budgets `[device, CPU, disk]` (on the CPU device, RAM twice).
    budgets: [u64; 3],
    /// Counts of the blocks run so far.
    stats: Mutex<BlockStats>,
    /// Whether scoring shares common prefixes ([`EngineOptions::share_prefixes`]).
    share_prefixes: bool,
    /// The disk tier's directory: declared last, so dropped after the executor's files (it
    /// is removed when this run created it and left it empty).
    _offload_dir: Option<OffloadDir>,
}

/// How full an engine's blocks were ([`Engine::block_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockStats {
    /// Blocks run.
    pub blocks: u64,
    /// Sequences run (a rolling window counts as one; a prefix group as its members).
    pub sequences: u64,
    /// Tokens run (rows computed: a prefix group's shared rows count once).
    pub tokens: u64,
    /// Tokens of sequences that prefix groups did not compute again (the shared rows
    /// counted for every member but the first).
    pub shared_tokens: u64,
    /// Sequences the blocks could have held: `gbs * nb` per block.
    pub sequence_capacity: u64,
    /// Tokens the blocks could have held, for blocks packed by tokens (scoring on a searched
    /// placement: `gbs * prompt_len * nb` per block); 0 otherwise.
    pub token_capacity: u64,
}

impl BlockStats {
    /// The share of the blocks' capacity that was used: tokens over token capacity for packed
    /// blocks, else sequences over sequence capacity (1.0 when nothing ran).
    pub fn fill(&self) -> f64 {
        let (used, capacity) = if self.token_capacity > 0 {
            (self.tokens, self.token_capacity)
        } else {
            (self.sequences, self.sequence_capacity)
        };
        if capacity == 0 {
            1.0
        } else {
            used as f64 / capacity as f64
        }
    }
}

/// The device tier's budget: the GPU budget, or on a device that computes in RAM the CPU
/// budget (a GPU budget there is an error). A finite CPU budget makes freed memory leave the
/// process, so that its RAM follows the ledger.
fn device_budget(host: bool, options: &EngineOptions) -> Result<u64> {
    if options.cpu_budget != u64::MAX {
        crate::storage::heap::return_freed_memory();
    }
    if !host {
        return Ok(options.gpu_budget);
    }
    if options.gpu_budget != u64::MAX {
        return Err(Error::invalid(
            "EngineOptions::gpu_budget",
            "the CPU device computes in RAM: budget all of its memory with \
             EngineOptions::cpu_budget",
        ));
    }
    Ok(options.cpu_budget)
}

/// The disk tier: the offload directory (created when missing) and its free bytes as the
/// disk budget; none and 0 without a directory.
fn offload_dir(dir: Option<&Path>) -> Result<(Option<OffloadDir>, u64)> {
    let Some(dir) = dir else {
        return Ok((None, 0));
    };
    let dir = OffloadDir::prepare(dir)?;
    let free = crate::storage::direct::free_disk_bytes(dir.path()).unwrap_or(u64::MAX);
    Ok((Some(dir), free))
}

impl Engine {
    /// Opens the model at `path` (a GGUF file, or a directory of `config.json` and safetensors:
    /// [`ModelFiles::open`]) on the device
    /// `options.device` names.
    pub fn open(path: &Path, options: EngineOptions) -> Result<Self> {
        let files = ModelFiles::open(path)?;
        Self::open_with(files, options)
    }

    /// Places `files` on the device `options.device` names: `Auto` takes a discrete or
    /// integrated GPU through WebGPU when there is one, else the CPU device.
    pub fn open_with(files: ModelFiles, options: EngineOptions) -> Result<Self> {
        let cpu = || CpuDevice::new(options.cpu_threads);
        match options.device {
            DeviceKind::Cpu => Self::open_on(cpu()?, files, options),
            DeviceKind::Wgpu => Self::open_files(GpuContext::new()?, files, options),
            DeviceKind::Auto => match GpuContext::new() {
                Ok(ctx)
                    if matches!(
                        ctx.info.device_type,
                        wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
                    ) =>
                {
                    Self::open_files(ctx, files, options)
                }
                _ => Self::open_on(cpu()?, files, options),
            },
        }
    }

    /// Places `files` on the WebGPU device `ctx` as `options` say.
    pub fn open_files(ctx: GpuContext, files: ModelFiles, options: EngineOptions) -> Result<Self> {
        Self::open_on(WgpuDevice::new(ctx)?, files, options)
    }

    /// Places `files` on `dev` as `options` say. On a device that computes in RAM (the CPU
    /// device) the GPU and CPU tiers are one: `cpu_budget` covers all of it, and a GPU budget
    /// is an error.
    pub fn open_on<D: Device>(dev: D, files: ModelFiles, options: EngineOptions) -> Result<Self> {
        let host = dev.is_host();
        let device_budget = device_budget(host, &options)?;
        let (offload_dir, disk_budget) = offload_dir(options.offload_dir.as_deref())?;
        let request = PlanRequest {
            placement: &options.placement,
            budgets: [device_budget, options.cpu_budget, disk_budget],
            io: (options.io_chunk_bytes as usize, options.io_threads),
            max_block_sequences: options.max_block_sequences,
        };
        let plan = plan(&dev, &files, &request)?;
        let ledger = if host {
            MemoryLedger::unified(options.cpu_budget, disk_budget)
        } else {
            MemoryLedger::new(device_budget, options.cpu_budget, disk_budget)
        };
        let mut runner = Runner::new(dev, &files.config, plan.run);
        (runner.logit_rows, runner.chunk_rows) = (plan.logit_rows, plan.chunk_rows);
        let model = Placer {
            dev: &runner.dev,
            files: &files,
            format: plan.run.weights,
            split: plan.policy.weights(),
            sep_layer: plan.policy.sep_layer,
            logit_panels: plan.logit_panels,
            ledger: &ledger,
            offload_dir: options.offload_dir.as_deref(),
            keep_offload: options.keep_offload,
        }
        .place()?;
        runner.dev.wait()?;
        let (chunk, io_threads) = plan.staging;
        let executor = Executor {
            runner,
            model,
            policy: plan.policy,
            staging: StagingPool::new(&ledger, staging_buffers(io_threads), chunk)?,
            ledger,
            io_threads,
            slots: Default::default(),
            offload_dir: options.offload_dir.clone(),
            trace: options.trace.then(|| Mutex::new(Trace::new())),
        };
        Ok(Self {
            executor: Box::new(executor),
            block_lock: Mutex::new(()),
            files,
            searched: plan.searched,
            stats: Mutex::new(BlockStats::default()),
            budgets: [device_budget, options.cpu_budget, disk_budget],
            share_prefixes: options.share_prefixes,
            _offload_dir: offload_dir,
        })
    }

    /// The policy in use.
    pub fn policy(&self) -> &Policy {
        self.executor.policy()
    }

    /// The compute device in words.
    pub fn device(&self) -> String {
        self.executor.describe()
    }

    /// Whether the device computes in host RAM (the CPU device): then its tier and the CPU's
    /// are one memory, budgeted by `cpu_budget`.
    pub fn on_host(&self) -> bool {
        self.executor.is_host()
    }

    /// The opened model (configuration, tokenizer).
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// The memory ledger: bytes in use and peaks per tier.
    pub fn ledger(&self) -> &Arc<MemoryLedger> {
        self.executor.ledger()
    }

    /// Bytes of weights placed on each tier (GPU, CPU, disk).
    pub fn weight_bytes(&self) -> [u64; 3] {
        self.executor.placed_bytes()
    }

    /// Bytes of weights streamed onto the GPU per token step (all units' CPU and disk rows).
    pub fn streamed_bytes_per_token(&self) -> u64 {
        self.executor.streamed_bytes()
    }

    /// Whether the offloaded weights were reused from an earlier run.
    pub fn reused_offload(&self) -> bool {
        self.executor.reused()
    }

    /// Seconds spent checking the checksums of a reused offload file (0 when none was).
    pub fn offload_check_seconds(&self) -> f64 {
        self.executor.check_seconds()
    }

    /// Whether a kept offload file for this model and placement was found damaged (a
    /// checksum failed) and written anew.
    pub fn rewrote_damaged_offload(&self) -> bool {
        self.executor.damaged()
    }

    /// The timeline so far (when opened with `trace`).
    pub fn trace(&self) -> Option<Trace> {
        self.executor.trace()
    }

    /// Runs `seqs` in blocks of `nb` GPU batches ([`Engine::batch_sizes`]), handing results
    /// to `on_block` (with the index of the first sequence they answer) as soon as a block
    /// completes a run of sequences, until `on_block` breaks. When scoring, sequences that
    /// begin alike run as prefix groups ([`Engine::groups`]), whose members may be far apart
    /// in `seqs`: results wait until those before them are done. Each block holds the engine
    /// to itself while it runs.
    fn run_each(
        &self,
        seqs: &[&[u32]],
        task: Task,
        control: Option<GenControl<'_>>,
        mut on_block: impl FnMut(usize, Vec<SeqResult>) -> ControlFlow<()>,
    ) -> Result<()> {
        if task == Task::Score {
            crate::batch::check_scorable(seqs)?;
        }
        self.check_longest(seqs, task)?;
        let (members, groups): (Vec<Vec<usize>>, Vec<PrefixGroup>) =
            self.groups(seqs, task).into_iter().unzip();
        let mut done: Vec<Option<SeqResult>> = vec![None; seqs.len()];
        let mut next = 0;
        for (range, sizes) in self.blocks(&groups, task) {
            let results = {
                let _running = self.block_lock.lock().unwrap_or_else(|e| e.into_inner());
                // (generation: one sequence per group, so the block's first is the call's)
                let control = control.map(|c| GenControl {
                    first: range.start,
                    ..c
                });
                self.run_fitting(&groups[range.clone()], &sizes, task, control)?
            };
            // results are per member, group by group
            for (&i, r) in members[range].iter().flatten().zip(results) {
                done[i] = Some(r);
            }
            let end = (next..seqs.len())
                .find(|&i| done[i].is_none())
                .unwrap_or(seqs.len());
            if end > next {
                let run = done[next..end]
                    .iter_mut()
                    .map(|r| r.take().unwrap_or_default())
                    .collect();
                let first = std::mem::replace(&mut next, end);
                if on_block(first, run).is_break() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The sequences as the blocks run them, each with the indices of the sequences it
    /// answers: when scoring with [`EngineOptions::share_prefixes`], those that begin alike as
    /// prefix groups (`group_prefixes`) of at most a batch's token capacity
    /// (or the model's context, when batches are counted in sequences); else one each.
    fn groups(&self, seqs: &[&[u32]], task: Task) -> Vec<(Vec<usize>, PrefixGroup)> {
        // (a sliding window hides a shared prefix from later rows: no groups there)
        let windowed = self.files.config.attention_window().is_some();
        if task == Task::Score && self.share_prefixes && !windowed {
            let context = self.files.config.max_context();
            let most = self
                .batch_token_capacity(task)
                .unwrap_or(context)
                .min(context);
            crate::batch::group_prefixes(seqs, most)
        } else {
            seqs.iter()
                .enumerate()
                .map(|(i, s)| (vec![i], PrefixGroup::single(s)))
                .collect()
        }
    }

    /// `seqs` in blocks of at most `nb` GPU batches ([`Engine::batch_sizes`]): each block's
    /// sequences and its batches' sizes.
    fn blocks(&self, seqs: &[PrefixGroup], task: Task) -> Vec<(Range<usize>, Vec<usize>)> {
        let nb = self.executor.policy().num_gpu_batches.max(1);
        let mut first = 0;
        let sizes = self.batch_sizes(seqs, task);
        sizes
            .chunks(nb)
            .map(|block| {
                let range = first..first + block.iter().sum::<usize>();
                first = range.end;
                (range, block.to_vec())
            })
            .collect()
    }

    /// The tokens a GPU batch is sized for when the engine packs records by tokens: `gbs *
    /// prompt_len` for scoring on a searched placement (the rows of `gbs` records of the length
    /// the search was told of); `None` otherwise (batches of `gbs` sequences).
    fn batch_token_capacity(&self, task: Task) -> Option<usize> {
        match (task, &self.searched) {
            (Task::Score, Some(model)) => Some(
                self.executor.policy().gpu_batch_size.max(1) * model.workload.prompt_len.max(1),
            ),
            _ => None,
        }
    }

    /// How many consecutive sequences each GPU batch takes: `gbs`, or when scoring on a
    /// searched placement, as many as fit the batch's token capacity (at least one), so that
    /// short records (a multiple-choice ending, a cloze word) fill the batch the budgets were
    /// sized for, and the weights streamed once per block serve that many tokens.
    fn batch_sizes(&self, seqs: &[PrefixGroup], task: Task) -> Vec<usize> {
        let Some(capacity) = self.batch_token_capacity(task) else {
            let gbs = self.executor.policy().gpu_batch_size.max(1);
            return seqs.chunks(gbs).map(<[_]>::len).collect();
        };
        // next fit: a batch takes sequences while their tokens fit
        let mut sizes = Vec::new();
        let (mut count, mut tokens) = (0, 0);
        for s in seqs {
            if count > 0 && tokens + s.len() > capacity {
                sizes.push(count);
                (count, tokens) = (0, 0);
            }
            count += 1;
            tokens += s.len();
        }
        if count > 0 {
            sizes.push(count);
        }
        sizes
    }

    /// Adds a block that ran to the counts of [`Engine::block_stats`].
    fn count_block(&self, seqs: &[PrefixGroup], task: Task) {
        let policy = self.executor.policy();
        let batches = policy.num_gpu_batches.max(1);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.blocks += 1;
        stats.sequences += seqs.iter().map(|g| g.branches.len() as u64).sum::<u64>();
        stats.tokens += seqs.iter().map(|g| g.len() as u64).sum::<u64>();
        stats.shared_tokens += seqs.iter().map(|g| g.saved_rows() as u64).sum::<u64>();
        stats.sequence_capacity += (batches * policy.gpu_batch_size.max(1)) as u64;
        if let Some(capacity) = self.batch_token_capacity(task) {
            stats.token_capacity += (batches * capacity) as u64;
        }
    }

    /// How full the blocks run so far were: the weights are read once per block, so the more
    /// tokens a block holds, the less each costs.
    pub fn block_stats(&self) -> BlockStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses, before any of its blocks runs, a call to a searched placement whose longest
    /// sequence is longer than the search was told of and does not fit the budgets even alone
    /// in its batch (the smallest block [`Engine::run_fitting`] falls back to). The cost model
    /// screens ([`Engine::model_flags`]); as its peaks run above what the executor holds (by a
    /// few percent to a third), a sequence it flags is then run alone, and the call is refused
    /// only if that run is refused too (its result is dropped: the sequence runs again in its
    /// block). Records the search was told of always fit. A policy file's placement is checked
    /// as memory is allocated, block by block.
    fn check_longest(&self, seqs: &[&[u32]], task: Task) -> Result<()> {
        if !self.model_flags(seqs, task) {
            return Ok(());
        }
        let Some(longest) = seqs.iter().max_by_key(|s| s.len()) else {
            return Ok(());
        };
        let _running = self.block_lock.lock().unwrap_or_else(|e| e.into_inner());
        match self
            .executor
            .run_block(&[PrefixGroup::single(longest)], &[1], task, None)
        {
            Err(Error::Infeasible {
                tier,
                short_bytes,
                detail,
            }) => Err(Error::Infeasible {
                tier,
                short_bytes,
                detail: format!(
                    "a sequence of {} tokens does not fit even alone in its batch: {detail}; \
                     or score long records in shorter windows (ScoreOptions::window)",
                    longest.len(),
                ),
            }),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }

    /// The cost model's screen for [`Engine::check_longest`]: whether a call's longest
    /// sequence is longer than the search was told of and the model's peaks for the placement
    /// at one sequence of that length exceed a budget.
    fn model_flags(&self, seqs: &[&[u32]], task: Task) -> bool {
        let Some(longest) = seqs.iter().map(|s| s.len()).max() else {
            return false;
        };
        let gen_len = match task {
            Task::Score => 1,
            Task::Generate(0) => return false,
            Task::Generate(n) => n,
        };
        let mut model = match &self.searched {
            Some(m) if longest > m.workload.prompt_len || gen_len > m.workload.gen_len => m.clone(),
            _ => return false,
        };
        model.workload = Workload {
            prompt_len: longest,
            gen_len,
        };
        // (the sequence in a block of its own: its cache and activations on one tier each)
        let alone = Policy {
            gpu_batch_size: 1,
            num_gpu_batches: 1,
            ..self.executor.policy().clone()
        }
        .placed_for(1);
        let need = model.predict(&alone);
        // (on the CPU device the first budget is RAM's, and the model's CPU peak is 0)
        [need.gpu_peak_bytes, need.cpu_peak_bytes, need.disk_bytes]
            .into_iter()
            .zip(self.budgets)
            .any(|(need, budget)| need > budget as f64)
    }

    /// Runs one block; when its sequences are too long for the budgets (a block's workspace,
    /// cache and activations grow with its tokens), runs each half on its own instead, down to
    /// single sequences (a prefix group, down to its members). Nothing is kept from a block
    /// that failed.
    fn run_fitting(
        &self,
        seqs: &[PrefixGroup],
        batch_sizes: &[usize],
        task: Task,
        control: Option<GenControl<'_>>,
    ) -> Result<Vec<SeqResult>> {
        // the control of sequences `from..` of these
        let from = |at: usize| {
            control.map(|c| GenControl {
                first: c.first + at,
                ..c
            })
        };
        match self.executor.run_block(seqs, batch_sizes, task, control) {
            Err(Error::Infeasible { .. }) if seqs.len() > 1 => {
                let mut out = Vec::with_capacity(seqs.len());
                let half = seqs.len() / 2;
                for part in [0..half, half..seqs.len()] {
                    // (each half's batches, packed again: never more than the block's)
                    for (range, sizes) in self.blocks(&seqs[part.clone()], task) {
                        let at = part.start + range.start;
                        out.extend(self.run_fitting(
                            &seqs[at..part.start + range.end],
                            &sizes,
                            task,
                            from(at),
                        )?);
                    }
                }
                Ok(out)
            }
            Err(Error::Infeasible { .. }) if seqs.len() == 1 && seqs[0].branches.len() > 1 => {
                // (scoring only: no control)
                let members = seqs[0].members();
                let mut out = Vec::with_capacity(members.len());
                for (range, sizes) in self.blocks(&members, task) {
                    out.extend(self.run_fitting(&members[range], &sizes, task, None)?);
                }
                Ok(out)
            }
            Ok(results) => {
                self.count_block(seqs, task);
                Ok(results)
            }
            result => result,
        }
    }

    /// For each sequence of `n >= 2` tokens, `ln p(t_i | t_<i)` for `i = 1..n`.
    pub fn token_logprobs(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(seqs.len());
        self.token_logprobs_each(seqs, |_, block| {
            out.extend(block);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// [`Engine::token_logprobs`] a block at a time: `on_block(first, logprobs)` gets the
    /// results of sequences `first..first + logprobs.len()` as soon as their block finishes,
    /// and returns [`ControlFlow::Break`] to cancel the blocks not started yet. When a block
    /// fails, the error is returned; the blocks handed over before it are the caller's.
    pub fn token_logprobs_each(
        &self,
        seqs: &[&[u32]],
        mut on_block: impl FnMut(usize, Vec<Vec<f32>>) -> ControlFlow<()>,
    ) -> Result<()> {
        self.token_scores_each(seqs, |first, block| {
            on_block(first, TokenScores::logprobs_of(block))
        })
    }

    /// [`Engine::token_logprobs`] with, for each token, whether it is the model's greedy
    /// choice at its position (what lm-eval's `is_greedy` is made of).
    pub fn token_scores(&self, seqs: &[&[u32]]) -> Result<Vec<TokenScores>> {
        let mut out = Vec::with_capacity(seqs.len());
        self.token_scores_each(seqs, |_, block| {
            out.extend(block);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// [`Engine::token_scores`] a block at a time, as [`Engine::token_logprobs_each`] hands
    /// over logprobs.
    pub fn token_scores_each(
        &self,
        seqs: &[&[u32]],
        mut on_block: impl FnMut(usize, Vec<TokenScores>) -> ControlFlow<()>,
    ) -> Result<()> {
        self.run_each(seqs, Task::Score, None, |first, results| {
            let scores = results
                .into_iter()
                .zip(&seqs[first..])
                .map(|(r, seq)| TokenScores::new(r.logprobs, &r.tokens, seq))
                .collect();
            on_block(first, scores)
        })
    }

    /// Greedy generation of up to `new_tokens` tokens per prompt, with each token's logprob.
    /// A sequence ends at the first token in `stop` (kept as its last token) and then costs
    /// no more compute.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<SeqResult>> {
        let mut out = Vec::with_capacity(prompts.len());
        self.generate_each(prompts, new_tokens, stop, |_, block| {
            out.extend(block);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// [`Engine::generate`] a block at a time, as [`Engine::token_logprobs_each`] scores.
    pub fn generate_each(
        &self,
        prompts: &[&[u32]],
        new_tokens: usize,
        stop: &[u32],
        on_block: impl FnMut(usize, Vec<SeqResult>) -> ControlFlow<()>,
    ) -> Result<()> {
        let decoding = Decoding {
            max_tokens: new_tokens,
            sampling: Sampling::GREEDY,
            stop_tokens: stop.to_vec(),
        };
        let decoding = vec![decoding; prompts.len()];
        self.generate_with_each(prompts, &decoding, &|_, _| false, on_block)
    }

    /// Generates for prompt `i` as `decoding[i]` says (greedy or sampled from its seed, up to
    /// its `max_tokens`, ending at a stop token), handing results over a block at a time as
    /// [`Engine::token_logprobs_each`] does. `stop(i, tokens)` is the caller's own stop
    /// condition (a stop string in the decoded text), asked after each new token of prompt
    /// `i`. A sequence that stopped costs no more compute, and a block ends when all of its
    /// sequences have.
    pub fn generate_with_each(
        &self,
        prompts: &[&[u32]],
        decoding: &[Decoding],
        stop: &(dyn Fn(usize, &[u32]) -> bool + Sync),
        on_block: impl FnMut(usize, Vec<SeqResult>) -> ControlFlow<()>,
    ) -> Result<()> {
        if decoding.len() != prompts.len() {
            return Err(Error::invalid("generate", "one decoding per prompt"));
        }
        for d in decoding {
            d.sampling.validate()?;
        }
        let longest = decoding.iter().map(|d| d.max_tokens).max().unwrap_or(0);
        let control = GenControl {
            decoding,
            first: 0,
            stop,
        };
        self.run_each(prompts, Task::Generate(longest), Some(control), on_block)
    }

    /// Peak bytes held per tier so far: `[GPU, CPU, disk]`.
    pub fn peaks(&self) -> [u64; 3] {
        Tier::ALL.map(|t| self.executor.ledger().peak(t))
    }
}

impl crate::scorer::Scorer for Engine {
    fn config(&self) -> &ModelConfig {
        &self.files.config
    }
    fn token_scores(&self, batch: &[&[u32]]) -> Result<Vec<TokenScores>> {
        Engine::token_scores(self, batch)
    }
    fn batch_tokens(&self) -> Option<usize> {
        // a block's token capacity, when blocks are packed by tokens
        let batches = self.executor.policy().num_gpu_batches.max(1);
        self.batch_token_capacity(Task::Score).map(|c| c * batches)
    }
}
