//! The engine (placement + zig-zag schedule + executor) against the all-resident model on the
//! same device: whatever the policy, the numbers are the same. Every test runs on the CPU
//! device and on WebGPU.
//!
//! WebGPU needs an adapter (lavapipe on machines without a GPU); `FERROGEN_SKIP_GPU=1` skips it.

mod common;

use common::{
    devices, engine, expected, fixture_dir, gpu_context, policy, resident, worst_diff, FIXTURES,
};
use ferrogen::arch::ModelFiles;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{Engine, EngineOptions, Placement};
use ferrogen::{RunOptions as GpuOptions, WeightFormat};

#[test]
fn offloaded_scoring_equals_resident() {
    let dir = tempfile::tempdir().unwrap();
    for (device, name) in devices().into_iter().flat_map(|d| FIXTURES.map(|n| (d, n))) {
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let options = GpuOptions {
            weights: WeightFormat::Native,
            compress_cache: false,
            f16_cache: false,
        };
        let resident = resident(device, &files, options);
        let exp = expected(name);
        let batch: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
        let want = resident.token_logprobs(&batch);
        for p in [
            policy(1, 2, (30.0, 30.0), (100.0, 0.0), (30.0, 30.0), true, true),
            policy(2, 1, (0.0, 10.0), (100.0, 0.0), (0.0, 0.0), false, false),
        ] {
            let options = EngineOptions::new(Placement::Policy(p.clone()))
                .offload_dir(dir.path().to_path_buf());
            let engine = engine(
                device,
                ModelFiles::open(&fixture_dir(name)).unwrap(),
                options,
            );
            let got = engine.token_logprobs(&batch).unwrap();
            let d = worst_diff(&got, &want);
            assert!(d < 1e-4, "{device:?} {name} {p:?}: {d}");
        }
    }
}

/// `is_greedy` through the engine: scoring a prompt followed by the reference's greedy
/// continuation flags every continuation token as the argmax, and every flag (the random
/// sequences' mostly false ones too) equals the reference's, on both devices, with weights
/// streamed from RAM and disk.
#[test]
fn greedy_flags_follow_the_reference() {
    use ferrogen::reference::ReferenceModel;
    let dir = tempfile::tempdir().unwrap();
    for (device, name) in devices().into_iter().flat_map(|d| FIXTURES.map(|n| (d, n))) {
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let reference = ReferenceModel::load(&files).unwrap();
        let exp = expected(name);
        let prompts: Vec<&[u32]> = exp
            .sequences
            .iter()
            .map(|s| &s.tokens[..s.tokens.len().min(3)])
            .collect();
        let continued = reference.generate_greedy(&prompts, 5, None).unwrap();
        let mut seqs: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&continued)
            .map(|(p, c)| p.iter().chain(c).copied().collect())
            .collect();
        seqs.extend(exp.sequences.iter().map(|s| s.tokens.clone()));
        let batch: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let want = reference.token_scores(&batch).unwrap();
        let p = policy(2, 1, (30.0, 30.0), (100.0, 0.0), (30.0, 30.0), true, true);
        let options =
            EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf());
        let engine = engine(device, files, options);
        let got = engine.token_scores(&batch).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.greedy, w.greedy, "{device:?} {name} sequence {i}");
            if i < prompts.len() {
                let from = prompts[i].len() - 1;
                assert!(g.greedy[from..].iter().all(|&f| f), "{device:?} {name} {i}");
            }
        }
        let logprobs = |s: &[ferrogen::TokenScores]| -> Vec<Vec<f32>> {
            s.iter().map(|t| t.logprobs.clone()).collect()
        };
        let d = worst_diff(&logprobs(&got), &logprobs(&want));
        assert!(d < 1e-4, "{device:?} {name}: {d}");
    }
}

/// `seqs`, then for each of 4 tokens or more its first half with the rest reversed (a
/// sequence that shares its beginning), then a copy of the first (a member that is all
/// prefix).
fn with_shared_prefixes(seqs: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut out = seqs.to_vec();
    for s in seqs.iter().filter(|s| s.len() >= 4) {
        let half = s.len() / 2;
        out.push(
            s[..half]
                .iter()
                .chain(s[half..].iter().rev())
                .copied()
                .collect(),
        );
    }
    out.extend(seqs.first().cloned());
    out
}

/// Multiple-choice requests (one context, several endings; two questions that share their
/// first tokens, and a copy of one request) run as prefix groups: each member's logprobs and
/// greedy flags are the reference model's for that sequence alone, with the groups' shared
/// rows computed once (the stats count exactly the rows saved), on both devices, with an f32
/// and a 4-bit cache. Turned off, no rows are shared and the numbers are the same.
#[test]
fn prefix_groups_score_as_their_members_alone() {
    use ferrogen::reference::ReferenceModel;
    let dir = tempfile::tempdir().unwrap();
    for (device, name) in devices().into_iter().flat_map(|d| FIXTURES.map(|n| (d, n))) {
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let reference = ReferenceModel::load(&files).unwrap();
        let vocab = files.config.vocab_size() as u32;
        let tok = |i: u32| (i * 37 + 11) % vocab;
        // question 1: 24 tokens; question 2 (26) shares its first 6 (a common instruction);
        // the groups fit the fixtures' context of 48 tokens
        let q1: Vec<u32> = (0..24).map(tok).collect();
        let q2: Vec<u32> = q1[..6].iter().copied().chain((100..120).map(tok)).collect();
        let endings: [&[u32]; 4] = [&[5, 6, 7], &[5, 9], &[11], &[13, 14, 15, 16, 17]];
        let mut seqs = Vec::new();
        for q in [&q1, &q2] {
            for e in endings {
                seqs.push([&q[..], e].concat());
            }
        }
        seqs.insert(3, seqs[0].clone());
        seqs.push(vec![1, 2, 3]);
        let batch: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let want = reference.token_scores(&batch).unwrap();
        for compress_cache in [false, true] {
            let mut p = policy(2, 2, (30.0, 30.0), (100.0, 0.0), (30.0, 30.0), true, false);
            p.compress_cache = compress_cache;
            let mut got_off = None;
            for share in [true, false] {
                let options = EngineOptions::new(Placement::Policy(p.clone()))
                    .offload_dir(dir.path().to_path_buf())
                    .share_prefixes(share);
                let engine = engine(
                    device,
                    ModelFiles::open(&fixture_dir(name)).unwrap(),
                    options,
                );
                let got = engine.token_scores(&batch).unwrap();
                let what = format!("{device:?} {name} cache q4 {compress_cache} share {share}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // (flags: the 4-bit cache moves logits, so only with f32)
                    if !compress_cache {
                        assert_eq!(g.greedy, w.greedy, "{what}: sequence {i}");
                    }
                }
                let lp = |s: &[ferrogen::TokenScores]| -> Vec<Vec<f32>> {
                    s.iter().map(|t| t.logprobs.clone()).collect()
                };
                if !compress_cache {
                    let d = worst_diff(&lp(&got), &lp(&want));
                    assert!(d < 1e-3, "{what}: {d}");
                }
                // the shared rows (a question's tokens but the last) for each member but the
                // first: q1 has 4 more (3 endings and the copy), q2 3; the stranger none (and
                // none at all where a sliding window hides a shared prefix)
                let saved = if share && !files_window(name) {
                    4 * 23 + 3 * 25
                } else {
                    0
                };
                assert_eq!(engine.block_stats().shared_tokens, saved, "{what}");
                match &got_off {
                    None => got_off = Some(lp(&got)),
                    Some(on) => {
                        let tolerance = if compress_cache { 1e-3 } else { 1e-4 };
                        let d = worst_diff(&lp(&got), on);
                        assert!(d < tolerance, "{what}: {d} against prefix groups");
                    }
                }
            }
        }
    }
}

/// Generation with per-sequence decoding: sampled sequences give the same tokens whatever
/// batch they run in (alone, or with others under another batching), every token's logprob
/// is the resident model's for it, sequences end at their token budget, a stop token or the
/// caller's stop condition (with nothing after), and the jobs leave the ledger as they found
/// it; on both devices.
#[test]
fn generation_follows_each_sequences_decoding() {
    use ferrogen::sampling::{Decoding, FinishReason, Sampling};
    use std::ops::ControlFlow;
    let dir = tempfile::tempdir().unwrap();
    for (device, name) in devices().into_iter().flat_map(|d| FIXTURES.map(|n| (d, n))) {
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let resident = resident(
            device,
            &files,
            GpuOptions {
                weights: WeightFormat::Native,
                compress_cache: false,
                f16_cache: false,
            },
        );
        let exp = expected(name);
        let prompts: Vec<&[u32]> = exp
            .sequences
            .iter()
            .flat_map(|s| {
                [
                    &s.tokens[..s.tokens.len().min(4)],
                    &s.tokens[..s.tokens.len().min(30)],
                ]
            })
            .collect();
        let n = prompts.len();
        // greedy and sampled, budgets of 1-9 tokens; sequence 2 stops at a token it would
        // generate, sequence 3 when its caller says so (after 3 tokens)
        let mut decoding: Vec<Decoding> = (0..n)
            .map(|i| Decoding {
                max_tokens: 1 + i * 5 % 9,
                sampling: Sampling {
                    temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
                    top_k: [0, 5, 0, 40][i % 4],
                    top_p: [1.0, 0.9, 0.8, 1.0][i % 4],
                    seed: 1000 + i as u64,
                },
                stop_tokens: Vec::new(),
            })
            .collect();
        decoding[2].max_tokens = 8;
        decoding[3].max_tokens = 8;
        let greedy2 = resident.generate_greedy(&[prompts[2]], 8).remove(0);
        decoding[2].stop_tokens = vec![greedy2[4]];
        let stop = |i: usize, t: &[u32]| i == 3 && t.len() >= 3;
        let run = |p: ferrogen::Policy, which: &[usize]| {
            let options =
                EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf());
            let engine = engine(
                device,
                ModelFiles::open(&fixture_dir(name)).unwrap(),
                options,
            );
            let ps: Vec<&[u32]> = which.iter().map(|&i| prompts[i]).collect();
            let ds: Vec<Decoding> = which.iter().map(|&i| decoding[i].clone()).collect();
            let stop = |k: usize, t: &[u32]| stop(which[k], t);
            // (the first job sizes the weight slots, which stay)
            engine.generate(&[prompts[0]], 1, &[]).unwrap();
            let before = ferrogen::Tier::ALL.map(|t| engine.ledger().used(t));
            let mut out = vec![None; which.len()];
            engine
                .generate_with_each(&ps, &ds, &stop, |first, block| {
                    for (k, r) in block.into_iter().enumerate() {
                        out[first + k] = Some(r);
                    }
                    ControlFlow::Continue(())
                })
                .unwrap();
            let after = ferrogen::Tier::ALL.map(|t| engine.ledger().used(t));
            assert_eq!(
                after, before,
                "{device:?} {name}: bytes held after generating"
            );
            out.into_iter().map(Option::unwrap).collect::<Vec<_>>()
        };
        let all: Vec<usize> = (0..n).collect();
        let p = policy(2, 2, (30.0, 30.0), (50.0, 30.0), (30.0, 30.0), true, false);
        let together = run(p.clone(), &all);
        let what = format!("{device:?} {name}");
        for (i, r) in together.iter().enumerate() {
            let d = &decoding[i];
            assert!(
                !r.tokens.is_empty() && r.tokens.len() <= d.max_tokens,
                "{what} {i}"
            );
            let finish = r.finish.unwrap();
            match i {
                2 => {
                    assert_eq!(finish, FinishReason::Eos, "{what}");
                    assert_eq!(
                        r.tokens,
                        greedy2[..=greedy2.iter().position(|&t| t == greedy2[4]).unwrap()],
                        "{what}"
                    );
                }
                3 => {
                    assert_eq!(finish, FinishReason::Stop, "{what}");
                    assert_eq!(r.tokens.len(), 3, "{what}");
                }
                _ => {
                    assert_eq!(finish, FinishReason::Length, "{what} {i}");
                    assert_eq!(r.tokens.len(), d.max_tokens, "{what} {i}");
                }
            }
            if d.sampling.is_greedy() && i != 2 {
                let want = resident
                    .generate_greedy(&[prompts[i]], r.tokens.len())
                    .remove(0);
                assert_eq!(r.tokens, want, "{what} greedy {i}");
            }
            // each token's logprob is the model's for it, after the prompt and those before
            let full: Vec<u32> = prompts[i].iter().chain(&r.tokens).copied().collect();
            let lp = resident.token_logprobs(&[&full]).remove(0);
            let tail = &lp[prompts[i].len() - 1..];
            let diff = tail
                .iter()
                .zip(&r.logprobs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{what} {i}: logprobs off by {diff}");
        }
        // alone, and in reverse order under another batching: the same tokens
        let alone = policy(1, 1, (100.0, 0.0), (100.0, 0.0), (100.0, 0.0), false, false);
        for i in [1, 3, 5] {
            let one = run(alone.clone(), &[i]);
            assert_eq!(
                one[0].tokens, together[i].tokens,
                "{what}: sequence {i} alone"
            );
        }
        let reversed: Vec<usize> = (0..n).rev().collect();
        let back = run(
            policy(3, 1, (50.0, 50.0), (0.0, 100.0), (100.0, 0.0), false, true),
            &reversed,
        );
        for (k, &i) in reversed.iter().enumerate() {
            assert_eq!(
                back[k].tokens, together[i].tokens,
                "{what}: sequence {i} reversed"
            );
            assert_eq!(
                back[k].finish, together[i].finish,
                "{what}: sequence {i} reversed"
            );
        }
    }
}

/// Percent pairs (gpu, cpu) with gpu + cpu <= 100, in steps of 10.
fn split() -> impl Strategy<Value = (f64, f64)> {
    (0u32..=10, 0u32..=10).prop_map(|(g, c)| {
        let c = c.min(10 - g);
        (f64::from(g * 10), f64::from(c * 10))
    })
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Scoring and generation under random placements, batchings and switches equal the
    /// all-resident model on the same device.
    #[test]
    fn any_policy_gives_the_resident_numbers(
        on_cpu in any::<bool>(),
        fixture in 0usize..FIXTURES.len(),
        gbs in 1usize..3,
        nb in 1usize..4,
        w in split(),
        c in split(),
        h in split(),
        overlap in any::<bool>(),
        sep in any::<bool>(),
        compress_weight in any::<bool>(),
        cache_format in 0u8..3,
        cpu_cache_compute in any::<bool>(),
    ) {
        let device = if on_cpu || gpu_context().is_none() { DeviceKind::Cpu } else { DeviceKind::Wgpu };
        // the KV cache in f32, 4-bit groups, or f16
        let compress_cache = cache_format == 1;
        let f16_cache = cache_format == 2;
        let name = FIXTURES[fixture];
        let dir = tempfile::tempdir().unwrap();
        let files = ModelFiles::open(&fixture_dir(name)).unwrap();
        let resident = resident(
            device,
            &files,
            GpuOptions {
                weights: if compress_weight { WeightFormat::Group4 } else { WeightFormat::Native },
                compress_cache,
                f16_cache,
            },
        );
        let exp = expected(name);
        // the fixtures' sequences, and sequences that share their beginnings (run as prefix
        // groups): each one's first half with its second half reversed, and a copy of the first
        let seqs = with_shared_prefixes(&exp.sequences.iter().map(|s| s.tokens.clone()).collect::<Vec<_>>());
        let batch: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let mut p = policy(gbs, nb, w, c, h, overlap, sep);
        p.compress_cache = compress_cache;
        p.f16_cache = f16_cache;
        p.compress_weight = compress_weight;
        // CPU attention beside the device reads an f32 cache (as in FlexGen)
        p.cpu_cache_compute = cpu_cache_compute && !compress_cache && !f16_cache && c.0 < 100.0;
        let options = EngineOptions::new(Placement::Policy(p.clone())).offload_dir(dir.path().to_path_buf());
        let engine = engine(device, files, options);
        let tiers = ferrogen::Tier::ALL;

        let want = resident.token_logprobs(&batch);
        let got = engine.token_logprobs(&batch).unwrap();
        // what the engine keeps between jobs (resident weights, the two weight slots)
        let at_rest = tiers.map(|t| engine.ledger().used(t));
        let d = worst_diff(&got, &want);
        // a 4-bit cache rounds each value to one of 16 levels: a last-bit difference in a key
        // (a prefix group's member attends its keys in other blocks than alone) can move it a
        // level (measured: up to 2.8e-4 on logprobs near -30)
        // (f16 rounds every value to 11 bits: such a difference can move it by half an ulp).
        // Gemma's norm after attention rescales the attention's output to unit size, so such
        // a moved level weighs more there (measured: 1.3e-2 on gemma2-softcap, a sequence run
        // alone against the resident batch, weights and cache in 4 bits)
        let gemma = name.starts_with("gemma");
        let tolerance = match (compress_cache, f16_cache) {
            (true, _) if gemma => 3e-2,
            (true, _) | (_, true) => 2e-3,
            _ => 1e-4,
        };
        prop_assert!(d < tolerance, "{:?} {} scoring {:?}: {}", device, name, p, d);
        // (a sliding window hides a shared prefix: such models share none)
        let windowed = files_window(name);
        prop_assert_eq!(engine.block_stats().shared_tokens > 0, !windowed);

        // generation: the same tokens, and each token's logprob as the resident model scores it
        let prompts: Vec<&[u32]> = batch.iter().take(exp.sequences.len()).map(|s| &s[..s.len().min(5)]).collect();
        let new = 4;
        let gen = engine.generate(&prompts, new, &[]).unwrap();
        let greedy = resident.generate_greedy(&prompts, new);
        for ((g, want_tokens), prompt) in gen.iter().zip(&greedy).zip(&prompts) {
            prop_assert_eq!(&g.tokens, want_tokens, "{:?} {} generation {:?}", device, name, p);
            let full: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
            let lp = resident.token_logprobs(&[&full]).remove(0);
            let tail = &lp[prompt.len() - 1..];
            let d = tail.iter().zip(&g.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // (as in scoring: with a compact cache a last-bit difference can move a cached
            // value a level; one sequence per batch decodes through the M = 1 kernel, whose
            // sums run in another order than the resident model's batch: measured 1.5e-4)
            let gen_tolerance = tolerance; // (as in scoring)
            prop_assert!(d < gen_tolerance, "{} generated logprobs {:?}: {}", name, p, d);
        }
        // jobs leave nothing behind: after generation every tier holds what it held after
        // scoring, and the jobs' buffers came and went
        let after = tiers.map(|t| engine.ledger().used(t));
        prop_assert_eq!(after, at_rest, "{:?} {} {:?}: bytes held after the jobs", device, name, p);
        let peaks = tiers.map(|t| engine.ledger().peak(t));
        prop_assert!(peaks.iter().sum::<u64>() > at_rest.iter().sum::<u64>());
    }
}

/// Offloaded weights are kept when asked, reused by the next run of the same model and policy
/// (same numbers), rebuilt when the policy changes, and removed at exit otherwise.
#[test]
fn offload_files_are_reused_kept_or_removed() {
    let Some(_) = gpu_context() else { return };
    let dir = tempfile::tempdir().unwrap();
    let name = "llama-gqa-untied";
    let exp = expected(name);
    let batch: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
    let open = |w: (f64, f64), keep: bool| {
        let options = EngineOptions::new(Placement::Policy(policy(
            2,
            1,
            w,
            (100.0, 0.0),
            (100.0, 0.0),
            true,
            true,
        )))
        .offload_dir(dir.path().to_path_buf())
        .keep_offload(keep);
        Engine::open_files(
            gpu_context().unwrap(),
            ModelFiles::open(&fixture_dir(name)).unwrap(),
            options,
        )
        .unwrap()
    };
    let first = open((20.0, 20.0), true);
    assert!(!first.reused_offload());
    let want = first.token_logprobs(&batch).unwrap();
    drop(first);
    let files = || std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files(), 2, "weights and manifest kept");
    let second = open((20.0, 20.0), false);
    assert!(second.reused_offload());
    assert_eq!(second.token_logprobs(&batch).unwrap(), want);
    drop(second);
    assert_eq!(files(), 0, "removed at exit");
    let third = open((0.0, 0.0), false);
    assert!(!third.reused_offload());
    assert!(worst_diff(&third.token_logprobs(&batch).unwrap(), &want) < 1e-4);
}

/// Budgets too small for the policy are refused with the tier and the shortfall, before any
/// work; no offload directory for a disk placement is a clear error too.
#[test]
fn small_budgets_are_refused_naming_the_tier_and_shortfall() {
    let Some(_) = gpu_context() else { return };
    let name = "opt-pre-ln-proj";
    let p = policy(1, 1, (100.0, 0.0), (100.0, 0.0), (100.0, 0.0), true, true);
    let options = EngineOptions::new(Placement::Policy(p)).gpu_budget(10_000);
    let err = Engine::open_files(
        gpu_context().unwrap(),
        ModelFiles::open(&fixture_dir(name)).unwrap(),
        options,
    )
    .err()
    .expect("10 kB of GPU cannot hold the model");
    match &err {
        ferrogen::Error::Infeasible {
            tier, short_bytes, ..
        } => {
            assert_eq!(*tier, ferrogen::Tier::Gpu);
            assert!(*short_bytes > 0);
            // the sentence names the tier and the budget the user set
            let text = err.to_string();
            assert!(
                text.contains("on the GPU") && text.contains("9.77 KiB budget"),
                "{text}"
            );
        }
        e => panic!("{e}"),
    }
    let p = policy(1, 1, (0.0, 0.0), (100.0, 0.0), (100.0, 0.0), true, true);
    let err = Engine::open_files(
        gpu_context().unwrap(),
        ModelFiles::open(&fixture_dir(name)).unwrap(),
        EngineOptions::new(Placement::Policy(p)),
    )
    .err()
    .expect("weights on disk need an offload directory");
    assert!(
        err.to_string().contains("EngineOptions::offload_dir"),
        "{err}"
    );
}

/// A block whose sequences need more GPU memory than the budget leaves is run in halves,
/// with the same results.
#[test]
fn blocks_too_big_for_the_budget_are_split_with_the_same_numbers() {
    let Some(_) = gpu_context() else { return };
    let name = "llama-gqa-untied";
    let exp = expected(name);
    let batch: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
    assert!(batch.len() >= 2);
    let p = policy(
        batch.len(),
        1,
        (100.0, 0.0),
        (100.0, 0.0),
        (100.0, 0.0),
        true,
        true,
    );
    let open = |gpu_budget: u64| {
        let options = EngineOptions::new(Placement::Policy(p.clone())).gpu_budget(gpu_budget);
        Engine::open_files(
            gpu_context().unwrap(),
            ModelFiles::open(&fixture_dir(name)).unwrap(),
            options,
        )
        .unwrap()
    };
    // GPU peaks for one sequence and for the whole block, with no limit
    let free = open(u64::MAX);
    let want = free.token_logprobs(&batch).unwrap();
    let whole = free.peaks()[0];
    let single = open(u64::MAX);
    single.token_logprobs(&batch[..1]).unwrap();
    let one = single.peaks()[0];
    assert!(whole > one, "{whole} vs {one}");
    // a budget between the two: the block cannot run whole, its halves can
    let tight = open(one + (whole - one) / 4);
    let got = tight.token_logprobs(&batch).unwrap();
    assert!(worst_diff(&got, &want) < 1e-5);
    assert!(tight.peaks()[0] < whole);
}

/// Results come block by block as the blocks finish; the caller can cancel the blocks not yet
/// started, a failed block keeps the blocks handed over before it, and generation ends each
/// sequence at its first stop token.
#[test]
fn blocks_stream_cancel_and_stop() {
    let name = "llama-gqa-untied";
    let exp = expected(name);
    let mut seqs: Vec<Vec<u32>> = exp.sequences.iter().map(|s| s.tokens.clone()).collect();
    seqs.truncate(3);
    let batch: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    // one sequence per block
    let p = policy(1, 1, (100.0, 0.0), (100.0, 0.0), (100.0, 0.0), true, true);
    let engine = engine(
        DeviceKind::Cpu,
        ModelFiles::open(&fixture_dir(name)).unwrap(),
        EngineOptions::new(Placement::Policy(p)),
    );
    let want = engine.token_logprobs(&batch).unwrap();

    let mut seen = Vec::new();
    engine
        .token_logprobs_each(&batch, |first, block| {
            seen.push((first, block));
            if seen.len() == 2 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(seen.len(), 2, "cancelled after two blocks");
    assert_eq!(seen[0], (0, vec![want[0].clone()]));
    assert_eq!(seen[1], (1, vec![want[1].clone()]));

    // a token out of the vocabulary in the third sequence: its block fails, the first two
    // blocks were handed over already
    let mut bad = seqs.clone();
    bad[2][1] = u32::MAX;
    let bad: Vec<&[u32]> = bad.iter().map(Vec::as_slice).collect();
    let mut kept = Vec::new();
    let err = engine
        .token_logprobs_each(&bad, |first, block| {
            kept.push(first);
            assert_eq!(block[0], want[first]);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(
        matches!(err, ferrogen::Error::TokenOutOfRange { .. }),
        "{err}"
    );
    assert_eq!(kept, vec![0, 1]);

    // stop tokens: each sequence ends at its first stop token, kept as its last
    let prompts: Vec<&[u32]> = batch.iter().map(|s| &s[..s.len().min(4)]).collect();
    let free = engine.generate(&prompts, 6, &[]).unwrap();
    let stop = free[0].tokens[2];
    let stopped = engine.generate(&prompts, 6, &[stop]).unwrap();
    for (s, f) in stopped.iter().zip(&free) {
        let end = f
            .tokens
            .iter()
            .position(|&t| t == stop)
            .map_or(6, |i| i + 1);
        assert_eq!(s.tokens, f.tokens[..end]);
        assert_eq!(s.logprobs, f.logprobs[..end]);
    }
    assert!(stopped[0].tokens.len() <= 3);
}

/// Calls from several threads at once are safe: their blocks run one at a time, and each
/// thread gets the numbers a lone call gets.
#[test]
fn calls_from_several_threads_give_the_lone_numbers() {
    let name = "llama-tied";
    let exp = expected(name);
    let batch: Vec<&[u32]> = exp.sequences.iter().map(|s| s.tokens.as_slice()).collect();
    let p = policy(1, 2, (30.0, 30.0), (50.0, 50.0), (100.0, 0.0), true, true);
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(
        DeviceKind::Cpu,
        ModelFiles::open(&fixture_dir(name)).unwrap(),
        EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf()),
    );
    let want = engine.token_logprobs(&batch).unwrap();
    let prompts: Vec<&[u32]> = batch.iter().map(|s| &s[..s.len().min(3)]).collect();
    let want_gen = engine.generate(&prompts, 4, &[]).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let engine = &engine;
                let (batch, prompts) = (&batch, &prompts);
                s.spawn(move || {
                    if i % 2 == 0 {
                        (Some(engine.token_logprobs(batch).unwrap()), None)
                    } else {
                        (None, Some(engine.generate(prompts, 4, &[]).unwrap()))
                    }
                })
            })
            .collect();
        for h in handles {
            match h.join().unwrap() {
                (Some(got), _) => assert_eq!(got, want),
                (_, Some(got)) => assert_eq!(got, want_gen),
                _ => unreachable!(),
            }
        }
    });
}

/// The disk part of the KV cache moves a run of sequences in one request when their rows lie
/// close together, and one request per sequence when more than the merge gap (256 KiB per
/// cache segment) lies between them. A random Llama with 8 KV heads of 256 has 8 KiB cache
/// rows per segment (f32): 4 prompts of 8 tokens generating 40 each have 48-row capacities, so the
/// prefill's stores and the first decode steps (a gap of (48 - c) x 8 KiB > 256 KiB while
/// fewer than c = 16 rows are cached) move one sequence at a time, the later steps merged.
/// The tokens and their logprobs are the resident model's, on both devices.
#[test]
fn disk_cache_rows_far_apart_move_one_sequence_at_a_time() {
    use ferrogen::arch::random::RandomWeights;
    use ferrogen::arch::LlamaConfig;
    let config = ferrogen::arch::ModelConfig::Llama(LlamaConfig {
        num_key_value_heads: Some(8),
        head_dim: Some(256),
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        ..LlamaConfig::new(64, 64, 128, 2, 8)
    });
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|s| (0..8).map(|i| (s * 17 + i * 5 + 1) % 64).collect())
        .collect();
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let new_tokens = 40;
    let dir = tempfile::tempdir().unwrap();
    for device in devices() {
        let files = RandomWeights::model_files(&config, 11);
        let resident = resident(device, &files, GpuOptions::default());
        // weights and activations resident, the whole cache on disk
        let p = policy(2, 2, (100.0, 0.0), (0.0, 0.0), (100.0, 0.0), true, false);
        let options =
            EngineOptions::new(Placement::Policy(p)).offload_dir(dir.path().to_path_buf());
        let engine = engine(device, RandomWeights::model_files(&config, 11), options);
        let got = engine.generate(&prompts, new_tokens, &[]).unwrap();
        let want = resident.generate_greedy(&prompts, new_tokens);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.tokens, want[i], "{device:?} sequence {i}");
            let full: Vec<u32> = prompts[i].iter().chain(&r.tokens).copied().collect();
            let lp = resident.token_logprobs(&[&full]).remove(0);
            let diff = lp[prompts[i].len() - 1..]
                .iter()
                .zip(&r.logprobs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-4,
                "{device:?} sequence {i}: logprobs off by {diff}"
            );
        }
    }
}

/// Whether fixture `name` has a sliding window (its rows share no prefix).
fn files_window(name: &str) -> bool {
    let files = ModelFiles::open(&fixture_dir(name)).unwrap();
    files.config.attention_window().is_some()
}

/// Gemma 3's vocabulary of 262,144 tokens on a small body: the output projection (32 MiB of
/// f16, tied to the embedding) is far larger than the layers and than the GPU budget, and
/// streams in vocabulary panels like any linear. The engine's logprobs equal the resident
/// model's on both devices.
#[test]
fn a_vocabulary_larger_than_the_budget_streams_in_panels() {
    use ferrogen::arch::random::RandomWeights;
    let text = r#"{"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "sliding_window": 4, "query_pre_attn_scalar": 16}"#;
    let config =
        ferrogen::arch::ModelConfig::from_json_str(text, std::path::Path::new("c.json")).unwrap();
    let seqs: Vec<Vec<u32>> = (0..3u32)
        .map(|s| {
            (0..12)
                .map(|i| (s * 104_729 + i * 7_919 + 5) % 262_144)
                .collect()
        })
        .collect();
    let seqs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let dir = tempfile::tempdir().unwrap();
    for device in devices() {
        let files = RandomWeights::model_files(&config, 3);
        let want = resident(device, &files, GpuOptions::default()).token_logprobs(&seqs);
        // every weight in RAM and none on the GPU: on WebGPU the output projection streams
        // to the device a panel at a time, under a GPU budget of a quarter of it
        let p = policy(3, 1, (0.0, 100.0), (100.0, 0.0), (100.0, 0.0), true, false);
        let (gpu_budget, _) = common::budgets(device, 16 << 20, 0);
        let options = EngineOptions::new(Placement::Policy(p))
            .gpu_budget(gpu_budget)
            .offload_dir(dir.path().to_path_buf());
        let engine = engine(device, RandomWeights::model_files(&config, 3), options);
        let got = engine.token_logprobs(&seqs).unwrap();
        let d = worst_diff(&got, &want);
        assert!(d < 1e-4, "{device:?}: {d}");
        let in_ram = engine.weight_bytes()[1];
        assert!(in_ram >= 32 << 20, "{device:?}: {in_ram} bytes in RAM");
    }
}
