// Rotary embedding in Hugging Face's rotate-half form, in place on x [rows, heads * d]:
// for row r, head h, pair i < d/2 with x1 = x[r, h*d + i], x2 = x[r, h*d + d/2 + i]:
//   x1' = x1 cos[r, i] - x2 sin[r, i],   x2' = x2 cos[r, i] + x1 sin[r, i].
// cos/sin [rows, d/2] are computed on the host in f64 (as the CPU reference does).
// One invocation per (r, h, i): t = (wid.y * nwg.x + wid.x) * 256 + lid.x.

struct Params { rows: u32, heads: u32, head_dim: u32, pad: u32 }

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> cos_t: array<f32>;
@group(0) @binding(2) var<storage, read> sin_t: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let half = params.head_dim / 2u;
    let t = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (t >= params.rows * params.heads * half) { return; }
    let i = t % half;
    let h = (t / half) % params.heads;
    let r = t / (half * params.heads);
    let base = r * params.heads * params.head_dim + h * params.head_dim;
    let c = cos_t[r * half + i];
    let s = sin_t[r * half + i];
    let x1 = x[base + i];
    let x2 = x[base + half + i];
    x[base + i] = x1 * c - x2 * s;
    x[base + half + i] = x2 * c + x1 * s;
}
