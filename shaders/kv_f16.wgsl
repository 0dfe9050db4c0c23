// The f16 KV cache: a cache row (one token of one layer) holds width = kv_heads * head_dim
// values as IEEE halves, two to a u32 word (value c in the low half of word c / 2 when c is
// even, the high half when odd), width rounded up to even (the padding half is 0): words =
// (width + 1) / 2 per row.
//
// store: one invocation per (new row i, word w), t = i * words + w: rounds src[i, 2w] and
// src[i, 2w + 1] (f32, [rows, width]) to nearest even, overflow to infinity (as the CPU
// device does: the same bits on every adapter, where pack2x16float may round either way),
// into cache row dest = info[4i] + info[4i + 1] - 1 (the row infos of attention.wgsl: first +
// visible - 1 is the row's own key).

struct Params { rows: u32, width: u32, p0: u32, p1: u32 }

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> info: array<u32>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;
@group(0) @binding(3) var<uniform> params: Params;

// IEEE half bits of x, rounded to nearest even.
fn half_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = i32((b >> 23u) & 255u);
    let m = b & 0x7fffffu;
    if (e == 255) {
        // infinity, or NaN (kept quiet)
        return sign | 0x7c00u | select(0u, 0x200u | (m >> 13u), m != 0u);
    }
    let he = e - 112; // the exponent rebiased to 15
    if (he >= 31) {
        return sign | 0x7c00u;
    }
    if (he <= 0) {
        // a subnormal half (or zero): (1.m * 2^23) >> (14 - he), rounded
        if (he < -10) {
            return sign;
        }
        let full = m | 0x800000u;
        let shift = u32(14 - he);
        let kept = full >> shift;
        let rest = full & ((1u << shift) - 1u);
        let half_way = 1u << (shift - 1u);
        let up = rest > half_way || (rest == half_way && (kept & 1u) == 1u);
        return sign | (kept + select(0u, 1u, up));
    }
    let kept = (u32(he) << 10u) | (m >> 13u);
    let rest = m & 0x1fffu;
    let up = rest > 0x1000u || (rest == 0x1000u && (kept & 1u) == 1u);
    // a carry out of the mantissa moves to the next exponent (to infinity past the largest)
    return sign | (kept + select(0u, 1u, up));
}

fn source_value(i: u32, c: u32) -> f32 {
    if (c >= params.width) { return 0.0; }
    return src[i * params.width + c];
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let words = (params.width + 1u) / 2u;
    let t = (wid.y * nwg.x + wid.x) * 64u + lid.x;
    if (t >= params.rows * words) { return; }
    let i = t / words;
    let w = t % words;
    let dest = info[4u * i] + info[4u * i + 1u] - 1u;
    let low = half_bits(source_value(i, 2u * w));
    let high = half_bits(source_value(i, 2u * w + 1u));
    cache[dest * words + w] = low | (high << 16u);
}
