// Causal attention of a ragged batch against per-sequence KV caches, with GQA.
// This is the kernel's body; a prelude declares the caches k, v (bindings 1 and 2) in their
// format and reads them: k4 / v4 (a head's chunk of 4 values from the value index of its
// first) and cache_stride() (values per cache row): attention_cache_f32.wgsl or
// attention_cache_f16.wgsl.
// q [rows, heads * d]; k, v [cache rows, kv_heads * d]; info[4r] = first cache row of row r's
// sequence, info[4r + 1] = keys up to row r's own (its row in the sequence + 1), and keys
// info[4r + 2] .. info[4r + 3] are not seen (another branch of a prefix group; an empty range
// for a plain sequence): row r sees keys j < visible outside it. Query head h reads kv head
// h / (heads / kv_heads). One invocation per (r, h): t = (wid.y * nwg.x + wid.x) * 64 + lid.x = h * rows + r.
// Online softmax over the visible keys j: m = running max of s_j = scale * q . k_j (soft-capped
// when the model says so),
// l = sum exp(s_j - m), acc = sum exp(s_j - m) v_j; out = acc / l.
//
// d = HEAD_DIM is a pipeline constant (<= 256), so the loops over a head have fixed trip
// counts; a head is read as ceil(d / 4) vec4 chunks (values past d read as 0), with q and acc
// held in private arrays of chunks.
//
// The keys are walked in passes (one dispatch each) over key_begin .. key_end, so that no
// invocation runs more loop iterations than the adapter allows (lavapipe silently ends every
// loop once an invocation's loops have run 65,535 iterations in all). Between passes the state
// lives in memory: acc in o[r, h] (unnormalized), (m, l) in ml[2t], ml[2t + 1]. FIRST starts
// from m = -inf, l = 0, acc = 0; LAST writes acc / l. A row whose visible keys end before
// key_begin only carries its state.

override HEAD_DIM: u32 = 64u;

struct Params { rows: u32, heads: u32, kv_heads: u32, head_dim: u32, scale_bits: u32,
                key_begin: u32, key_end: u32, flags: u32, softcap_bits: u32 }

const FIRST: u32 = 1u;
const LAST: u32 = 2u;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> info: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> ml: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;

fn chunks() -> u32 { return (HEAD_DIM + 3u) / 4u; }

// Soft-capping (Gemma 2): s -> cap * tanh(s / cap) when softcap_bits holds a cap (0: none).
// tanh's argument is held to +-10, where tanh is 1 to f32's precision.
fn softcap(s: f32) -> f32 {
    if (params.softcap_bits == 0u) { return s; }
    let cap = bitcast<f32>(params.softcap_bits);
    return cap * tanh(clamp(s / cap, -10.0, 10.0));
}

// Whether value 4c + i of a head lies inside it, and its index clamped into the head.
fn inside(c: u32, i: u32) -> bool { return 4u * c + i < HEAD_DIM; }
fn at(base: u32, c: u32, i: u32) -> u32 { return base + min(4u * c + i, HEAD_DIM - 1u); }

fn q4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(select(0.0, q[at(base, c, 0u)], inside(c, 0u)), select(0.0, q[at(base, c, 1u)], inside(c, 1u)),
                     select(0.0, q[at(base, c, 2u)], inside(c, 2u)), select(0.0, q[at(base, c, 3u)], inside(c, 3u)));
}
fn o4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(select(0.0, o[at(base, c, 0u)], inside(c, 0u)), select(0.0, o[at(base, c, 1u)], inside(c, 1u)),
                     select(0.0, o[at(base, c, 2u)], inside(c, 2u)), select(0.0, o[at(base, c, 3u)], inside(c, 3u)));
}
fn store4(base: u32, c: u32, x: vec4<f32>) {
    for (var i = 0u; i < 4u; i++) {
        if (inside(c, i)) { o[base + 4u * c + i] = x[i]; }
    }
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
    let g = h / (params.heads / params.kv_heads);
    let kvw = cache_stride();
    let qb = r * params.heads * HEAD_DIM + h * HEAD_DIM;
    let first = info[4u * r];
    let visible = info[4u * r + 1u];
    let skip_from = info[4u * r + 2u];
    let skip_to = info[4u * r + 3u];
    let scale = bitcast<f32>(params.scale_bits);
    var qv: array<vec4<f32>, 64>;
    var acc: array<vec4<f32>, 64>;
    for (var c = 0u; c < chunks(); c++) { qv[c] = q4(qb, c) * scale; }
    var m = -3.0e38;
    var l = 0.0;
    if ((params.flags & FIRST) == 0u) {
        m = ml[2u * t];
        l = ml[2u * t + 1u];
        for (var c = 0u; c < chunks(); c++) { acc[c] = o4(qb, c); }
    }
    for (var j = params.key_begin; j < min(params.key_end, visible); j++) {
        if (j >= skip_from && j < skip_to) {
            j = skip_to - 1u; // past the skipped keys
            continue;
        }
        let kb = (first + j) * kvw + g * HEAD_DIM;
        var s = 0.0;
        for (var c = 0u; c < chunks(); c++) { s += dot(qv[c], k4(kb, c)); }
        s = softcap(s);
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let p = exp(s - m_new);
        l = l * correction + p;
        for (var c = 0u; c < chunks(); c++) { acc[c] = acc[c] * correction + p * v4(kb, c); }
        m = m_new;
    }
    if ((params.flags & LAST) != 0u) {
        for (var c = 0u; c < chunks(); c++) { store4(qb, c, acc[c] / l); }
    } else {
        ml[2u * t] = m;
        ml[2u * t + 1u] = l;
        for (var c = 0u; c < chunks(); c++) { store4(qb, c, acc[c]); }
    }
}
