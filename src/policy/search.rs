//! Policy search: batch sizes and flags enumerated outside, placement solved as an LP.
//!
//! For each `(gbs, nb, cpu_cache_compute)` the LP over `x = [wg, wc, wn, cg, cc, cn, hg, hc, hn]`
//! with per-layer times `Tpre, Tgen` is
//! ```text
//! minimise   (l * Tpre + l * (n - 1) * Tgen) / bls
//! subject to wg + wc + wn = 1,  cg + cc + cn = 1,  hg + hc + hn = 1,  0 <= x <= 1
//!            Tpre >= ctog + dtoc,  Tpre >= gtoc + ctod,  Tpre >= comp      (prefill forms)
//!            Tgen >= ctog + dtoc,  Tgen >= gtoc + ctod,  Tgen >= comp      (decode forms)
//!            GPU peak (prefill, decode) <= GPU memory; CPU peaks <= CPU memory; disk <= disk
//! ```
//! solved with good_lp's pure-Rust microlp backend, twice: with the cache all on the GPU, and
//! with the working copies a cache partly elsewhere needs on the GPU. The executor places the
//! cache and activations in whole sequences per tier, so each LP's fractions are then fixed to
//! the whole counts of the block's `bls` sequences either side and the LP solved again for the
//! weights (the best of those). The grid is enumerated in full (stopping a row only where
//! memory runs out, which only grows with gbs and nb), so more memory or more bandwidth does not
//! lower the best prediction (checked by a proptest; whole counts make this hold in practice,
//! not by construction).

use good_lp::{microlp, variable, Expression, ProblemVariables, Solution, SolverModel, Variable};
use serde::Serialize;

use super::cost::{x, Batching, CostModel, Linear, Prediction, Terms};
use super::hardware::GIB;
use super::policy::{Policy, QuantConfig};
use crate::bytes::format_size;
use crate::error::{Error, Result};
use crate::storage::Tier;

/// Choices the search does not make itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOptions {
    /// Store weights in 4-bit groups.
    pub compress_weight: bool,
    /// Store the KV cache in 4-bit groups.
    pub compress_cache: bool,
    /// Store the KV cache in f16.
    pub f16_cache: bool,
    /// GPU batch sizes to try.
    pub gpu_batch_sizes: Vec<usize>,
    /// Numbers of GPU batches per block to try.
    pub num_gpu_batches: Vec<usize>,
    /// Consider attention on the CPU where the cache lives (`cpu_cache_compute`).
    pub allow_cpu_cache_compute: bool,
    /// The largest block to try, `gpu_batch_size * num_gpu_batches` sequences (when the
    /// workload has no more sequences than this, a larger block only costs memory).
    pub max_block_size: usize,
}

/// 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x them) up to `max`.
pub fn batch_grid(max: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 3];
    let mut p = 4;
    while p <= max {
        v.push(p);
        if p * 3 / 2 <= max {
            v.push(p * 3 / 2);
        }
        p *= 2;
    }
    v.retain(|&b| b <= max);
    v
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            compress_weight: false,
            compress_cache: false,
            f16_cache: false,
            gpu_batch_sizes: batch_grid(512),
            num_gpu_batches: batch_grid(64),
            allow_cpu_cache_compute: true,
            max_block_size: usize::MAX,
        }
    }
}

/// The best policy found, with its prediction.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    /// The chosen policy.
    pub policy: Policy,
    /// Its prediction (throughput, breakdown, peaks).
    pub prediction: Prediction,
    /// LPs solved.
    pub lps_solved: usize,
}

/// Bytes are scaled to GiB inside the LP to keep its numbers well conditioned.
const BYTES_SCALE: f64 = 1.0 / GIB;

fn expr(l: &Linear, xs: &[Variable; x::COUNT], scale: f64) -> Expression {
    let mut e = Expression::from(l.constant * scale);
    for (c, v) in l.coef.iter().zip(xs) {
        if *c != 0.0 {
            e += *v * (c * scale);
        }
    }
    e
}

/// The best placement for one batching choice, or `None` when nothing fits: the better of
/// the LP with the whole cache on the GPU and the LP with the working copies of caches held
/// elsewhere (see [`Terms::gpu_peaks`]), each with its cache and activations in whole
/// sequences per tier ([`solve_whole`]).
fn solve_placement(model: &CostModel, b: &Batching, lps: &mut usize) -> Option<[f64; x::COUNT]> {
    let terms = model.terms(b);
    [true, false]
        .into_iter()
        .filter_map(|cache_on_gpu| solve_whole(model, b, &terms, cache_on_gpu, lps))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, xs)| xs)
}

/// The best placement, and its seconds, with the cache and the activations in whole sequences
/// of the block per tier, as the executor places them: the LP's fractions `f` put `f * bls`
/// sequences on a tier, so each tier's count is fixed in turn to the whole numbers either side
/// (the GPU's, and the GPU's and CPU's together, for the cache and for the activations: up
/// to 16 choices) and the LP places the weights for each.
fn solve_whole(
    model: &CostModel,
    b: &Batching,
    terms: &Terms,
    cache_on_gpu: bool,
    lps: &mut usize,
) -> Option<(f64, [f64; x::COUNT])> {
    let relaxed = solve_lp(model, b, terms, cache_on_gpu, &[], lps)?;
    let n = b.gpu_batch_size * b.num_gpu_batches;
    let nf = n as f64;
    // the whole counts either side of f * n, the higher first (where two tie, more on the
    // faster tier); just the one when f * n is whole within the LP's tolerance
    let either_side = |f: f64| -> Vec<usize> {
        let v = (f * nf).clamp(0.0, nf);
        if (v - v.round()).abs() < 1e-6 {
            vec![v.round() as usize]
        } else {
            vec![v.ceil() as usize, v.floor() as usize]
        }
    };
    // (GPU count, GPU + CPU count) choices of the kind whose fractions start at `first`
    let counts = |first: usize| -> Vec<(usize, usize)> {
        let (g, c) = (relaxed[first], relaxed[first + 1]);
        let mut out = Vec::new();
        for gpu in either_side(g) {
            for both in either_side(g + c) {
                if gpu <= both && !(first == x::CG && cache_on_gpu && gpu < n) {
                    out.push((gpu, both));
                }
            }
        }
        out
    };
    let time = |xs: &[f64; x::COUNT]| {
        let p = model.predict_at(b, xs, true);
        p.prefill_s + p.decode_s
    };
    let mut best: Option<(f64, [f64; x::COUNT])> = None;
    for (cg, cgc) in counts(x::CG) {
        for (hg, hgc) in counts(x::HG) {
            let share = |k: usize| k as f64 / nf;
            let fixed = [
                (x::CG, share(cg)),
                (x::CC, share(cgc - cg)),
                (x::HG, share(hg)),
                (x::HC, share(hgc - hg)),
            ];
            let Some(mut xs) = solve_lp(model, b, terms, cache_on_gpu, &fixed, lps) else {
                continue;
            };
            // (exactly the whole shares, without the solver's rounding)
            for (i, v) in fixed {
                xs[i] = v;
            }
            xs[x::CN] = share(n - cgc);
            xs[x::HN] = share(n - hgc);
            let t = time(&xs);
            if best.as_ref().is_none_or(|(bt, _)| t < *bt) {
                best = Some((t, xs));
            }
        }
    }
    best
}

/// The LP for the cache all on the GPU (`cg = 1`) or not, with the placement fractions in
/// `fixed` (index, value) held at those values.
fn solve_lp(
    model: &CostModel,
    b: &Batching,
    terms: &Terms,
    cache_on_gpu: bool,
    fixed: &[(usize, f64)],
    lps: &mut usize,
) -> Option<[f64; x::COUNT]> {
    *lps += 1;
    let hw = &model.hardware;
    let caps = [hw.gpu_memory.0, hw.cpu_memory.0, hw.disk_space.0].map(|c| c as f64);
    let mut vars = ProblemVariables::new();
    let xs: [Variable; x::COUNT] = std::array::from_fn(|_| vars.add(variable().min(0).max(1)));
    let t_pre = vars.add(variable().min(0));
    let t_gen = vars.add(variable().min(0));
    let l = model.shape.layers as f64;
    let steps = model.workload.gen_len.saturating_sub(1) as f64;
    let bls = (b.gpu_batch_size * b.num_gpu_batches) as f64;
    let objective = (l / bls) * t_pre + (l * steps / bls) * t_gen;
    let mut problem = vars.minimise(objective).using(microlp);
    for kind in [x::WG, x::CG, x::HG] {
        problem = problem.with((xs[kind] + xs[kind + 1] + xs[kind + 2]).eq(1));
    }
    if cache_on_gpu {
        problem = problem.with(Expression::from(xs[x::CG]).eq(1));
    }
    for &(i, v) in fixed {
        problem = problem.with(Expression::from(xs[i]).eq(v));
    }
    for form in terms.prefill.overlapped() {
        problem = problem.with(expr(&form, &xs, 1.0).leq(t_pre));
    }
    for form in terms.decode.overlapped() {
        problem = problem.with(expr(&form, &xs, 1.0).leq(t_gen));
    }
    let peaks = [
        terms.gpu_peaks(cache_on_gpu).to_vec(),
        terms.cpu_peak.to_vec(),
        vec![terms.disk],
    ];
    for (peaks, cap) in peaks.iter().zip(caps) {
        for p in peaks {
            problem = problem.with(expr(p, &xs, BYTES_SCALE).leq(cap * BYTES_SCALE));
        }
    }
    let solution = problem.solve().ok()?;
    Some(xs.map(|v| solution.value(v).clamp(0.0, 1.0)))
}

/// Turns LP fractions into a policy (percentages, tiny solver noise removed).
fn to_policy(b: &Batching, xs: &[f64; x::COUNT]) -> Policy {
    let pct = |v: f64| {
        let p = v * 100.0;
        if p.abs() < 1e-7 {
            0.0
        } else {
            p.min(100.0)
        }
    };
    let pair = |g: f64, c: f64| {
        let (g, c) = (pct(g), pct(c));
        (g, c.min(100.0 - g))
    };
    let (wg, wc) = pair(xs[x::WG], xs[x::WC]);
    let (cg, cc) = pair(xs[x::CG], xs[x::CC]);
    let (hg, hc) = pair(xs[x::HG], xs[x::HC]);
    Policy {
        gpu_batch_size: b.gpu_batch_size,
        num_gpu_batches: b.num_gpu_batches,
        w_gpu_percent: wg,
        w_cpu_percent: wc,
        cache_gpu_percent: cg,
        cache_cpu_percent: cc,
        act_gpu_percent: hg,
        act_cpu_percent: hc,
        overlap: true,
        sep_layer: true,
        pin_weight: true,
        // delegation means nothing when the whole cache is on the GPU
        cpu_cache_compute: b.cpu_cache_compute && cg < 100.0,
        attn_sparsity: b.attn_sparsity,
        compress_weight: b.compress_weight,
        compress_cache: b.compress_cache,
        f16_cache: b.f16_cache,
        quant: b.quant,
    }
}

/// Finds the policy with the highest predicted throughput that fits the profile's memory.
pub fn search(model: &CostModel, options: &SearchOptions) -> Result<SearchResult> {
    let mut best: Option<(f64, Batching, [f64; x::COUNT])> = None;
    let mut lps = 0;
    let batching = |gbs, nb, ccc| Batching {
        gpu_batch_size: gbs,
        num_gpu_batches: nb,
        cpu_cache_compute: ccc,
        compress_weight: options.compress_weight,
        compress_cache: options.compress_cache,
        f16_cache: options.f16_cache,
        quant: QuantConfig::default(),
        attn_sparsity: 1.0,
        sep_layer: true,
    };
    let delegation: &[bool] = if options.allow_cpu_cache_compute {
        &[false, true]
    } else {
        &[false]
    };
    for &ccc in delegation {
        for &gbs in &options.gpu_batch_sizes {
            let mut any = false;
            for &nb in &options.num_gpu_batches {
                if gbs.saturating_mul(nb) > options.max_block_size {
                    break; // the grid grows with nb
                }
                let b = batching(gbs, nb, ccc);
                let Some(xs) = solve_placement(model, &b, &mut lps) else {
                    break; // memory only grows with nb
                };
                any = true;
                let throughput = model.predict_at(&b, &xs, true).throughput_tok_s;
                if best.as_ref().is_none_or(|(t, ..)| throughput > *t) {
                    best = Some((throughput, b, xs));
                }
            }
            if !any {
                break; // nor does it shrink with gbs
            }
        }
    }
    let Some((_, b, xs)) = best else {
        return Err(shortfall(model, &batching(1, 1, true)));
    };
    let policy = to_policy(&b, &xs);
    Ok(SearchResult {
        prediction: model.predict(&policy),
        policy,
        lps_solved: lps,
    })
}

/// Why even the smallest batch does not fit: the LP with a slack per tier (minimising the
/// relative shortfall) says which tier is short and by how many bytes.
fn shortfall(model: &CostModel, b: &Batching) -> Error {
    let hw = &model.hardware;
    // (the tier an error names and how the message says it; on a host device the device
    // tier is RAM)
    let tiers = [
        if model.host_device {
            (Tier::Cpu, "RAM")
        } else {
            (Tier::Gpu, "GPU")
        },
        (Tier::Cpu, "CPU"),
        (Tier::Disk, "disk"),
    ];
    // the smaller relative shortfall of the cache all on the GPU or not
    let caps = [hw.gpu_memory.0, hw.cpu_memory.0, hw.disk_space.0].map(|c| (c as f64).max(1.0));
    let relative = |short: &[f64; 3]| short.iter().zip(caps).map(|(s, c)| s / c).sum::<f64>();
    let short = [true, false]
        .map(|cache_on_gpu| slack_lp(model, b, cache_on_gpu))
        .into_iter()
        .min_by(|a, b| relative(a).total_cmp(&relative(b)))
        .unwrap_or([f64::NAN; 3]);
    let (i, bytes) = short
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, b)| (i, *b))
        .unwrap_or((0, f64::NAN));
    let bytes = if bytes.is_finite() {
        bytes.ceil() as u64
    } else {
        0
    };
    Error::Infeasible {
        tier: tiers[i].0,
        short_bytes: bytes,
        detail: format!(
            "even 1 sequence per batch does not fit: the {} tier is short by {} (budgets: {})",
            tiers[i].1,
            format_size(bytes),
            if model.host_device {
                format!(
                    "RAM {}, disk {}",
                    format_size(hw.gpu_memory.0),
                    format_size(hw.disk_space.0)
                )
            } else {
                format!(
                    "GPU {}, CPU {}, disk {}",
                    format_size(hw.gpu_memory.0),
                    format_size(hw.cpu_memory.0),
                    format_size(hw.disk_space.0)
                )
            },
        ),
    }
}

/// The bytes each tier (device, CPU, disk) is short by at the placement that minimises the
/// relative shortfall, with the cache all on the GPU or not; NaN where the LP fails.
fn slack_lp(model: &CostModel, b: &Batching, cache_on_gpu: bool) -> [f64; 3] {
    let terms = model.terms(b);
    let hw = &model.hardware;
    let mut vars = ProblemVariables::new();
    let xs: [Variable; x::COUNT] = std::array::from_fn(|_| vars.add(variable().min(0).max(1)));
    let slack: [Variable; 3] = std::array::from_fn(|_| vars.add(variable().min(0)));
    let caps = [hw.gpu_memory.0, hw.cpu_memory.0, hw.disk_space.0].map(|c| c as f64 * BYTES_SCALE);
    let objective: Expression = slack
        .iter()
        .zip(caps)
        .map(|(s, c)| *s * (1.0 / c.max(1e-9)))
        .sum();
    let mut problem = vars.minimise(objective).using(microlp);
    for kind in [x::WG, x::CG, x::HG] {
        problem = problem.with((xs[kind] + xs[kind + 1] + xs[kind + 2]).eq(1));
    }
    if cache_on_gpu {
        problem = problem.with(Expression::from(xs[x::CG]).eq(1));
    }
    let peaks = [
        terms.gpu_peaks(cache_on_gpu).to_vec(),
        terms.cpu_peak.to_vec(),
        vec![terms.disk],
    ];
    for (i, peaks) in peaks.iter().enumerate() {
        for p in peaks {
            problem = problem.with(expr(p, &xs, BYTES_SCALE).leq(caps[i] + slack[i]));
        }
    }
    match problem.solve() {
        Ok(sol) => slack.map(|s| sol.value(s) / BYTES_SCALE),
        Err(_) => [f64::NAN; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_has_the_usual_batch_sizes() {
        assert_eq!(
            batch_grid(64),
            vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
        );
        assert_eq!(batch_grid(5), vec![1, 2, 3, 4]);
    }
}
