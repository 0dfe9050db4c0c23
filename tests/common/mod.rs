//! Helpers shared by the integration tests: fixture paths and expected-value files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ferrogen::arch::ModelFiles;
use ferrogen::device::{CpuDevice, Device, DeviceKind};
use ferrogen::engine::{Engine, EngineOptions};
use ferrogen::exec::ResidentModel;
use ferrogen::gpu::{GpuContext, WgpuDevice};
use ferrogen::policy::Policy;
use ferrogen::RunOptions;
use serde::Deserialize;

pub mod gguf_writer;

/// The real test model's file name in the cache directory.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-model.sh` puts the model and its text: `$FERROGEN_CACHE`, or
/// `~/.cache/ferrogen`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("FERROGEN_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ferrogen"),
    }
}

/// SmolLM2's path; `None` (said as a skip) when it is missing and `FERROGEN_OFFLINE=1`, else a
/// missing model fails the test with how to fetch it.
pub fn smollm2_path() -> Option<PathBuf> {
    present_or_skipped(
        cache_dir().join(SMOLLM2_FILE),
        "`bash scripts/fetch-model.sh`",
    )
}

/// `path` when it exists; else `None` (said as a skip) when `FERROGEN_OFFLINE=1`, or a panic
/// that says to run `fetch` (what puts it there).
pub fn present_or_skipped(path: PathBuf, fetch: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var("FERROGEN_OFFLINE").as_deref() == Ok("1") {
        skipped(&format!("FERROGEN_OFFLINE=1, {} missing", path.display()));
        return None;
    }
    panic!(
        "{} is missing: run {fetch}, or set FERROGEN_OFFLINE=1",
        path.display()
    );
}

/// The policy search on the built-in profile, for scoring `prompt_len`-token records with
/// uncompressed weights and cache.
pub fn searched(prompt_len: usize) -> ferrogen::engine::Placement {
    searched_with_cache(prompt_len, false)
}

/// [`searched`], with the KV cache in f16 when `f16_cache`.
pub fn searched_with_cache(prompt_len: usize, f16_cache: bool) -> ferrogen::engine::Placement {
    ferrogen::engine::Placement::Search {
        hardware: ferrogen::engine::default_profile().unwrap(),
        prompt_len,
        gen_len: 1,
        compress_weight: false,
        compress_cache: false,
        f16_cache,
    }
}

/// An example's binary, built by `cargo test` beside the test executables.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The committed fixture models, made by scripts/make_fixtures.py.
pub const FIXTURES: [&str; 11] = [
    "opt-pre-ln-proj",
    "opt-post-ln",
    "llama-gqa-untied",
    "llama-tied",
    "llama3-rope",
    "mistral-window",
    "qwen2-bias",
    "qwen3-qknorm",
    "phi3-fused",
    "gemma2-softcap",
    "gemma3-local-global",
];

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Deserialize)]
pub struct Scored {
    pub tokens: Vec<u32>,
    pub token_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
pub struct ScoredText {
    pub text: String,
    pub tokens: Vec<u32>,
    pub token_logprobs: Vec<f64>,
}

#[derive(Deserialize)]
pub struct Greedy {
    pub prompt: Vec<u32>,
    pub new_tokens: Vec<u32>,
}

/// A fixture's expected.json.
#[derive(Deserialize)]
pub struct Expected {
    pub sequences: Vec<Scored>,
    pub texts: Vec<ScoredText>,
    pub greedy: Greedy,
}

pub fn expected(name: &str) -> Expected {
    let path = fixture_dir(name).join("expected.json");
    let text = std::fs::read_to_string(&path).expect("fixture expected.json");
    serde_json::from_str(&text).expect("valid expected.json")
}

/// Largest absolute difference, asserting equal lengths.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// A writable copy of a fixture directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Splits a safetensors file into its header JSON and data section.
pub fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

pub fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Rewrites `model.safetensors` of `dir` through `edit(header, data)`.
pub fn edit_safetensors(dir: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let path = dir.join("model.safetensors");
    let (mut header, mut data) = split_safetensors(&std::fs::read(&path).unwrap());
    edit(&mut header, &mut data);
    std::fs::write(&path, join_safetensors(&header, &data)).unwrap();
}

/// Says in the test output (past libtest's capture, so a passing run shows it) that the
/// current test skipped some or all of its checks, and why.
pub fn skipped(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED in {test}: {why}");
}

/// The WebGPU device, or `None` (after saying so) when there is none and `FERROGEN_SKIP_GPU=1`
/// asks to skip the GPU tests.
pub fn gpu_context() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var("FERROGEN_SKIP_GPU").as_deref() == Ok("1") => {
            skipped(&format!("FERROGEN_SKIP_GPU=1, no WebGPU device ({e})"));
            None
        }
        Err(e) => panic!("{e} (or set FERROGEN_SKIP_GPU=1 to skip the GPU tests)"),
    }
}

/// A policy with (GPU %, CPU %) for weights `w`, cache `c` and activations `h`, the rest
/// on disk.
#[allow(clippy::too_many_arguments)]
pub fn policy(
    gbs: usize,
    nb: usize,
    w: (f64, f64),
    c: (f64, f64),
    h: (f64, f64),
    overlap: bool,
    sep: bool,
) -> Policy {
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: nb,
        w_gpu_percent: w.0,
        w_cpu_percent: w.1,
        cache_gpu_percent: c.0,
        cache_cpu_percent: c.1,
        act_gpu_percent: h.0,
        act_cpu_percent: h.1,
        overlap,
        sep_layer: sep,
        pin_weight: true,
        cpu_cache_compute: false,
        attn_sparsity: 1.0,
        compress_weight: false,
        compress_cache: false,
        f16_cache: false,
        quant: Default::default(),
    }
}

/// Largest absolute difference between two sets of per-sequence logprobs of the same shape.
pub fn worst_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "sequence counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max)
}

/// The compute devices a test runs on: the CPU device always, WebGPU when there is an
/// adapter (or the run fails, unless `FERROGEN_SKIP_GPU=1` skips it).
pub fn devices() -> Vec<DeviceKind> {
    let mut out = vec![DeviceKind::Cpu];
    if gpu_context().is_some() {
        out.push(DeviceKind::Wgpu);
    }
    out
}

/// `(gpu_budget, cpu_budget)` for an engine on `device`: as given on WebGPU; on the CPU
/// device, whose one memory is RAM, no GPU budget and a RAM budget of both.
pub fn budgets(device: DeviceKind, gpu: u64, cpu: u64) -> (u64, u64) {
    match device {
        DeviceKind::Cpu => (u64::MAX, gpu + cpu),
        _ => (gpu, cpu),
    }
}

/// Opens an engine on `device` (`Cpu` or `Wgpu`).
pub fn try_engine(
    device: DeviceKind,
    files: ModelFiles,
    options: EngineOptions,
) -> ferrogen::Result<Engine> {
    match device {
        DeviceKind::Cpu => Engine::open_on(CpuDevice::new(0)?, files, options),
        _ => Engine::open_files(GpuContext::new()?, files, options),
    }
}

/// [`try_engine`], which must succeed.
pub fn engine(device: DeviceKind, files: ModelFiles, options: EngineOptions) -> Engine {
    try_engine(device, files, options).unwrap_or_else(|e| panic!("{device:?}: {e}"))
}

/// What the tests ask of a resident model on any device.
pub trait Resident {
    fn token_logprobs(&self, batch: &[&[u32]]) -> Vec<Vec<f32>>;
    fn generate_greedy(&self, prompts: &[&[u32]], n: usize) -> Vec<Vec<u32>>;
}

impl<D: Device> Resident for ResidentModel<D> {
    fn token_logprobs(&self, batch: &[&[u32]]) -> Vec<Vec<f32>> {
        ResidentModel::token_logprobs(self, batch).unwrap()
    }
    fn generate_greedy(&self, prompts: &[&[u32]], n: usize) -> Vec<Vec<u32>> {
        ResidentModel::generate_greedy(self, prompts, n, None).unwrap()
    }
}

/// Every weight of `files` resident on `device`.
pub fn resident(device: DeviceKind, files: &ModelFiles, options: RunOptions) -> Box<dyn Resident> {
    match device {
        DeviceKind::Cpu => {
            Box::new(ResidentModel::new(CpuDevice::new(0).unwrap(), files, options).unwrap())
        }
        _ => Box::new(
            ResidentModel::new(
                WgpuDevice::new(GpuContext::new().unwrap()).unwrap(),
                files,
                options,
            )
            .unwrap(),
        ),
    }
}
