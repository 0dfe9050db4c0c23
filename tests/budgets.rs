//! The policy search and the engine agree on what fits: under random budgets that bind, the
//! engine either refuses at open time with `Infeasible` (naming the tier and the bytes it
//! lacks), or runs every job to the end with its ledger peaks within the budgets and the same
//! numbers as the all-resident model. A call is refused with `Infeasible` before any of its
//! blocks runs, or it completes: a policy the search picked runs every record of the length it
//! was told of, and a longer record (whose KV cache and activations are larger than the policy
//! budgeted) either runs too or is refused up front, never after earlier blocks were handed
//! over.
//!
//! The fixtures are about a thousandth of a real model, so the budgets are scaled the same
//! way: GPU 16 KiB to 2 MiB, CPU 32 KiB to 2 MiB (the 16 MiB-2 GiB and 32 MiB-2 GiB),
//! or one RAM budget of both on the CPU device.

mod common;

use common::{
    budgets, expected, fixture_dir, gpu_context, resident, try_engine, worst_diff, FIXTURES,
};
use ferrogen::arch::ModelFiles;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, EngineOptions, Placement};
use ferrogen::Error;
use ferrogen::Tier;
use ferrogen::{RunOptions, WeightFormat};
use proptest::prelude::*;

/// A search placement for `prompt_len`-token records with small staging buffers (one reader
/// thread, 64 KiB chunks), so that the fixed working set is in scale with the fixtures.
fn search(prompt_len: usize, gen_len: usize, compress: bool) -> Placement {
    let mut hardware = default_profile().unwrap();
    hardware.io_chunk_bytes = 64 << 10;
    hardware.io_threads = 1;
    Placement::Search {
        hardware,
        prompt_len,
        gen_len,
        compress_weight: compress,
        compress_cache: compress,
        f16_cache: false,
    }
}

/// How a call of `total` records that handed `handed` back ended: `Ok(true)` when it
/// completed, `Ok(false)` when the up-front check refused it before any result (allowed only
/// for records longer than the search was told of); any other end fails the case.
fn completed(
    result: ferrogen::Result<()>,
    handed: usize,
    total: usize,
    told_of: bool,
    what: &str,
) -> Result<bool, TestCaseError> {
    match result {
        Ok(()) => Ok(true),
        Err(e @ Error::Infeasible { .. }) if !told_of && handed == 0 => {
            // (the up-front check's refusal, not a block's)
            prop_assert!(e.to_string().contains("even alone in its batch"), "{}", e);
            Ok(false)
        }
        Err(e) => Err(TestCaseError::fail(format!(
            "{what} refused after {handed} of {total} records: {e}"
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn searched_policies_run_within_their_budgets(
        on_cpu in any::<bool>(),
        fixture in 0usize..FIXTURES.len(),
        gpu_log in 4.0f64..11.0,
        cpu_log in 5.0f64..11.0,
        lens in prop::collection::vec(2usize..64, 1..10),
        prompt_len in 2usize..40,
        new_tokens in 0usize..5,
        compress in any::<bool>(),
        max_block in prop::option::of(1usize..8),
    ) {
        // log-uniform budgets, so that small and large ones are drawn alike
        let (gpu_kib, cpu_kib) = (gpu_log.exp2() as u64, cpu_log.exp2() as u64);
        let device = if on_cpu || gpu_context().is_none() { DeviceKind::Cpu } else { DeviceKind::Wgpu };
        let name = FIXTURES[fixture];
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let exp = expected(name);
        // records of the drawn lengths (within the model's context, and often longer than the
        // search was told of), cut from the fixture's sequences
        let source: Vec<u32> = exp.sequences.iter().flat_map(|s| s.tokens.clone()).collect();
        let max_context = files.config.max_context();
        let records: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| source.iter().cycle().skip(i * 7).take(n.min(max_context - new_tokens)).copied().collect())
            .collect();
        let told_of = records.iter().all(|r| r.len() <= prompt_len);
        let batch: Vec<&[u32]> = records.iter().map(Vec::as_slice).collect();
        let dir = tempfile::tempdir().unwrap();
        let (gpu_budget, cpu_budget) = budgets(device, gpu_kib << 10, cpu_kib << 10);
        let options = EngineOptions::new(search(prompt_len, new_tokens + 1, compress)).gpu_budget(gpu_budget).cpu_budget(cpu_budget).offload_dir(dir.path().to_path_buf());
        let options = match max_block {
            Some(n) => options.max_block_sequences(n),
            None => options,
        };
        let engine = match try_engine(device, files, options) {
            Ok(engine) => engine,
            Err(e @ Error::Infeasible { .. }) => {
                // refused before any work, naming a tier and a shortfall
                let Error::Infeasible { tier, short_bytes, .. } = &e else { unreachable!() };
                prop_assert!(*short_bytes > 0, "{}", e);
                prop_assert!(Tier::ALL.contains(tier));
                prop_assert!(e.to_string().contains("short by"), "{}", e);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("{device:?} {name}: {e}"))),
        };
        let policy = engine.policy().clone();
        let what = format!("{device:?} {name} gpu {gpu_kib} KiB cpu {cpu_kib} KiB {policy:?}");
        prop_assert!(policy.block_size() <= max_block.unwrap_or(usize::MAX), "{}", what);
        let format = if policy.compress_weight { WeightFormat::Group4 } else { WeightFormat::Native };
        let resident = resident(
            device,
            &ModelFiles::open(&fixture_dir(name)).unwrap(),
            RunOptions { weights: format, compress_cache: policy.compress_cache, f16_cache: policy.f16_cache },
        );

        // a call is refused before its first block, or completes
        let mut got = Vec::new();
        let scored = engine.token_logprobs_each(&batch, |_, block| {
            got.extend(block);
            std::ops::ControlFlow::Continue(())
        });
        if !completed(scored, got.len(), batch.len(), told_of, &format!("{what}: scoring"))? {
            return Ok(());
        }
        let d = worst_diff(&got, &resident.token_logprobs(&batch));
        // a small budget computes in smaller row chunks and batches than the resident model;
        // with a 4-bit cache, last-bit differences in a key or value can round to another
        // 4-bit code (as across devices), which moves a logprob by up to a few 1e-3
        let tolerance = if policy.compress_cache { 5e-3 } else { 1e-4 };
        prop_assert!(d < tolerance, "{}: scoring differs by {}", what, d);

        let prompts = &batch;
        let mut gen = Vec::new();
        let generated = engine.generate_each(prompts, new_tokens, &[], |_, block| {
            gen.extend(block);
            std::ops::ControlFlow::Continue(())
        });
        if !completed(generated, gen.len(), prompts.len(), told_of, &format!("{what}: generation"))? {
            return Ok(());
        }
        let greedy = resident.generate_greedy(prompts, new_tokens);
        for (g, want) in gen.iter().zip(&greedy) {
            // (a flipped 4-bit code may flip a near tie between two tokens)
            if policy.compress_cache {
                prop_assert_eq!(g.tokens.len(), want.len(), "{}", what);
            } else {
                prop_assert_eq!(&g.tokens, want, "{}", what);
            }
        }

        // the ledger's peaks stay within the budgets (one RAM budget on the CPU device)
        let peaks = engine.peaks();
        if device == DeviceKind::Cpu {
            prop_assert!(peaks[0] <= cpu_budget && peaks[1] <= cpu_budget, "{}: {:?}", what, peaks);
        } else {
            prop_assert!(peaks[0] <= gpu_budget, "{}: GPU peak {}", what, peaks[0]);
            prop_assert!(peaks[1] <= cpu_budget, "{}: CPU peak {}", what, peaks[1]);
        }
    }
}

/// With the smallest RAM budget at which the search places the model for 4-token records, a
/// record near the model's context is refused before any block runs (naming the tier and its
/// shortfall), while the 4-token records still run.
#[test]
fn records_longer_than_searched_are_refused_before_any_block() {
    let name = "llama-gqa-untied";
    let exp = expected(name);
    let source: Vec<u32> = exp
        .sequences
        .iter()
        .flat_map(|s| s.tokens.clone())
        .collect();
    let files = || ModelFiles::open(&fixture_dir(name)).unwrap();
    let long: Vec<u32> = source
        .iter()
        .cycle()
        .take(files().config.max_context())
        .copied()
        .collect();
    let short = &source[..4];
    // the smallest budget (in 4 KiB steps) the search places the model in
    let open = |kib: u64| {
        let options = EngineOptions::new(search(4, 1, false)).cpu_budget(kib << 10);
        try_engine(DeviceKind::Cpu, files(), options)
    };
    let (kib, engine) = (8..4096)
        .step_by(4)
        .find_map(|kib| open(kib).ok().map(|e| (kib, e)))
        .expect("the search places the fixture within 4 MiB");
    let mut handed = 0;
    let err = engine
        .token_logprobs_each(&[short, &long], |_, block| {
            handed += block.len();
            std::ops::ControlFlow::Continue(())
        })
        .expect_err("a record at the model's context does not fit a budget sized for 4 tokens");
    assert_eq!(handed, 0, "refused after {handed} records were scored");
    let Error::Infeasible {
        tier, short_bytes, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*tier, Tier::Cpu, "{err}");
    assert!(*short_bytes > 0);
    let message = err.to_string();
    let alone = format!(
        "a sequence of {} tokens does not fit even alone",
        long.len()
    );
    assert!(message.contains(&alone), "{message}");
    assert!(message.contains("more in RAM"), "{message}");
    // the records the search was told of run, within the budget
    let got = engine.token_logprobs(&[short, short]).unwrap();
    assert_eq!(got.len(), 2);
    assert!(
        engine.peaks()[0] <= kib << 10,
        "{:?} vs {kib} KiB",
        engine.peaks()
    );
}

/// Short records are packed by tokens into the batches the search sized for `prompt_len`-token
/// records (`gbs * prompt_len` tokens each), not `gbs` records to a batch: fewer blocks, each
/// reading the weights once, with the same numbers.
#[test]
fn short_records_are_packed_into_fewer_blocks_with_the_same_numbers() {
    let name = "llama-gqa-untied";
    let exp = expected(name);
    let source: Vec<u32> = exp
        .sequences
        .iter()
        .flat_map(|s| s.tokens.clone())
        .collect();
    let records: Vec<Vec<u32>> = (0..30).map(|i| source[i..i + 3].to_vec()).collect();
    let batch: Vec<&[u32]> = records.iter().map(Vec::as_slice).collect();
    let files = || ModelFiles::open(&fixture_dir(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions::new(search(16, 1, false))
        .cpu_budget(1 << 20)
        .offload_dir(dir.path().to_path_buf());
    let engine = try_engine(DeviceKind::Cpu, files(), options).unwrap();
    let got = engine.token_logprobs(&batch).unwrap();
    let resident = resident(DeviceKind::Cpu, &files(), RunOptions::default());
    assert!(worst_diff(&got, &resident.token_logprobs(&batch)) < 1e-4);

    let policy = engine.policy();
    let (gbs, nb) = (policy.gpu_batch_size, policy.num_gpu_batches);
    // next fit of 3-token records into batches of gbs * 16 tokens, nb batches to a block
    let per_batch = (gbs * 16 / 3).max(1);
    let blocks = 30usize.div_ceil(per_batch).div_ceil(nb) as u64;
    let stats = engine.block_stats();
    assert_eq!(stats.blocks, blocks, "{stats:?} for gbs {gbs} nb {nb}");
    assert_eq!((stats.sequences, stats.tokens), (30, 90));
    assert_eq!(stats.token_capacity, blocks * (gbs * 16 * nb) as u64);
    // gbs records to a batch would have taken more blocks
    assert!(
        blocks < 30usize.div_ceil(gbs * nb) as u64,
        "{stats:?} gbs {gbs} nb {nb}"
    );
}

/// Where the search keeps part of the KV cache off the device, the executor computes each
/// batch against a working copy of its whole layer cache on the device, up to three at once
/// (one being stored, one computing, one loading): the budgets the search placed the model in
/// hold them. Swept over device budgets (RAM budgets on the CPU device, whose cache then goes
/// partly to disk), on every budget where the search split the cache, generation of the
/// prompts it was told of runs to the end within the budgets.
#[test]
fn split_caches_run_within_the_searched_budgets() {
    let name = FIXTURES[0];
    let exp = expected(name);
    let source: Vec<u32> = exp
        .sequences
        .iter()
        .flat_map(|s| s.tokens.clone())
        .collect();
    let records: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            source
                .iter()
                .cycle()
                .skip(i * 5)
                .take(48)
                .copied()
                .collect()
        })
        .collect();
    let prompts: Vec<&[u32]> = records.iter().map(Vec::as_slice).collect();
    // (device budgets in KiB about where the search splits the cache: on the CPU device RAM
    // about what the weights and staging buffers take, the rest of the cache on disk; on the
    // GPU from what the weights take to twice that, the rest in RAM)
    let mut devices = vec![(DeviceKind::Cpu, (896..1056).step_by(8))];
    if gpu_context().is_some() {
        devices.push((DeviceKind::Wgpu, (480..1200).step_by(48)));
    }
    for (device, sweep) in devices {
        let mut split = 0;
        for kib in sweep {
            let dir = tempfile::tempdir().unwrap();
            let (gpu, cpu) = match device {
                DeviceKind::Cpu => (u64::MAX, kib << 10),
                _ => (kib << 10, 2 << 20),
            };
            // (an f16 cache: CPU attention, which reads the cache where it lives, is then
            // not an option)
            let mut placement = search(48, 4, false);
            if let Placement::Search { f16_cache, .. } = &mut placement {
                *f16_cache = true;
            }
            let options = EngineOptions::new(placement)
                .gpu_budget(gpu)
                .cpu_budget(cpu)
                .offload_dir(dir.path().to_path_buf());
            let Ok(engine) = try_engine(
                device,
                ModelFiles::open(&fixture_dir(name)).unwrap(),
                options,
            ) else {
                continue;
            };
            let policy = engine.policy().clone();
            if policy.cache_gpu_percent >= 100.0 {
                continue;
            }
            split += 1;
            let what = format!("{device:?} {kib} KiB {policy:?}");
            let got = engine.generate(&prompts, 3, &[]);
            assert!(got.is_ok(), "{what}: {:?}", got.err());
            let peaks = engine.peaks();
            if device == DeviceKind::Cpu {
                assert!(peaks[0] <= cpu, "{what}: {peaks:?}");
            } else {
                assert!(peaks[0] <= gpu && peaks[1] <= cpu, "{what}: {peaks:?}");
            }
        }
        assert!(
            split >= 3,
            "{device:?}: the search split the cache at {split} budgets"
        );
    }
}
