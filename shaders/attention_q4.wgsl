// Causal attention against a 4-bit KV cache (layout in kv_quant.wgsl); otherwise as
// attention.wgsl: one invocation per (query row r, head h), t = h * rows + r, online softmax over the visible keys
// (info[4r .. 4r + 4]: first, visible, skip_from, skip_to),
// query head h reading kv head h / (heads / kv_heads). Keys and values are decoded as read:
// value(row, c) = code(row, c) * step + min of c's group. Keys are walked in passes over
// key_begin .. key_end with the state carried in o and ml between them, as in attention.wgsl.

struct Params { rows: u32, heads: u32, kv_heads: u32, head_dim: u32, scale_bits: u32,
                key_begin: u32, key_end: u32, flags: u32, softcap_bits: u32, padded: u32,
                group: u32, p0: u32 }

// the head width, a pipeline constant so that the per-value loops have fixed trip counts
override HEAD_DIM: u32 = 64u;

const FIRST: u32 = 1u;
const LAST: u32 = 2u;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_codes: array<u32>;
@group(0) @binding(2) var<storage, read> k_scales: array<u32>;
@group(0) @binding(3) var<storage, read> v_codes: array<u32>;
@group(0) @binding(4) var<storage, read> v_scales: array<u32>;
@group(0) @binding(5) var<storage, read> info: array<u32>;
@group(0) @binding(6) var<storage, read_write> o: array<f32>;
@group(0) @binding(7) var<storage, read_write> ml: array<f32>;
@group(0) @binding(8) var<uniform> params: Params;

fn decode(codes_word: u32, c: u32, sm: vec2<f32>) -> f32 {
    return f32((codes_word >> (4u * (c % 8u))) & 15u) * sm.x + sm.y;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.y * nwg.x + wid.x) * 64u + lid.x;
    if (t >= params.rows * params.heads) { return; }
    // consecutive invocations take consecutive rows of one head: their keys and values are
    // the same rows (one sequence) or neighbours, so a SIMD group's loads coincide
    let h = t / params.rows;
    let r = t % params.rows;
    let d = HEAD_DIM;
    let g = h / (params.heads / params.kv_heads);
    let width = params.kv_heads * params.padded;
    let words = width / 8u;
    let groups = width / params.group;
    let qb = r * params.heads * d + h * d;
    let first = info[4u * r];
    let visible = info[4u * r + 1u];
    let skip_from = info[4u * r + 2u];
    let skip_to = info[4u * r + 3u];
    let scale = bitcast<f32>(params.scale_bits);
    var acc: array<f32, 256>;
    var m = -3.0e38;
    var l = 0.0;
    if ((params.flags & FIRST) == 0u) {
        m = ml[2u * t];
        l = ml[2u * t + 1u];
        for (var e = 0u; e < d; e++) { acc[e] = o[qb + e]; }
    }
    for (var j = params.key_begin; j < min(params.key_end, visible); j++) {
        if (j >= skip_from && j < skip_to) {
            j = skip_to - 1u; // past the skipped keys
            continue;
        }
        let row = first + j;
        var s = 0.0;
        for (var e = 0u; e < d; e++) {
            let c = g * params.padded + e;
            let sm = unpack2x16float(k_scales[row * groups + c / params.group]);
            s += q[qb + e] * decode(k_codes[row * words + c / 8u], c, sm);
        }
        s *= scale;
        if (params.softcap_bits != 0u) {
            // soft-capping (Gemma 2): cap * tanh(s / cap), the argument held to +-10
            let cap = bitcast<f32>(params.softcap_bits);
            s = cap * tanh(clamp(s / cap, -10.0, 10.0));
        }
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let p = exp(s - m_new);
        l = l * correction + p;
        for (var e = 0u; e < d; e++) {
            let c = g * params.padded + e;
            let sm = unpack2x16float(v_scales[row * groups + c / params.group]);
            acc[e] = acc[e] * correction + p * decode(v_codes[row * words + c / 8u], c, sm);
        }
        m = m_new;
    }
    if ((params.flags & LAST) != 0u) {
        for (var e = 0u; e < d; e++) { o[qb + e] = acc[e] / l; }
    } else {
        ml[2u * t] = m;
        ml[2u * t + 1u] = l;
        for (var e = 0u; e < d; e++) { o[qb + e] = acc[e]; }
    }
}
