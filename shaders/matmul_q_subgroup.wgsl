// The subgroup variant of matmul_q.wgsl's kernel, compiled as matmul_q.wgsl + this file
// (naga needs no `enable` directive: the device feature admits it) for adapters whose
// subgroups have at least 8 invocations.
//
// Same layout, tiles and group arithmetic as `main`. The difference is how x reaches the lanes:
// in `main` every lane loads x[row, kk] for every kk, the same value in all lanes, which a CPU
// adapter (lavapipe) executes as a gather per value. Here the k axis is walked in chunks of 8:
// lane l loads x[row, k0 + l % 8] once, and the 8 values are handed round the subgroup with
// subgroupBroadcast(v, j), j = 0..7 (a register shuffle). One load per row per 8 codes.
// Lanes whose columns lie past n still run, so that every broadcast has a full subgroup, and
// never store.

// Code j (0..7) of the 8 codes starting a chunk, for 4 columns: 4-bit chunks are one word
// (`wa`), 8-bit chunks two (`wa` for codes 0..3, `wb` for 4..7).
fn chunk_code(wa: vec4<u32>, wb: vec4<u32>, j: u32) -> vec4<f32> {
    let per_word = 32u / BITS;
    let w = select(wa, wb, j >= per_word);
    return vec4<f32>((w >> vec4<u32>((j % per_word) * BITS)) & vec4<u32>((1u << BITS) - 1u));
}

// Adds group g's contribution to acc (see group_dot in matmul_q.wgsl); `checked`: the last group.
fn group_dot_subgroup(g: u32, groups: u32, quads: u32, lane8: u32, checked: bool) {
    let per_word = 32u / BITS;
    let quads_per_group = dims.group / (4u * per_word);
    var step: vec4<f32>;
    var lo: vec4<f32>;
    for (var c = 0u; c < 4u; c++) {
        let sm = unpack2x16float(scales[col[c] * groups + g]);
        step[c] = sm.x;
        lo[c] = sm.y;
    }
    for (var qd = 0u; qd < quads_per_group; qd++) {
        let qi = g * quads_per_group + qd;
        let w0 = codes[col[0] * quads + qi];
        let w1 = codes[col[1] * quads + qi];
        let w2 = codes[col[2] * quads + qi];
        let w3 = codes[col[3] * quads + qi];
        // a quad holds 4 * per_word codes: per_word / 2 chunks of 8
        for (var h = 0u; h < per_word / 2u; h++) {
            let ta = h * 8u / per_word;
            let tb = min(ta + 1u, 3u);
            let wa = vec4<u32>(w0[ta], w1[ta], w2[ta], w3[ta]);
            let wb = vec4<u32>(w0[tb], w1[tb], w2[tb], w3[tb]);
            let kk = qi * 4u * per_word + h * 8u + lane8; // this lane's share of the chunk
            var xl: array<f32, 8>;
            for (var r = 0u; r < ROWS; r++) {
                if (checked) {
                    xl[r] = x[xb[r] + min(kk, dims.k - 1u)] * select(0.0, 1.0, kk < dims.k);
                } else {
                    xl[r] = x[xb[r] + kk];
                }
            }
            var q = chunk_code(wa, wb, 0u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 0u) * q; }
            q = chunk_code(wa, wb, 1u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 1u) * q; }
            q = chunk_code(wa, wb, 2u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 2u) * q; }
            q = chunk_code(wa, wb, 3u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 3u) * q; }
            q = chunk_code(wa, wb, 4u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 4u) * q; }
            q = chunk_code(wa, wb, 5u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 5u) * q; }
            q = chunk_code(wa, wb, 6u) * step + lo;
            for (var r = 0u; r < ROWS; r++) { acc[r] += subgroupBroadcast(xl[r], 6u) * q; }
            q = chunk_code(wa, wb, 7u) * step + lo;
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
    let quads = dims.padded_k * BITS / 128u;
    let groups = dims.padded_k / dims.group;
    for (var i = 0u; i < 8u; i++) {
        xb[i] = min(row0 + min(i, ROWS - 1u), dims.m - 1u) * dims.k;
    }
    for (var i = 0u; i < 4u; i++) {
        col[i] = min(col0 + i, dims.n - 1u);
    }
    let full = dims.k / dims.group;
    for (var g = 0u; g < full; g++) {
        group_dot_subgroup(g, groups, quads, lane % 8u, false);
    }
    if (full < groups) {
        group_dot_subgroup(full, groups, quads, lane % 8u, true);
    }
    store_tile(row0, col0);
}
