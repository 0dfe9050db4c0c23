// 4-bit KV cache (FlexGen's format, groups along head_dim).
// A cache row (one token of one layer) holds kv_heads heads of head_dim values; each head is
// padded to `padded` values (a multiple of 8) and split into groups of `group` values (a
// multiple of 8 dividing `padded`). Codes: row r, padded column c -> word r * (width / 8) + c / 8,
// bits 4 * (c % 8), with width = kv_heads * padded. Scales: one u32 pack2x16float(step, min) per
// group, index r * (width / group) + c / group. value = code * step + min.
//
// quantize: one invocation per (new row i, group j): reads the group's values from src
// [rows, kv_heads * head_dim] (padding reads as 0), computes min and max, step = (max - min)/15,
// stores (step, min) as f16 and codes round((x - min16) / step16) clamped to 0..15 against the
// f16-rounded pair, into cache row dest[i] = info[4i] + info[4i + 1] - 1 (the row infos of
// attention.wgsl: first + visible - 1 is the row's own key).

struct Params { rows: u32, kv_heads: u32, head_dim: u32, padded: u32, group: u32, p0: u32, p1: u32, p2: u32 }

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> info: array<u32>;
@group(0) @binding(2) var<storage, read_write> codes: array<u32>;
@group(0) @binding(3) var<storage, read_write> scales: array<u32>;
@group(0) @binding(4) var<uniform> params: Params;

fn source_value(i: u32, c: u32) -> f32 {
    let head = c / params.padded;
    let e = c % params.padded;
    if (e >= params.head_dim) { return 0.0; }
    return src[i * params.kv_heads * params.head_dim + head * params.head_dim + e];
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let width = params.kv_heads * params.padded;
    let groups = width / params.group;
    let t = (wid.y * nwg.x + wid.x) * 64u + lid.x;
    if (t >= params.rows * groups) { return; }
    let i = t / groups;
    let j = t % groups;
    let c0 = j * params.group;
    var lo = 3.0e38;
    var hi = -3.0e38;
    for (var c = c0; c < c0 + params.group; c++) {
        let v = source_value(i, c);
        lo = min(lo, v);
        hi = max(hi, v);
    }
    let packed = pack2x16float(vec2<f32>((hi - lo) / 15.0, lo));
    let sm = unpack2x16float(packed);
    let dest = info[4u * i] + info[4u * i + 1u] - 1u;
    scales[dest * groups + j] = packed;
    // each group spans whole words (group is a multiple of 8): write them outright
    for (var w = c0 / 8u; w < (c0 + params.group) / 8u; w++) {
        var word = 0u;
        for (var b = 0u; b < 8u; b++) {
            var q = 0.0;
            if (sm.x > 0.0) {
                q = clamp(round((source_value(i, w * 8u + b) - sm.y) / sm.x), 0.0, 15.0);
            }
            word |= u32(q) << (4u * b);
        }
        codes[dest * (width / 8u) + w] = word;
    }
}
