//! The process's memory, not only the ledger, stays within the budget: SmolLM2 on the CPU
//! device under a RAM budget far below the model's size, with the placement the policy search
//! picks. A sampler thread reads the process's anonymous resident memory (`RssAnon`: heap,
//! stacks, the device's buffers) every millisecond; its growth from before the engine opened
//! (after the model file's metadata and tokenizer were read) to the job's peak must stay
//! within the budget. Pages of the memory-mapped model file are the file's, shared with the
//! page cache, and not counted.
//!
//! One test in its own binary, so that no other test's memory is sampled with it. Linux only
//! (it reads `/proc/self/status`); elsewhere it is skipped and says so.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ferrogen::arch::ModelFiles;
use ferrogen::device::CpuDevice;
use ferrogen::engine::{Engine, EngineOptions};

/// `RssAnon` of this process in bytes.
fn rss_anon() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[test]
fn cpu_device_memory_stays_within_the_ram_budget() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2/reference.json"
    ))
    .unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tokens: Vec<u32> = reference["britannica"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    // the model file's metadata and the tokenizer built from it (about 43 MiB for SmolLM2's
    // 49,152-entry BPE vocabulary) come before the engine and are not under its budget
    let files = ModelFiles::open(&path).unwrap();
    let Some(baseline) = rss_anon() else {
        return common::skipped("no /proc/self/status RssAnon on this system");
    };
    let budget: u64 = 32 << 20;
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_anon() {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };

    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::new(common::searched(256))
        .cpu_budget(budget)
        .cpu_threads(2)
        .offload_dir(dir.path().to_path_buf());
    let engine = Engine::open_on(CpuDevice::new(2).unwrap(), files, options).unwrap();
    let seqs: Vec<&[u32]> = tokens.chunks(256).take(6).collect();
    let logprobs = engine.token_logprobs(&seqs).unwrap();
    assert_eq!(logprobs.len(), seqs.len());
    let peaks = engine.peaks();
    drop(engine);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let grew = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "RAM budget {} MiB: ledger peak {:.1} MiB, anonymous RSS grew by {:.1} MiB",
        budget >> 20,
        peaks[0] as f64 / (1 << 20) as f64,
        grew as f64 / (1 << 20) as f64
    );
    assert!(peaks[0] <= budget, "ledger peak {peaks:?}");
    assert!(
        grew <= budget,
        "anonymous RSS grew by {grew} bytes, budget {budget}"
    );
}
