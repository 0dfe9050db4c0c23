//! Causal attention on all cores against an f32, f16 or 4-bit KV cache.
//!
//! Work is split into tasks of (query tile of one sequence, kv head): up to [`TILE`]
//! consecutive query rows that share a sequence, with every query head that reads that kv head
//! (GQA: `heads / kv_heads` of them), so each key and value is read (and, from a 4-bit cache,
//! decoded) once per tile. A task walks the visible keys in blocks of [`KEY_BLOCK`] with an
//! online softmax per query (running max `m`, sum `l` and accumulator `acc`: for each block
//! `m' = max(m, max_j s_j)`, `acc = acc e^(m - m') + sum_j e^(s_j - m') v_j`, `l` likewise;
//! the output is `acc / l`), so memory stays one block whatever the context. Keys are held
//! transposed (`kt[c][j]`), so the scores of a block are `d` vector multiply-adds over the
//! block's keys, and the values row-major, so `acc += p_j v_j` runs along `head_dim`.

use rayon::prelude::*;

use super::math::{dot, exp, max, max_nan, sum};
use super::weight_rows::f16_bits_to_f32;
use crate::device::RowInfo;
use crate::layout::kv::unpack_scale;
use crate::layout::{HeadLayout, Q4Layout};

/// Query rows per task.
pub const TILE: usize = 16;
/// Keys per online-softmax block.
pub const KEY_BLOCK: usize = 64;
/// Queries of a task (rows x heads sharing a kv head) up to which an f32 cache is read in
/// place, key by key, instead of gathered into a transposed block.
const DIRECT_QUERIES: usize = 8;

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
    /// IEEE half rows of `stride` halves (`width` rounded up to even: whole 32-bit words).
    F16 {
        /// Keys' bits.
        k: &'a [u16],
        /// Values' bits.
        v: &'a [u16],
        /// Halves per row.
        stride: usize,
    },
    /// 4-bit rows (`Q4Layout`).
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
    /// Head `g`'s values of cache row `row` of keys (`which = 0`) or values (`1`), passed to
    /// `put(e, value)` for `e < d`.
    #[inline(always)]
    fn head_row(
        &self,
        which: usize,
        row: usize,
        g: usize,
        d: usize,
        mut put: impl FnMut(usize, f32),
    ) {
        match *self {
            KvView::F32 { k, v, width } => {
                let src = if which == 0 { k } else { v };
                let a = row * width + g * d;
                for (e, &x) in src[a..a + d].iter().enumerate() {
                    put(e, x);
                }
            }
            KvView::F16 { k, v, stride } => {
                let src = if which == 0 { k } else { v };
                let a = row * stride + g * d;
                for (e, &h) in src[a..a + d].iter().enumerate() {
                    put(e, f16_bits_to_f32(u32::from(h)));
                }
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
                // padded column c of the row: code word c / 8, nibble c % 8; group c / group
                let codes = &codes[row * layout.words_per_row()..];
                let scales = &scales[row * layout.groups_per_row()..];
                let c0 = g * layout.padded;
                for e0 in (0..d).step_by(layout.group) {
                    let (s, m) = unpack_scale(scales[(c0 + e0) / layout.group]);
                    for e in e0..(e0 + layout.group).min(d) {
                        let c = c0 + e;
                        let q = (codes[c / 8] >> (4 * (c % 8))) & 15;
                        put(e, q as f32 * s + m);
                    }
                }
            }
        }
    }
}

/// `o [rows, heads * d]` = causal attention of `q [rows, heads * d]`: row `r` attends to cache
/// rows `infos[r].first + j` for `j < infos[r].visible` outside `skip_from..skip_to`, query
/// head `h` reading kv head `h / (heads / kv_heads)`, scores scaled by `1 / sqrt(d)` (then
/// soft-capped, `s = cap * tanh(s / cap)`, when `softcap` is given).
pub fn attend(
    q: &[f32],
    infos: &[RowInfo],
    kv: KvView,
    layout: HeadLayout,
    softcap: Option<f32>,
    o: &mut [f32],
) {
    let HeadLayout {
        heads,
        kv_heads,
        head_dim: d,
    } = layout;
    let qw = heads * d;
    let group = (heads / kv_heads.max(1)).max(1);
    // tiles: consecutive rows of one sequence, at most TILE (each row skips its own keys)
    let mut tiles = Vec::new();
    let mut start = 0;
    let same = |a: &RowInfo, b: &RowInfo| a.first == b.first;
    for r in 1..=infos.len() {
        if r == infos.len() || !same(&infos[r], &infos[start]) || r - start == TILE {
            tiles.push(start..r);
            start = r;
        }
    }
    let tasks: Vec<(usize, usize)> = (0..tiles.len())
        .flat_map(|t| (0..kv_heads).map(move |g| (t, g)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(t, g)| tile_kv_head(q, infos, kv, layout, softcap, tiles[t].clone(), g))
        .collect();
    // a task's output is [rows][group heads][d]; head h = g * group + i of row r
    for (&(t, g), out) in tasks.iter().zip(results) {
        for (i, r) in tiles[t].clone().enumerate() {
            let a = r * qw + g * group * d;
            o[a..a + group * d].copy_from_slice(&out[i * group * d..(i + 1) * group * d]);
        }
    }
}

multiversion! {
    /// One task: query rows `rows` (one sequence, each with its skipped keys), every query head of
    /// kv head `g`, online softmax over key blocks; returns `[rows, group, d]`.
    fn tile_kv_head(
        q: &[f32],
        infos: &[RowInfo],
        kv: KvView,
        layout: HeadLayout,
        softcap: Option<f32>,
        rows: std::ops::Range<usize>,
        g: usize
    ) -> Vec<f32> {
        let HeadLayout {
            heads,
            kv_heads,
            head_dim: d,
        } = layout;
        let qw = heads * d;
        let group = (heads / kv_heads.max(1)).max(1);
        let scale = 1.0 / (d as f32).sqrt();
        let queries = rows.len() * group;
        let first = infos[rows.start].first as usize;
        let skip = |r: usize| infos[r].skip_from as usize..infos[r].skip_to as usize;
        let most = rows
            .clone()
            .map(|r| infos[r].visible as usize)
            .max()
            .unwrap_or(0);
        // the tile's queries, pre-scaled: query (i, hh) = row rows.start + i, head g * group + hh
        let mut qs = vec![0.0f32; queries * d];
        for (i, r) in rows.clone().enumerate() {
            let a = r * qw + g * group * d;
            for (dst, &v) in qs[i * group * d..(i + 1) * group * d].iter_mut().zip(&q[a..a + group * d]) {
                *dst = v * scale;
            }
        }
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; queries], vec![0.0f32; queries]);
        let mut acc = vec![0.0f32; queries * d];
        // kt[c * KEY_BLOCK + j] = key j's column c; vb[j * d + c] = value j's column c
        let mut kt = vec![0.0f32; d * KEY_BLOCK];
        let mut vb = vec![0.0f32; KEY_BLOCK * d];
        for j0 in (0..most).step_by(KEY_BLOCK) {
            let j1 = (j0 + KEY_BLOCK).min(most);
            if rows.clone().all(|r| skip(r).start <= j0 && j1 <= skip(r).end) {
                continue; // keys no row sees (another branch's, or out of the window)
            }
            // few queries (decode) against an f32 cache read its rows in place; otherwise the
            // block is gathered once for all the tile's queries, keys transposed
            let direct = match kv {
                KvView::F32 { k, v, width } if queries <= DIRECT_QUERIES => {
                    let at = move |j: usize| (first + j0 + j) * width + g * d;
                    Some((k, v, at))
                }
                _ => None,
            };
            if direct.is_none() {
                kt.fill(0.0);
                for j in j0..j1 {
                    let jj = j - j0;
                    kv.head_row(0, first + j, g, d, |c, x| kt[c * KEY_BLOCK + jj] = x);
                    kv.head_row(1, first + j, g, d, |c, x| vb[jj * d + c] = x);
                }
            }
            for (i, r) in rows.clone().enumerate() {
                let visible = (infos[r].visible as usize).min(j1);
                if visible <= j0 {
                    continue;
                }
                let cnt = visible - j0;
                for hh in 0..group {
                    let qi = i * group + hh;
                    let qv = &qs[qi * d..(qi + 1) * d];
                    let mut s = match direct {
                        Some((k, _, at)) => {
                            let mut s = [0.0f32; KEY_BLOCK];
                            for (j, sj) in s[..cnt].iter_mut().enumerate() {
                                *sj = dot(qv, &k[at(j)..at(j) + d]);
                            }
                            s
                        }
                        None => scores(qv, &kt),
                    };
                    if let Some(cap) = softcap {
                        for sj in &mut s[..cnt] {
                            *sj = cap * (*sj / cap).tanh();
                        }
                    }
                    // keys past the row's visible ones (and the block's end), and skipped
                    // ones, do not count
                    let skipped = skip(r);
                    let seen = |j: usize| j < cnt && !skipped.contains(&(j0 + j));
                    for (j, sj) in s.iter_mut().enumerate() {
                        if !seen(j) {
                            *sj = f32::NEG_INFINITY;
                        }
                    }
                    let m_new = max_nan(m[qi], max(&s));
                    if m_new == f32::NEG_INFINITY {
                        continue; // nothing seen yet
                    }
                    let correction = exp(m[qi] - m_new);
                    for (j, sj) in s.iter_mut().enumerate() {
                        *sj = if seen(j) { exp(*sj - m_new) } else { 0.0 };
                    }
                    l[qi] = l[qi] * correction + sum(&s);
                    m[qi] = m_new;
                    let a = &mut acc[qi * d..(qi + 1) * d];
                    let p = &s[..cnt];
                    match direct {
                        Some((_, v, at)) => weigh_values(a, correction, p, |j| &v[at(j)..at(j) + d]),
                        None => weigh_values(a, correction, p, |j| &vb[j * d..(j + 1) * d]),
                    }
                }
            }
        }
        for (qi, &lq) in l.iter().enumerate() {
            let inv = if lq > 0.0 || lq.is_nan() { 1.0 / lq } else { 0.0 };
            acc[qi * d..(qi + 1) * d].iter_mut().for_each(|v| *v *= inv);
        }
        acc
    }
}

/// `s_j = q . k_j` for the block's keys, from the keys transposed (`kt[c * KEY_BLOCK + j]`):
/// `d` multiply-adds along the keys, even and odd columns in separate accumulators so that
/// eight vector chains run at once.
#[inline(always)]
fn scores(q: &[f32], kt: &[f32]) -> [f32; KEY_BLOCK] {
    let (mut even, mut odd) = ([0.0f32; KEY_BLOCK], [0.0f32; KEY_BLOCK]);
    let pairs = q.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    for (c2, qc) in pairs.enumerate() {
        let k0 = &kt[2 * c2 * KEY_BLOCK..(2 * c2 + 1) * KEY_BLOCK];
        let k1 = &kt[(2 * c2 + 1) * KEY_BLOCK..(2 * c2 + 2) * KEY_BLOCK];
        for j in 0..KEY_BLOCK {
            even[j] = qc[0].mul_add(k0[j], even[j]);
            odd[j] = qc[1].mul_add(k1[j], odd[j]);
        }
    }
    if let Some(qc) = last {
        let c = q.len() - 1;
        let kr = &kt[c * KEY_BLOCK..(c + 1) * KEY_BLOCK];
        for j in 0..KEY_BLOCK {
            even[j] = qc.mul_add(kr[j], even[j]);
        }
    }
    for j in 0..KEY_BLOCK {
        even[j] += odd[j];
    }
    even
}

/// `acc = acc * correction + sum_j p[j] v_j`, value row `j` given by `row(j)`: for heads of
/// 64 or 128 values with the accumulator held in registers across the keys.
#[inline(always)]
fn weigh_values<'a>(acc: &mut [f32], correction: f32, p: &[f32], row: impl Fn(usize) -> &'a [f32]) {
    match acc.len() {
        64 => weigh_head::<64>(acc, correction, p, row),
        128 => weigh_head::<128>(acc, correction, p, row),
        _ => {
            acc.iter_mut().for_each(|v| *v *= correction);
            for (j, &pj) in p.iter().enumerate() {
                for (av, &vv) in acc.iter_mut().zip(row(j)) {
                    *av = pj.mul_add(vv, *av);
                }
            }
        }
    }
}

/// [`weigh_values`] for a head of `D` values.
#[inline(always)]
fn weigh_head<'a, const D: usize>(
    acc: &mut [f32],
    correction: f32,
    p: &[f32],
    row: impl Fn(usize) -> &'a [f32],
) {
    let Ok(acc) = <&mut [f32; D]>::try_from(acc) else {
        return;
    };
    let mut r = *acc;
    r.iter_mut().for_each(|x| *x *= correction);
    for (j, &pj) in p.iter().enumerate() {
        let vj = &row(j)[..D];
        for c in 0..D {
            r[c] = pj.mul_add(vj[c], r[c]);
        }
    }
    *acc = r;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CacheFormat;
    use crate::layout::kv::{dequantize_row, quantize_row};
    use crate::reference::ops::{causal_attention, Scores};
    use ndarray::ArrayView2;
    use proptest::prelude::*;

    /// Sequences of ragged lengths (some long, past many key blocks) with cached prefixes,
    /// in one batch; each against the reference's attention of that sequence alone.
    /// How the test's cache is stored.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Stored {
        F32,
        F16,
        Q4,
    }

    fn check(
        lens: &[(usize, usize)],
        layout: HeadLayout,
        stored: Stored,
        window: Option<usize>,
        softcap: Option<f32>,
    ) -> Result<(), TestCaseError> {
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
        // the reference sees the values as stored: rounded to halves, or quantized and decoded
        let (kh, vh): (Vec<u16>, Vec<u16>) = if stored == Stored::F16 {
            let half = |x: &mut f32| {
                let h = half::f16::from_f32(*x);
                *x = h.to_f32();
                h.to_bits()
            };
            // rows of an odd width end with a half of padding
            let rows = |x: &mut Vec<f32>| -> Vec<u16> {
                x.chunks_mut(width)
                    .flat_map(|r| {
                        let mut h: Vec<u16> = r.iter_mut().map(half).collect();
                        h.resize(CacheFormat::f16_stride(width), 0x7e00); // NaN: never read
                        h
                    })
                    .collect()
            };
            (rows(&mut k), rows(&mut v))
        } else {
            (Vec::new(), Vec::new())
        };
        if stored == Stored::Q4 {
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
                let mut info = RowInfo::new(first as u32, (past + i + 1) as u32);
                // a sliding window hides the keys before the last `window`
                info.skip_to = window.map_or(0, |w| info.visible.saturating_sub(w as u32));
                infos.push(info);
            }
            first += past + n;
        }
        let view = match stored {
            Stored::Q4 => KvView::Q4 {
                layout: ql,
                k_codes: &kc,
                k_scales: &ks,
                v_codes: &vc,
                v_scales: &vs,
            },
            Stored::F16 => KvView::F16 {
                k: &kh,
                v: &vh,
                stride: CacheFormat::f16_stride(width),
            },
            Stored::F32 => KvView::F32 {
                k: &k,
                v: &v,
                width,
            },
        };
        let mut o = vec![f32::NAN; rows * heads * d];
        attend(&q, &infos, view, layout, softcap, &mut o);
        let (mut row, mut first) = (0, 0);
        let scale = 1.0 / (d as f32).sqrt();
        for &(past, n) in lens {
            let span = first * width..(first + past + n) * width;
            let kk = ArrayView2::from_shape((past + n, width), &k[span.clone()]).unwrap();
            let vv = ArrayView2::from_shape((past + n, width), &v[span]).unwrap();
            let qq =
                ArrayView2::from_shape((n, heads * d), &q[row * heads * d..(row + n) * heads * d])
                    .unwrap();
            let want = causal_attention(
                qq,
                kk,
                vv,
                past,
                layout,
                Scores {
                    scale,
                    window,
                    softcap,
                },
            );
            for (i, w) in want.iter().enumerate() {
                let g = o[row * heads * d + i];
                prop_assert!(
                    (g - w).abs() < 1e-4,
                    "lens {lens:?} {stored:?} window {window:?}: {g} vs {w} at {i}"
                );
            }
            row += n;
            first += past + n;
        }
        Ok(())
    }

    /// A prefix group (shared rows, then branches back to back in one sequence's cache, each
    /// branch row skipping the branches before its own): every row against the reference's
    /// attention of its member alone.
    fn check_group(
        shared: usize,
        branches: &[usize],
        layout: HeadLayout,
    ) -> Result<(), TestCaseError> {
        let (heads, kvh, d) = (layout.heads, layout.kv_heads, layout.head_dim);
        let width = kvh * d;
        let total = shared + branches.iter().sum::<usize>();
        let val =
            |i: usize, salt: usize| (((i * 7919 + salt * 104729) % 2003) as f32 / 1001.0) - 1.0;
        let k: Vec<f32> = (0..total * width).map(|i| val(i, 1)).collect();
        let v: Vec<f32> = (0..total * width).map(|i| val(i, 2)).collect();
        let q: Vec<f32> = (0..total * heads * d).map(|i| val(i, 3)).collect();
        // the group sits after another sequence's 7 rows in the cache
        let first = 7;
        let pad = vec![0.0; first * width];
        let (kc, vc) = ([&pad[..], &k].concat(), [&pad[..], &v].concat());
        let mut infos: Vec<RowInfo> = (0..shared)
            .map(|i| RowInfo::new(first as u32, i as u32 + 1))
            .collect();
        let mut at = shared;
        for &n in branches {
            for t in 0..n {
                infos.push(RowInfo {
                    first: first as u32,
                    visible: (at + t + 1) as u32,
                    skip_from: shared as u32,
                    skip_to: at as u32,
                });
            }
            at += n;
        }
        let mut o = vec![f32::NAN; total * heads * d];
        attend(
            &q,
            &infos,
            KvView::F32 {
                k: &kc,
                v: &vc,
                width,
            },
            layout,
            None,
            &mut o,
        );
        let scale = 1.0 / (d as f32).sqrt();
        let qw = heads * d;
        // each member: the shared rows, then its branch
        let mut at = shared;
        for &n in branches {
            let rows: Vec<usize> = (0..shared).chain(at..at + n).collect();
            let gather = |x: &[f32], w: usize| -> Vec<f32> {
                rows.iter()
                    .flat_map(|&r| x[r * w..(r + 1) * w].to_vec())
                    .collect()
            };
            let (km, vm, qm) = (gather(&k, width), gather(&v, width), gather(&q, qw));
            let len = rows.len();
            let want = causal_attention(
                ArrayView2::from_shape((len, qw), &qm).unwrap(),
                ArrayView2::from_shape((len, width), &km).unwrap(),
                ArrayView2::from_shape((len, width), &vm).unwrap(),
                0,
                layout,
                Scores::scaled(scale),
            );
            for (i, &r) in rows.iter().enumerate() {
                for c in 0..qw {
                    let (g, w) = (o[r * qw + c], want[[i, c]]);
                    prop_assert!(
                        (g - w).abs() < 1e-4,
                        "shared {shared} branches {branches:?}: row {r}: {g} vs {w}"
                    );
                }
            }
            at += n;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn prefix_groups_attend_as_their_members_alone(
            shared in prop_oneof![1usize..5, 10usize..80],
            branches in prop::collection::vec(prop_oneof![1usize..4, 14usize..40], 1..5),
            shape in prop_oneof![Just((4usize, 2usize, 8usize)), Just((3, 3, 64)), Just((9, 3, 64))],
        ) {
            let (heads, kv_heads, head_dim) = shape;
            check_group(shared, &branches, HeadLayout { heads, kv_heads, head_dim })?;
        }

        #[test]
        fn attention_matches_reference(
            lens in prop::collection::vec(
                prop_oneof![(0usize..4, 1usize..5), (0usize..2100, 1usize..3), (0usize..300, 30usize..200)],
                1..5,
            ),
            shape in prop_oneof![Just((4usize, 2usize, 8usize)), Just((3, 3, 64)), Just((2, 1, 24)), Just((9, 3, 64)), Just((2, 1, 5))],
            stored in prop_oneof![Just(Stored::F32), Just(Stored::F16), Just(Stored::Q4)],
            window in prop_oneof![Just(None), (1usize..70).prop_map(Some)],
            softcap in prop_oneof![Just(None), Just(Some(0.7f32)), Just(Some(50.0f32))],
        ) {
            let (heads, kv_heads, head_dim) = shape;
            check(&lens, HeadLayout { heads, kv_heads, head_dim }, stored, window, softcap)?;
        }
    }
}
