// y = x W^T for k a multiple of 4: as matmul_f32.wgsl, but x and W are read as vec4 along k.
// Invocation (gx, gy) owns the 4 x 4 output tile rows 4*gy.., columns 4*gx..; per step of 4
// along k it loads 4 vec4 of x (its rows) and 4 vec4 of W (its columns) and accumulates 16 dot
// products: 64 multiply-adds per 8 loads. Output (row, col) goes to
// y[row * y_stride + y_offset + col]. Out-of-range rows/columns read clamped rows, never stored.
// A dispatch covers k_begin .. k_end (multiples of 4); ACCUMULATE adds to y (later passes).

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= dims.m || col0 >= dims.n) {
        return;
    }
    let k4 = dims.k / 4u;
    var xb: array<u32, 4>;
    var wb: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xb[i] = min(row0 + i, dims.m - 1u) * k4;
        wb[i] = min(col0 + i, dims.n - 1u) * k4;
    }
    var acc: array<vec4<f32>, 4>; // acc[r][c] = x[row0 + r, :] . W[col0 + c, :]
    for (var kk = dims.k_begin / 4u; kk < dims.k_end / 4u; kk++) {
        let w0 = w[wb[0] + kk];
        let w1 = w[wb[1] + kk];
        let w2 = w[wb[2] + kk];
        let w3 = w[wb[3] + kk];
        for (var r = 0u; r < 4u; r++) {
            let xv = x[xb[r] + kk];
            acc[r] += vec4<f32>(dot(xv, w0), dot(xv, w1), dot(xv, w2), dot(xv, w3));
        }
    }
    store_tile4(acc, row0, col0);
}
