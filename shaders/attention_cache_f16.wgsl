// attention.wgsl's caches in f16 (layout in kv_f16.wgsl): value i of a cache is half i % 2
// of word i / 2 (the low half first); rows of kv_heads * d values rounded up to even.

@group(0) @binding(1) var<storage, read> k: array<u32>;
@group(0) @binding(2) var<storage, read> v: array<u32>;

fn cache_stride() -> u32 { return 2u * ((params.kv_heads * HEAD_DIM + 1u) / 2u); }

// The f32 value of IEEE half bits h (exactly, subnormals included, decoded with integer
// operations so that no adapter flushes them).
fn half_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 31u;
    let m = h & 1023u;
    if (e == 0u) {
        // zero or subnormal: m * 2^-24
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604645e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    // rebias the exponent: 15 -> 127
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn k_at(i: u32) -> f32 { return half_value((k[i / 2u] >> (16u * (i % 2u))) & 0xffffu); }
fn v_at(i: u32) -> f32 { return half_value((v[i / 2u] >> (16u * (i % 2u))) & 0xffffu); }

fn k4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(select(0.0, k_at(at(base, c, 0u)), inside(c, 0u)), select(0.0, k_at(at(base, c, 1u)), inside(c, 1u)),
                     select(0.0, k_at(at(base, c, 2u)), inside(c, 2u)), select(0.0, k_at(at(base, c, 3u)), inside(c, 3u)));
}
fn v4(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(select(0.0, v_at(at(base, c, 0u)), inside(c, 0u)), select(0.0, v_at(at(base, c, 1u)), inside(c, 1u)),
                     select(0.0, v_at(at(base, c, 2u)), inside(c, 2u)), select(0.0, v_at(at(base, c, 3u)), inside(c, 3u)));
}

