//! Planning an engine before anything is placed: budgets -> the model's sizes in the run-time
//! layout ([`sizes`]) -> the cost model -> the policy search -> a checked [`Policy`], with
//! the executor's shapes that follow (rows per logit and compute chunk, logit panels, the
//! staging buffers). Nothing here allocates on a device: `Engine::open` plans, then places.

mod sizes;

pub use sizes::runtime_bytes_per_value;
pub(crate) use sizes::workspace_bytes;

use crate::arch::{ModelConfig, ModelFiles};
use crate::device::{CacheFormat, Device};
use crate::error::Result;
use crate::layout::{RunOptions, WeightFormat, CHUNK_ROWS, LOGIT_ROWS};
use crate::policy::cost::CacheRowBytes;
use crate::policy::search::{search, SearchOptions};
use crate::policy::{CostModel, HardwareProfile, HeadBytes, Policy, Workload};
use crate::storage::offload::StagingPool;

/// How the placement is decided.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per engine, built once
pub enum Placement {
    /// As a policy file says (checked against the budgets as memory is allocated).
    Policy(Policy),
    /// Found by the LP policy search for this hardware and workload within the budgets.
    Search {
        /// The machine's rates (see `calibrate`).
        hardware: HardwareProfile,
        /// Typical prompt (record) length in tokens.
        prompt_len: usize,
        /// Tokens computed per sequence: 1 for scoring, 1 + new tokens when generating.
        gen_len: usize,
        /// Store weights in 4-bit groups.
        compress_weight: bool,
        /// Store the KV cache in 4-bit groups.
        compress_cache: bool,
        /// Store the KV cache in f16.
        f16_cache: bool,
    },
}

/// What planning needs besides the model: the placement asked for and the budgets.
pub(crate) struct PlanRequest<'a> {
    /// A policy, or a search.
    pub placement: &'a Placement,
    /// `[device, CPU, disk]` budgets in bytes (on a host device, RAM is the device tier and
    /// the CPU tier is empty).
    pub budgets: [u64; 3],
    /// Disk read size and reader threads asked for (a search takes its profile's).
    pub io: (usize, usize),
    /// The most sequences a block will hold.
    pub max_block_sequences: usize,
}

/// A checked policy and the executor's shapes.
pub(crate) struct Plan {
    /// The policy, as the device runs it ([`Policy::on_host`] on a host device).
    pub policy: Policy,
    /// The cost model a search placed the model with (`None`: a policy file).
    pub searched: Option<CostModel>,
    /// Weight and cache formats.
    pub run: RunOptions,
    /// Rows of logits per chunk.
    pub logit_rows: usize,
    /// Rows a unit computes at once.
    pub chunk_rows: usize,
    /// Panels the output projection streams in.
    pub logit_panels: usize,
    /// Staging chunk size and reader threads.
    pub staging: (usize, usize),
}

/// Plans `files` on `dev` for `request`: the policy given or searched, checked
/// ([`Policy::validate`]), and the shapes the executor runs it with.
pub(crate) fn plan<D: Device>(dev: &D, files: &ModelFiles, request: &PlanRequest) -> Result<Plan> {
    let host = dev.is_host();
    let config = &files.config;
    let device_budget = request.budgets[0];
    let format = WeightFormat::of(match request.placement {
        Placement::Policy(p) => p.compress_weight,
        Placement::Search {
            compress_weight, ..
        } => *compress_weight,
    });
    // the output projection streams in panels no larger than a layer; the device holds
    // `logit_width` logits per row of a chunk of `logit_rows` rows at once (the widest
    // panels, as without sep_layer, bound what the search counts)
    let panel_width = |panels: usize| {
        let vocab = config.vocab_size();
        dev.logit_width(vocab.div_ceil(panels.clamp(1, vocab.max(1))))
    };
    let logit_width = panel_width(sizes::logit_panel_count(files, format, false)?);
    let logit_rows = logit_rows(config, device_budget, logit_width);
    let chunk_rows = chunk_rows(config, device_budget);
    let (policy, searched, io) = match request.placement {
        Placement::Policy(p) => (p.clone(), None, request.io),
        Placement::Search { hardware, .. } => {
            let shapes = Shapes {
                host,
                format,
                logit_bytes: (4 * logit_rows * logit_width) as f64,
                chunk_rows,
            };
            let (policy, model) = search_policy(files, request, &shapes)?;
            let io = (hardware.io_chunk_bytes as usize, hardware.io_threads);
            (policy, Some(model), io)
        }
    };
    let policy = if host { policy.on_host() } else { policy };
    policy.validate("policy")?;
    Ok(Plan {
        run: RunOptions {
            weights: format,
            compress_cache: policy.compress_cache,
            f16_cache: policy.f16_cache,
        },
        logit_panels: sizes::logit_panel_count(files, format, policy.sep_layer)?,
        policy,
        searched,
        logit_rows,
        chunk_rows,
        staging: staging_shape(io.0, io.1),
    })
}

/// The device's shapes a search prices.
struct Shapes {
    host: bool,
    format: WeightFormat,
    logit_bytes: f64,
    chunk_rows: usize,
}

/// The cost model of `files` for a search request, and the policy the search finds with it.
fn search_policy(
    files: &ModelFiles,
    request: &PlanRequest,
    shapes: &Shapes,
) -> Result<(Policy, CostModel)> {
    let Placement::Search {
        hardware,
        prompt_len,
        gen_len,
        compress_weight,
        compress_cache,
        f16_cache,
    } = request.placement.clone()
    else {
        unreachable!("search_policy is called for a search")
    };
    let [device_budget, cpu_budget, disk_budget] = request.budgets;
    let (chunk, threads) = staging_shape(hardware.io_chunk_bytes as usize, hardware.io_threads);
    let hw = if shapes.host {
        // one memory: the device tier is RAM
        let bytes_per_value = runtime_bytes_per_value(files, shapes.format)?;
        hardware
            .for_host_device(bytes_per_value)
            .with_capacities(device_budget, 0, disk_budget)
    } else {
        hardware.with_capacities(device_budget, cpu_budget, disk_budget)
    };
    let head = HeadBytes {
        output: (sizes::output_weight_bytes(files, shapes.format)?
            + sizes::projection_weight_bytes(files, shapes.format)?) as f64,
        table: sizes::lookup_table_bytes(files)? as f64,
    };
    let workload = Workload {
        prompt_len,
        gen_len: gen_len.max(1),
    };
    let model = CostModel::new(files.config.shape(), hw, workload)
        .with_weight_bytes(runtime_bytes_per_value(files, WeightFormat::Native)?)
        // activations and the uncompressed cache are f32 here
        .with_activation_bytes(4.0)
        .with_executor_layouts(
            runtime_bytes_per_value(files, WeightFormat::Group4)?,
            cache_row_bytes(&files.config),
        )
        .with_compute_rows(shapes.chunk_rows)
        .with_executor_bytes(
            head,
            shapes.logit_bytes,
            StagingPool::bytes(staging_buffers(threads), chunk) as f64,
        );
    let model = if shapes.host {
        model.on_host_device()
    } else {
        model
    };
    let found = search(
        &model,
        &SearchOptions {
            compress_weight,
            compress_cache,
            f16_cache,
            // CPU attention beside the device reads an f32 cache
            allow_cpu_cache_compute: !compress_cache && !f16_cache,
            max_block_size: request.max_block_sequences,
            ..SearchOptions::default()
        },
    )?;
    Ok((found.policy, model))
}

/// Rows of logits per chunk for a GPU budget, where the device holds `width` logits per row
/// at once (the vocabulary, or its panel): 128 rows of the whole vocabulary's worth (up to a
/// chunk of rows when the device reduces in panels), or fewer so that a chunk takes at most
/// an eighth of the budget, but not fewer than 64 while a 64-row chunk fits a quarter of it
/// (on lavapipe, scoring 1,533 SmolLM2 tokens in chunks of 21 rows ran at half the speed of
/// chunks of 128).
fn logit_rows(config: &ModelConfig, gpu_budget: u64, width: usize) -> usize {
    let row = (width.max(1) * 4) as u64;
    let most = (LOGIT_ROWS * config.vocab_size() / width.max(1)).clamp(LOGIT_ROWS, CHUNK_ROWS);
    let by_budget = (gpu_budget / 8 / row) as usize;
    let floor = if 64 * row <= gpu_budget / 4 { 64 } else { 1 };
    by_budget.clamp(floor, most)
}

/// Rows of a batch a unit computes at once for a GPU budget: 512, or fewer (by halves, down
/// to 16) so that their intermediate tensors take at most an eighth of the budget. Prompts
/// longer than this run in row chunks, so a record's length does not decide what fits.
fn chunk_rows(config: &ModelConfig, gpu_budget: u64) -> usize {
    let mut rows = CHUNK_ROWS;
    while rows > 16 && workspace_bytes(config, rows, 0, 0) > gpu_budget / 8 {
        rows /= 2;
    }
    rows
}

/// Bytes per cached token of one layer in each cache format, as the executor stores them.
fn cache_row_bytes(config: &ModelConfig) -> CacheRowBytes {
    let row = |compress_cache, f16_cache| {
        let options = RunOptions {
            weights: WeightFormat::Native,
            compress_cache,
            f16_cache,
        };
        CacheFormat::new(config.head_layout(), options).row_bytes() as f64
    };
    CacheRowBytes {
        f32: row(false, false),
        f16: row(false, true),
        q4: row(true, false),
    }
}

/// The staging chunk size and reader threads in use for the ones asked for.
fn staging_shape(chunk: usize, threads: usize) -> (usize, usize) {
    (chunk.clamp(64 << 10, 16 << 20), threads.clamp(1, 16))
}

/// Staging buffers in RAM: one per reader thread and per other I/O operation a step can hold
/// at once (cache and activation loads and stores, the embedding lookup).
pub(crate) fn staging_buffers(io_threads: usize) -> usize {
    io_threads + 4
}
