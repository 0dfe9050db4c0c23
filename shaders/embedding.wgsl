// Embedding gather: y[r, j] = table[ids[r], j] (+ positions[pos[r] + offset, j] when
// has_positions; OPT's learned positions use offset 2). One invocation per output element,
// i = (wid.y * nwg.x + wid.x) * 256 + lid.x, r = i / width, j = i % width.

struct Params { rows: u32, width: u32, has_positions: u32, offset: u32 }

@group(0) @binding(0) var<storage, read> table: array<f32>;
@group(0) @binding(1) var<storage, read> positions: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> pos: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= params.rows * params.width) { return; }
    let r = i / params.width;
    let j = i % params.width;
    var v = table[ids[r] * params.width + j];
    if (params.has_positions != 0u) {
        v += positions[(pos[r] + params.offset) * params.width + j];
    }
    y[i] = v;
}
