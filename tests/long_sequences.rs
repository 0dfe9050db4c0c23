//! Sequences up to the model's context, where position bugs live: SmolLM2 windows of 500,
//! 1,024 and 2,048 tokens of britannica-11th.txt (fetched text, not in the repo) against Hugging
//! Face transformers (`scripts/make_smollm2_long_reference.py`, float64) and the CPU reference,
//! on the resident model and on the engine with its weights on disk under small budgets, on the
//! CPU device and on WebGPU; and greedy generation that crosses 512, 1,024 and 2,048 total
//! tokens.
//!
//! Needs the fetched model (see `tests/smollm2.rs`; `FERROGEN_OFFLINE=1` skips). The WebGPU
//! runs need an adapter (`FERROGEN_SKIP_GPU=1` skips them).

mod common;

use std::sync::OnceLock;

use common::{devices, engine, resident, worst_diff};
use ferrogen::arch::ModelFiles;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{EngineOptions, Placement};
use ferrogen::reference::ReferenceModel;
use ferrogen::Tier;
use serde::Deserialize;

struct Loaded {
    files: ModelFiles,
    reference: ReferenceModel,
}

fn smollm2() -> Option<&'static Loaded> {
    static MODEL: OnceLock<Option<Loaded>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let files = ModelFiles::open(&common::smollm2_path()?).expect("open SmolLM2");
            let reference = ReferenceModel::load(&files).expect("load SmolLM2");
            Some(Loaded { files, reference })
        })
        .as_ref()
}

#[derive(Deserialize)]
struct Long {
    windows: Vec<Window>,
    greedy: Vec<Greedy>,
}
#[derive(Deserialize)]
struct Window {
    tokens: Vec<u32>,
    token_logprobs: Vec<f64>,
}
#[derive(Deserialize)]
struct Greedy {
    prompt: Vec<u32>,
    new_tokens: Vec<u32>,
}

fn long() -> &'static Long {
    static LONG: OnceLock<Long> = OnceLock::new();
    LONG.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2/long.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

/// The windows (500, 1,024, 2,048 tokens), checked to be what our tokenizer makes of the text.
fn windows(m: &Loaded) -> Vec<&'static [u32]> {
    let text = std::fs::read_to_string(
        common::smollm2_path()
            .unwrap()
            .with_file_name("britannica-11th.txt"),
    )
    .expect("britannica-11th.txt (fetched by scripts/fetch-model.sh)");
    let ids = m.files.tokenizer().unwrap().encode(&text).unwrap();
    long()
        .windows
        .iter()
        .map(|w| {
            assert!(
                ids.windows(w.tokens.len())
                    .any(|s| s == w.tokens.as_slice()),
                "window of {} tokens not found in our tokenization",
                w.tokens.len()
            );
            w.tokens.as_slice()
        })
        .collect()
}

/// Largest per-token difference from transformers, per window.
fn from_hf(got: &[Vec<f32>]) -> Vec<f64> {
    got.iter()
        .zip(&long().windows)
        .map(|(g, w)| common::max_abs_diff(g, &w.token_logprobs))
        .collect()
}

/// The CPU reference against transformers at every length (the oracle for the fast paths).
#[test]
fn reference_matches_transformers_up_to_2048_tokens() {
    let Some(m) = smollm2() else { return };
    let seqs = windows(m);
    let got: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| m.reference.token_logprobs(&[s]).unwrap().remove(0))
        .collect();
    let hf = from_hf(&got);
    eprintln!("reference vs transformers, windows of 500/1024/2048: {hf:?}");
    assert!(hf.iter().all(|&d| d < 2e-3), "{hf:?}");
}

/// The resident model on each device, all three windows in one ragged batch (rows computed
/// in chunks that cross sequence boundaries), against the reference and transformers.
#[test]
fn resident_models_match_reference_up_to_2048_tokens() {
    let Some(m) = smollm2() else { return };
    let seqs = windows(m);
    let want: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| m.reference.token_logprobs(&[s]).unwrap().remove(0))
        .collect();
    let g = &long().greedy[0];
    let greedy = m
        .reference
        .generate_greedy(&[&g.prompt], g.new_tokens.len(), None)
        .unwrap();
    for device in devices() {
        let model = resident(device, &m.files, Default::default());
        let got = model.token_logprobs(&seqs);
        let worst = worst_diff(&got, &want);
        let hf = from_hf(&got);
        eprintln!("{device:?} vs reference: {worst:.2e}; vs transformers per window: {hf:?}");
        assert!(worst < 1e-3, "{device:?}: {worst}");
        assert!(hf.iter().all(|&d| d < 2e-3), "{device:?}: {hf:?}");
        // generation crossing 512 total tokens on the resident model too
        let out = model.generate_greedy(&[&g.prompt], g.new_tokens.len());
        assert_eq!(out, greedy, "{device:?}: greedy past 512 tokens");
    }
}

/// The engine as `score --gpu-mem 96MiB --cpu-mem 128MiB --offload-dir D` runs it on WebGPU
/// (and `score --device cpu --cpu-mem 128MiB` on the CPU device, where 128 MiB is all of RAM
/// and the model must partly stay on disk): the policy search picks the placement, and 1,024-
/// and 2,048-token records score within the budgets, with transformers' numbers; with the
/// KV cache in f16 (`--f16-cache`) too, within a few hundredths of a nat of them.
#[test]
fn engine_scores_2048_tokens_within_small_budgets() {
    let Some(m) = smollm2() else { return };
    let seqs = windows(m);
    let want: Vec<Vec<f32>> = seqs[1..]
        .iter()
        .map(|s| m.reference.token_logprobs(&[s]).unwrap().remove(0))
        .collect();
    let cases = devices().into_iter().flat_map(|d| [(d, false), (d, true)]);
    for (device, f16_cache) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (gpu_budget, cpu_budget) = match device {
            DeviceKind::Cpu => (u64::MAX, 128u64 << 20),
            _ => (96u64 << 20, 128u64 << 20),
        };
        let placement = common::searched_with_cache(256, f16_cache);
        let options = EngineOptions::new(placement)
            .gpu_budget(gpu_budget)
            .cpu_budget(cpu_budget)
            .offload_dir(dir.path().to_path_buf());
        let engine = engine(
            device,
            ModelFiles::open(&common::smollm2_path().unwrap()).unwrap(),
            options,
        );
        let got = engine.token_logprobs(&seqs[1..]).unwrap();
        let worst = worst_diff(&got, &want);
        let hf: Vec<f64> = got
            .iter()
            .zip(&long().windows[1..])
            .map(|(g, w)| common::max_abs_diff(g, &w.token_logprobs))
            .collect();
        let peaks = engine.peaks();
        eprintln!(
            "{device:?} engine, f16 cache {f16_cache} ({:?}, weights {:?} B on GPU/CPU/disk): \
             vs reference {worst:.2e}, vs transformers {hf:?}; peaks {peaks:?}",
            engine.policy(),
            engine.weight_bytes()
        );
        assert_eq!(engine.policy().f16_cache, f16_cache);
        // keys and values rounded to 11 significant bits move a token by up to a few
        // hundredths of a nat (measured at 256 tokens: 0.032)
        let (tolerance, hf_tolerance) = if f16_cache { (0.1, 0.1) } else { (1e-3, 2e-3) };
        assert!(worst < tolerance, "{device:?}, f16 {f16_cache}: {worst}");
        assert!(
            hf.iter().all(|&d| d < hf_tolerance),
            "{device:?}, f16 {f16_cache}: {hf:?}"
        );
        if f16_cache {
            // and the corpus log-perplexity by far less
            let mean = |v: &[Vec<f32>]| {
                let all: Vec<f64> = v.iter().flatten().map(|&x| f64::from(x)).collect();
                all.iter().sum::<f64>() / all.len() as f64
            };
            let drift = (mean(&got) - mean(&want)).abs() / mean(&want).abs();
            assert!(drift < 2e-3, "{device:?}: f16 cache log-ppl drift {drift}");
        }
        assert!(
            peaks[Tier::Gpu.index()] <= gpu_budget,
            "{device:?}: {peaks:?}"
        );
        assert!(
            peaks[Tier::Cpu.index()] <= cpu_budget,
            "{device:?}: {peaks:?}"
        );
        if device == DeviceKind::Cpu {
            assert!(
                engine.weight_bytes()[2] > 0,
                "128 MiB of RAM cannot hold it all"
            );
        }
    }
}

/// Greedy generation through the engine (weights, cache and activations split over the tiers)
/// across 512, 1,024 and 2,048 total tokens: the reference's tokens, and logprobs within 1e-3
/// of the reference scoring the generated text; the reference's tokens are transformers'.
#[test]
fn engine_generation_crosses_long_lengths_like_the_reference() {
    let Some(m) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let policy = ferrogen::policy::Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        w_gpu_percent: 20.0,
        w_cpu_percent: 30.0,
        cache_gpu_percent: 40.0,
        cache_cpu_percent: 30.0,
        act_gpu_percent: 30.0,
        act_cpu_percent: 30.0,
        ..ferrogen::policy::Policy::all_on_gpu(2)
    };
    let cases = &long().greedy;
    let n = cases[0].new_tokens.len();
    let prompts: Vec<&[u32]> = cases.iter().map(|g| g.prompt.as_slice()).collect();
    let want = m.reference.generate_greedy(&prompts, n, None).unwrap();
    for device in devices() {
        let options = EngineOptions::new(Placement::Policy(policy.clone()))
            .offload_dir(dir.path().to_path_buf());
        let engine = engine(
            device,
            ModelFiles::open(&common::smollm2_path().unwrap()).unwrap(),
            options,
        );
        let got = engine.generate(&prompts, n, &[]).unwrap();
        for ((g, w), case) in got.iter().zip(&want).zip(cases) {
            let total = case.prompt.len() + n;
            assert_eq!(
                &g.tokens, w,
                "{device:?} engine vs reference, {total} total tokens"
            );
            let mut full = case.prompt.clone();
            full.extend(&g.tokens);
            let scored = m.reference.token_logprobs(&[&full]).unwrap().remove(0);
            let tail = &scored[case.prompt.len() - 1..];
            let worst = worst_diff(std::slice::from_ref(&g.logprobs), &[tail.to_vec()]);
            assert!(worst < 1e-3, "{device:?} {total} tokens: {worst}");
        }
    }
    for (w, case) in want.iter().zip(cases) {
        if w != &case.new_tokens {
            let total = case.prompt.len() + n;
            eprintln!("note: f32 greedy differs from transformers' float64 at {total} tokens");
        }
    }
    let matches = want
        .iter()
        .zip(cases)
        .filter(|(w, c)| **w == c.new_tokens)
        .count();
    assert!(
        matches >= 2,
        "the reference's greedy tokens are transformers' in most cases"
    );
}
