// y = x W^T with W [n, k] kept as GGUF blocks (the K-quants, Q5_0/Q5_1, IQ4, and the legacy
// 32-value formats), decoded in the kernel. Layout (src/layout/rows.rs, RowFormat::Blocks):
// row r of W is k / BL blocks of BB bytes, as the GGUF file stores them, padded to whole u32
// words; row r starts at word r * row_words. FORMAT (a pipeline constant) is the ggml type id.
//
// Every format splits a block into runs of 16 values sharing one scale: value i of run j is
// q * dl - ml, with (dl, ml) from `run_scale` and the code value q from `code` (already signed,
// offset, or looked up in IQ4's table). For each run, with RW x-rows:
//   sum_i x[i] (q_i dl - ml) = dl * sum_i x[i] q_i - ml * sum_i x[i].
//
// Indexing: invocation gid.x owns weight row gid.x (one column of y), gid.y the RW rows of x
// from RW * gid.y (clamped; rows past m are never stored). A dispatch covers blocks
// b_begin .. b_end of every row (a pass within the adapter's loop budget); passes after the
// first add to y (ACCUMULATE).

override FORMAT: u32 = 12u;
override RW: u32 = 1u;
override ACCUMULATE: bool = false;

struct Dims { m: u32, k: u32, n: u32, y_stride: u32, y_offset: u32, row_words: u32,
              b_begin: u32, b_end: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> words: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> dims: Dims;

// IQ4_NL's and IQ4_XS's 16 levels.
const IQ4: array<f32, 16> = array<f32, 16>(-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0,
    -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0);

// Values and bytes per block.
fn block_len() -> u32 {
    switch FORMAT {
        case 2u, 3u, 6u, 7u, 8u, 20u: { return 32u; }
        default: { return 256u; }
    }
}
fn block_bytes() -> u32 {
    switch FORMAT {
        case 2u, 20u: { return 18u; }
        case 3u: { return 20u; }
        case 6u: { return 22u; }
        case 7u: { return 24u; }
        case 8u: { return 34u; }
        case 10u: { return 84u; }
        case 11u: { return 110u; }
        case 12u: { return 144u; }
        case 13u: { return 176u; }
        case 14u: { return 210u; }
        default: { return 136u; } // IQ4_XS
    }
}

// Byte `at` of the weight, a little-endian half at `at`, a byte as a signed integer.
fn byte(at: u32) -> u32 { return (words[at >> 2u] >> ((at & 3u) * 8u)) & 0xffu; }
fn half(at: u32) -> f32 { return unpack2x16float(byte(at) | (byte(at + 1u) << 8u)).x; }
fn signed(b: u32) -> f32 { return f32(bitcast<i32>(b << 24u) >> 24u); }

// Q4_K's and Q5_K's 6-bit (scale, min) of sub-block s from the 12 bytes at `p`.
fn scale_min_k4(p: u32, s: u32) -> vec2<f32> {
    if (s < 4u) {
        return vec2<f32>(f32(byte(p + s) & 63u), f32(byte(p + s + 4u) & 63u));
    }
    let sc = (byte(p + s + 4u) & 15u) | ((byte(p + s - 4u) >> 6u) << 4u);
    let mn = (byte(p + s + 4u) >> 4u) | ((byte(p + s) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// (dl, ml) of run j of the block at byte `b`.
fn run_scale(b: u32, j: u32) -> vec2<f32> {
    switch FORMAT {
        case 3u, 7u: { return vec2<f32>(half(b), -half(b + 2u)); }
        case 10u: {
            let sc = byte(b + j);
            return vec2<f32>(half(b + 80u) * f32(sc & 15u), half(b + 82u) * f32(sc >> 4u));
        }
        case 11u: {
            let lo = (byte(b + 96u + j % 8u) >> (4u * (j / 8u))) & 15u;
            let hi = (byte(b + 104u + j % 4u) >> (2u * (j / 4u))) & 3u;
            return vec2<f32>(half(b + 108u) * (f32(lo | (hi << 4u)) - 32.0), 0.0);
        }
        case 12u, 13u: {
            let sm = scale_min_k4(b + 4u, j / 2u);
            return vec2<f32>(half(b) * sm.x, half(b + 2u) * sm.y);
        }
        case 14u: { return vec2<f32>(half(b + 208u) * signed(byte(b + 192u + j)), 0.0); }
        case 23u: {
            let s = j / 2u;
            let lo = (byte(b + 4u + s / 2u) >> (4u * (s % 2u))) & 15u;
            let hi = ((byte(b + 2u) | (byte(b + 3u) << 8u)) >> (2u * s)) & 3u;
            return vec2<f32>(half(b) * (f32(lo | (hi << 4u)) - 32.0), 0.0);
        }
        default: { return vec2<f32>(half(b), 0.0); } // Q8_0, Q4_0, Q5_0, IQ4_NL
    }
}

// Nibble i of run j (0 or 1) of a 32-value block whose 16 nibble bytes start at `q`.
fn nib(q: u32, j: u32, i: u32) -> u32 { return (byte(q + i) >> (4u * j)) & 15u; }

// The fifth bit of value 16 j + i of a Q5_0/Q5_1 block whose 32 high bits start at `h`.
fn bit5(h: u32, j: u32, i: u32) -> u32 {
    let p = 16u * j + i;
    return ((byte(h + p / 8u) >> (p % 8u)) & 1u) << 4u;
}

// Code value i of run j of the block at byte `b`.
fn code(b: u32, j: u32, i: u32) -> f32 {
    let h = j / 8u;
    let s = (j / 2u) % 4u;
    let hf = j % 2u;
    switch FORMAT {
        case 8u: { return signed(byte(b + 2u + 16u * j + i)); }
        case 2u: { return f32(nib(b + 2u, j, i)) - 8.0; }
        case 3u: { return f32(nib(b + 4u, j, i)); }
        case 6u: { return f32(nib(b + 6u, j, i) | bit5(b + 2u, j, i)) - 16.0; }
        case 7u: { return f32(nib(b + 8u, j, i) | bit5(b + 4u, j, i)); }
        case 20u: { return IQ4[nib(b + 2u, j, i)]; }
        case 10u: { return f32((byte(b + 16u + 32u * h + 16u * hf + i) >> (2u * s)) & 3u); }
        case 11u: {
            let lo = (byte(b + 32u + 32u * h + 16u * hf + i) >> (2u * s)) & 3u;
            let hb = (byte(b + 16u * hf + i) >> (j / 2u)) & 1u;
            return f32(lo) - 4.0 * f32(1u - hb);
        }
        case 12u, 13u: {
            let sb = j / 2u;
            var q = (byte(b + 16u + select(0u, 32u, FORMAT == 13u) + 32u * (sb / 2u) + 16u * hf + i)
                     >> (4u * (sb % 2u))) & 15u;
            if (FORMAT == 13u) {
                q |= ((byte(b + 16u + 16u * hf + i) >> sb) & 1u) << 4u;
            }
            return f32(q);
        }
        case 14u: {
            let t = s;
            let lo = (byte(b + 64u * h + 32u * (t % 2u) + 16u * hf + i) >> (4u * (t / 2u))) & 15u;
            let hi = (byte(b + 128u + 32u * h + 16u * hf + i) >> (2u * t)) & 3u;
            return f32(lo | (hi << 4u)) - 32.0;
        }
        default: { // IQ4_XS
            return IQ4[(byte(b + 8u + 16u * (j / 2u) + i) >> (4u * hf)) & 15u];
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row0 = gid.y * RW;
    if (col >= dims.n || row0 >= dims.m) {
        return;
    }
    var xb: array<u32, 8>;
    for (var r = 0u; r < RW; r++) {
        xb[r] = min(row0 + r, dims.m - 1u) * dims.k;
    }
    var acc: array<f32, 8>;
    let bl = block_len();
    for (var blk = dims.b_begin; blk < dims.b_end; blk++) {
        let b = col * dims.row_words * 4u + blk * block_bytes();
        for (var j = 0u; j < bl / 16u; j++) {
            let sc = run_scale(b, j);
            var dot: array<f32, 8>;
            var xs: array<f32, 8>;
            for (var i = 0u; i < 16u; i++) {
                let q = code(b, j, i);
                let kk = blk * bl + 16u * j + i;
                for (var r = 0u; r < RW; r++) {
                    let xv = x[xb[r] + kk];
                    dot[r] += xv * q;
                    xs[r] += xv;
                }
            }
            for (var r = 0u; r < RW; r++) {
                acc[r] += sc.x * dot[r] - sc.y * xs[r];
            }
        }
    }
    for (var r = 0u; r < RW; r++) {
        let row = row0 + r;
        if (row < dims.m) {
            let at = row * dims.y_stride + dims.y_offset + col;
            var sum = acc[r];
            if (ACCUMULATE) { sum += y[at]; }
            y[at] = sum;
        }
    }
}
