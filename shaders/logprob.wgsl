// Per row of logits [rows, vocab] (one 64-wide workgroup per row, row = wid.y * nwg.x + wid.x):
//   partials: out[4r..4r+4] = a panel's max, sum_j exp(logits[r, j] - max), the target's
//             logit and the argmax bits, for the host to merge across panels
// Strided partial results per invocation, then tree reductions in workgroup memory.

struct Params { rows: u32, vocab: u32, pad0: u32, pad1: u32 }

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> targets: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

var<workgroup> best: array<f32, 64>;
var<workgroup> where_: array<u32, 64>;

// Max over the workgroup with its (smallest) index.
fn workgroup_argmax(v: f32, at: u32, lid: u32) {
    best[lid] = v;
    where_[lid] = at;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            let ov = best[lid + stride];
            let oi = where_[lid + stride];
            if (ov > best[lid] || (ov == best[lid] && oi < where_[lid])) {
                best[lid] = ov;
                where_[lid] = oi;
            }
        }
        workgroupBarrier();
    }
}

// Row statistics over logits[base .. base + params.vocab): the max, the first index of the
// max, and sum_j exp(logits[j] - max), all returned to every invocation of the workgroup.
fn row_stats(base: u32, lid: u32) -> vec3<f32> {
    var m = -3.0e38;
    var at = 0u;
    for (var j = lid; j < params.vocab; j += 64u) {
        if (logits[base + j] > m) { m = logits[base + j]; at = j; }
    }
    workgroup_argmax(m, at, lid);
    let mx = best[0];
    let top = where_[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j < params.vocab; j += 64u) { s += exp(logits[base + j] - mx); }
    best[lid] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { best[lid] += best[lid + stride]; }
        workgroupBarrier();
    }
    return vec3<f32>(mx, bitcast<f32>(top), best[0]);
}

// partials: one panel of a row's logits folded for the host to merge (an online log-softmax):
//   out[4r] = m = max_j logits[r, j],  out[4r + 1] = sum_j exp(logits[r, j] - m),
//   out[4r + 2] = logits[r, target[r]] (NaN when target[r] is outside the panel, u32 max),
//   out[4r + 3] = the bits of the first index of m.
@compute @workgroup_size(64)
fn partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= params.rows) { return; }
    let base = row * params.vocab;
    let st = row_stats(base, lid3.x);
    if (lid3.x == 0u) {
        let t = targets[row];
        out[4u * row] = st.x;
        out[4u * row + 1u] = st.z;
        out[4u * row + 2u] = select(bitcast<f32>(0x7fc00000u), logits[base + min(t, params.vocab - 1u)], t < params.vocab);
        out[4u * row + 3u] = st.y;
    }
}
