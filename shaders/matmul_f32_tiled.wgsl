// y = x W^T, the discrete-GPU variant: workgroup memory tiles and barriers.
// A 16 x 16 workgroup owns a 64 x 64 output tile (rows 64*wid.y.., columns 64*wid.x..); each
// invocation (tx, ty) owns the 4 x 4 outputs rows 64*wid.y + 4*ty + r, columns 64*wid.x + 4*tx + c.
// The k axis is walked in steps of 16: the workgroup stages xs[i][kk] = x[row_base + i, k0 + kk]
// and ws[j][kk] = W[col_base + j, k0 + kk] (i, j < 64; zero outside the matrices; 4 loads each per
// invocation), synchronizes, and accumulates from workgroup memory. Output (row, col) goes to
// y[row * y_stride + y_offset + col]. A dispatch covers k_begin .. k_end (k_begin a multiple
// of 16); ACCUMULATE adds to y (later passes).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;

var<workgroup> xs: array<array<f32, 16>, 64>;
var<workgroup> ws: array<array<f32, 16>, 64>;

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row_base = wid.y * 64u;
    let col_base = wid.x * 64u;
    let flat = lid.y * 16u + lid.x; // 0..256
    var acc: array<vec4<f32>, 4>;
    for (var k0 = dims.k_begin; k0 < dims.k_end; k0 += 16u) {
        // stage: element e = flat + 256 * s (s < 4) of each 64 x 16 tile
        for (var s = 0u; s < 4u; s++) {
            let e = flat + 256u * s;
            let i = e / 16u;
            let kk = e % 16u;
            let kx = k0 + kk;
            let xr = row_base + i;
            let wr = col_base + i;
            xs[i][kk] = select(0.0, x[min(xr, dims.m - 1u) * dims.k + min(kx, dims.k - 1u)], xr < dims.m && kx < dims.k_end);
            ws[i][kk] = select(0.0, w[min(wr, dims.n - 1u) * dims.k + min(kx, dims.k - 1u)], wr < dims.n && kx < dims.k_end);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let b = vec4<f32>(ws[lid.x * 4u][kk], ws[lid.x * 4u + 1u][kk], ws[lid.x * 4u + 2u][kk], ws[lid.x * 4u + 3u][kk]);
            for (var r = 0u; r < 4u; r++) {
                acc[r] += xs[lid.y * 4u + r][kk] * b;
            }
        }
        workgroupBarrier();
    }
    store_tile4(acc, row_base + lid.y * 4u, col_base + lid.x * 4u);
}
