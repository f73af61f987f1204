// The subgroup matmul of linear.wgsl, compiled only for adapters with subgroups (appended to linear.wgsl's
// source, whose bindings and constants it uses): a module that mentions subgroupBroadcast fails validation
// on a device without the SUBGROUP feature, even when another entry point is asked for.

// ---- matmul_sub, matmul_sub_bias: a 32x64 block of C per subgroup of 8 (adapters with subgroups of >= 8). ----
// Lane l owns the 8 columns n0 + l + 8j (j = 0..7, two vec4 accumulators per row) of all 32 rows. Per step of
// K each lane loads its 8 values of B and 4 values of A (rows m0 + l + 8i), and the 32 values of A every lane
// needs are shared by subgroupBroadcast, a register move: 12 loads per 256 FMAs per lane, against 32 per 256
// in matmul_big, and loads are what lavapipe pays for (issued lane by lane). Measured on lavapipe for the MNIST
// MLP's products: 1.6-2x less CPU time than matmul_big. Adjacent lanes take adjacent columns, which also
// coalesces on GPUs. A 64-row block was another ~25% faster but took 3-7 s to compile per pipeline.
// The workgroup is one subgroup: the host picks this kernel only when the adapter's smallest subgroup has
// at least 8 lanes, so broadcasts from lanes 0..7 always reach the whole block.
const SUB_ROWS: u32 = 32u;
const SUB_COLS: u32 = 64u;
const SUB_COL_BLOCKS: u32 = (N + SUB_COLS - 1u) / SUB_COLS;

// Stores row m of the lane's columns n, n + 8, n + 16, n + 24 (v) dropping what falls outside C.
fn store_sub(m: u32, n: u32, v: vec4<f32>) {
    if (m >= M) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (n + 8u * j < N) {
            c[m * N + n + 8u * j] = epilogue(m * N + n + 8u * j, v[j]);
        }
    }
}

// The lane's 8 columns of B at step k (clamped columns past N load a valid value that is never stored).
fn b_sub(k: u32, bc: vec4<u32>) -> vec4<f32> {
    let o = k * SBK;
    return vec4<f32>(b[o + bc.x], b[o + bc.y], b[o + bc.z], b[o + bc.w]);
}

// Returns the row sums of A over the lane's rows m0 + lane + 8j when `rowsum` (zeros otherwise).
fn product_sub(blk: u32, lane: u32, init0: vec4<f32>, init1: vec4<f32>, rowsum: bool) -> vec4<f32> {
    let m0 = (blk / SUB_COL_BLOCKS) * SUB_ROWS;
    let n0 = (blk % SUB_COL_BLOCKS) * SUB_COLS + lane;
    let bc0 = min(vec4<u32>(n0, n0 + 8u, n0 + 16u, n0 + 24u), vec4<u32>(N - 1u)) * SBN;
    let bc1 = min(vec4<u32>(n0 + 32u, n0 + 40u, n0 + 48u, n0 + 56u), vec4<u32>(N - 1u)) * SBN;
    let ar = min(vec4<u32>(m0 + lane, m0 + 8u + lane, m0 + 16u + lane, m0 + 24u + lane), vec4<u32>(M - 1u)) * SAM;
    var r0_0 = init0;
    var r0_1 = init1;
    var r1_0 = init0;
    var r1_1 = init1;
    var r2_0 = init0;
    var r2_1 = init1;
    var r3_0 = init0;
    var r3_1 = init1;
    var r4_0 = init0;
    var r4_1 = init1;
    var r5_0 = init0;
    var r5_1 = init1;
    var r6_0 = init0;
    var r6_1 = init1;
    var r7_0 = init0;
    var r7_1 = init1;
    var r8_0 = init0;
    var r8_1 = init1;
    var r9_0 = init0;
    var r9_1 = init1;
    var r10_0 = init0;
    var r10_1 = init1;
    var r11_0 = init0;
    var r11_1 = init1;
    var r12_0 = init0;
    var r12_1 = init1;
    var r13_0 = init0;
    var r13_1 = init1;
    var r14_0 = init0;
    var r14_1 = init1;
    var r15_0 = init0;
    var r15_1 = init1;
    var r16_0 = init0;
    var r16_1 = init1;
    var r17_0 = init0;
    var r17_1 = init1;
    var r18_0 = init0;
    var r18_1 = init1;
    var r19_0 = init0;
    var r19_1 = init1;
    var r20_0 = init0;
    var r20_1 = init1;
    var r21_0 = init0;
    var r21_1 = init1;
    var r22_0 = init0;
    var r22_1 = init1;
    var r23_0 = init0;
    var r23_1 = init1;
    var r24_0 = init0;
    var r24_1 = init1;
    var r25_0 = init0;
    var r25_1 = init1;
    var r26_0 = init0;
    var r26_1 = init1;
    var r27_0 = init0;
    var r27_1 = init1;
    var r28_0 = init0;
    var r28_1 = init1;
    var r29_0 = init0;
    var r29_1 = init1;
    var r30_0 = init0;
    var r30_1 = init1;
    var r31_0 = init0;
    var r31_1 = init1;
    var rs = vec4<f32>(0.0);
    for (var k = 0u; k < K; k++) {
        let b0 = b_sub(k, bc0);
        let b1 = b_sub(k, bc1);
        let ak = k * SAK;
        let a_lane = vec4<f32>(a[ar.x + ak], a[ar.y + ak], a[ar.z + ak], a[ar.w + ak]);
        // rows m0 + 0 .. m0 + 7: lane i's value of a_lane.x
        let s0 = subgroupBroadcast(a_lane.x, 0u);
        r0_0 += s0 * b0;
        r0_1 += s0 * b1;
        let s1 = subgroupBroadcast(a_lane.x, 1u);
        r1_0 += s1 * b0;
        r1_1 += s1 * b1;
        let s2 = subgroupBroadcast(a_lane.x, 2u);
        r2_0 += s2 * b0;
        r2_1 += s2 * b1;
        let s3 = subgroupBroadcast(a_lane.x, 3u);
        r3_0 += s3 * b0;
        r3_1 += s3 * b1;
        let s4 = subgroupBroadcast(a_lane.x, 4u);
        r4_0 += s4 * b0;
        r4_1 += s4 * b1;
        let s5 = subgroupBroadcast(a_lane.x, 5u);
        r5_0 += s5 * b0;
        r5_1 += s5 * b1;
        let s6 = subgroupBroadcast(a_lane.x, 6u);
        r6_0 += s6 * b0;
        r6_1 += s6 * b1;
        let s7 = subgroupBroadcast(a_lane.x, 7u);
        r7_0 += s7 * b0;
        r7_1 += s7 * b1;
        // rows m0 + 8 .. m0 + 15: lane i's value of a_lane.y
        let s8 = subgroupBroadcast(a_lane.y, 0u);
        r8_0 += s8 * b0;
        r8_1 += s8 * b1;
        let s9 = subgroupBroadcast(a_lane.y, 1u);
        r9_0 += s9 * b0;
        r9_1 += s9 * b1;
        let s10 = subgroupBroadcast(a_lane.y, 2u);
        r10_0 += s10 * b0;
        r10_1 += s10 * b1;
        let s11 = subgroupBroadcast(a_lane.y, 3u);
        r11_0 += s11 * b0;
        r11_1 += s11 * b1;
        let s12 = subgroupBroadcast(a_lane.y, 4u);
        r12_0 += s12 * b0;
        r12_1 += s12 * b1;
        let s13 = subgroupBroadcast(a_lane.y, 5u);
        r13_0 += s13 * b0;
        r13_1 += s13 * b1;
        let s14 = subgroupBroadcast(a_lane.y, 6u);
        r14_0 += s14 * b0;
        r14_1 += s14 * b1;
        let s15 = subgroupBroadcast(a_lane.y, 7u);
        r15_0 += s15 * b0;
        r15_1 += s15 * b1;
        // rows m0 + 16 .. m0 + 23: lane i's value of a_lane.z
        let s16 = subgroupBroadcast(a_lane.z, 0u);
        r16_0 += s16 * b0;
        r16_1 += s16 * b1;
        let s17 = subgroupBroadcast(a_lane.z, 1u);
        r17_0 += s17 * b0;
        r17_1 += s17 * b1;
        let s18 = subgroupBroadcast(a_lane.z, 2u);
        r18_0 += s18 * b0;
        r18_1 += s18 * b1;
        let s19 = subgroupBroadcast(a_lane.z, 3u);
        r19_0 += s19 * b0;
        r19_1 += s19 * b1;
        let s20 = subgroupBroadcast(a_lane.z, 4u);
        r20_0 += s20 * b0;
        r20_1 += s20 * b1;
        let s21 = subgroupBroadcast(a_lane.z, 5u);
        r21_0 += s21 * b0;
        r21_1 += s21 * b1;
        let s22 = subgroupBroadcast(a_lane.z, 6u);
        r22_0 += s22 * b0;
        r22_1 += s22 * b1;
        let s23 = subgroupBroadcast(a_lane.z, 7u);
        r23_0 += s23 * b0;
        r23_1 += s23 * b1;
        // rows m0 + 24 .. m0 + 31: lane i's value of a_lane.w
        let s24 = subgroupBroadcast(a_lane.w, 0u);
        r24_0 += s24 * b0;
        r24_1 += s24 * b1;
        let s25 = subgroupBroadcast(a_lane.w, 1u);
        r25_0 += s25 * b0;
        r25_1 += s25 * b1;
        let s26 = subgroupBroadcast(a_lane.w, 2u);
        r26_0 += s26 * b0;
        r26_1 += s26 * b1;
        let s27 = subgroupBroadcast(a_lane.w, 3u);
        r27_0 += s27 * b0;
        r27_1 += s27 * b1;
        let s28 = subgroupBroadcast(a_lane.w, 4u);
        r28_0 += s28 * b0;
        r28_1 += s28 * b1;
        let s29 = subgroupBroadcast(a_lane.w, 5u);
        r29_0 += s29 * b0;
        r29_1 += s29 * b1;
        let s30 = subgroupBroadcast(a_lane.w, 6u);
        r30_0 += s30 * b0;
        r30_1 += s30 * b1;
        let s31 = subgroupBroadcast(a_lane.w, 7u);
        r31_0 += s31 * b0;
        r31_1 += s31 * b1;
        if (rowsum) {
            rs += a_lane;
        }
    }
    store_sub(m0 + 0u, n0, r0_0);
    store_sub(m0 + 0u, n0 + 32u, r0_1);
    store_sub(m0 + 1u, n0, r1_0);
    store_sub(m0 + 1u, n0 + 32u, r1_1);
    store_sub(m0 + 2u, n0, r2_0);
    store_sub(m0 + 2u, n0 + 32u, r2_1);
    store_sub(m0 + 3u, n0, r3_0);
    store_sub(m0 + 3u, n0 + 32u, r3_1);
    store_sub(m0 + 4u, n0, r4_0);
    store_sub(m0 + 4u, n0 + 32u, r4_1);
    store_sub(m0 + 5u, n0, r5_0);
    store_sub(m0 + 5u, n0 + 32u, r5_1);
    store_sub(m0 + 6u, n0, r6_0);
    store_sub(m0 + 6u, n0 + 32u, r6_1);
    store_sub(m0 + 7u, n0, r7_0);
    store_sub(m0 + 7u, n0 + 32u, r7_1);
    store_sub(m0 + 8u, n0, r8_0);
    store_sub(m0 + 8u, n0 + 32u, r8_1);
    store_sub(m0 + 9u, n0, r9_0);
    store_sub(m0 + 9u, n0 + 32u, r9_1);
    store_sub(m0 + 10u, n0, r10_0);
    store_sub(m0 + 10u, n0 + 32u, r10_1);
    store_sub(m0 + 11u, n0, r11_0);
    store_sub(m0 + 11u, n0 + 32u, r11_1);
    store_sub(m0 + 12u, n0, r12_0);
    store_sub(m0 + 12u, n0 + 32u, r12_1);
    store_sub(m0 + 13u, n0, r13_0);
    store_sub(m0 + 13u, n0 + 32u, r13_1);
    store_sub(m0 + 14u, n0, r14_0);
    store_sub(m0 + 14u, n0 + 32u, r14_1);
    store_sub(m0 + 15u, n0, r15_0);
    store_sub(m0 + 15u, n0 + 32u, r15_1);
    store_sub(m0 + 16u, n0, r16_0);
    store_sub(m0 + 16u, n0 + 32u, r16_1);
    store_sub(m0 + 17u, n0, r17_0);
    store_sub(m0 + 17u, n0 + 32u, r17_1);
    store_sub(m0 + 18u, n0, r18_0);
    store_sub(m0 + 18u, n0 + 32u, r18_1);
    store_sub(m0 + 19u, n0, r19_0);
    store_sub(m0 + 19u, n0 + 32u, r19_1);
    store_sub(m0 + 20u, n0, r20_0);
    store_sub(m0 + 20u, n0 + 32u, r20_1);
    store_sub(m0 + 21u, n0, r21_0);
    store_sub(m0 + 21u, n0 + 32u, r21_1);
    store_sub(m0 + 22u, n0, r22_0);
    store_sub(m0 + 22u, n0 + 32u, r22_1);
    store_sub(m0 + 23u, n0, r23_0);
    store_sub(m0 + 23u, n0 + 32u, r23_1);
    store_sub(m0 + 24u, n0, r24_0);
    store_sub(m0 + 24u, n0 + 32u, r24_1);
    store_sub(m0 + 25u, n0, r25_0);
    store_sub(m0 + 25u, n0 + 32u, r25_1);
    store_sub(m0 + 26u, n0, r26_0);
    store_sub(m0 + 26u, n0 + 32u, r26_1);
    store_sub(m0 + 27u, n0, r27_0);
    store_sub(m0 + 27u, n0 + 32u, r27_1);
    store_sub(m0 + 28u, n0, r28_0);
    store_sub(m0 + 28u, n0 + 32u, r28_1);
    store_sub(m0 + 29u, n0, r29_0);
    store_sub(m0 + 29u, n0 + 32u, r29_1);
    store_sub(m0 + 30u, n0, r30_0);
    store_sub(m0 + 30u, n0 + 32u, r30_1);
    store_sub(m0 + 31u, n0, r31_0);
    store_sub(m0 + 31u, n0 + 32u, r31_1);
    return rs;
}

fn sub_block(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The number of 32x64 blocks of C.
fn sub_blocks() -> u32 {
    return (M + SUB_ROWS - 1u) / SUB_ROWS * SUB_COL_BLOCKS;
}

// Block blk of C = A B.
fn sub_plain(blk: u32, lane: u32) {
    _ = product_sub(blk, lane, vec4<f32>(0.0), vec4<f32>(0.0), false);
}

// Block blk of C = A B, and the row sums of A into `bias`, each row's once: from the blocks of C's first
// column block.
fn sub_rowsum(blk: u32, lane: u32) {
    let rs = product_sub(blk, lane, vec4<f32>(0.0), vec4<f32>(0.0), true);
    if (blk % SUB_COL_BLOCKS == 0u) {
        let m0 = (blk / SUB_COL_BLOCKS) * SUB_ROWS;
        for (var j = 0u; j < 4u; j++) {
            let m = m0 + lane + 8u * j;
            if (m < M) {
                bias[m] = rs[j];
            }
        }
    }
}

@compute @workgroup_size(8)
fn matmul_sub(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = sub_block(wid, nwg);
    if (blk < sub_blocks()) {
        sub_plain(blk, lane);
    }
}

@compute @workgroup_size(8)
fn matmul_sub_rowsum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = sub_block(wid, nwg);
    if (blk < sub_blocks()) {
        sub_rowsum(blk, lane);
    }
}

@compute @workgroup_size(8)
fn matmul_sub_bias(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = sub_block(wid, nwg);
    if (blk >= sub_blocks()) {
        return;
    }
    let n0 = (blk % SUB_COL_BLOCKS) * SUB_COLS + lane;
    let c0 = min(vec4<u32>(n0, n0 + 8u, n0 + 16u, n0 + 24u), vec4<u32>(N - 1u));
    let c1 = min(vec4<u32>(n0 + 32u, n0 + 40u, n0 + 48u, n0 + 56u), vec4<u32>(N - 1u));
    let init0 = vec4<f32>(bias[c0.x], bias[c0.y], bias[c0.z], bias[c0.w]);
    let init1 = vec4<f32>(bias[c1.x], bias[c1.y], bias[c1.z], bias[c1.w]);
    _ = product_sub(blk, lane, init0, init1, false);
}
