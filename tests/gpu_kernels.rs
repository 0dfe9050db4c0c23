//! WebGPU kernels against CPU references on random shapes, including sizes that are not
//! multiples of the workgroup or tile; outputs are poisoned with NaN before each run so an
//! element a kernel fails to write shows up.
//!
//! Needs a WebGPU adapter (on a machine without a GPU: `apt-get install mesa-vulkan-drivers`
//! for lavapipe). `FERROGEN_SKIP_GPU=1` skips these tests where none can be had.

use std::sync::OnceLock;

use ferrogen::gpu::kernels::matmul::MatmulF32;
use ferrogen::gpu::{GpuContext, GpuTensor};
use ndarray::Array2;
use proptest::prelude::*;

fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new() {
        Ok(ctx) => {
            eprintln!("adapter: {}", ctx.describe());
            Some(ctx)
        }
        Err(e) if std::env::var("FERROGEN_SKIP_GPU").as_deref() == Ok("1") => {
            eprintln!("FERROGEN_SKIP_GPU=1: skipping ({e})");
            None
        }
        Err(e) => panic!("{e} (or set FERROGEN_SKIP_GPU=1 to skip the GPU tests)"),
    })
    .as_ref()
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

fn matmul(ctx: &GpuContext, m: usize, k: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (xv, wv) = (random(m * k, seed), random(n * k, seed + 1));
    let x = GpuTensor::upload(ctx, &xv, &[m, k]).unwrap();
    let w = GpuTensor::upload(ctx, &wv, &[n, k]).unwrap();
    let y = GpuTensor::poisoned(ctx, &[m, n]).unwrap();
    MatmulF32::new(ctx).run(ctx, &x, &w, &y).unwrap();
    let got = y.download(ctx).unwrap();
    let xa = Array2::from_shape_vec((m, k), xv).unwrap();
    let wa = Array2::from_shape_vec((n, k), wv).unwrap();
    let want = xa.dot(&wa.t()).into_raw_vec_and_offset().0;
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
    for (m, k, n) in [(1, 576, 192), (8, 64, 1536), (37, 33, 65), (128, 96, 130)] {
        let (got, want) = matmul(ctx, m, k, n, 7);
        assert_close(&got, &want, k);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn matmul_matches_ndarray(m in 1usize..70, k in 1usize..100, n in 1usize..70, seed in any::<u64>()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let (got, want) = matmul(ctx, m, k, n, seed);
        assert_close(&got, &want, k);
    }
}
