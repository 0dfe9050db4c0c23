// y = x W^T with W [n, k] stored as quantized codes, dequantized in the kernel.
// Layout (see src/gpu/kernels/matmul_q.rs): each row of W holds `padded_k` codes (k rounded up
// to the group size G), `bits` wide (4 or 8), packed little-endian into u32 words: code e of a
// row sits in word e * bits / 32 at bit (e * bits) % 32. Group g of a row (codes g*G .. g*G+G-1)
// has one u32 `scales[row * groups + g]` = pack2x16float(step, min); value = code * step + min.
// (FlexGen 4-bit and GGUF Q4_1: as stored; Q4_0: min = -8 * step; Q8_0: codes + 128 unsigned,
// min = -128 * step.)
//
// Indexing: invocation (gx, gy) owns the 4 x 4 output tile rows 4*gy.., columns 4*gx..; it walks
// the k axis one code word at a time (32 / bits values), decodes the word of each of its 4
// columns with that word's group scale, and accumulates against x. Values past k (padding)
// meet x = 0. Out-of-range rows/columns read clamped rows and are never stored.

struct Dims { m: u32, k: u32, n: u32, y_stride: u32, y_offset: u32, padded_k: u32, group: u32, bits: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> codes: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> dims: Dims;

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= dims.m || col0 >= dims.n) {
        return;
    }
    let per_word = 32u / dims.bits;
    let mask = (1u << dims.bits) - 1u;
    let words = dims.padded_k / per_word;
    let groups = dims.padded_k / dims.group;
    var xb: array<u32, 4>;
    var col: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xb[i] = min(row0 + i, dims.m - 1u) * dims.k;
        col[i] = min(col0 + i, dims.n - 1u);
    }
    var acc: array<vec4<f32>, 4>; // acc[r][c] = sum_kk x[row0 + r, kk] * W[col0 + c, kk]
    for (var wi = 0u; wi < words; wi++) {
        let k0 = wi * per_word;
        let g = k0 / dims.group; // a word never straddles groups (G is a multiple of 8)
        var word: array<u32, 4>;
        var step: vec4<f32>;
        var lo: vec4<f32>;
        for (var c = 0u; c < 4u; c++) {
            word[c] = codes[col[c] * words + wi];
            let sm = unpack2x16float(scales[col[c] * groups + g]);
            step[c] = sm.x;
            lo[c] = sm.y;
        }
        for (var j = 0u; j < per_word; j++) {
            let kk = k0 + j;
            let shift = j * dims.bits;
            let q = vec4<f32>(
                f32((word[0] >> shift) & mask), f32((word[1] >> shift) & mask),
                f32((word[2] >> shift) & mask), f32((word[3] >> shift) & mask));
            let wv = q * step + lo;
            let valid = select(0.0, 1.0, kk < dims.k);
            let xk = min(kk, dims.k - 1u);
            for (var r = 0u; r < 4u; r++) {
                acc[r] += (x[xb[r] + xk] * valid) * wv;
            }
        }
    }
    for (var r = 0u; r < 4u; r++) {
        let row = row0 + r;
        if (row < dims.m) {
            for (var c = 0u; c < 4u; c++) {
                if (col0 + c < dims.n) {
                    y[row * dims.y_stride + dims.y_offset + col0 + c] = acc[r][c];
                }
            }
        }
    }
}
