// y = x W^T: x [m, k] row-major, W [n, k] row-major (PyTorch's Linear layout); output element
// (row, col) goes to y[row * y_stride + y_offset + col], so a W split by rows (for bindings
// larger than the device allows) writes its own columns of a wider y.
//
// Indexing: invocation (gx, gy) owns the 4 x 4 output tile rows 4*gy .. 4*gy+3 and columns
// 4*gx .. 4*gx+3. For each kk in 0..k it loads x[row, kk] for its 4 rows and W[col, kk] for its
// 4 columns and accumulates the 16 products in registers: no workgroup memory, no barriers
// (the fast shape on CPU adapters). Rows and columns past m and n read a
// clamped (valid) address and are never stored.
// Dims, y and the tile store come first from matmul_f32_common.wgsl.

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= dims.m || col0 >= dims.n) {
        return;
    }
    // base offsets of the 4 rows of x and 4 rows of W, clamped into range
    var xb: array<u32, 4>;
    var wb: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xb[i] = min(row0 + i, dims.m - 1u) * dims.k;
        wb[i] = min(col0 + i, dims.n - 1u) * dims.k;
    }
    var acc: array<vec4<f32>, 4>; // acc[r][c] = sum_kk x[row0 + r, kk] * W[col0 + c, kk]
    for (var kk = dims.k_begin; kk < dims.k_end; kk++) {
        let wv = vec4<f32>(w[wb[0] + kk], w[wb[1] + kk], w[wb[2] + kk], w[wb[3] + kk]);
        for (var r = 0u; r < 4u; r++) {
            acc[r] += x[xb[r] + kk] * wv;
        }
    }
    store_tile4(acc, row0, col0);
}
