//! Causal attention on all cores against an f32 or 4-bit KV cache.
//!
//! Work is split into tasks of (query tile of one sequence, head): up to [`TILE`] consecutive
//! query rows that share a sequence, against one head's keys. A task walks the visible keys in
//! blocks of [`KEY_BLOCK`] with an online softmax per row (running max `m`, sum `l` and
//! accumulator `acc`: for each block `m' = max(m, max_j s_j)`, `acc = acc e^(m - m') +
//! sum_j e^(s_j - m') v_j`, `l` likewise; the output is `acc / l`), so memory stays one block
//! whatever the context; a block of 4-bit keys and values is decoded once for the whole tile.

use rayon::prelude::*;

use crate::device::RowInfo;
use crate::layout::kv::unpack_scale;
use crate::layout::{HeadLayout, Q4Layout};

/// Query rows per task.
pub const TILE: usize = 16;
/// Keys per online-softmax block.
pub const KEY_BLOCK: usize = 64;

/// One layer's cached keys and values, all sequences' rows back to back.
#[derive(Clone, Copy)]
pub enum KvView<'a> {
    /// f32 rows of `width` values.
    F32 {
        /// Keys.
        k: &'a [f32],
        /// Values.
        v: &'a [f32],
        /// Values per row.
        width: usize,
    },
    /// 4-bit rows ([`Q4Layout`]).
    Q4 {
        /// Row layout.
        layout: Q4Layout,
        /// Key codes.
        k_codes: &'a [u32],
        /// Key scales.
        k_scales: &'a [u32],
        /// Value codes.
        v_codes: &'a [u32],
        /// Value scales.
        v_scales: &'a [u32],
    },
}

impl KvView<'_> {
    /// Head `g`'s values of cache row `row` of keys (`which = 0`) or values (`1`) into `out`.
    #[inline]
    fn head_row(&self, which: usize, row: usize, g: usize, d: usize, out: &mut [f32]) {
        match *self {
            KvView::F32 { k, v, width } => {
                let src = if which == 0 { k } else { v };
                let a = row * width + g * d;
                out[..d].copy_from_slice(&src[a..a + d]);
            }
            KvView::Q4 {
                layout,
                k_codes,
                k_scales,
                v_codes,
                v_scales,
            } => {
                let (codes, scales) = if which == 0 {
                    (k_codes, k_scales)
                } else {
                    (v_codes, v_scales)
                };
                let codes = &codes[row * layout.words_per_row()..];
                let scales = &scales[row * layout.groups_per_row()..];
                for (e, o) in out[..d].iter_mut().enumerate() {
                    let c = g * layout.padded + e;
                    let q = (codes[c / 8] >> (4 * (c % 8))) & 15;
                    let (s, m) = unpack_scale(scales[c / layout.group]);
                    *o = q as f32 * s + m;
                }
            }
        }
    }
}

/// `o [rows, heads * d]` = causal attention of `q [rows, heads * d]`: row `r` attends to cache
/// rows `infos[r].first .. infos[r].first + infos[r].visible`, query head `h` reading kv head
/// `h / (heads / kv_heads)`, scores scaled by `1 / sqrt(d)`.
pub fn attend(q: &[f32], infos: &[RowInfo], kv: KvView, layout: HeadLayout, o: &mut [f32]) {
    let HeadLayout {
        heads,
        kv_heads,
        head_dim: d,
    } = layout;
    let qw = heads * d;
    let group = (heads / kv_heads.max(1)).max(1);
    let scale = 1.0 / (d as f32).sqrt();
    // tiles: consecutive rows of one sequence, at most TILE
    let mut tiles = Vec::new();
    let mut start = 0;
    for r in 1..=infos.len() {
        if r == infos.len() || infos[r].first != infos[start].first || r - start == TILE {
            tiles.push(start..r);
            start = r;
        }
    }
    let tasks: Vec<(usize, usize)> = (0..tiles.len())
        .flat_map(|t| (0..heads).map(move |h| (t, h)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(t, h)| {
            let rows = tiles[t].clone();
            let n = rows.len();
            let g = h / group;
            let first = infos[rows.start].first as usize;
            let most = rows
                .clone()
                .map(|r| infos[r].visible as usize)
                .max()
                .unwrap_or(0);
            let (mut m, mut l) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n]);
            let mut acc = vec![0.0f32; n * d];
            let mut kb = vec![0.0f32; KEY_BLOCK * d];
            let mut vb = vec![0.0f32; KEY_BLOCK * d];
            let mut s = [0.0f32; KEY_BLOCK];
            for j0 in (0..most).step_by(KEY_BLOCK) {
                let j1 = (j0 + KEY_BLOCK).min(most);
                for j in j0..j1 {
                    kv.head_row(0, first + j, g, d, &mut kb[(j - j0) * d..]);
                    kv.head_row(1, first + j, g, d, &mut vb[(j - j0) * d..]);
                }
                for (i, r) in rows.clone().enumerate() {
                    let visible = (infos[r].visible as usize).min(j1);
                    if visible <= j0 {
                        continue;
                    }
                    let cnt = visible - j0;
                    let qr = &q[r * qw + h * d..r * qw + (h + 1) * d];
                    let mut block_max = f32::NEG_INFINITY;
                    for (jj, sj) in s[..cnt].iter_mut().enumerate() {
                        *sj = dot(qr, &kb[jj * d..(jj + 1) * d]) * scale;
                        block_max = block_max.max(*sj);
                    }
                    let m_new = m[i].max(block_max);
                    let correction = (m[i] - m_new).exp();
                    let a = &mut acc[i * d..(i + 1) * d];
                    if correction != 1.0 {
                        a.iter_mut().for_each(|v| *v *= correction);
                    }
                    let mut sum = 0.0;
                    for (jj, &sj) in s[..cnt].iter().enumerate() {
                        let p = (sj - m_new).exp();
                        sum += p;
                        for (av, &vv) in a.iter_mut().zip(&vb[jj * d..(jj + 1) * d]) {
                            *av = p.mul_add(vv, *av);
                        }
                    }
                    l[i] = l[i] * correction + sum;
                    m[i] = m_new;
                }
            }
            for i in 0..n {
                let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
                acc[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= inv);
            }
            acc
        })
        .collect();
    for (&(t, h), out) in tasks.iter().zip(results) {
        for (i, r) in tiles[t].clone().enumerate() {
            o[r * qw + h * d..r * qw + (h + 1) * d].copy_from_slice(&out[i * d..(i + 1) * d]);
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::causal_attention;
    use crate::layout::kv::{dequantize_row, quantize_row};
    use ndarray::ArrayView2;
    use proptest::prelude::*;

    /// Sequences of ragged lengths (some long, past many key blocks) with cached prefixes,
    /// in one batch; each against the reference's attention of that sequence alone.
    fn check(lens: &[(usize, usize)], layout: HeadLayout, q4: bool) -> Result<(), TestCaseError> {
        let (heads, kvh, d) = (layout.heads, layout.kv_heads, layout.head_dim);
        let width = kvh * d;
        let total: usize = lens.iter().map(|&(p, n)| p + n).sum();
        let val =
            |i: usize, salt: usize| (((i * 7919 + salt * 104729) % 2003) as f32 / 1001.0) - 1.0;
        let mut k: Vec<f32> = (0..total * width).map(|i| val(i, 1)).collect();
        let mut v: Vec<f32> = (0..total * width).map(|i| val(i, 2)).collect();
        let ql = Q4Layout::new(kvh, d);
        let (mut kc, mut ks, mut vc, mut vs) = (
            vec![0; total * ql.words_per_row()],
            vec![0; total * ql.groups_per_row()],
            vec![0; total * ql.words_per_row()],
            vec![0; total * ql.groups_per_row()],
        );
        if q4 {
            for r in 0..total {
                let (w, g) = (ql.words_per_row(), ql.groups_per_row());
                quantize_row(
                    &ql,
                    &k[r * width..(r + 1) * width],
                    &mut kc[r * w..(r + 1) * w],
                    &mut ks[r * g..(r + 1) * g],
                );
                quantize_row(
                    &ql,
                    &v[r * width..(r + 1) * width],
                    &mut vc[r * w..(r + 1) * w],
                    &mut vs[r * g..(r + 1) * g],
                );
                dequantize_row(
                    &ql,
                    &kc[r * w..(r + 1) * w],
                    &ks[r * g..(r + 1) * g],
                    &mut k[r * width..(r + 1) * width],
                );
                dequantize_row(
                    &ql,
                    &vc[r * w..(r + 1) * w],
                    &vs[r * g..(r + 1) * g],
                    &mut v[r * width..(r + 1) * width],
                );
            }
        }
        let rows: usize = lens.iter().map(|&(_, n)| n).sum();
        let q: Vec<f32> = (0..rows * heads * d).map(|i| val(i, 3)).collect();
        let mut infos = Vec::new();
        let mut first = 0;
        for &(past, n) in lens {
            for i in 0..n {
                infos.push(RowInfo {
                    first: first as u32,
                    visible: (past + i + 1) as u32,
                });
            }
            first += past + n;
        }
        let view = if q4 {
            KvView::Q4 {
                layout: ql,
                k_codes: &kc,
                k_scales: &ks,
                v_codes: &vc,
                v_scales: &vs,
            }
        } else {
            KvView::F32 {
                k: &k,
                v: &v,
                width,
            }
        };
        let mut o = vec![f32::NAN; rows * heads * d];
        attend(&q, &infos, view, layout, &mut o);
        let (mut row, mut first) = (0, 0);
        let scale = 1.0 / (d as f32).sqrt();
        for &(past, n) in lens {
            let span = first * width..(first + past + n) * width;
            let kk = ArrayView2::from_shape((past + n, width), &k[span.clone()]).unwrap();
            let vv = ArrayView2::from_shape((past + n, width), &v[span]).unwrap();
            let qq =
                ArrayView2::from_shape((n, heads * d), &q[row * heads * d..(row + n) * heads * d])
                    .unwrap();
            let want = causal_attention(qq, kk, vv, past, layout, scale);
            for (i, w) in want.iter().enumerate() {
                let g = o[row * heads * d + i];
                prop_assert!(
                    (g - w).abs() < 1e-4,
                    "lens {lens:?} q4 {q4}: {g} vs {w} at {i}"
                );
            }
            row += n;
            first += past + n;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn attention_matches_reference(
            lens in prop::collection::vec(
                prop_oneof![(0usize..4, 1usize..5), (0usize..2100, 1usize..3), (0usize..300, 30usize..200)],
                1..5,
            ),
            shape in prop_oneof![Just((4usize, 2usize, 8usize)), Just((3, 3, 64)), Just((2, 1, 24)), Just((9, 3, 64))],
            q4 in any::<bool>(),
        ) {
            let (heads, kv_heads, head_dim) = shape;
            check(&lens, HeadLayout { heads, kv_heads, head_dim }, q4)?;
        }
    }
}
