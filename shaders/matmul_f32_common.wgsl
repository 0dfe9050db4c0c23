// Shared by the f32 matmul kernels (matmul_f32.wgsl, matmul_f32_vec4.wgsl,
// matmul_f32_tiled.wgsl), compiled as this file + the kernel's: y = x W^T with x [m, k] and
// W [n, k] row-major; output element (row, col) goes to y[row * y_stride + y_offset + col], so
// a W split by rows (for bindings larger than the device allows) writes its own columns of a
// wider y. One dispatch covers the k range k_begin .. k_end (a pass, so that no invocation
// loops past the adapter's budget); passes after the first add to y (ACCUMULATE).

// A pipeline constant, not a uniform: reading y in every dispatch cost the 4-bit kernel 4x on
// lavapipe; passes after the first run the ACCUMULATE = true compilation.
override ACCUMULATE: bool = false;

struct Dims { m: u32, k: u32, n: u32, y_stride: u32, y_offset: u32, k_begin: u32, k_end: u32, pad: u32 }

@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> dims: Dims;

// Writes the 4 x 4 tile acc (acc[r][c]: output row row0 + r, column col0 + c) where it lies
// inside y, adding to y's values under ACCUMULATE.
fn store_tile4(acc: array<vec4<f32>, 4>, row0: u32, col0: u32) {
    for (var r = 0u; r < 4u; r++) {
        let row = row0 + r;
        if (row < dims.m) {
            for (var c = 0u; c < 4u; c++) {
                if (col0 + c < dims.n) {
                    let at = row * dims.y_stride + dims.y_offset + col0 + c;
                    var sum = acc[r][c];
                    if (ACCUMULATE) { sum += y[at]; }
                    y[at] = sum;
                }
            }
        }
    }
}

