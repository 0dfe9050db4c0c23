// The subgroup variant of matmul_q.wgsl's kernel, compiled as matmul_q.wgsl + this file
// (naga needs no `enable` directive: the device feature admits it) for adapters whose
// subgroups have at least 8 invocations.
//
// Same layout and tiles as `main`. The difference is how x reaches the lanes:
// in `main` every lane loads x[row, kk] for every kk, the same value in all lanes, which a CPU
// adapter (lavapipe) executes as a gather per value. Here the k axis is walked in chunks of 8:
// lane l loads x[row, k0 + l % 8] once, and the 8 values are handed round the subgroup with
// subgroupBroadcast(v, j), j = 0..7 (a register shuffle). One load per row per 8 codes.
// Each code is decoded to its value (code * step + min) before the multiply-add: with x this
// cheap, the per-group sums of `main` cost more registers than they save.
// Lanes whose columns lie past n still run, so that every broadcast has a full subgroup, and
// never store.

// Code j (0..7) of a chunk of 8 codes that starts in word wa of each tile column and runs on
// into wb, wc, wd (8-bit codes fill 2 words, 16-bit codes 4). j is a literal at every call, so
// the word choice folds away.
fn chunk_code(wa: vec4<u32>, wb: vec4<u32>, wc: vec4<u32>, wd: vec4<u32>, j: u32) -> vec4<f32> {
    let per_word = 32u / BITS;
    let t = j / per_word;
    var w = wa;
    if (t == 1u) {
        w = wb;
    } else if (t == 2u) {
        w = wc;
    } else if (t == 3u) {
        w = wd;
    }
    return decode(w, j % per_word);
}

// Adds group g's contribution to acc (see group_dot in matmul_q.wgsl); `checked`: the last group.
fn group_dot_subgroup(g: u32, lane8: u32, checked: bool) {
    let sc = group_scales(g);
    let step = sc.step;
    let lo = sc.lo;
    for (var qd = 0u; qd < quads_per_group(); qd++) {
        let qi = g * quads_per_group() + qd;
        let w0 = quad(0u, qi);
        let w1 = quad(1u, qi);
        let w2 = quad(2u, qi);
        let w3 = quad(3u, qi);
        // a quad holds per_quad() codes: per_quad() / 8 chunks of 8 (4, 2 or 1)
        for (var h = 0u; h < per_quad() / 8u; h++) {
            let kk = qi * per_quad() + h * 8u + lane8; // this lane's share of the chunk
            let t0 = h * 8u * BITS / 32u; // the chunk's first word
            let t1 = min(t0 + 1u, 3u);
            let t2 = min(t0 + 2u, 3u);
            let wa = vec4<u32>(w0[t0], w1[t0], w2[t0], w3[t0]);
            let wb = vec4<u32>(w0[t1], w1[t1], w2[t1], w3[t1]);
            let wc = vec4<u32>(w0[t2], w1[t2], w2[t2], w3[t2]);
            let wd = vec4<u32>(w0[3], w1[3], w2[3], w3[3]);
            var xl: array<f32, 8>;
            for (var r = 0u; r < ROWS; r++) {
                if (checked) {
                    xl[r] = x[xb[r] + min(kk, dims.k - 1u)] * select(0.0, 1.0, kk < dims.k);
                } else {
                    xl[r] = x[xb[r] + kk];
                }
            }
            var q = chunk_code(wa, wb, wc, wd, 0u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 0u) * q; }
            q = chunk_code(wa, wb, wc, wd, 1u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 1u) * q; }
            q = chunk_code(wa, wb, wc, wd, 2u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 2u) * q; }
            q = chunk_code(wa, wb, wc, wd, 3u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 3u) * q; }
            q = chunk_code(wa, wb, wc, wd, 4u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 4u) * q; }
            q = chunk_code(wa, wb, wc, wd, 5u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 5u) * q; }
            q = chunk_code(wa, wb, wc, wd, 6u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 6u) * q; }
            q = chunk_code(wa, wb, wc, wd, 7u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 7u) * q; }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn main_subgroup(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let row0 = gid.y * ROWS;
    if (row0 >= dims.m) {
        return; // the whole workgroup shares gid.y
    }
    let col0 = gid.x * 4u;
    init_tile(row0, col0);
    for (var g = dims.g_begin; g < dims.g_end; g++) {
        group_dot_subgroup(g, lane % 8u, false);
    }
    if (dims.partial != 0u) {
        group_dot_subgroup(dims.g_end, lane % 8u, true);
    }
    store_tile(row0, col0);
}
