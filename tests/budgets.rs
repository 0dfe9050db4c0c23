//! The policy search and the engine agree on what fits: under random budgets that bind, the
//! engine either refuses at open time with `Infeasible` (naming the tier and the bytes it
//! lacks), or runs every job to the end with its ledger peaks within the budgets and the same
//! numbers as the all-resident model. A policy the search picked is never refused at run time
//! for the records it was told of (a record longer than the search's `prompt_len` needs a
//! longer KV cache than the policy budgeted, and may be refused).
//!
//! The fixtures are about a thousandth of a real model, so the budgets are scaled the same
//! way: GPU 16 KiB to 2 MiB, CPU 32 KiB to 2 MiB (the 16 MiB-2 GiB and 32 MiB-2 GiB),
//! or one RAM budget of both on the CPU device.

mod common;

use common::{
    budgets, expected, fixture_dir, gpu_context, resident, try_engine, worst_diff, FIXTURES,
};
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, EngineOptions, Placement};
use ferrogen::layout::{RunOptions, WeightFormat};
use ferrogen::model::ModelFiles;
use ferrogen::storage::Tier;
use ferrogen::Error;
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
        lens in prop::collection::vec(2usize..40, 1..10),
        prompt_len in 2usize..40,
        new_tokens in 0usize..5,
        compress in any::<bool>(),
    ) {
        // log-uniform budgets, so that small and large ones are drawn alike
        let (gpu_kib, cpu_kib) = (gpu_log.exp2() as u64, cpu_log.exp2() as u64);
        let device = if on_cpu || gpu_context().is_none() { DeviceKind::Cpu } else { DeviceKind::Wgpu };
        let name = FIXTURES[fixture];
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let exp = expected(name);
        // records of the drawn lengths, cut from the fixture's sequences
        let source: Vec<u32> = exp.sequences.iter().flat_map(|s| s.tokens.clone()).collect();
        // (no longer than the records the search was told of: a sequence's KV cache grows
        // with its length, and must fit where its attention is computed)
        let records: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| source.iter().cycle().skip(i * 7).take(n.min(prompt_len)).copied().collect())
            .collect();
        let batch: Vec<&[u32]> = records.iter().map(Vec::as_slice).collect();
        let dir = tempfile::tempdir().unwrap();
        let (gpu_budget, cpu_budget) = budgets(device, gpu_kib << 10, cpu_kib << 10);
        let options = EngineOptions::new(search(prompt_len, new_tokens + 1, compress)).gpu_budget(gpu_budget).cpu_budget(cpu_budget).offload_dir(dir.path().to_path_buf());
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
        let format = if policy.compress_weight { WeightFormat::Group4 } else { WeightFormat::Native };
        let resident = resident(
            device,
            &ModelFiles::open(&fixture_dir(name)).unwrap(),
            RunOptions { weights: format, compress_cache: policy.compress_cache },
        );

        let got = engine.token_logprobs(&batch);
        let got = got.map_err(|e| TestCaseError::fail(format!("{what}: scoring refused: {e}")))?;
        let d = worst_diff(&got, &resident.token_logprobs(&batch));
        // a small budget computes in smaller row chunks and batches than the resident model;
        // with a 4-bit cache, last-bit differences in a key or value can round to another
        // 4-bit code (as across devices), which moves a logprob by up to a few 1e-3
        let tolerance = if policy.compress_cache { 5e-3 } else { 1e-4 };
        prop_assert!(d < tolerance, "{}: scoring differs by {}", what, d);

        let max_context = engine.files().config.max_context();
        let prompts: Vec<&[u32]> = batch
            .iter()
            .map(|s| &s[..s.len().min(max_context - new_tokens)])
            .collect();
        let gen = engine.generate(&prompts, new_tokens, &[]);
        let gen = gen.map_err(|e| TestCaseError::fail(format!("{what}: generation refused: {e}")))?;
        let greedy = resident.generate_greedy(&prompts, new_tokens);
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
