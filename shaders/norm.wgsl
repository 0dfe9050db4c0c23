// Row norms: one 64-wide workgroup per row (row = wid.y * nwg.x + wid.x); each invocation sums
// a strided slice (j = lid, lid + 64, ...), then a tree reduction in workgroup memory.
//   layer_norm: y = (x - mean) / sqrt(var + eps) * w + b   (biased variance, two passes)
//   rms_norm:   y = x / sqrt(mean(x^2) + eps) * w          (b is bound but unused)

struct Params { rows: u32, width: u32, eps_bits: u32, pad: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

var<workgroup> partial: array<f32, 64>;

// Sum of `v` over the workgroup (every invocation gets the total).
fn workgroup_sum(v: f32, lid: u32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) { partial[lid] += partial[lid + stride]; }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= params.rows) { return; } // uniform per workgroup: barriers stay uniform
    let lid = lid3.x;
    let base = row * params.width;
    let n = f32(params.width);
    var s = 0.0;
    for (var j = lid; j < params.width; j += 64u) { s += x[base + j]; }
    let mean = workgroup_sum(s, lid) / n;
    var q = 0.0;
    for (var j = lid; j < params.width; j += 64u) { let d = x[base + j] - mean; q += d * d; }
    let inv = 1.0 / sqrt(workgroup_sum(q, lid) / n + bitcast<f32>(params.eps_bits));
    for (var j = lid; j < params.width; j += 64u) {
        y[base + j] = (x[base + j] - mean) * inv * w[j] + b[j];
    }
}

@compute @workgroup_size(64)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid3: vec3<u32>) {
    _ = arrayLength(&b);
    let row = wid.y * nwg.x + wid.x;
    if (row >= params.rows) { return; }
    let lid = lid3.x;
    let base = row * params.width;
    var q = 0.0;
    for (var j = lid; j < params.width; j += 64u) { let v = x[base + j]; q += v * v; }
    let inv = 1.0 / sqrt(workgroup_sum(q, lid) / f32(params.width) + bitcast<f32>(params.eps_bits));
    for (var j = lid; j < params.width; j += 64u) { y[base + j] = x[base + j] * inv * w[j]; }
}
