// matmul_dot: C = A B^T (+ bias) where both operands run along K in memory, C[m, n] = sum_k A[m, k] B[n, k]:
// a Linear's forward y = x W^T + b with x [M, K] and W [N, K] row-major (the dx and dW products run along
// M or N and stay with matmul_sub). Needs subgroups of >= 8 lanes (as matmul_sub), K % 4 == 0 and both
// operands' bindings 16-byte aligned; the host prepends `const M, N: u32`, `fn dot_k4() -> u32` (K / 4: from
// `const K`, or where a kernel appended to this one says so, from a binding of its own, so that Linears
// differing only in K share one pipeline) and C's binding with its
// `fn store_dot(m, n, v)` (columns n .. n + 3 of row m, dropping what falls outside C: one vec4 store where 4
// divides N and C is 16-byte aligned, else 4 scalar stores; on lavapipe each store is a loop over the lanes,
// as dear for a vec4 as for a scalar) and checks the rest.
//
// A 64xDOT_COLS block of C per subgroup of 8: lane l owns rows m0 + l + 8r (r = 0..7) and all DOT_COLS
// columns. Per 4 steps of K each lane loads its 8 rows of A as vec4s and DOT_COLS / 8 rows of B (columns n0 +
// l + 8j), and the subgroup shares the columns by subgroupBroadcast. Each accumulator then takes 4 steps of K
// in one update (a chain of fma): on lavapipe an accumulator update costs a mask blend and, beyond the 16
// vector registers, a stack load and store, as much as the loads do (ARCHITECTURE.md). Measured on lavapipe
// for [60x784]x[784x100] (examples/texture_probe.rs, "x from storage, 8 rows"): 0.74-0.84 ms against 1.2-1.8
// for matmul_sub in the same runs.

// A comes from the host with `fn load_a(i4) -> vec4<f32>` (its vec4 i4 in row-major order): a storage array,
// or on CPU drivers the Linear's x mirrored into a texture (`Texels` in src/ops/kernel.rs: lavapipe
// loads an image's texels for all lanes at once, where a storage load is a loop over the lanes).
// B (binding 1, W) the same way with `fn load_b(i4)`: storage, or on CPU drivers the parameter arena's texture
// mirror at the weight's offset.
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;

const DOT_ROWS: u32 = 64u;
// DOT_COLS and `fn product_dot(blk, lane, init: array<vec4<f32>, DOT_QUADS>, mode)` come from the block file
// the host appends: shaders/linear_dot16.wgsl (16 columns) or shaders/linear_dot32.wgsl (32). The block
// calls the module's `fn dot_prologue(mode, lane, n0)` once, then hands its accumulators to `fn
// dot_out(mode, lane, m0, n, q, rows: array<vec4<f32>, 8>)` quad by quad (columns n = n0 + 4q .. n + 3 of
// the lane's rows m0 + 8r): `dot_store_rows` here, or an epilogue that also works on the values where
// they are (shaders/linear_dot_bn.wgsl normalizes them, its per-column parameters loaded by the prologue,
// a vec4 per lane). Reading C back from storage instead is a loop over the lanes per component on
// lavapipe (ARCHITECTURE.md, "Hosts without AVX-512"), as is every storage load, even at one address.
const DOT_OUT_STORE: u32 = 0u;

// Stores columns n .. n + 3 of the lane's rows m0 + 8r.
fn dot_store_rows(m0: u32, n: u32, rows: array<vec4<f32>, 8>) {
    for (var r = 0u; r < 8u; r++) {
        store_dot(m0 + 8u * r, n, rows[r]);
    }
}
const DOT_QUADS: u32 = DOT_COLS / 4u;
const DOT_COL_BLOCKS: u32 = (N + DOT_COLS - 1u) / DOT_COLS;

// acc + sum_i u[i] v[i], as one chain of fma (lavapipe keeps `a * b + c` a multiply and an add).
fn dot_acc(acc: f32, u: vec4<f32>, v: vec4<f32>) -> f32 {
    return fma(u.x, v.x, fma(u.y, v.y, fma(u.z, v.z, fma(u.w, v.w, acc))));
}

// r + (u . v0, u . v1, u . v2, u . v3)
fn dot_row(r: vec4<f32>, u: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot_acc(r.x, u, v0), dot_acc(r.y, u, v1), dot_acc(r.z, u, v2), dot_acc(r.w, u, v3));
}

// The bias of columns n .. n + 3 (clamped to N).
fn bias_dot(n: u32) -> vec4<f32> {
    let cols = min(vec4<u32>(n, n + 1u, n + 2u, n + 3u), vec4<u32>(N - 1u));
    return vec4<f32>(bias[cols.x], bias[cols.y], bias[cols.z], bias[cols.w]);
}

fn dot_block_start(blk: u32) -> u32 {
    return (blk % DOT_COL_BLOCKS) * DOT_COLS;
}

// The bias of the block's columns n0 .. n0 + DOT_COLS - 1, the accumulators' start.
fn dot_bias_init(n0: u32) -> array<vec4<f32>, DOT_QUADS> {
    var init: array<vec4<f32>, DOT_QUADS>;
    for (var q = 0u; q < DOT_QUADS; q++) {
        init[q] = bias_dot(n0 + 4u * q);
    }
    return init;
}

@compute @workgroup_size(8)
fn matmul_dot(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < (M + DOT_ROWS - 1u) / DOT_ROWS * DOT_COL_BLOCKS) {
        product_dot(blk, lane, array<vec4<f32>, DOT_QUADS>(), DOT_OUT_STORE);
    }
}

@compute @workgroup_size(8)
fn matmul_dot_bias(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < (M + DOT_ROWS - 1u) / DOT_ROWS * DOT_COL_BLOCKS) {
        let n0 = dot_block_start(blk);
        product_dot(blk, lane, dot_bias_init(n0), DOT_OUT_STORE);
    }
}
