// Causal attention of a ragged batch against per-sequence KV caches, with GQA.
// q [rows, heads * d]; k, v [cache rows, kv_heads * d]; info[2r] = first cache row of row r's
// sequence, info[2r + 1] = keys visible to row r (its position + 1). Query head h reads kv head
// h / (heads / kv_heads). One invocation per (r, h): t = (wid.y * nwg.x + wid.x) * 64 + lid.x.
// Online softmax over the visible keys j: m = running max of s_j = scale * q . k_j,
// l = sum exp(s_j - m), acc = sum exp(s_j - m) v_j; out = acc / l. d <= 256.

struct Params { rows: u32, heads: u32, kv_heads: u32, head_dim: u32, scale_bits: u32,
                pad0: u32, pad1: u32, pad2: u32 }

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> info: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.y * nwg.x + wid.x) * 64u + lid.x;
    if (t >= params.rows * params.heads) { return; }
    let r = t / params.heads;
    let h = t % params.heads;
    let d = params.head_dim;
    let g = h / (params.heads / params.kv_heads);
    let kvw = params.kv_heads * d;
    let qb = r * params.heads * d + h * d;
    let first = info[2u * r];
    let visible = info[2u * r + 1u];
    let scale = bitcast<f32>(params.scale_bits);
    var acc: array<f32, 256>;
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < visible; j++) {
        let kb = (first + j) * kvw + g * d;
        var s = 0.0;
        for (var e = 0u; e < d; e++) { s += q[qb + e] * k[kb + e]; }
        s *= scale;
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let p = exp(s - m_new);
        l = l * correction + p;
        for (var e = 0u; e < d; e++) { acc[e] = acc[e] * correction + p * v[kb + e]; }
        m = m_new;
    }
    for (var e = 0u; e < d; e++) { o[qb + e] = acc[e] / l; }
}
