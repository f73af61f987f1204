// matmul_dot: C = A B^T (+ bias) where both operands run along K in memory, C[m, n] = sum_k A[m, k] B[n, k]:
// a Linear's forward y = x W^T + b with x [M, K] and W [N, K] row-major (the dx and dW products run along
// M or N and stay with matmul_sub). Needs subgroups of >= 8 lanes (as matmul_sub), K % 4 == 0 and both
// operands' bindings 16-byte aligned; the host prepends `const M, N, K: u32` and C's binding with its
// `fn store_dot(m, n, v)` (columns n .. n + 3 of row m, dropping what falls outside C: one vec4 store where 4
// divides N and C is 16-byte aligned, else 4 scalar stores; on lavapipe each store is a loop over the lanes,
// as dear for a vec4 as for a scalar) and checks the rest.
//
// A 64x16 block of C per subgroup of 8: lane l owns rows m0 + l + 8r (r = 0..7) and all 16 columns. Per 4
// steps of K each lane loads its 8 rows of A as vec4s and 2 rows of B (columns n0 + l and n0 + 8 + l), and
// the subgroup shares the 16 columns by subgroupBroadcast. Each accumulator then takes 4 steps of K in one
// update (a chain of fma): on lavapipe an accumulator update costs a mask blend and, beyond the 16 vector
// registers, a stack load and store, as much as the loads do (ARCHITECTURE.md). Measured on lavapipe for
// [60x784]x[784x100] (examples/texture_probe.rs, "x from storage, 8 rows"): 0.74-0.84 ms against 1.2-1.8 for
// matmul_sub in the same runs.

@group(0) @binding(0) var<storage, read_write> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;

const K4: u32 = K / 4u;
const DOT_ROWS: u32 = 64u;
const DOT_COLS: u32 = 16u;
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

// Block blk of C, its accumulators starting from init[q] for columns 4q .. 4q + 3 of the block (the bias,
// or zero: taken as values so that the entry point without bias binds no `bias`).
fn product_dot(blk: u32, lane: u32, init: array<vec4<f32>, 4>) {
    let m0 = (blk / DOT_COL_BLOCKS) * DOT_ROWS + lane;
    let n0 = dot_block_start(blk);
    // Rows past M and columns past N load clamped, valid values that are never stored.
    let ar0 = min(m0 + 0u, M - 1u) * K4;
    let ar1 = min(m0 + 8u, M - 1u) * K4;
    let ar2 = min(m0 + 16u, M - 1u) * K4;
    let ar3 = min(m0 + 24u, M - 1u) * K4;
    let ar4 = min(m0 + 32u, M - 1u) * K4;
    let ar5 = min(m0 + 40u, M - 1u) * K4;
    let ar6 = min(m0 + 48u, M - 1u) * K4;
    let ar7 = min(m0 + 56u, M - 1u) * K4;
    let bn0 = min(n0 + lane, N - 1u) * K4;
    let bn1 = min(n0 + 8u + lane, N - 1u) * K4;
    var r0_0 = init[0];
    var r0_1 = init[1];
    var r0_2 = init[2];
    var r0_3 = init[3];
    var r1_0 = init[0];
    var r1_1 = init[1];
    var r1_2 = init[2];
    var r1_3 = init[3];
    var r2_0 = init[0];
    var r2_1 = init[1];
    var r2_2 = init[2];
    var r2_3 = init[3];
    var r3_0 = init[0];
    var r3_1 = init[1];
    var r3_2 = init[2];
    var r3_3 = init[3];
    var r4_0 = init[0];
    var r4_1 = init[1];
    var r4_2 = init[2];
    var r4_3 = init[3];
    var r5_0 = init[0];
    var r5_1 = init[1];
    var r5_2 = init[2];
    var r5_3 = init[3];
    var r6_0 = init[0];
    var r6_1 = init[1];
    var r6_2 = init[2];
    var r6_3 = init[3];
    var r7_0 = init[0];
    var r7_1 = init[1];
    var r7_2 = init[2];
    var r7_3 = init[3];
    for (var k = 0u; k < K4; k++) {
        let w0 = b[bn0 + k];
        let w1 = b[bn1 + k];
        let v0 = subgroupBroadcast(w0, 0u);
        let v1 = subgroupBroadcast(w0, 1u);
        let v2 = subgroupBroadcast(w0, 2u);
        let v3 = subgroupBroadcast(w0, 3u);
        let v4 = subgroupBroadcast(w0, 4u);
        let v5 = subgroupBroadcast(w0, 5u);
        let v6 = subgroupBroadcast(w0, 6u);
        let v7 = subgroupBroadcast(w0, 7u);
        let v8 = subgroupBroadcast(w1, 0u);
        let v9 = subgroupBroadcast(w1, 1u);
        let v10 = subgroupBroadcast(w1, 2u);
        let v11 = subgroupBroadcast(w1, 3u);
        let v12 = subgroupBroadcast(w1, 4u);
        let v13 = subgroupBroadcast(w1, 5u);
        let v14 = subgroupBroadcast(w1, 6u);
        let v15 = subgroupBroadcast(w1, 7u);
        let x0 = a[ar0 + k];
        r0_0 = dot_row(r0_0, x0, v0, v1, v2, v3);
        r0_1 = dot_row(r0_1, x0, v4, v5, v6, v7);
        r0_2 = dot_row(r0_2, x0, v8, v9, v10, v11);
        r0_3 = dot_row(r0_3, x0, v12, v13, v14, v15);
        let x1 = a[ar1 + k];
        r1_0 = dot_row(r1_0, x1, v0, v1, v2, v3);
        r1_1 = dot_row(r1_1, x1, v4, v5, v6, v7);
        r1_2 = dot_row(r1_2, x1, v8, v9, v10, v11);
        r1_3 = dot_row(r1_3, x1, v12, v13, v14, v15);
        let x2 = a[ar2 + k];
        r2_0 = dot_row(r2_0, x2, v0, v1, v2, v3);
        r2_1 = dot_row(r2_1, x2, v4, v5, v6, v7);
        r2_2 = dot_row(r2_2, x2, v8, v9, v10, v11);
        r2_3 = dot_row(r2_3, x2, v12, v13, v14, v15);
        let x3 = a[ar3 + k];
        r3_0 = dot_row(r3_0, x3, v0, v1, v2, v3);
        r3_1 = dot_row(r3_1, x3, v4, v5, v6, v7);
        r3_2 = dot_row(r3_2, x3, v8, v9, v10, v11);
        r3_3 = dot_row(r3_3, x3, v12, v13, v14, v15);
        let x4 = a[ar4 + k];
        r4_0 = dot_row(r4_0, x4, v0, v1, v2, v3);
        r4_1 = dot_row(r4_1, x4, v4, v5, v6, v7);
        r4_2 = dot_row(r4_2, x4, v8, v9, v10, v11);
        r4_3 = dot_row(r4_3, x4, v12, v13, v14, v15);
        let x5 = a[ar5 + k];
        r5_0 = dot_row(r5_0, x5, v0, v1, v2, v3);
        r5_1 = dot_row(r5_1, x5, v4, v5, v6, v7);
        r5_2 = dot_row(r5_2, x5, v8, v9, v10, v11);
        r5_3 = dot_row(r5_3, x5, v12, v13, v14, v15);
        let x6 = a[ar6 + k];
        r6_0 = dot_row(r6_0, x6, v0, v1, v2, v3);
        r6_1 = dot_row(r6_1, x6, v4, v5, v6, v7);
        r6_2 = dot_row(r6_2, x6, v8, v9, v10, v11);
        r6_3 = dot_row(r6_3, x6, v12, v13, v14, v15);
        let x7 = a[ar7 + k];
        r7_0 = dot_row(r7_0, x7, v0, v1, v2, v3);
        r7_1 = dot_row(r7_1, x7, v4, v5, v6, v7);
        r7_2 = dot_row(r7_2, x7, v8, v9, v10, v11);
        r7_3 = dot_row(r7_3, x7, v12, v13, v14, v15);
    }
    store_dot(m0 + 0u, n0 + 0u, r0_0);
    store_dot(m0 + 0u, n0 + 4u, r0_1);
    store_dot(m0 + 0u, n0 + 8u, r0_2);
    store_dot(m0 + 0u, n0 + 12u, r0_3);
    store_dot(m0 + 8u, n0 + 0u, r1_0);
    store_dot(m0 + 8u, n0 + 4u, r1_1);
    store_dot(m0 + 8u, n0 + 8u, r1_2);
    store_dot(m0 + 8u, n0 + 12u, r1_3);
    store_dot(m0 + 16u, n0 + 0u, r2_0);
    store_dot(m0 + 16u, n0 + 4u, r2_1);
    store_dot(m0 + 16u, n0 + 8u, r2_2);
    store_dot(m0 + 16u, n0 + 12u, r2_3);
    store_dot(m0 + 24u, n0 + 0u, r3_0);
    store_dot(m0 + 24u, n0 + 4u, r3_1);
    store_dot(m0 + 24u, n0 + 8u, r3_2);
    store_dot(m0 + 24u, n0 + 12u, r3_3);
    store_dot(m0 + 32u, n0 + 0u, r4_0);
    store_dot(m0 + 32u, n0 + 4u, r4_1);
    store_dot(m0 + 32u, n0 + 8u, r4_2);
    store_dot(m0 + 32u, n0 + 12u, r4_3);
    store_dot(m0 + 40u, n0 + 0u, r5_0);
    store_dot(m0 + 40u, n0 + 4u, r5_1);
    store_dot(m0 + 40u, n0 + 8u, r5_2);
    store_dot(m0 + 40u, n0 + 12u, r5_3);
    store_dot(m0 + 48u, n0 + 0u, r6_0);
    store_dot(m0 + 48u, n0 + 4u, r6_1);
    store_dot(m0 + 48u, n0 + 8u, r6_2);
    store_dot(m0 + 48u, n0 + 12u, r6_3);
    store_dot(m0 + 56u, n0 + 0u, r7_0);
    store_dot(m0 + 56u, n0 + 4u, r7_1);
    store_dot(m0 + 56u, n0 + 8u, r7_2);
    store_dot(m0 + 56u, n0 + 12u, r7_3);
}

@compute @workgroup_size(8)
fn matmul_dot(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < (M + DOT_ROWS - 1u) / DOT_ROWS * DOT_COL_BLOCKS) {
        product_dot(blk, lane, array<vec4<f32>, 4>());
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
        product_dot(blk, lane, array<vec4<f32>, 4>(bias_dot(n0), bias_dot(n0 + 4u), bias_dot(n0 + 8u), bias_dot(n0 + 12u)));
    }
}
