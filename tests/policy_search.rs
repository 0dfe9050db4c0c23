//! The cost model against FlexGen's published T4 results, and the search's invariants.

use std::path::Path;

use ferrogen::arch::builtin::builtin_config;
use ferrogen::policy::{
    search, ByteSize, CostModel, CpuLinear, HardwareProfile, Policy, QuantConfig, SearchOptions,
    Workload,
};
use ferrogen::Error;
use proptest::prelude::*;

fn t4() -> HardwareProfile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/t4-flexgen.toml");
    HardwareProfile::from_toml_file(Path::new(path)).unwrap()
}

const PAPER: Workload = Workload {
    prompt_len: 512,
    gen_len: 32,
};

/// A FlexGen policy as its `--percent w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu` says.
fn flexgen_policy(gbs: usize, nb: usize, percent: [f64; 6], cpu_cache_compute: bool) -> Policy {
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: nb,
        w_gpu_percent: percent[0],
        w_cpu_percent: percent[1],
        cache_gpu_percent: percent[2],
        cache_cpu_percent: percent[3],
        act_gpu_percent: percent[4],
        act_cpu_percent: percent[5],
        overlap: true,
        sep_layer: true,
        pin_weight: true,
        cpu_cache_compute,
        attn_sparsity: 1.0,
        compress_weight: false,
        compress_cache: false,
        f16_cache: false,
        quant: QuantConfig::default(),
    }
}

fn within(predicted: f64, measured: f64, factor: f64) -> bool {
    predicted / measured <= factor && measured / predicted <= factor
}

#[test]
fn opt_30b_published_policy_and_search() {
    let model = CostModel::new(builtin_config("opt-30b").unwrap().shape(), t4(), PAPER);
    // 48 x 3, weights 20/80/0, cache and activations on CPU, CPU attention: 7.32 tokens/s.
    let published = flexgen_policy(48, 3, [20.0, 80.0, 0.0, 100.0, 0.0, 100.0], true);
    let predicted = model.predict(&published).throughput_tok_s;
    assert!(within(predicted, 7.32, 1.5), "predicted {predicted}");
    let found = search(&model, &SearchOptions::default()).unwrap();
    assert!(
        found.prediction.throughput_tok_s >= predicted,
        "search {} < published {predicted}",
        found.prediction.throughput_tok_s
    );
}

#[test]
fn opt_175b_published_policy_and_search() {
    let config = builtin_config("opt-175b").unwrap();
    // As the paper's table states it: 32 x 8, weights 0/50/50, cache and activations on CPU,
    // CPU attention: 0.69 tokens/s.
    let stated = flexgen_policy(32, 8, [0.0, 50.0, 0.0, 100.0, 0.0, 100.0], true);
    let model = CostModel::new(config.shape(), t4(), PAPER);
    let prediction = model.predict(&stated);
    assert!(
        within(prediction.throughput_tok_s, 0.69, 1.5),
        "predicted {}",
        prediction.throughput_tok_s
    );
    // That cache (256 sequences x 544 tokens x 96 layers, fp16) is 657 GB: the policy does not
    // fit the machine's 204 GB of RAM, so the search cannot choose it there. Given the RAM it
    // needs, the search's choice predicts at least as much.
    assert!(prediction.cpu_peak_bytes > t4().cpu_memory.0 as f64);
    let roomy = t4().with_capacities(15 << 30, 1 << 40, 1500 << 30);
    let found = search(
        &CostModel::new(config.shape(), roomy, PAPER),
        &SearchOptions::default(),
    )
    .unwrap();
    assert!(found.prediction.throughput_tok_s >= prediction.throughput_tok_s);

    // FlexGen's benchmark suite actually ran `--percent 0 50 0 0 0 100`: the cache on disk.
    // On the real machine, the search beats that policy's prediction.
    let ran = flexgen_policy(32, 8, [0.0, 50.0, 0.0, 0.0, 0.0, 100.0], true);
    let ran_prediction = model.predict(&ran);
    assert!(ran_prediction.cpu_peak_bytes <= t4().cpu_memory.0 as f64);
    let found = search(&model, &SearchOptions::default()).unwrap();
    assert!(found.prediction.throughput_tok_s >= ran_prediction.throughput_tok_s);
}

/// A limit on the block (a job with only so many sequences) is respected, and a limit the
/// unlimited choice already meets changes nothing.
#[test]
fn block_size_limit_bounds_the_search() {
    let model = CostModel::new(builtin_config("opt-30b").unwrap().shape(), t4(), PAPER);
    let free = search(&model, &SearchOptions::default()).unwrap().policy;
    let block = free.block_size();
    assert!(block > 8, "{free:?}");
    for limit in [1, 8, block - 1] {
        let options = SearchOptions {
            max_block_size: limit,
            ..SearchOptions::default()
        };
        let bound = search(&model, &options).unwrap().policy;
        assert!(bound.block_size() <= limit, "{limit}: {bound:?}");
    }
    let options = SearchOptions {
        max_block_size: block,
        ..SearchOptions::default()
    };
    assert_eq!(search(&model, &options).unwrap().policy, free);
}

#[test]
fn infeasible_budgets_name_the_short_tier() {
    let tiny = t4().with_capacities(1 << 30, 1 << 30, 1 << 30);
    let model = CostModel::new(builtin_config("opt-175b").unwrap().shape(), tiny, PAPER);
    match search(&model, &SearchOptions::default()) {
        Err(e @ Error::Infeasible { .. }) => {
            let Error::Infeasible {
                tier, short_bytes, ..
            } = &e
            else {
                unreachable!()
            };
            // 350 GB of weights cannot fit 3 GiB in all: some tier is short by a lot.
            assert!(*short_bytes > 100 << 30, "{e}");
            assert!(ferrogen::Tier::ALL.contains(tier));
            assert!(e.to_string().contains("short by"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

const MODELS: [&str; 5] = [
    "opt-1.3b",
    "opt-6.7b",
    "opt-30b",
    "llama-2-7b",
    "llama-3-8b",
];

fn scaled(factors: &[f64; 6]) -> HardwareProfile {
    let mut hw = t4();
    hw.gpu_memory = ByteSize((hw.gpu_memory.0 as f64 * factors[0]) as u64);
    hw.cpu_memory = ByteSize((hw.cpu_memory.0 as f64 * factors[1]) as u64);
    hw.disk_space = ByteSize((hw.disk_space.0 as f64 * factors[2]) as u64);
    hw.cpu_to_gpu_gib_s *= factors[3];
    hw.disk_read[0].gib_s *= factors[4];
    hw.gpu_matmul_tflops_decode *= factors[5];
    hw
}

fn small_grid() -> SearchOptions {
    SearchOptions {
        gpu_batch_sizes: vec![1, 2, 4, 8, 16, 32, 64],
        num_gpu_batches: vec![1, 2, 4, 8, 16],
        ..SearchOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every returned policy fits every tier, its fractions sum to 1, its cache and
    /// activations are placed in whole sequences, and giving any tier more
    /// memory or any link more bandwidth never lowers the predicted throughput.
    #[test]
    fn search_respects_budgets_and_is_monotone(
        model in 0usize..MODELS.len(),
        factors in prop::array::uniform6(0.05f64..2.0),
        which in 0usize..6,
        prompt_len in 16usize..1024,
        gen_len in 1usize..128,
        compress in any::<bool>(),
    ) {
        let config = builtin_config(MODELS[model]).unwrap();
        let workload = Workload { prompt_len, gen_len };
        let mut options = small_grid();
        options.compress_weight = compress;
        let hw = scaled(&factors);
        let base = search(&CostModel::new(config.shape(), hw.clone(), workload), &options);
        let mut more = factors;
        more[which] *= 2.0;
        let better = search(&CostModel::new(config.shape(), scaled(&more), workload), &options);
        match base {
            Err(Error::Infeasible { .. }) => {}
            Err(e) => prop_assert!(false, "{e}"),
            Ok(found) => {
                let p = &found.prediction;
                let tol = 1.0 + 1e-6;
                prop_assert!(p.gpu_peak_bytes <= hw.gpu_memory.0 as f64 * tol);
                prop_assert!(p.cpu_peak_bytes <= hw.cpu_memory.0 as f64 * tol);
                prop_assert!(p.disk_bytes <= hw.disk_space.0 as f64 * tol + 1.0);
                found.policy.validate("search").unwrap();
                // the cache and activations in whole sequences of the block per tier, as the
                // executor places them
                let block = found.policy.block_size() as f64;
                for split in [found.policy.cache(), found.policy.activations()] {
                    for share in [split.gpu, split.cpu, split.disk] {
                        prop_assert!((share * block - (share * block).round()).abs() < 1e-6, "{:?}", found.policy);
                    }
                }
                for split in [found.policy.weights(), found.policy.cache(), found.policy.activations()] {
                    prop_assert!((split.gpu + split.cpu + split.disk - 1.0).abs() < 1e-9);
                    prop_assert!(split.gpu >= 0.0 && split.cpu >= 0.0 && split.disk >= 0.0);
                }
                let better = better.expect("more resources cannot make it infeasible");
                prop_assert!(
                    better.prediction.throughput_tok_s >= p.throughput_tok_s * (1.0 - 1e-6),
                    "{} < {}", better.prediction.throughput_tok_s, p.throughput_tok_s
                );
            }
        }
    }
}

#[test]
fn saved_policies_load_and_fit_the_t4() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // t4-<model>-s512-n32[-4bit].toml, searched on the T4 profile
        let Some(model) = name
            .strip_prefix("t4-")
            .and_then(|r| r.split("-s512").next())
            .filter(|_| name.contains("-s512-n32"))
        else {
            continue;
        };
        let policy = Policy::from_toml_file(&path).unwrap();
        let cost = CostModel::new(builtin_config(model).unwrap().shape(), t4(), PAPER);
        let p = cost.predict(&policy);
        let hw = t4();
        assert!(
            p.gpu_peak_bytes <= hw.gpu_memory.0 as f64 * (1.0 + 1e-6),
            "{name}"
        );
        assert!(
            p.cpu_peak_bytes <= hw.cpu_memory.0 as f64 * (1.0 + 1e-6),
            "{name}"
        );
        assert!(p.throughput_tok_s > 0.0);
        checked += 1;
    }
    assert_eq!(checked, 6, "three FlexGen settings, fp16 and 4-bit");
}

/// On the CPU device the decode step's linear layers cost what the device's kernels do: below
/// 24 rows (packed weights) one pass of the weight bytes per 4 rows of `x` (or per the
/// calibrated rows per pass, plus a fixed cost per linear call), from 24 rows one panel decode
/// of every value plus the GEMM; and every call of a layer's kernels its calibrated fixed cost.
#[test]
fn host_device_linear_cost_follows_the_kernel_the_device_runs() {
    let bytes_per_value = 0.625; // Q4_0/Q4_1 blocks
                                 // (call_s, rows_per_pass, layer overhead): not calibrated, then calibrated
    for (call_s, rows_per_pass, overhead) in [(0.0, 0.0, 0.0), (40e-6, 3.0, 150e-6)] {
        let mut hw = t4();
        hw.cpu_linear = vec![CpuLinear {
            bytes_per_value,
            gemm_tflops: 0.14,
            panel_gvalues_s: 2.0,
            decode_gib_s: 4.0,
            call_s,
            rows_per_pass,
        }];
        hw.cpu_layer_overhead_s = overhead;
        let hw = hw.for_host_device(bytes_per_value);
        let config = builtin_config("opt-1.3b").unwrap();
        let model = CostModel::new(
            config.shape(),
            hw,
            Workload {
                prompt_len: 64,
                gen_len: 8,
            },
        )
        .with_weight_bytes(bytes_per_value)
        .with_compute_rows(512)
        .on_host_device();
        let shape = model.shape;
        let l = shape.layers as f64;
        let w_values = shape.layer_values + shape.head_values / l;
        let flin = 2.0 * shape.layer_values + 2.0 * shape.head_macs / l;
        let pass = w_values * bytes_per_value / (4.0 * f64::from(1u32 << 30));
        let panels = w_values / 2.0e9;
        // OPT's 6 linear layers and the head's call spread over the layers
        let calls = (6.0 + 1.0 / l) * call_s;
        // the constant part of the decode compute is the linear layers' and the calls' (attention
        // and cache decoding are coefficients of the cache fractions)
        let decode_linear = |gbs: usize, nb: usize| {
            let policy = Policy {
                cpu_cache_compute: false,
                ..flexgen_policy(gbs, nb, [100.0, 0.0, 100.0, 0.0, 100.0, 0.0], false)
            };
            let terms = model.terms(&ferrogen::policy::cost::Batching::of(&policy));
            terms.decode.comp.constant
        };
        for (gbs, nb) in [(1usize, 1), (4, 1), (5, 1), (8, 2), (23, 1)] {
            let passes = if rows_per_pass > 0.0 {
                (gbs as f64 / rows_per_pass).max(1.0)
            } else {
                gbs.div_ceil(4) as f64
            };
            let expected = nb as f64 * (calls + passes * pass + overhead);
            let got = decode_linear(gbs, nb);
            assert!(
                (got - expected).abs() <= 1e-9 * expected,
                "gbs {gbs}: {got} vs {expected}"
            );
        }
        for (gbs, nb) in [(24, 1), (64, 3), (512, 1)] {
            let expected = nb as f64 * (panels + gbs as f64 * flin / 0.14e12 + overhead);
            let got = decode_linear(gbs, nb);
            assert!(
                (got - expected).abs() <= 1e-9 * expected,
                "gbs {gbs}: {got} vs {expected}"
            );
        }
        // 600 rows run as calls of 512 and 88 rows: two panel decodes, two layer calls
        let expected = 2.0 * panels + 600.0 * flin / 0.14e12 + 2.0 * overhead;
        assert!((decode_linear(600, 1) - expected).abs() <= 1e-9 * expected);
    }
}

/// Weights load from disk a unit at a time: the weight reads cost what the profile measured
/// for bursts of one unit's bytes (attention and MLP apart with `sep_layer`), while
/// activations and cache stream at the stream rate.
#[test]
fn disk_weight_reads_cost_the_burst_rate_of_a_unit() {
    use ferrogen::policy::cost::{x, Batching};
    use ferrogen::policy::hardware::BurstRead;
    let config = builtin_config("opt-1.3b").unwrap();
    let workload = Workload {
        prompt_len: 64,
        gen_len: 8,
    };
    let plain = t4();
    let mut bursts = t4();
    bursts.disk_burst_read = vec![
        BurstRead {
            burst_bytes: 1 << 20,
            gib_s: 0.1,
        },
        BurstRead {
            burst_bytes: 1 << 30,
            gib_s: 0.2,
        },
    ];
    for sep_layer in [true, false] {
        let policy = Policy {
            sep_layer,
            ..flexgen_policy(8, 2, [0.0, 0.0, 100.0, 0.0, 100.0, 0.0], false)
        };
        let b = Batching::of(&policy);
        let terms = |hw: &HardwareProfile| {
            CostModel::new(config.shape(), hw.clone(), workload)
                .with_weight_bytes(2.0)
                .terms(&b)
        };
        let (without, with) = (terms(&plain), terms(&bursts));
        let unit = CostModel::new(config.shape(), plain.clone(), workload)
            .shape
            .layer_values
            * 2.0
            / if sep_layer { 2.0 } else { 1.0 };
        let want = plain.disk_to_cpu_gib_s() / bursts.disk_burst_gib_s(unit);
        for (a, b) in [
            (without.decode.dtoc, with.decode.dtoc),
            (without.prefill.dtoc, with.prefill.dtoc),
        ] {
            let ratio = b.coef[x::WN] / a.coef[x::WN];
            assert!((ratio - want).abs() < 1e-9 * want, "{ratio} vs {want}");
            // activations on disk keep the stream rate
            assert_eq!(a.coef[x::HN], b.coef[x::HN]);
        }
    }
}

/// The KV cache's bytes follow its format: with f32 activations (the engine's), an f16
/// cache takes half the memory of the f32 one on every tier and half its disk traffic, and
/// 4-bit groups less again.
#[test]
fn cache_bytes_follow_the_cache_format() {
    use ferrogen::policy::cost::{x, Batching};
    let config = builtin_config("opt-1.3b").unwrap();
    let model = CostModel::new(
        config.shape(),
        t4(),
        Workload {
            prompt_len: 64,
            gen_len: 8,
        },
    )
    .with_activation_bytes(4.0);
    let base = flexgen_policy(8, 2, [100.0, 0.0, 30.0, 30.0, 100.0, 0.0], false);
    let terms = |f16_cache: bool, compress_cache: bool| {
        model.terms(&Batching::of(&Policy {
            f16_cache,
            compress_cache,
            ..base.clone()
        }))
    };
    let (f32, f16, q4) = (terms(false, false), terms(true, false), terms(false, true));
    let cg = |t: &ferrogen::policy::cost::Terms| t.gpu_peak[1].coef[x::CG];
    let (a, b, c) = (cg(&f32), cg(&f16), cg(&q4));
    assert!(
        a > 0.0 && (b - a / 2.0).abs() <= 1e-9 * a,
        "gpu cache bytes {a} vs {b}"
    );
    assert!(c < b, "4-bit {c} vs f16 {b}");
    // reading the disk part of the cache back for a decode step: half the time
    let (a, b) = (f32.decode.dtoc.coef[x::CN], f16.decode.dtoc.coef[x::CN]);
    assert!(
        a > 0.0 && (b - a / 2.0).abs() <= 1e-9 * a,
        "disk cache reads {a} vs {b}"
    );
}

/// A cache partly off the GPU is computed against working copies of one batch's layer cache,
/// `Bkv (s + n) gbs` each: one when scoring, up to two in prefill and three in decode (one
/// stored, one computing, one loaded), as many as the schedule's run of cache cells allows (nb
/// with sep_layer); none in decode with CPU attention. The peaks count them only when some of
/// the cache is off the GPU.
#[test]
fn working_cache_copies_follow_the_schedule() {
    use ferrogen::policy::cost::Batching;
    let config = builtin_config("opt-1.3b").unwrap();
    let (s, n) = (64usize, 8usize);
    let model = |gen_len| {
        CostModel::new(
            config.shape(),
            t4(),
            Workload {
                prompt_len: s,
                gen_len,
            },
        )
        .with_activation_bytes(4.0)
    };
    // one layer's K and V of one token, f32: 2 * hidden * 4 bytes
    let bkv = 2.0 * 2048.0 * 4.0;
    let copies = |gen_len: usize, nb: usize, sep_layer: bool, ccc: bool| {
        let policy = Policy {
            sep_layer,
            ..flexgen_policy(8, nb, [100.0, 0.0, 50.0, 50.0, 100.0, 0.0], ccc)
        };
        let working = model(gen_len).terms(&Batching::of(&policy)).working_cache;
        working.map(|w| w / (bkv * (s + gen_len) as f64 * 8.0))
    };
    assert_eq!(copies(1, 4, true, false), [1.0, 0.0], "scoring");
    assert_eq!(copies(n, 1, true, false), [1.0, 1.0]);
    assert_eq!(copies(n, 2, true, false), [2.0, 2.0]);
    assert_eq!(copies(n, 4, true, false), [2.0, 3.0]);
    assert_eq!(
        copies(n, 1, false, false),
        [2.0, 3.0],
        "every layer has a cache"
    );
    assert_eq!(
        copies(n, 4, true, true),
        [2.0, 0.0],
        "CPU attention in decode"
    );

    // counted in the peak only when some of the cache is off the GPU
    let model = model(n);
    let peak = |cache_gpu: f64| {
        let policy = flexgen_policy(
            8,
            4,
            [100.0, 0.0, cache_gpu, 100.0 - cache_gpu, 100.0, 0.0],
            false,
        );
        let terms = model.terms(&Batching::of(&policy));
        (model.predict(&policy).gpu_peak_bytes, terms)
    };
    let (all, terms) = peak(100.0);
    let resident = terms
        .gpu_peaks(true)
        .map(|p| p.eval(&[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]));
    assert_eq!(all, resident[0].max(resident[1]));
    let (almost, terms) = peak(99.0);
    let xs = [1.0, 0.0, 0.0, 0.99, 0.01, 0.0, 1.0, 0.0, 0.0];
    let split = terms.gpu_peaks(false).map(|p| p.eval(&xs));
    assert!((almost - split[0].max(split[1])).abs() < 1e-6 * almost);
    assert!(almost > all, "{almost} vs {all}");
}

/// The disk terms move what the executor moves: a disk sequence's whole capacity `s + n` per
/// request when the rows between sequences are within the merge gap (256 KiB per cache
/// segment), else only its rows (`c` read at the average step, the new rows written).
#[test]
fn disk_cache_terms_follow_the_executors_requests() {
    use ferrogen::policy::cost::Batching;
    let config = builtin_config("opt-1.3b").unwrap();
    // one layer's K and V of one token, f32: 2 * 2048 * 4 bytes, 8 KiB per segment
    let bkv = 2.0 * 2048.0 * 4.0;
    let policy = flexgen_policy(8, 2, [100.0, 0.0, 0.0, 0.0, 100.0, 0.0], false);
    let hw = t4();
    let rows = |s: usize, n: usize| {
        let model = CostModel::new(
            config.shape(),
            hw.clone(),
            Workload {
                prompt_len: s,
                gen_len: n,
            },
        )
        .with_activation_bytes(4.0);
        let terms = model.terms(&Batching::of(&policy));
        // only the disk share of the cache: x = cn
        let cn = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let per_row = |bw_gib_s: f64| bkv * 16.0 / (bw_gib_s * (1u64 << 30) as f64);
        [
            terms.prefill.ctod.eval(&cn) / per_row(hw.cpu_to_disk_cache_gib_s),
            terms.decode.dtoc.eval(&cn) / per_row(hw.disk_to_cpu_gib_s()),
            terms.decode.ctod.eval(&cn) / per_row(hw.cpu_to_disk_gib_s),
        ]
    };
    let close = |a: [f64; 3], b: [f64; 3]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-9);
    // s = 64, n = 8: gaps of 8 rows (prefill, 64 KiB) and 4 (read) merge; 71 (decode write,
    // 568 KiB) do not
    assert!(close(rows(64, 8), [72.0, 72.0, 1.0]), "{:?}", rows(64, 8));
    // s = 512, n = 32: the prefill's gap is exactly 256 KiB (merges), the read's 128 KiB
    assert!(
        close(rows(512, 32), [544.0, 544.0, 1.0]),
        "{:?}",
        rows(512, 32)
    );
    // s = 512, n = 128: the prefill's gap (1 MiB) and the read's (512 KiB) do not merge
    assert!(
        close(rows(512, 128), [512.0, 576.0, 1.0]),
        "{:?}",
        rows(512, 128)
    );
    // short rows merge everything, new decode rows included: 2 + 2 rows of capacity
    assert!(close(rows(2, 2), [4.0, 4.0, 4.0]), "{:?}", rows(2, 2));
}
