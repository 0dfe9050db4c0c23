//! WebGPU kernels against CPU references on random shapes, including sizes that are not
//! multiples of the workgroup or tile; outputs are poisoned with NaN before each run so an
//! element a kernel fails to write shows up.
//!
//! Needs a WebGPU adapter (on a machine without a GPU: `apt-get install mesa-vulkan-drivers`
//! for lavapipe). `FERROGEN_SKIP_GPU=1` skips these tests where none can be had.

use std::sync::OnceLock;

use crate::gpu::kernels::attention::{Attention, RowInfo};
use crate::gpu::kernels::elementwise::{Elementwise, Op};
use crate::gpu::kernels::embedding::Embedding;
use crate::gpu::kernels::kv_f16::{GpuF16Cache, KvF16};
use crate::gpu::kernels::kv_quant::{GpuQ4Cache, KvQuant};
use crate::gpu::kernels::logprob::Logprob;
use crate::gpu::kernels::matmul::{MatmulF32, MatmulVariant};
use crate::gpu::kernels::matmul_q::{GpuPackedWeight, MatmulQ, MatmulQVariant, PackedWeight};
use crate::gpu::kernels::norm::Norm;
use crate::gpu::kernels::rope::Rope;
use crate::gpu::{GpuContext, GpuIndices, GpuTensor};
use crate::layout::Q4Layout;
use crate::quant::ggml::BlockFormat;
use crate::quant::group4::Group4;
use crate::reference::ops::{self, HeadLayout};
use ndarray::{s, Array1, Array2};
use proptest::prelude::*;

/// The WebGPU device, or `None` (said in the test output) when `FERROGEN_SKIP_GPU=1` skips the
/// tests on a machine without one.
fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        GpuContext::new()
            .inspect(|ctx| eprintln!("adapter: {}", ctx.describe()))
            .map_err(|e| e.to_string())
    });
    match ctx {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var("FERROGEN_SKIP_GPU").as_deref() == Ok("1") => {
            use std::io::Write;
            let test = std::thread::current()
                .name()
                .unwrap_or("a test")
                .to_string();
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED in {test}: FERROGEN_SKIP_GPU=1, no WebGPU device ({e})"
            );
            None
        }
        Err(e) => panic!("{e} (or set FERROGEN_SKIP_GPU=1 to skip the GPU tests)"),
    }
}

/// A second device whose loop budget is tiny, so that attention and matrix products split
/// even short inputs into many passes (the pass logic is then tested on every case).
fn small_budget_gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        gpu()?;
        let mut ctx = GpuContext::new().ok()?;
        ctx.loop_budget = 700;
        Some(ctx)
    })
    .as_ref()
}

/// 0 for the default device, 1 for the tiny-budget one (kernels are compiled per device).
fn device_index(ctx: &GpuContext) -> usize {
    usize::from(small_budget_gpu().is_some_and(|s| std::ptr::eq(s, ctx)))
}

/// The default device and the tiny-budget one.
fn both_budgets() -> Vec<&'static GpuContext> {
    [gpu(), small_budget_gpu()].into_iter().flatten().collect()
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn matmul(
    ctx: &GpuContext,
    variant: MatmulVariant,
    m: usize,
    k: usize,
    n: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let (xv, wv) = (random(m * k, seed), random(n * k, seed + 1));
    let x = GpuTensor::upload(ctx, &xv, &[m, k]).unwrap();
    let w = GpuTensor::upload(ctx, &wv, &[n, k]).unwrap();
    let y = GpuTensor::poisoned(ctx, &[m, n]).unwrap();
    MatmulF32::with_variant(ctx, variant)
        .run(ctx, &x, &w, &y, 0)
        .unwrap();
    let got = y.download(ctx).unwrap();
    let xa = Array2::from_shape_vec((m, k), xv).unwrap();
    let wa = Array2::from_shape_vec((n, k), wv).unwrap();
    // logical (row-major) order: `dot` may return column-major storage (e.g. when k = 1)
    let want = xa.dot(&wa.t()).iter().copied().collect();
    (got, want)
}

fn assert_close(got: &[f32], want: &[f32], k: usize) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // f32 sums of k products of values in [-1, 1]: rounding grows like k * eps
        let tol = 1e-5 * (k as f32).max(1.0);
        assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
    }
}

#[test]
fn matmul_decode_and_prefill_shapes() {
    let Some(ctx) = gpu() else { return };
    for variant in [MatmulVariant::Register, MatmulVariant::Tiled] {
        for (m, k, n) in [(1, 576, 192), (8, 64, 1536), (37, 33, 65), (128, 96, 130)] {
            let (got, want) = matmul(ctx, variant, m, k, n, 7);
            assert_close(&got, &want, k);
        }
    }
}

/// GGUF blocks decoded in the kernel, every format: decode (one row of x) and prefill (tiles
/// of 8 rows with a ragged end) against the f64 product with the blocks as the CPU decodes
/// them; odd weight row counts (the last workgroup partly idle), rows of several blocks, the
/// tiny-budget device splitting rows into passes of one block, written at a column offset.
#[test]
fn gguf_blocks_decode_in_the_kernel() {
    use crate::gpu::kernels::matmul_blocks::{GpuBlockWeight, MatmulBlocks};
    use wgpu::util::DeviceExt;
    for ctx in both_budgets() {
        let kernel = MatmulBlocks::default();
        for id in [2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23] {
            let format = BlockFormat::from_ggml_type(id).unwrap();
            let (n, blocks) = (67, if format.block_len() == 32 { 5 } else { 2 });
            let k = blocks * format.block_len();
            let bytes = crate::quant::ggml::random_blocks(format, n * blocks, id.into());
            let mut w = vec![0.0f32; n * k];
            format.decode(&bytes, &mut w);
            let (_, segs) = crate::layout::rows::as_blocks(format, &bytes, n, k);
            let words = ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: &segs[0],
                    usage: wgpu::BufferUsages::STORAGE,
                });
            let weight = GpuBlockWeight {
                words,
                rows: n,
                k,
                format,
            };
            for m in [1, 3, 13] {
                let x = random(m * k, id.into());
                let (total, offset) = (n + 3, 2);
                let y = up(ctx, &vec![f32::NAN; m * total], &[m, total]);
                kernel
                    .run(ctx, &up(ctx, &x, &[m, k]), &weight, &y, offset)
                    .unwrap();
                let got = y.download(ctx).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| f64::from(x[i * k + c]) * f64::from(w[j * k + c]))
                            .sum();
                        let g = got[i * total + offset + j];
                        assert!(
                            (f64::from(g) - want).abs() <= 1e-5 * k as f64,
                            "{} m {m} y[{i}, {j}] = {g}, want {want}",
                            format.name()
                        );
                    }
                    assert!(got[i * total].is_nan() && got[i * total + offset + n].is_nan());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn matmul_matches_ndarray(m in 1usize..70, k in 1usize..100, n in 1usize..70, seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        for variant in [MatmulVariant::Register, MatmulVariant::Tiled] {
            let (got, want) = matmul(ctx, variant, m, k, n, seed);
            assert_close(&got, &want, k);
        }
    }
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}", what);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{} [{}]: {} vs {}",
            what,
            i,
            g,
            w
        );
    }
    Ok(())
}

fn up(ctx: &GpuContext, data: &[f32], shape: &[usize]) -> GpuTensor {
    GpuTensor::upload(ctx, data, shape).unwrap()
}

/// erf in f64 by its Maclaurin series (|x| < 6 here), for the GELU reference.
fn erf64(x: f64) -> f64 {
    if x.abs() > 5.5 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 * sum.abs().max(1e-300) {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn matmul_writes_its_columns_of_a_wider_output(m in 1usize..40, k in 1usize..50, n in 1usize..40, offset in 0usize..9, seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let total = n + offset + 3;
        let (xv, wv) = (random(m * k, seed), random(n * k, seed ^ 5));
        let want = Array2::from_shape_vec((m, k), xv.clone()).unwrap()
            .dot(&Array2::from_shape_vec((n, k), wv.clone()).unwrap().t());
        for variant in [MatmulVariant::Register, MatmulVariant::Tiled] {
            let y = GpuTensor::upload(ctx, &vec![7.0; m * total], &[m, total]).unwrap();
            MatmulF32::with_variant(ctx, variant).run(ctx, &up(ctx, &xv, &[m, k]), &up(ctx, &wv, &[n, k]), &y, offset).unwrap();
            let got = y.download(ctx).unwrap();
            for r in 0..m {
                for c in 0..total {
                    let g = got[r * total + c];
                    if c < offset || c >= offset + n {
                        prop_assert_eq!(g, 7.0, "untouched column {}", c);
                    } else {
                        prop_assert!((g - want[[r, c - offset]]).abs() <= 1e-5 * k as f32);
                    }
                }
            }
        }
    }

    #[test]
    fn elementwise_ops_match_cpu(n in 1usize..3000, width_seed in 1usize..50, seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let ew = Elementwise::new(ctx).unwrap();
        let (a, b) = (random(n, seed), random(n, seed ^ 9));
        let width = (1..=width_seed).rev().find(|w| n % w == 0).unwrap_or(1);
        let bias = random(width, seed ^ 3);
        // GeGLU sees gates up to +-12, where tanh saturates
        let wide: Vec<f32> = a.iter().map(|x| x * 12.0).collect();
        for op in [Op::Add, Op::AddBias, Op::Relu, Op::Gelu, Op::SiluMul, Op::GeluTanhMul, Op::Scale, Op::SoftCap, Op::Copy] {
            let widened = matches!(op, Op::GeluTanhMul | Op::SoftCap);
            let at = up(ctx, if widened { &wide } else { &a }, &[n]);
            let want: Vec<f32> = match op {
                Op::SoftCap => wide.iter().map(|&x| (3.0 * (f64::from(x) / 3.0).tanh()) as f32).collect(),
                Op::Scale => a.iter().map(|x| x * -0.37).collect(),
                Op::GeluTanhMul => {
                    let mut g = Array2::from_shape_vec((1, n), wide.clone()).unwrap();
                    ops::gelu_tanh_mul(&mut g, &Array2::from_shape_vec((1, n), b.clone()).unwrap());
                    g.iter().copied().collect::<Vec<f32>>()
                }
                Op::Add => a.iter().zip(&b).map(|(x, y)| x + y).collect(),
                Op::Copy => b.clone(),
                Op::AddBias => a.iter().enumerate().map(|(i, x)| x + bias[i % width]).collect(),
                Op::Relu => a.iter().map(|x| x.max(0.0)).collect(),
                Op::Gelu => a.iter().map(|&x| {
                    let x = f64::from(x);
                    (0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))) as f32
                }).collect(),
                Op::SiluMul => {
                    let mut g = Array2::from_shape_vec((1, n), a.clone()).unwrap();
                    ops::silu_mul(&mut g, &Array2::from_shape_vec((1, n), b.clone()).unwrap());
                    g.iter().copied().collect::<Vec<f32>>()
                }
            };
            match op {
                Op::Scale => ew.scale(ctx, &at, -0.37).unwrap(),
                Op::SoftCap => ew.soft_cap(ctx, &at, 3.0).unwrap(),
                Op::Relu | Op::Gelu => ew.unary(ctx, op, &at).unwrap(),
                Op::AddBias => ew.binary(ctx, op, &at, &up(ctx, &bias, &[width])).unwrap(),
                _ => ew.binary(ctx, op, &at, &up(ctx, &b, &[n])).unwrap(),
            }
            let tolerance = if widened { 1e-5 } else { 1e-6 };
            close(&at.download(ctx).unwrap(), &want, tolerance, &format!("{op:?}"))?;
        }
    }

    #[test]
    fn norms_match_cpu(rows in 1usize..20, width in 1usize..300, seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let norm = Norm::new(ctx);
        let (x, w, b) = (random(rows * width, seed), random(width, seed ^ 1), random(width, seed ^ 2));
        let xa = Array2::from_shape_vec((rows, width), x.clone()).unwrap();
        let (wa, ba) = (Array1::from_vec(w.clone()), Array1::from_vec(b.clone()));
        let y = GpuTensor::poisoned(ctx, &[rows, width]).unwrap();
        norm.layer_norm(ctx, &up(ctx, &x, &[rows, width]), &up(ctx, &w, &[width]), &up(ctx, &b, &[width]), &y, 1e-5).unwrap();
        let want = ops::layer_norm(xa.view(), &wa, &ba, 1e-5).iter().copied().collect::<Vec<f32>>();
        close(&y.download(ctx).unwrap(), &want, 1e-4, "layer_norm")?;
        let y = GpuTensor::poisoned(ctx, &[rows, width]).unwrap();
        norm.rms_norm(ctx, &up(ctx, &x, &[rows, width]), &up(ctx, &w, &[width]), &y, 1e-6).unwrap();
        let want = ops::rms_norm(xa.view(), &wa, 1e-6).iter().copied().collect::<Vec<f32>>();
        close(&y.download(ctx).unwrap(), &want, 1e-4, "rms_norm")?;
    }

    #[test]
    fn embedding_gathers_rows_and_positions(vocab in 1usize..60, width in 1usize..70, rows in prop_oneof![1usize..40, 2040usize..2100], seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let table = random(vocab * width, seed);
        let positions = random((rows + 2) * width, seed ^ 4);
        let ids: Vec<u32> = (0..rows).map(|r| ((r * 7 + seed as usize % 13) % vocab) as u32).collect();
        let pos: Vec<u32> = (0..rows as u32).rev().collect();
        let y = GpuTensor::poisoned(ctx, &[rows, width]).unwrap();
        Embedding::new(ctx).run(ctx, &up(ctx, &table, &[vocab, width]),
            Some((&up(ctx, &positions, &[rows + 2, width]), 2)),
            &GpuIndices::upload(ctx, &ids), &GpuIndices::upload(ctx, &pos), &y).unwrap();
        let want: Vec<f32> = (0..rows).flat_map(|r| (0..width).map(move |j| (r, j)))
            .map(|(r, j)| table[ids[r] as usize * width + j] + positions[(pos[r] as usize + 2) * width + j])
            .collect();
        close(&y.download(ctx).unwrap(), &want, 0.0, "embedding")?;
    }

    #[test]
    fn rope_matches_cpu(rows in 1usize..20, heads in 1usize..5, half in 1usize..40, base in prop::sample::select(vec![100.0f64, 1e4, 5e5]), seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let d = 2 * half;
        // positions up to ~20,000: past any context the tests run
        let positions: Vec<usize> = (0..rows).map(|r| r * 521 + (seed % 9000) as usize).collect();
        let x = random(rows * heads * d, seed);
        let (cos, sin) = crate::device::rope_tables(&positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), &crate::device::rope_inv_freq(d, base));
        let xt = up(ctx, &x, &[rows, heads * d]);
        Rope::new(ctx).run(ctx, &xt, &up(ctx, &cos, &[rows, half]), &up(ctx, &sin, &[rows, half]), d).unwrap();
        let mut want = Array2::from_shape_vec((rows, heads * d), x).unwrap();
        ops::Rope::new(&positions, &crate::device::rope_inv_freq(d, base)).apply(want.view_mut(), d);
        close(&xt.download(ctx).unwrap(), &want.iter().copied().collect::<Vec<f32>>(), 1e-6, "rope")?;
    }

    /// One panel holding the whole row, up to vocabularies of 130,000 (the kernel's strided
    /// loops and tree reductions at the largest sizes models use).
    #[test]
    fn whole_row_partials_match_cpu((rows, vocab) in prop_oneof![(1usize..10, 1usize..3000), (1usize..4, 49_000usize..130_000)], seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let logits: Vec<f32> = random(rows * vocab, seed).iter().map(|v| v * 20.0).collect();
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 31 + 5) % vocab) as u32).collect();
        let out = GpuTensor::poisoned(ctx, &[rows * 4]).unwrap();
        Logprob::new(ctx).partials(ctx, &up(ctx, &logits, &[rows, vocab]), &GpuIndices::upload(ctx, &targets), &out).unwrap();
        let got = out.download(ctx).unwrap();
        let la = Array2::from_shape_vec((rows, vocab), logits).unwrap();
        for (r, v) in got.chunks(4).enumerate() {
            let row = la.row(r);
            let max = row.iter().copied().fold(f32::MIN, f32::max);
            let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
            close(&[v[0], v[2]], &[max, row[targets[r] as usize]], 0.0, "max and target logit")?;
            close(&[v[1]], &[sum as f32], 2e-5, "sum of exponentials")?;
            prop_assert_eq!(v[3].to_bits() as usize, ops::argmax(row), "argmax of row {}", r);
        }
    }

    /// The vocabulary folded a panel at a time (the streamed output projection): each panel's
    /// partials from the kernel, merged on the host, give the whole row's target logprob and
    /// argmax, ties included (equal logits in different panels keep the first).
    #[test]
    fn panel_partials_merge_to_the_whole_row(rows in 1usize..6, vocab in 2usize..5000, panels in 1usize..6, seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let mut logits: Vec<f32> = random(rows * vocab, seed).iter().map(|v| v * 20.0).collect();
        // a tie for the maximum in the first and last column of row 0
        let top = logits[..vocab].iter().copied().fold(f32::MIN, f32::max) + 1.0;
        logits[0] = top;
        logits[vocab - 1] = top;
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 31 + 5) % vocab) as u32).collect();
        let la = Array2::from_shape_vec((rows, vocab), logits.clone()).unwrap();
        let mut states = vec![crate::device::LogitState::EMPTY; rows];
        let n = panels.min(vocab);
        let lp = Logprob::new(ctx);
        for p in 0..n {
            let cols = p * vocab / n..(p + 1) * vocab / n;
            let panel: Vec<f32> = (0..rows)
                .flat_map(|r| logits[r * vocab + cols.start..r * vocab + cols.end].to_vec())
                .collect();
            let relative: Vec<u32> = targets
                .iter()
                .map(|&t| if cols.contains(&(t as usize)) { t - cols.start as u32 } else { u32::MAX })
                .collect();
            let out = GpuTensor::poisoned(ctx, &[rows * 4]).unwrap();
            lp.partials(ctx, &up(ctx, &panel, &[rows, cols.len()]), &GpuIndices::upload(ctx, &relative), &out).unwrap();
            for (st, v) in states.iter_mut().zip(out.download(ctx).unwrap().chunks(4)) {
                st.merge(&crate::device::LogitState {
                    max: v[0],
                    sum: f64::from(v[1]),
                    target: v[2],
                    best: (cols.start as u32 + v[3].to_bits(), v[0]),
                });
            }
        }
        let got: Vec<f32> = states.iter().map(|s| s.target_logprob()).collect();
        let want: Vec<f32> = (0..rows).map(|r| ops::log_softmax_at(la.row(r), targets[r] as usize)).collect();
        close(&got, &want, 2e-5, "merged target logprob")?;
        let got: Vec<usize> = states.iter().map(|s| s.greedy().0 as usize).collect();
        let want: Vec<usize> = (0..rows).map(|r| ops::argmax(la.row(r))).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(states[0].greedy().0, 0);
    }
}

/// The quantized kernel in each variant the adapter offers (on lavapipe both: its subgroups are
/// 8 wide), compiled once per device (the default one, or the tiny-budget one).
fn quantized_kernels(ctx: &GpuContext) -> &'static [MatmulQ] {
    static KERNELS: [OnceLock<Vec<MatmulQ>>; 2] = [OnceLock::new(), OnceLock::new()];
    KERNELS[device_index(ctx)].get_or_init(|| {
        [MatmulQVariant::Plain, MatmulQVariant::Subgroup]
            .into_iter()
            .filter_map(|v| MatmulQ::with_variant(ctx, v).ok())
            .collect()
    })
}

/// The f32 kernel in both variants, compiled once per device.
fn f32_kernels(ctx: &GpuContext) -> &'static [MatmulF32] {
    static KERNELS: [OnceLock<Vec<MatmulF32>>; 2] = [OnceLock::new(), OnceLock::new()];
    KERNELS[device_index(ctx)].get_or_init(|| {
        [MatmulVariant::Register, MatmulVariant::Tiled]
            .map(|v| MatmulF32::with_variant(ctx, v))
            .into()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(30))]

    /// Packed weights (FlexGen 4-bit, GGUF Q4_0, Q4_1, Q8_0, f16), decoded in the kernel,
    /// against ndarray on the same weights decoded on the host.
    #[test]
    fn quantized_matmul_matches_dequantized_reference(
        m in 1usize..24, blocks in 1usize..5, extra in 0usize..31, n in 1usize..40,
        format in 0usize..5, seed in any::<u64>(),
    ) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let packed = match format {
            4 => {
                // f16 values in groups of 64; k need not be a multiple of the group
                let k = blocks * 32 + extra;
                let halves: Vec<u16> = random(n * k, seed).iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                PackedWeight::from_f16(&halves, n, k).unwrap()
            }
            0 => {
                // FlexGen groups of 64 along k; k need not be a multiple of the group
                let k = blocks * 32 + extra;
                let w = random(n * k, seed);
                PackedWeight::from_group4(&Group4::quantize(&w, &[n, k], 1, 64).unwrap()).unwrap()
            }
            f => {
                let format = [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0][f - 1];
                let k = blocks * 32;
                let mut bytes: Vec<u8> = random(n * format.bytes_for(k), seed).iter().map(|v| (v * 127.0) as i8 as u8).collect();
                for b in bytes.chunks_exact_mut(format.block_bytes()) {
                    let d = half::f16::from_f32(0.01 + f32::from(b[3] % 16) * 0.002);
                    b[..2].copy_from_slice(&d.to_le_bytes());
                    if format == BlockFormat::Q4_1 {
                        let m = half::f16::from_f32(f32::from(b[4] % 9) * -0.01);
                        b[2..4].copy_from_slice(&m.to_le_bytes());
                    }
                }
                PackedWeight::from_ggml(format, &bytes, n, k).unwrap()
            }
        };
        let k = packed.k;
        let w = packed.dequantize();
        let xv = random(m * k, seed ^ 77);
        let x = up(ctx, &xv, &[m, k]);
        let want: Vec<f32> = Array2::from_shape_vec((m, k), xv).unwrap()
            .dot(&Array2::from_shape_vec((n, k), w).unwrap().t()).iter().copied().collect();
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        let wq = GpuPackedWeight::upload(ctx, packed).unwrap();
        for kernel in quantized_kernels(ctx) {
            let variant = kernel.variant();
            let y = GpuTensor::poisoned(ctx, &[m, n]).unwrap();
            kernel.run(ctx, &x, &wq, &y, 0).unwrap();
            close(&y.download(ctx).unwrap(), &want, 1e-5 * k as f32 * scale, &format!("quantized matmul, {variant:?}"))?;
        }
    }
}

/// Per-row infos, queries and the CPU reference output for a ragged batch: sequence `i` has
/// `seqs[i].0` cached rows and `seqs[i].1` new query rows, all stacked in one cache.
struct RaggedAttention {
    infos: Vec<RowInfo>,
    /// Keys a row sees, its own included (a sliding window), or all.
    window: Option<usize>,
    /// The scores' soft-cap (Gemma 2), or none.
    softcap: Option<f32>,
    q: Vec<f32>,
    q_rows: usize,
    cache_rows: usize,
}

impl RaggedAttention {
    fn new(seqs: &[(usize, usize)], layout: HeadLayout, seed: u64) -> Self {
        Self::windowed(seqs, layout, seed, None)
    }

    /// As `new`, each row seeing only the last `window` keys.
    fn windowed(
        seqs: &[(usize, usize)],
        layout: HeadLayout,
        seed: u64,
        window: Option<usize>,
    ) -> Self {
        let cache_rows: usize = seqs.iter().map(|(p, t)| p + t).sum();
        let q_rows: usize = seqs.iter().map(|(_, t)| t).sum();
        let mut infos = Vec::new();
        let mut first = 0;
        for &(past, t) in seqs {
            for i in 0..t {
                let mut info = RowInfo::new(first as u32, (past + i + 1) as u32);
                info.skip_to = window.map_or(0, |w| info.visible.saturating_sub(w as u32));
                infos.push(info);
            }
            first += past + t;
        }
        let q = random(q_rows * layout.heads * layout.head_dim, seed ^ 11);
        Self {
            infos,
            window,
            softcap: None,
            q,
            q_rows,
            cache_rows,
        }
    }

    /// `ops::causal_attention` per sequence over cache rows `k`, `v`.
    fn reference(
        &self,
        seqs: &[(usize, usize)],
        k: &[f32],
        v: &[f32],
        layout: HeadLayout,
        scale: f32,
    ) -> Vec<f32> {
        let (qw, kvw) = (
            layout.heads * layout.head_dim,
            layout.kv_heads * layout.head_dim,
        );
        let qa = ndarray::ArrayView2::from_shape((self.q_rows, qw), &self.q).unwrap();
        let ka = ndarray::ArrayView2::from_shape((self.cache_rows, kvw), k).unwrap();
        let va = ndarray::ArrayView2::from_shape((self.cache_rows, kvw), v).unwrap();
        let (mut first, mut qr) = (0usize, 0usize);
        let mut want = Vec::new();
        for &(past, t) in seqs {
            let o = ops::causal_attention(
                qa.slice(s![qr..qr + t, ..]),
                ka.slice(s![first..first + past + t, ..]),
                va.slice(s![first..first + past + t, ..]),
                past,
                layout,
                ops::Scores {
                    scale,
                    window: self.window,
                    softcap: self.softcap,
                },
            );
            want.extend(o.iter().copied());
            first += past + t;
            qr += t;
        }
        want
    }
}

/// Sequence shapes `(cached rows, new rows)`: short ones, and long ones whose positions reach
/// past 2,048 (a cached prefix of up to 2,400 rows, or a prefill of up to 700 rows).
fn ragged_seqs() -> impl Strategy<Value = Vec<(usize, usize)>> {
    prop::collection::vec(
        prop_oneof![
            (0usize..12, 1usize..9),
            (1500usize..2400, 1usize..24),
            (0usize..1500, 400usize..700),
        ],
        1..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// A ragged batch mixing short and long sequences, each with a cached prefix, GQA, with
    /// and without a sliding window, against the CPU reference, at the default loop budget and
    /// at a tiny one (many key passes).
    #[test]
    fn attention_matches_cpu(
        seqs in ragged_seqs(),
        kv_heads in 1usize..3, group in 1usize..4, head_dim in prop::sample::select(vec![1usize, 8, 24, 64, 100]),
        window in prop_oneof![Just(None), (1usize..600).prop_map(Some)],
        softcap in prop_oneof![Just(None), Just(Some(0.7f32)), Just(Some(50.0f32))],
        seed in any::<u64>(),
    ) {
        for ctx in both_budgets() {
            let layout = HeadLayout { heads: kv_heads * group, kv_heads, head_dim };
            let (qw, kvw) = (layout.heads * head_dim, kv_heads * head_dim);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut batch = RaggedAttention::windowed(&seqs, layout, seed, window);
            batch.softcap = softcap;
            let rows = batch.cache_rows;
            let (k, v) = (random(rows * kvw, seed), random(rows * kvw, seed ^ 7));
            let want = batch.reference(&seqs, &k, &v, layout, scale);
            let o = GpuTensor::poisoned(ctx, &[batch.q_rows, qw]).unwrap();
            Attention::new(ctx, head_dim).unwrap().run(ctx, &up(ctx, &batch.q, &[batch.q_rows, qw]),
                &up(ctx, &k, &[rows, kvw]), &up(ctx, &v, &[rows, kvw]),
                &Attention::upload_info(ctx, &batch.infos).soft_capped(softcap), &o, layout, scale).unwrap();
            close(&o.download(ctx).unwrap(), &want, 1e-5, &format!("attention, loop budget {}", ctx.loop_budget))?;
        }
    }

    /// New rows stored into a 4-bit cache at their positions come back within half a step
    /// (plus the f16 rounding of the group minimum), and attention over the 4-bit cache equals
    /// the CPU attention over the decoded values, for ragged batches of short and long
    /// sequences, at the default and at a tiny loop budget.
    #[test]
    fn q4_cache_round_trips_and_attends(
        seqs in ragged_seqs(),
        kv_heads in 1usize..3, group in 1usize..3, head_dim in prop::sample::select(vec![1usize, 8, 24, 64]),
        seed in any::<u64>(),
    ) {
        for ctx in both_budgets() {
            let layout = HeadLayout { heads: kv_heads * group, kv_heads, head_dim };
            let (qw, kvw) = (layout.heads * head_dim, kv_heads * head_dim);
            let mut batch = RaggedAttention::new(&seqs, layout, seed);
            batch.softcap = seed.is_multiple_of(2).then_some(2.0); // soft-capped half the time
            let rows = batch.cache_rows;
            let ql = Q4Layout::new(kv_heads, head_dim);
            let (kc, vc) = (GpuQ4Cache::new(ctx, rows, ql).unwrap(), GpuQ4Cache::new(ctx, rows, ql).unwrap());
            // store every row of every sequence (past and new) at its position
            let (k, v) = (random(rows * kvw, seed), random(rows * kvw, seed ^ 3));
            let kq = KvQuant::new(ctx, head_dim).unwrap();
            let info = Attention::upload_info(ctx, &every_position(&seqs));
            kq.store(ctx, &up(ctx, &k, &[rows, kvw]), &info, &kc).unwrap();
            kq.store(ctx, &up(ctx, &v, &[rows, kvw]), &info, &vc).unwrap();
            let (kd, ksteps) = kc.download(ctx).unwrap();
            let (vd, _) = vc.download(ctx).unwrap();
            for (i, (a, b)) in k.iter().zip(&kd).enumerate() {
                prop_assert!((a - b).abs() <= ksteps[i] / 2.0 + 1e-3 * a.abs().max(1e-3), "{} -> {}, step {}", a, b, ksteps[i]);
            }
            let want = batch.reference(&seqs, &kd, &vd, layout, 0.5);
            let o = GpuTensor::poisoned(ctx, &[batch.q_rows, qw]).unwrap();
            kq.attend(ctx, &up(ctx, &batch.q, &[batch.q_rows, qw]), &kc, &vc,
                &Attention::upload_info(ctx, &batch.infos).soft_capped(batch.softcap), &o, layout, 0.5).unwrap();
            close(&o.download(ctx).unwrap(), &want, 1e-5, &format!("q4 attention, loop budget {}", ctx.loop_budget))?;
        }
    }

    /// New rows stored into an f16 cache at their positions are the halves the CPU rounds
    /// them to (nearest even, bit for bit), odd widths included, and attention over the f16
    /// cache equals the CPU attention over those values, for ragged batches of short and long
    /// sequences, at the default and at a tiny loop budget.
    #[test]
    fn f16_cache_round_trips_and_attends(
        seqs in ragged_seqs(),
        kv_heads in 1usize..3, group in 1usize..3, head_dim in prop::sample::select(vec![1usize, 5, 8, 24, 64]),
        seed in any::<u64>(),
    ) {
        for ctx in both_budgets() {
            let layout = HeadLayout { heads: kv_heads * group, kv_heads, head_dim };
            let (qw, kvw) = (layout.heads * head_dim, kv_heads * head_dim);
            let mut batch = RaggedAttention::new(&seqs, layout, seed);
            batch.softcap = seed.is_multiple_of(2).then_some(2.0); // soft-capped half the time
            let rows = batch.cache_rows;
            let (kc, vc) = (GpuF16Cache::new(ctx, rows, kvw).unwrap(), GpuF16Cache::new(ctx, rows, kvw).unwrap());
            // store every row of every sequence (past and new) at its position
            let (k, v) = (random(rows * kvw, seed), random(rows * kvw, seed ^ 3));
            let kf = KvF16::new(ctx, head_dim).unwrap();
            let info = Attention::upload_info(ctx, &every_position(&seqs));
            kf.store(ctx, &up(ctx, &k, &[rows, kvw]), &info, &kc).unwrap();
            kf.store(ctx, &up(ctx, &v, &[rows, kvw]), &info, &vc).unwrap();
            let halves = |x: &[f32]| -> Vec<u16> { x.iter().map(|&a| half::f16::from_f32(a).to_bits()).collect() };
            let (kh, vh) = (kc.download(ctx).unwrap(), vc.download(ctx).unwrap());
            prop_assert_eq!(&kh, &halves(&k));
            prop_assert_eq!(&vh, &halves(&v));
            let value = |h: &[u16]| -> Vec<f32> { h.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect() };
            let want = batch.reference(&seqs, &value(&kh), &value(&vh), layout, 0.5);
            let o = GpuTensor::poisoned(ctx, &[batch.q_rows, qw]).unwrap();
            kf.attend(ctx, &up(ctx, &batch.q, &[batch.q_rows, qw]), &kc, &vc,
                &Attention::upload_info(ctx, &batch.infos).soft_capped(batch.softcap), &o, layout, 0.5).unwrap();
            close(&o.download(ctx).unwrap(), &want, 1e-5, &format!("f16 attention, loop budget {}", ctx.loop_budget))?;
        }
    }
}

/// Row infos that store every row of every `(past, new)` sequence at its own position.
fn every_position(seqs: &[(usize, usize)]) -> Vec<RowInfo> {
    let mut infos = Vec::new();
    let mut first = 0;
    for &(p, t) in seqs {
        for pos in 0..p + t {
            infos.push(RowInfo::new(first as u32, (pos + 1) as u32));
        }
        first += p + t;
    }
    infos
}

/// The f16 cache's store rounds as the CPU does at the edges: ties to even, the largest
/// finite halves and overflow to infinity, subnormals and their ties, signed zeros,
/// infinities and NaN; and attention reads every finite half back exactly.
#[test]
fn f16_cache_rounds_like_the_cpu_at_the_edges() {
    let Some(ctx) = gpu() else { return };
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        -65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-30,
        // ties between halves: 1 + 2^-11 (to 1), 1 + 3 * 2^-11 (to 1 + 2^-9)
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        -(1.0 + 2f32.powi(-11)),
        // subnormal halves, their ties and the smallest: 2^-24, 1.5 * 2^-24, 2^-25, 2^-26
        2f32.powi(-24),
        1.5 * 2f32.powi(-24),
        2.5 * 2f32.powi(-24),
        2f32.powi(-25),
        2f32.powi(-26),
        3.0 * 2f32.powi(-25),
        2f32.powi(-14),
        2f32.powi(-14) - 2f32.powi(-25),
        6.1e-5,
    ];
    // and a sweep of exponents and mantissas
    values.extend((0..400).map(|i| f32::from_bits(0x3000_0000 + i * 0x0012_3457)));
    values.extend((0..400).map(|i| -f32::from_bits(0x2800_0000 + i * 0x0013_5791)));
    let width = values.len() + 1; // odd: a padding half
    values.push(0.0);
    values.truncate(width);
    let cache = GpuF16Cache::new(ctx, 1, width).unwrap();
    let kf = KvF16::new(ctx, 8).unwrap();
    let info = Attention::upload_info(ctx, &[RowInfo::new(0, 1)]);
    kf.store(ctx, &up(ctx, &values, &[1, width]), &info, &cache)
        .unwrap();
    let got = cache.download(ctx).unwrap();
    for (x, g) in values.iter().zip(&got) {
        let want = half::f16::from_f32(*x);
        if want.is_nan() {
            assert!(half::f16::from_bits(*g).is_nan(), "{x}: {g:#06x}");
        } else {
            assert_eq!(
                *g,
                want.to_bits(),
                "{x:e}: {g:#06x}, want {:#06x}",
                want.to_bits()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Long reductions: k up to 12,800 (several k passes at the default budget, dozens at the
    /// tiny one) for the f32 kernels and every packed format.
    #[test]
    fn matmul_over_long_k_matches_reference(m in 1usize..10, k64 in 1usize..200, n in 1usize..12, seed in any::<u64>()) {
        let k = 64 * k64 - (seed % 7) as usize; // ragged last group
        for ctx in both_budgets() {
            let (xv, wv) = (random(m * k, seed), random(n * k, seed ^ 1));
            let xa = Array2::from_shape_vec((m, k), xv.clone()).unwrap();
            let x = up(ctx, &xv, &[m, k]);
            let want: Vec<f32> = xa.dot(&Array2::from_shape_vec((n, k), wv.clone()).unwrap().t()).iter().copied().collect();
            for f32_kernel in f32_kernels(ctx) {
                let variant = f32_kernel.variant();
                let y = GpuTensor::poisoned(ctx, &[m, n]).unwrap();
                f32_kernel.run(ctx, &x, &up(ctx, &wv, &[n, k]), &y, 0).unwrap();
                close(&y.download(ctx).unwrap(), &want, 2e-6 * k as f32, &format!("f32 {variant:?}, k {k}, budget {}", ctx.loop_budget))?;
            }
            let halves: Vec<u16> = wv.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let packed = [
                PackedWeight::from_group4(&Group4::quantize(&wv, &[n, k], 1, 64).unwrap()).unwrap(),
                PackedWeight::from_f16(&halves, n, k).unwrap(),
            ];
            for p in packed {
                let want: Vec<f32> = xa.dot(&Array2::from_shape_vec((n, k), p.dequantize()).unwrap().t()).iter().copied().collect();
                let wq = GpuPackedWeight::upload(ctx, p).unwrap();
                for kernel in quantized_kernels(ctx) {
                    let y = GpuTensor::poisoned(ctx, &[m, n]).unwrap();
                    kernel.run(ctx, &x, &wq, &y, 0).unwrap();
                    close(&y.download(ctx).unwrap(), &want, 2e-6 * k as f32, &format!("packed {:?}, k {k}, budget {}", kernel.variant(), ctx.loop_budget))?;
                }
            }
        }
    }
}

/// What the device rejects comes back as `Error::Device`, not a panic: a shader that does not
/// compile (kept by the context and returned by its next check, naming the kernel), and an
/// allocation past the device's limits inside an error scope. A fresh context, since the first
/// error stays with it.
#[test]
fn device_errors_are_errors() {
    if gpu().is_none() {
        return;
    }
    let ctx = GpuContext::new().unwrap();
    ctx.check().unwrap();
    let too_big = ctx.limits.max_buffer_size.saturating_mul(2);
    let refused = ctx.scoped("allocating too much", || {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: too_big,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    });
    match refused {
        Err(crate::Error::Device { what, message }) => {
            assert_eq!(what, "allocating too much");
            assert!(!message.is_empty());
        }
        other => panic!("expected a device error, got {:?}", other.map(|_| ())),
    }
    // a scoped error does not stick to the context
    ctx.check().unwrap();
    let _broken = crate::gpu::Pipeline::new(&ctx, "fn main( { this is not WGSL", "main");
    match ctx.wait() {
        Err(crate::Error::Device { message, .. }) => {
            assert!(message.contains("compiling kernel `main`"), "{message}")
        }
        other => panic!("expected a device error, got {other:?}"),
    }
}
