// y = x W^T with W [n, k] stored as codes, decoded in the kernel.
// Layout (see src/gpu/kernels/matmul_q.rs): each row of W holds `padded_k` codes (k rounded up
// to the group size G), BITS wide (4, 8 or 16), packed little-endian into u32 words: code e of
// a row sits in word e * BITS / 32 at bit (e * BITS) % 32. Words are read four at a time (a
// "quad", vec4<u32>): every group spans whole quads (G * BITS / 32 is a multiple of 4 for
// G = 32 or 64). Group g of a row (codes g*G .. g*G+G-1) has one u32 `scales[row * groups + g]`
// = pack2x16float(step, min); value = code * step + min, where a 4- or 8-bit code is an
// unsigned integer and a 16-bit code an IEEE half (then step = 1, min = 0). FlexGen 4-bit and
// GGUF Q4_1: as stored; Q4_0: min = -8 * step; Q8_0: codes + 128 unsigned, min = -128 * step;
// f16 checkpoints: the halves as stored.
//
// Indexing: invocation (gx, gy) owns the ROWS x 4 output tile rows ROWS*gy.., columns 4*gx..
// (ROWS and BITS are pipeline constants: ROWS = 8, 4, or 1 for matrix-vector products so that
// no work is spent on copies of the one row). A workgroup is 64 consecutive column tiles of one
// row tile: every lane reads the same x values and none idles when m = 1. Each walks the k axis
// a group at a time: for column c with step s_c and minimum m_c,
//   sum_kk x[kk] * (q_c[kk] * s_c + m_c) = s_c * sum_kk x[kk] q_c[kk] + m_c * sum_kk x[kk],
// so the inner loop only unpacks codes and multiply-adds; scales are read once per group.
// Only the last group can reach past k (padding): there x is read clamped and counted as 0.
// Out-of-range rows/columns read clamped rows and are never stored.
// A dispatch covers groups g_begin .. g_end (a pass, so that no invocation loops past the
// adapter's budget), all wholly inside k, plus the partial last group of a row when
// `partial` = 1; passes after the first add to y (ACCUMULATE).

override ROWS: u32 = 4u;
override BITS: u32 = 4u;

// A pipeline constant, not a uniform: reading y in every dispatch cost the 4-bit kernel 4x on
// lavapipe; passes after the first run the ACCUMULATE = true compilation.
override ACCUMULATE: bool = false;

struct Dims { m: u32, k: u32, n: u32, y_stride: u32, y_offset: u32, padded_k: u32, group: u32, bits: u32,
              g_begin: u32, g_end: u32, partial: u32, pad: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> dims: Dims;

var<private> xb: array<u32, 8>;   // start of each tile row of x
var<private> col: array<u32, 4>;  // each tile column (clamped)
var<private> acc: array<vec4<f32>, 8>; // acc[r][c] = sum_kk x[row0 + r, kk] * W[col0 + c, kk]

// Code i (0 .. 32 / BITS - 1) of `word`, one word per tile column.
fn decode(word: vec4<u32>, i: u32) -> vec4<f32> {
    let bits = (word >> vec4<u32>(i * BITS)) & vec4<u32>((1u << BITS) - 1u);
    if (BITS == 16u) {
        return vec4<f32>(unpack2x16float(bits.x).x, unpack2x16float(bits.y).x,
                         unpack2x16float(bits.z).x, unpack2x16float(bits.w).x);
    }
    return vec4<f32>(bits);
}

// Codes per quad, quads per group, groups per row, quads per row.
fn per_quad() -> u32 { return 128u / BITS; }
fn quads_per_group() -> u32 { return dims.group / per_quad(); }
fn groups_per_row() -> u32 { return dims.padded_k / dims.group; }
fn quads_per_row() -> u32 { return dims.padded_k / per_quad(); }

// Step and min of group g for the 4 tile columns.
struct GroupScales { step: vec4<f32>, lo: vec4<f32> }
fn group_scales(g: u32) -> GroupScales {
    var s: GroupScales;
    for (var c = 0u; c < 4u; c++) {
        let sm = unpack2x16float(scales[col[c] * groups_per_row() + g]);
        s.step[c] = sm.x;
        s.lo[c] = sm.y;
    }
    return s;
}

// Quad qi of tile column c's row of W.
fn quad(c: u32, qi: u32) -> vec4<u32> {
    return codes[col[c] * quads_per_row() + qi];
}

// Points xb and col at the tile with top-left (row0, col0), clamping rows and columns past the
// edges (their results are never stored).
fn init_tile(row0: u32, col0: u32) {
    for (var i = 0u; i < 8u; i++) {
        xb[i] = min(row0 + min(i, ROWS - 1u), dims.m - 1u) * dims.k;
    }
    for (var i = 0u; i < 4u; i++) {
        col[i] = min(col0 + i, dims.n - 1u);
    }
}

// Adds group g's contribution to acc; `checked` clamps and zeroes x past k (the last group).
fn group_dot(g: u32, checked: bool) {
    let sc = group_scales(g);
    var dot: array<vec4<f32>, 8>; // sum of x * q per row and column, this group
    var xsum: array<f32, 8>;      // sum of x per row, this group
    for (var qd = 0u; qd < quads_per_group(); qd++) {
        let qi = g * quads_per_group() + qd;
        let w0 = quad(0u, qi);
        let w1 = quad(1u, qi);
        let w2 = quad(2u, qi);
        let w3 = quad(3u, qi);
        for (var t = 0u; t < 4u; t++) {
            let word = vec4<u32>(w0[t], w1[t], w2[t], w3[t]);
            for (var i = 0u; i < 32u / BITS; i++) {
                let q = decode(word, i);
                let kk = qi * per_quad() + t * (32u / BITS) + i;
                for (var r = 0u; r < ROWS; r++) {
                    var xv: f32;
                    if (checked) {
                        xv = x[xb[r] + min(kk, dims.k - 1u)] * select(0.0, 1.0, kk < dims.k);
                    } else {
                        xv = x[xb[r] + kk];
                    }
                    dot[r] += xv * q;
                    xsum[r] += xv;
                }
            }
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        acc[r] += sc.step * dot[r] + sc.lo * xsum[r];
    }
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * ROWS;
    let col0 = gid.x * 4u;
    if (row0 >= dims.m || col0 >= dims.n) {
        return;
    }
    init_tile(row0, col0);
    for (var g = dims.g_begin; g < dims.g_end; g++) {
        group_dot(g, false);
    }
    if (dims.partial != 0u) {
        group_dot(dims.g_end, true);
    }
    store_tile(row0, col0);
}

// Writes acc's rows and columns that lie inside y.
fn store_tile(row0: u32, col0: u32) {
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + r;
        if (row < dims.m) {
            for (var c = 0u; c < 4u; c++) {
                if (col0 + c < dims.n) {
                    let at = row * dims.y_stride + dims.y_offset + col0 + c;
                    var sum = acc[r][c];
                    if (ACCUMULATE) { sum += y[at]; }
                    y[at] = sum;
                }
            }
        }
    }
}
