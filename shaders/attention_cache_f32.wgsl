// attention.wgsl's caches in f32: value i of a cache is k[i] (v[i]); rows of kv_heads * d.

@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;

fn cache_stride() -> u32 { return params.kv_heads * HEAD_DIM; }

fn k4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(select(0.0, k[at(base, c, 0u)], inside(c, 0u)), select(0.0, k[at(base, c, 1u)], inside(c, 1u)),
                     select(0.0, k[at(base, c, 2u)], inside(c, 2u)), select(0.0, k[at(base, c, 3u)], inside(c, 3u)));
}
fn v4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(select(0.0, v[at(base, c, 0u)], inside(c, 0u)), select(0.0, v[at(base, c, 1u)], inside(c, 1u)),
                     select(0.0, v[at(base, c, 2u)], inside(c, 2u)), select(0.0, v[at(base, c, 3u)], inside(c, 3u)));
}

