// Linear layer kernels: y = x W^T + b and its backward, all through one strided matmul.
// The host prepends `const M, N, K, SAM, SAK, SBK, SBN: u32`: C[m, n] = sum_k A[m*SAM + k*SAK] * B[k*SBK + n*SBN],
// C row-major [M, N]. Forward: A = x, B = W^T; dx: A = dy, B = W; dW: A = dy^T, B = x. The strides make the
// transposes free, so one kernel serves all three.
//
// matmul_big, matmul_big_bias: a 16x16 output block per invocation in named registers, K walked in order.
// (A 4x4 block was ~3x slower on lavapipe, a workgroup-memory tiled one ~30x.) The fallback.
// matmul_sub, matmul_sub_bias (linear_subgroup.wgsl, appended by the host): a 32x64 block per subgroup of 8,
// A shared by subgroupBroadcast; what runs wherever the adapter's subgroups have at least 8 lanes.
// matmul_dot, matmul_dot_bias (linear_dot.wgsl, a module of its own): the forward only, where K % 4 == 0,
// a 64x16 block per subgroup of 8 taking 4 steps of K per accumulator update (vec4 loads along K).
// matmul_outer, matmul_outer_rowsum (linear_outer.wgsl, a module of its own): dx and dW where B runs along N
// and 4 divides N, K and B's row stride, 4 steps of K per accumulator update.
// matmul_pair (linear_pair.wgsl): a backward's dx and dW products in one dispatch.
// matmul_big_rowsum, matmul_sub_rowsum: the product, and also bias[m] = sum_k A[m, k] (written by the blocks of
// C's first column block). For dW = dy^T x the row sums of A = dy^T are db (summed over the batch in order,
// k ascending from 0), so the bias gradient costs no dispatch of its own (a column-sum kernel did: with the
// gap between dispatches ~0.1 ms a layer on lavapipe).

// The host also prepends `fn epilogue(i: u32, v: f32) -> f32`, applied to every value stored to C (flat
// index i): the identity, or for the dx of a Linear whose input is a sigmoid's output s (bound as `bias`)
// v * s[i] * (1 - s[i]), so the sigmoid's backward runs inside this product instead of as a dispatch.

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;

// Stores a row of 4 values of C from column n0, dropping what falls outside C.
fn store_row(m: u32, n0: u32, v: vec4<f32>) {
    if (m >= M) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (n0 + j < N) {
            c[m * N + n0 + j] = epilogue(m * N + n0 + j, v[j]);
        }
    }
}

// Stores the row sums of A for rows m .. m + 3 (the `*_rowsum` entry points), dropping rows past M.
fn store_rowsum(m: u32, v: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if (m + j < M) {
            bias[m + j] = v[j];
        }
    }
}

// ---- matmul_big, matmul_big_bias: a 16x16 block of C per invocation (what the training step runs). ----
// On lavapipe a storage load is issued lane by lane (vec4 loads too, per component), so what counts is
// loads per FMA: a 16x16 block loads 32 values per step of K for 256 FMAs, against 8 for 16 in a 4x4
// block. The accumulators are named variables: a local array indexed in a loop is kept in memory and
// accessed per lane, which loses most of the gain. The bias (or zero) is the accumulators' start value.
// Workgroups of 8, so that the few blocks of a small product still spread over the CPU's threads.
const BIG_M: u32 = (M + 15u) / 16u;
const BIG_N: u32 = (N + 15u) / 16u;

fn clamp_cols(n0: u32) -> vec4<u32> {
    return min(vec4<u32>(n0, n0 + 1u, n0 + 2u, n0 + 3u), vec4<u32>(N - 1u));
}

// Returns the row sums of A over the block's 16 rows when `rowsum` (zeros otherwise).
fn product_big(blk: u32, init: array<vec4<f32>, 4>, rowsum: bool) -> array<vec4<f32>, 4> {
    let m0 = (blk / BIG_N) * 16u;
    let n0 = (blk % BIG_N) * 16u;
    let ar0 = min(vec4<u32>(m0 + 0u, m0 + 1u, m0 + 2u, m0 + 3u), vec4<u32>(M - 1u)) * SAM;
    let ar1 = min(vec4<u32>(m0 + 4u, m0 + 5u, m0 + 6u, m0 + 7u), vec4<u32>(M - 1u)) * SAM;
    let ar2 = min(vec4<u32>(m0 + 8u, m0 + 9u, m0 + 10u, m0 + 11u), vec4<u32>(M - 1u)) * SAM;
    let ar3 = min(vec4<u32>(m0 + 12u, m0 + 13u, m0 + 14u, m0 + 15u), vec4<u32>(M - 1u)) * SAM;
    let bc0 = clamp_cols(n0 + 0u) * SBN;
    let bc1 = clamp_cols(n0 + 4u) * SBN;
    let bc2 = clamp_cols(n0 + 8u) * SBN;
    let bc3 = clamp_cols(n0 + 12u) * SBN;
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
    var r8_0 = init[0];
    var r8_1 = init[1];
    var r8_2 = init[2];
    var r8_3 = init[3];
    var r9_0 = init[0];
    var r9_1 = init[1];
    var r9_2 = init[2];
    var r9_3 = init[3];
    var r10_0 = init[0];
    var r10_1 = init[1];
    var r10_2 = init[2];
    var r10_3 = init[3];
    var r11_0 = init[0];
    var r11_1 = init[1];
    var r11_2 = init[2];
    var r11_3 = init[3];
    var r12_0 = init[0];
    var r12_1 = init[1];
    var r12_2 = init[2];
    var r12_3 = init[3];
    var r13_0 = init[0];
    var r13_1 = init[1];
    var r13_2 = init[2];
    var r13_3 = init[3];
    var r14_0 = init[0];
    var r14_1 = init[1];
    var r14_2 = init[2];
    var r14_3 = init[3];
    var r15_0 = init[0];
    var r15_1 = init[1];
    var r15_2 = init[2];
    var r15_3 = init[3];
    var rs0 = vec4<f32>(0.0);
    var rs1 = vec4<f32>(0.0);
    var rs2 = vec4<f32>(0.0);
    var rs3 = vec4<f32>(0.0);
    for (var k = 0u; k < K; k++) {
        let kb = k * SBK;
        let ka = k * SAK;
        let b0 = vec4<f32>(b[kb + bc0.x], b[kb + bc0.y], b[kb + bc0.z], b[kb + bc0.w]);
        let b1 = vec4<f32>(b[kb + bc1.x], b[kb + bc1.y], b[kb + bc1.z], b[kb + bc1.w]);
        let b2 = vec4<f32>(b[kb + bc2.x], b[kb + bc2.y], b[kb + bc2.z], b[kb + bc2.w]);
        let b3 = vec4<f32>(b[kb + bc3.x], b[kb + bc3.y], b[kb + bc3.z], b[kb + bc3.w]);
        let a0 = vec4<f32>(a[ar0.x + ka]);
        r0_0 = fma(a0, b0, r0_0);
        r0_1 = fma(a0, b1, r0_1);
        r0_2 = fma(a0, b2, r0_2);
        r0_3 = fma(a0, b3, r0_3);
        let a1 = vec4<f32>(a[ar0.y + ka]);
        r1_0 = fma(a1, b0, r1_0);
        r1_1 = fma(a1, b1, r1_1);
        r1_2 = fma(a1, b2, r1_2);
        r1_3 = fma(a1, b3, r1_3);
        let a2 = vec4<f32>(a[ar0.z + ka]);
        r2_0 = fma(a2, b0, r2_0);
        r2_1 = fma(a2, b1, r2_1);
        r2_2 = fma(a2, b2, r2_2);
        r2_3 = fma(a2, b3, r2_3);
        let a3 = vec4<f32>(a[ar0.w + ka]);
        r3_0 = fma(a3, b0, r3_0);
        r3_1 = fma(a3, b1, r3_1);
        r3_2 = fma(a3, b2, r3_2);
        r3_3 = fma(a3, b3, r3_3);
        let a4 = vec4<f32>(a[ar1.x + ka]);
        r4_0 = fma(a4, b0, r4_0);
        r4_1 = fma(a4, b1, r4_1);
        r4_2 = fma(a4, b2, r4_2);
        r4_3 = fma(a4, b3, r4_3);
        let a5 = vec4<f32>(a[ar1.y + ka]);
        r5_0 = fma(a5, b0, r5_0);
        r5_1 = fma(a5, b1, r5_1);
        r5_2 = fma(a5, b2, r5_2);
        r5_3 = fma(a5, b3, r5_3);
        let a6 = vec4<f32>(a[ar1.z + ka]);
        r6_0 = fma(a6, b0, r6_0);
        r6_1 = fma(a6, b1, r6_1);
        r6_2 = fma(a6, b2, r6_2);
        r6_3 = fma(a6, b3, r6_3);
        let a7 = vec4<f32>(a[ar1.w + ka]);
        r7_0 = fma(a7, b0, r7_0);
        r7_1 = fma(a7, b1, r7_1);
        r7_2 = fma(a7, b2, r7_2);
        r7_3 = fma(a7, b3, r7_3);
        let a8 = vec4<f32>(a[ar2.x + ka]);
        r8_0 = fma(a8, b0, r8_0);
        r8_1 = fma(a8, b1, r8_1);
        r8_2 = fma(a8, b2, r8_2);
        r8_3 = fma(a8, b3, r8_3);
        let a9 = vec4<f32>(a[ar2.y + ka]);
        r9_0 = fma(a9, b0, r9_0);
        r9_1 = fma(a9, b1, r9_1);
        r9_2 = fma(a9, b2, r9_2);
        r9_3 = fma(a9, b3, r9_3);
        let a10 = vec4<f32>(a[ar2.z + ka]);
        r10_0 = fma(a10, b0, r10_0);
        r10_1 = fma(a10, b1, r10_1);
        r10_2 = fma(a10, b2, r10_2);
        r10_3 = fma(a10, b3, r10_3);
        let a11 = vec4<f32>(a[ar2.w + ka]);
        r11_0 = fma(a11, b0, r11_0);
        r11_1 = fma(a11, b1, r11_1);
        r11_2 = fma(a11, b2, r11_2);
        r11_3 = fma(a11, b3, r11_3);
        let a12 = vec4<f32>(a[ar3.x + ka]);
        r12_0 = fma(a12, b0, r12_0);
        r12_1 = fma(a12, b1, r12_1);
        r12_2 = fma(a12, b2, r12_2);
        r12_3 = fma(a12, b3, r12_3);
        let a13 = vec4<f32>(a[ar3.y + ka]);
        r13_0 = fma(a13, b0, r13_0);
        r13_1 = fma(a13, b1, r13_1);
        r13_2 = fma(a13, b2, r13_2);
        r13_3 = fma(a13, b3, r13_3);
        let a14 = vec4<f32>(a[ar3.z + ka]);
        r14_0 = fma(a14, b0, r14_0);
        r14_1 = fma(a14, b1, r14_1);
        r14_2 = fma(a14, b2, r14_2);
        r14_3 = fma(a14, b3, r14_3);
        let a15 = vec4<f32>(a[ar3.w + ka]);
        r15_0 = fma(a15, b0, r15_0);
        r15_1 = fma(a15, b1, r15_1);
        r15_2 = fma(a15, b2, r15_2);
        r15_3 = fma(a15, b3, r15_3);
        if (rowsum) {
            rs0 += vec4<f32>(a0.x, a1.x, a2.x, a3.x);
            rs1 += vec4<f32>(a4.x, a5.x, a6.x, a7.x);
            rs2 += vec4<f32>(a8.x, a9.x, a10.x, a11.x);
            rs3 += vec4<f32>(a12.x, a13.x, a14.x, a15.x);
        }
    }
    store_row(m0 + 0u, n0 + 0u, r0_0);
    store_row(m0 + 0u, n0 + 4u, r0_1);
    store_row(m0 + 0u, n0 + 8u, r0_2);
    store_row(m0 + 0u, n0 + 12u, r0_3);
    store_row(m0 + 1u, n0 + 0u, r1_0);
    store_row(m0 + 1u, n0 + 4u, r1_1);
    store_row(m0 + 1u, n0 + 8u, r1_2);
    store_row(m0 + 1u, n0 + 12u, r1_3);
    store_row(m0 + 2u, n0 + 0u, r2_0);
    store_row(m0 + 2u, n0 + 4u, r2_1);
    store_row(m0 + 2u, n0 + 8u, r2_2);
    store_row(m0 + 2u, n0 + 12u, r2_3);
    store_row(m0 + 3u, n0 + 0u, r3_0);
    store_row(m0 + 3u, n0 + 4u, r3_1);
    store_row(m0 + 3u, n0 + 8u, r3_2);
    store_row(m0 + 3u, n0 + 12u, r3_3);
    store_row(m0 + 4u, n0 + 0u, r4_0);
    store_row(m0 + 4u, n0 + 4u, r4_1);
    store_row(m0 + 4u, n0 + 8u, r4_2);
    store_row(m0 + 4u, n0 + 12u, r4_3);
    store_row(m0 + 5u, n0 + 0u, r5_0);
    store_row(m0 + 5u, n0 + 4u, r5_1);
    store_row(m0 + 5u, n0 + 8u, r5_2);
    store_row(m0 + 5u, n0 + 12u, r5_3);
    store_row(m0 + 6u, n0 + 0u, r6_0);
    store_row(m0 + 6u, n0 + 4u, r6_1);
    store_row(m0 + 6u, n0 + 8u, r6_2);
    store_row(m0 + 6u, n0 + 12u, r6_3);
    store_row(m0 + 7u, n0 + 0u, r7_0);
    store_row(m0 + 7u, n0 + 4u, r7_1);
    store_row(m0 + 7u, n0 + 8u, r7_2);
    store_row(m0 + 7u, n0 + 12u, r7_3);
    store_row(m0 + 8u, n0 + 0u, r8_0);
    store_row(m0 + 8u, n0 + 4u, r8_1);
    store_row(m0 + 8u, n0 + 8u, r8_2);
    store_row(m0 + 8u, n0 + 12u, r8_3);
    store_row(m0 + 9u, n0 + 0u, r9_0);
    store_row(m0 + 9u, n0 + 4u, r9_1);
    store_row(m0 + 9u, n0 + 8u, r9_2);
    store_row(m0 + 9u, n0 + 12u, r9_3);
    store_row(m0 + 10u, n0 + 0u, r10_0);
    store_row(m0 + 10u, n0 + 4u, r10_1);
    store_row(m0 + 10u, n0 + 8u, r10_2);
    store_row(m0 + 10u, n0 + 12u, r10_3);
    store_row(m0 + 11u, n0 + 0u, r11_0);
    store_row(m0 + 11u, n0 + 4u, r11_1);
    store_row(m0 + 11u, n0 + 8u, r11_2);
    store_row(m0 + 11u, n0 + 12u, r11_3);
    store_row(m0 + 12u, n0 + 0u, r12_0);
    store_row(m0 + 12u, n0 + 4u, r12_1);
    store_row(m0 + 12u, n0 + 8u, r12_2);
    store_row(m0 + 12u, n0 + 12u, r12_3);
    store_row(m0 + 13u, n0 + 0u, r13_0);
    store_row(m0 + 13u, n0 + 4u, r13_1);
    store_row(m0 + 13u, n0 + 8u, r13_2);
    store_row(m0 + 13u, n0 + 12u, r13_3);
    store_row(m0 + 14u, n0 + 0u, r14_0);
    store_row(m0 + 14u, n0 + 4u, r14_1);
    store_row(m0 + 14u, n0 + 8u, r14_2);
    store_row(m0 + 14u, n0 + 12u, r14_3);
    store_row(m0 + 15u, n0 + 0u, r15_0);
    store_row(m0 + 15u, n0 + 4u, r15_1);
    store_row(m0 + 15u, n0 + 8u, r15_2);
    store_row(m0 + 15u, n0 + 12u, r15_3);
    return array<vec4<f32>, 4>(rs0, rs1, rs2, rs3);
}

@compute @workgroup_size(8)
fn matmul_big(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = gid.x + gid.y * nwg.x * 8u;
    if (blk >= BIG_M * BIG_N) {
        return;
    }
    _ = product_big(blk, array<vec4<f32>, 4>(), false);
}

@compute @workgroup_size(8)
fn matmul_big_rowsum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = gid.x + gid.y * nwg.x * 8u;
    if (blk >= BIG_M * BIG_N) {
        return;
    }
    let rs = product_big(blk, array<vec4<f32>, 4>(), true);
    // Each row's sum once: from the blocks of C's first column block.
    if (blk % BIG_N == 0u) {
        let m0 = (blk / BIG_N) * 16u;
        store_rowsum(m0, rs[0]);
        store_rowsum(m0 + 4u, rs[1]);
        store_rowsum(m0 + 8u, rs[2]);
        store_rowsum(m0 + 12u, rs[3]);
    }
}

@compute @workgroup_size(8)
fn matmul_big_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = gid.x + gid.y * nwg.x * 8u;
    if (blk >= BIG_M * BIG_N) {
        return;
    }
    let n0 = (blk % BIG_N) * 16u;
    var init: array<vec4<f32>, 4>;
    let c0 = clamp_cols(n0 + 0u);
    init[0] = vec4<f32>(bias[c0.x], bias[c0.y], bias[c0.z], bias[c0.w]);
    let c1 = clamp_cols(n0 + 4u);
    init[1] = vec4<f32>(bias[c1.x], bias[c1.y], bias[c1.z], bias[c1.w]);
    let c2 = clamp_cols(n0 + 8u);
    init[2] = vec4<f32>(bias[c2.x], bias[c2.y], bias[c2.z], bias[c2.w]);
    let c3 = clamp_cols(n0 + 12u);
    init[3] = vec4<f32>(bias[c3.x], bias[c3.y], bias[c3.z], bias[c3.w]);
    _ = product_big(blk, init, false);
}

