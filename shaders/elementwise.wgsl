// Element-wise kernels over a[0..n], in place. Index: i = (wid.y * nwg.x + wid.x) * 256 + lid.x
// (a 2-d grid of 256-wide workgroups, so n may exceed 65535 * 256).

struct Params { n: u32, width: u32, pad0: u32, pad1: u32 }

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}

// a[i] += b[i] (residual add)
@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < params.n) { a[i] += b[i]; }
}

// a[i] += b[i % width] (bias over rows of `width`)
@compute @workgroup_size(256)
fn add_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < params.n) { a[i] += b[i % params.width]; }
}

// a[i] = max(a[i], 0)
@compute @workgroup_size(256)
fn relu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    _ = arrayLength(&b); // keeps binding 1 in the layout
    let i = index(wid, nwg, lid);
    if (i < params.n) { a[i] = max(a[i], 0.0); }
}

// erf(x) by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
        + 0.254829592) * t * exp(-x * x);
    return select(-y, y, x >= 0.0);
}

// a[i] = gelu(a[i]) = a / 2 * (1 + erf(a / sqrt 2)) (the exact form, as torch's "gelu")
@compute @workgroup_size(256)
fn gelu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    _ = arrayLength(&b);
    let i = index(wid, nwg, lid);
    if (i < params.n) { let v = a[i]; a[i] = 0.5 * v * (1.0 + erf(v * 0.70710678)); }
}

// a[i] = silu(a[i]) * b[i] with silu(g) = g / (1 + e^-g) (SwiGLU: a = gate, b = up)
@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < params.n) { let g = a[i]; a[i] = g / (1.0 + exp(-g)) * b[i]; }
}

// a[i] = gelu_tanh(a[i]) * b[i] with gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g +
// 0.044715 g^3))) (GeGLU as Gemma computes it: a = gate, b = up); the tanh's argument is held
// to +-10, where tanh is 1 to f32's precision
@compute @workgroup_size(256)
fn gelu_tanh_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < params.n) {
        let g = a[i];
        let t = tanh(clamp(0.7978845608 * (g + 0.044715 * g * g * g), -10.0, 10.0));
        a[i] = 0.5 * g * (1.0 + t) * b[i];
    }
}

// a[i] *= s, s = bitcast(params.pad0)
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    _ = arrayLength(&b);
    let i = index(wid, nwg, lid);
    if (i < params.n) { a[i] *= bitcast<f32>(params.pad0); }
}

// a[i] = cap * tanh(a[i] / cap), cap = bitcast(params.pad0) (soft-capping); the argument held
// to +-10, where tanh is 1 to f32's precision
@compute @workgroup_size(256)
fn soft_cap(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    _ = arrayLength(&b);
    let i = index(wid, nwg, lid);
    let cap = bitcast<f32>(params.pad0);
    if (i < params.n) { a[i] = cap * tanh(clamp(a[i] / cap, -10.0, 10.0)); }
}

// a[i] = b[i] (a copy, for measuring the device's memory bandwidth)
@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < params.n) { a[i] = b[i]; }
}
