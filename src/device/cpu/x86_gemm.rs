//! AVX-512 GEMM for linear layers over many rows of `x` (prefill, big decode batches):
//! `y[:, col..col + n] = x [m, k] · W^T` for weight rows `W [n, k]` in any run-time layout.
//!
//! Work is split over the threads by tasks of [`BLOCKS`] x [`NR`] weight rows. A task walks
//! `k` in chunks of [`KC`] columns; per chunk it decodes its weight rows' columns straight
//! into the order the tile reads them (`b[(block * KC + p) * NR + j]` = weight row
//! `block * NR + j`, column `c0 + p`; 128 KiB, held in L2), then for each [`MR`] rows of `x`
//! copies them to `a[p * MR + i]` (12 KiB, in L1; rows of `x` a power of two apart would
//! otherwise fall into the same L1 sets) and runs one tile per block:
//!
//! `acc[i][j] += a[p * MR + i] * b[p * NR + j]` over the chunk's `p`, for `MR` x `NR`
//! accumulators held in 24 of the 32 vector registers (each `p`: two loads of `b`, `MR`
//! broadcasts of `a`, `2 MR` multiply-adds), added to `y`'s tile from the second chunk on.
//!
//! Weight rows are decoded once per call, never expanded into an f32 copy of the weight,
//! and `y` is written in place with its row stride (no temporary, no copy).

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::weight_rows::WeightRows;
use super::x86::mask;

/// Rows of `x` per tile.
const MR: usize = 12;
/// Weight rows (columns of `y`) per tile: two 16-lane vectors.
const NR: usize = 32;
/// Tiles of weight rows per task.
const BLOCKS: usize = 4;
/// Columns of `k` per chunk (a multiple of every group size that divides it).
const KC: usize = 256;

/// The chunk width for `w`, or `None` when its groups do not tile `k` in chunks (group not
/// a multiple of 16; the caller's portable path then runs).
fn chunk(w: &WeightRows) -> Option<usize> {
    match *w {
        WeightRows::F32 { .. } => Some(KC),
        // blocks of 32 or 256 values: whole blocks in every chunk
        WeightRows::Blocks { format, .. } if KC.is_multiple_of(format.block_len()) => Some(KC),
        WeightRows::Blocks { .. } => None,
        WeightRows::Packed { group, .. } if group == 0 || group % 16 != 0 => None,
        WeightRows::Packed { group, .. } if KC.is_multiple_of(group) => Some(KC),
        WeightRows::Packed { group, .. } => Some(group),
    }
}

/// Whether [`linear`] runs `w` on this CPU.
pub fn supports(w: &WeightRows) -> bool {
    super::x86::available() && chunk(w).is_some()
}

/// `y` shared by the tasks, each writing its own columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint columns of `y`, which outlives the parallel loop.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y[i * ldy + col + r] = sum_c x[i * k + c] W[r, c]` for `i < m`, `r < n`, on all threads
/// of `pool`. Callers check [`supports`] first.
pub fn linear(
    pool: &rayon::ThreadPool,
    w: &WeightRows,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    ldy: usize,
    col: usize,
) {
    let (k, n) = (w.k(), w.rows());
    let Some(kc) = chunk(w) else {
        unreachable!("linear called for a layout it does not support")
    };
    assert!(x.len() >= m * k && (m == 0 || y.len() >= (m - 1) * ldy + col + n));
    if m == 0 || n == 0 {
        return;
    }
    // rows of x packed per pass: the whole of x when it fits in PACK_VALUES, else as few
    // passes of whole tiles as fit, of even size (each pass decodes the weight rows again)
    let most = (PACK_VALUES / k.max(1) / MR * MR).max(MR);
    let passes = m.div_ceil(most);
    let group_rows = m.div_ceil(passes).div_ceil(MR) * MR;
    PACKED_X.with(|kept| {
        let mut fresh = Vec::new();
        let mut kept = kept.try_borrow_mut();
        // a call nested in another on this thread (a pool worker waiting in one) packs into
        // a buffer of its own
        let a = kept.as_deref_mut().unwrap_or(&mut fresh);
        let need = group_rows.min(m.div_ceil(MR) * MR) * k;
        if a.len() < need {
            a.resize(need, 0.0);
        }
        for r0 in (0..m).step_by(group_rows) {
            let rows = group_rows.min(m - r0);
            let x = &x[r0 * k..(r0 + rows) * k];
            let y = &mut y[r0 * ldy..];
            pass(
                pool,
                w,
                kc,
                (x, rows),
                &mut a[..rows.div_ceil(MR) * MR * k],
                y,
                ldy,
                col,
            );
        }
    });
}

/// f32 values of `x` packed for one pass (8 MiB: 256 rows of `k` up to 8,192 in one pass;
/// kept per calling thread, so that its pages are mapped once).
const PACK_VALUES: usize = 2 << 20;

thread_local! {
    /// The calling thread's buffer for `x` packed.
    static PACKED_X: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One pass: `m` rows of `x` (packed into `a`) against all weight rows, over the threads.
#[allow(clippy::too_many_arguments)]
fn pass(
    pool: &rayon::ThreadPool,
    w: &WeightRows,
    kc: usize,
    (x, m): (&[f32], usize),
    a: &mut [f32],
    y: &mut [f32],
    ldy: usize,
    col: usize,
) {
    let (k, n) = (w.k(), w.rows());
    let out = Out(y.as_mut_ptr());
    let rows_per_task = BLOCKS * NR;
    pool.install(|| {
        // a[(ib * k + p) * MR + i] = x[ib * MR + i, p], zero past row m: once per pass,
        // read by every task
        a.par_chunks_mut(MR * k).enumerate().for_each(|(ib, dst)| {
            for i in 0..MR {
                let row = ib * MR + i;
                for p in 0..k {
                    dst[p * MR + i] = if row < m { x[row * k + p] } else { 0.0 };
                }
            }
        });
        let a = &*a;
        (0..n.div_ceil(rows_per_task))
            .into_par_iter()
            .for_each_init(
                || (vec![0.0f32; BLOCKS * kc * NR], vec![0.0f32; 16 * kc]),
                |(b, rows16), t| {
                    let rows = t * rows_per_task..((t + 1) * rows_per_task).min(n);
                    // SAFETY: AVX-512 is available (`supports`); the task writes columns
                    // `col + rows` of rows `..m` of `y`, which `linear`'s assert bounds.
                    unsafe { task(w, (a, m), kc, rows, (b, rows16), out, ldy, col) }
                },
            )
    });
}

/// One task: weight rows `rows` against all of `x` (`a`: `x` packed by [`linear`]).
///
/// # Safety
/// AVX-512 is available; `y` (behind `out`) holds rows `..m` of `ldy` columns with columns
/// `col + rows` inside them, written by no one else meanwhile.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn task(
    w: &WeightRows,
    (a, m): (&[f32], usize),
    kc: usize,
    rows: std::ops::Range<usize>,
    (b, rows16): (&mut [f32], &mut [f32]),
    out: Out,
    ldy: usize,
    col: usize,
) {
    let k = w.k();
    let blocks = rows.len().div_ceil(NR);
    for c0 in (0..k).step_by(kc) {
        let len = kc.min(k - c0);
        // b[(blk * kc + p) * NR + j] = W[rows.start + blk * NR + j, c0 + p], zero past the
        // rows: 16 rows decoded into rows16[j * kc + p], then transposed 16 x 16 at a time
        for blk in 0..blocks {
            for half in 0..2 {
                let first = rows.start + blk * NR + half * 16;
                for j in 0..16 {
                    let dst = &mut rows16[j * kc..j * kc + len];
                    if first + j < rows.end {
                        decode_cols(w, first + j, c0, dst);
                    } else {
                        dst.fill(0.0);
                    }
                }
                let panel = b.as_mut_ptr().add(blk * kc * NR + half * 16);
                for q0 in (0..len).step_by(16) {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (j, r) in r.iter_mut().enumerate() {
                        *r = _mm512_loadu_ps(rows16.as_ptr().add(j * kc + q0));
                    }
                    let t = transpose16(r);
                    for (q, t) in t.iter().enumerate().take(len - q0) {
                        _mm512_storeu_ps(panel.add((q0 + q) * NR), *t);
                    }
                }
            }
        }
        for i0 in (0..m).step_by(MR) {
            let ap = a.as_ptr().add((i0 / MR * k + c0) * MR);
            for blk in 0..blocks {
                let first = rows.start + blk * NR;
                let cols = NR.min(rows.end - first);
                let c = out.0.add(i0 * ldy + col + first);
                let bp = b.as_ptr().add(blk * kc * NR);
                tile_rows(MR.min(m - i0), ap, bp, len, c, ldy, cols, c0 > 0);
            }
        }
    }
}

/// The 16 x 16 transpose: `out[q]` lane `j` is `r[j]` lane `q`.
///
/// Four rounds of shuffles: pairs of rows interleaved by 32 then 64 bits within each 128-bit
/// lane (after which 128-bit lane `l` of `u[4 g + c]` holds column `4 l + c` of rows
/// `4 g..4 g + 4`), then 128-bit lanes gathered from registers 4 and 8 apart.
///
/// # Safety
/// AVX-512 is available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for g in 0..8 {
        t[2 * g] = _mm512_unpacklo_ps(r[2 * g], r[2 * g + 1]);
        t[2 * g + 1] = _mm512_unpackhi_ps(r[2 * g], r[2 * g + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let d = |v: __m512| _mm512_castps_pd(v);
        let (t0, t1, t2, t3) = (
            d(t[4 * g]),
            d(t[4 * g + 1]),
            d(t[4 * g + 2]),
            d(t[4 * g + 3]),
        );
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    // 0x88 takes 128-bit lanes 0 and 2 of each operand, 0xdd lanes 1 and 3
    let mut v = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        v[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        v[4 + c] = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        v[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        v[12 + c] = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        out[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
        out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v[c], v[8 + c]);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v[4 + c], v[12 + c]);
        out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(v[4 + c], v[12 + c]);
    }
    out
}

/// Columns `c0..c0 + out.len()` of weight row `r`, decoded (`c0` a multiple of the group).
///
/// # Safety
/// AVX-512 is available.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn decode_cols(w: &WeightRows, r: usize, c0: usize, out: &mut [f32]) {
    match *w {
        WeightRows::F32 { values, k } => {
            out.copy_from_slice(&values[r * k + c0..r * k + c0 + out.len()]);
        }
        WeightRows::Packed { group, bits, .. } => {
            let (codes, scales) = w.packed_row(r);
            super::x86::decode_cols(codes, scales, (c0, group, bits), out);
        }
        WeightRows::Blocks { format, .. } => {
            // c0 and out.len() are whole blocks (chunks of KC, rows of whole blocks)
            let (bl, bb) = (format.block_len(), format.block_bytes());
            let row = w.block_row(r);
            format.decode(&row[c0 / bl * bb..(c0 + out.len()) / bl * bb], out);
        }
    }
}

/// [`tile`] for `mr` rows (1 to [`MR`]).
///
/// # Safety
/// As [`tile`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile_rows(
    mr: usize,
    a: *const f32,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
) {
    let args = (a, b, kc, c, ldc, cols, accumulate);
    match mr {
        12 => tile::<12>(args),
        11 => tile::<11>(args),
        10 => tile::<10>(args),
        9 => tile::<9>(args),
        8 => tile::<8>(args),
        7 => tile::<7>(args),
        6 => tile::<6>(args),
        5 => tile::<5>(args),
        4 => tile::<4>(args),
        3 => tile::<3>(args),
        2 => tile::<2>(args),
        _ => tile::<1>(args),
    }
}

/// The tile: `c[i * ldc + j] (+)= sum_p a[p * MR + i] b[p * NR + j]` for `i < R`,
/// `j < cols`, `p < kc` (added to `c` when `accumulate`).
///
/// # Safety
/// AVX-512 is available; `a` holds `kc * MR` values, `b` `kc * NR`; `c` rows `..R` of
/// `ldc` columns hold `cols` (at most [`NR`]) values from `c`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize>(
    (a, b, kc, c, ldc, cols, accumulate): (
        *const f32,
        *const f32,
        usize,
        *mut f32,
        usize,
        usize,
        bool,
    ),
) {
    let (m0, m1) = (mask(0, cols), mask(16, cols));
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if accumulate {
        for (i, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
            acc[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
        }
    }
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(p * MR + i));
            acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(c.add(i * ldc), m0, acc[0]);
        _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, acc[1]);
    }
}
