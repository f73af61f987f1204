// matmul_dot's block of 64 rows x 16 columns (shaders/linear_dot.wgsl, which the host appends this to): lane
// l owns rows m0 + l + 8r (r = 0..7), 32 accumulators of 4 columns; per 4 steps of K it loads 2 rows of B
// (n0 + l, n0 + 8 + l) and its 8 rows of A. The block GPUs and the narrow layers get; CPU devices take
// shaders/linear_dot32.wgsl where a layer has more than 32 outputs.

const DOT_COLS: u32 = 16u;

// v_q, for the quad loop below.
fn dot_pick4(q: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> vec4<f32> {
    var v = v0;
    v = select(v, v1, q == 1u);
    v = select(v, v2, q == 2u);
    v = select(v, v3, q == 3u);
    return v;
}

// Block blk of C, its accumulators starting from init[q] for columns 4q .. 4q + 3 of the block (the bias,
// or zero: taken as values so that the entry point without bias binds no `bias`), handed column quad by
// column quad to the module's `dot_out` with the entry point's `mode`.
fn product_dot(blk: u32, lane: u32, init: array<vec4<f32>, DOT_QUADS>, mode: u32) {
    let m0 = (blk / DOT_COL_BLOCKS) * DOT_ROWS + lane;
    let n0 = dot_block_start(blk);
    let k4 = dot_k4();
    // Rows past M and columns past N load clamped, valid values that are never stored.
    let ar0 = min(m0 + 0u, M - 1u) * k4;
    let ar1 = min(m0 + 8u, M - 1u) * k4;
    let ar2 = min(m0 + 16u, M - 1u) * k4;
    let ar3 = min(m0 + 24u, M - 1u) * k4;
    let ar4 = min(m0 + 32u, M - 1u) * k4;
    let ar5 = min(m0 + 40u, M - 1u) * k4;
    let ar6 = min(m0 + 48u, M - 1u) * k4;
    let ar7 = min(m0 + 56u, M - 1u) * k4;
    let bn0 = min(n0 + lane, N - 1u) * k4;
    let bn1 = min(n0 + 8u + lane, N - 1u) * k4;
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
    for (var k = 0u; k < k4; k++) {
        let w0 = load_b(bn0 + k);
        let w1 = load_b(bn1 + k);
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
        let x0 = load_a(ar0 + k);
        r0_0 = dot_row(r0_0, x0, v0, v1, v2, v3);
        r0_1 = dot_row(r0_1, x0, v4, v5, v6, v7);
        r0_2 = dot_row(r0_2, x0, v8, v9, v10, v11);
        r0_3 = dot_row(r0_3, x0, v12, v13, v14, v15);
        let x1 = load_a(ar1 + k);
        r1_0 = dot_row(r1_0, x1, v0, v1, v2, v3);
        r1_1 = dot_row(r1_1, x1, v4, v5, v6, v7);
        r1_2 = dot_row(r1_2, x1, v8, v9, v10, v11);
        r1_3 = dot_row(r1_3, x1, v12, v13, v14, v15);
        let x2 = load_a(ar2 + k);
        r2_0 = dot_row(r2_0, x2, v0, v1, v2, v3);
        r2_1 = dot_row(r2_1, x2, v4, v5, v6, v7);
        r2_2 = dot_row(r2_2, x2, v8, v9, v10, v11);
        r2_3 = dot_row(r2_3, x2, v12, v13, v14, v15);
        let x3 = load_a(ar3 + k);
        r3_0 = dot_row(r3_0, x3, v0, v1, v2, v3);
        r3_1 = dot_row(r3_1, x3, v4, v5, v6, v7);
        r3_2 = dot_row(r3_2, x3, v8, v9, v10, v11);
        r3_3 = dot_row(r3_3, x3, v12, v13, v14, v15);
        let x4 = load_a(ar4 + k);
        r4_0 = dot_row(r4_0, x4, v0, v1, v2, v3);
        r4_1 = dot_row(r4_1, x4, v4, v5, v6, v7);
        r4_2 = dot_row(r4_2, x4, v8, v9, v10, v11);
        r4_3 = dot_row(r4_3, x4, v12, v13, v14, v15);
        let x5 = load_a(ar5 + k);
        r5_0 = dot_row(r5_0, x5, v0, v1, v2, v3);
        r5_1 = dot_row(r5_1, x5, v4, v5, v6, v7);
        r5_2 = dot_row(r5_2, x5, v8, v9, v10, v11);
        r5_3 = dot_row(r5_3, x5, v12, v13, v14, v15);
        let x6 = load_a(ar6 + k);
        r6_0 = dot_row(r6_0, x6, v0, v1, v2, v3);
        r6_1 = dot_row(r6_1, x6, v4, v5, v6, v7);
        r6_2 = dot_row(r6_2, x6, v8, v9, v10, v11);
        r6_3 = dot_row(r6_3, x6, v12, v13, v14, v15);
        let x7 = load_a(ar7 + k);
        r7_0 = dot_row(r7_0, x7, v0, v1, v2, v3);
        r7_1 = dot_row(r7_1, x7, v4, v5, v6, v7);
        r7_2 = dot_row(r7_2, x7, v8, v9, v10, v11);
        r7_3 = dot_row(r7_3, x7, v12, v13, v14, v15);
    }
    // One epilogue in a loop over the quads rather than 4 inlined copies (lavapipe builds a large
    // shader slowly), its rows picked out of the accumulators by selects: an array indexed by q would
    // be an indirect access.
    dot_prologue(mode, lane, n0);
    for (var q = 0u; q < DOT_QUADS; q++) {
        dot_out(mode, lane, m0, n0 + 4u * q, q, array<vec4<f32>, 8>(
            dot_pick4(q, r0_0, r0_1, r0_2, r0_3),
            dot_pick4(q, r1_0, r1_1, r1_2, r1_3),
            dot_pick4(q, r2_0, r2_1, r2_2, r2_3),
            dot_pick4(q, r3_0, r3_1, r3_2, r3_3),
            dot_pick4(q, r4_0, r4_1, r4_2, r4_3),
            dot_pick4(q, r5_0, r5_1, r5_2, r5_3),
            dot_pick4(q, r6_0, r6_1, r6_2, r6_3),
            dot_pick4(q, r7_0, r7_1, r7_2, r7_3)
        ));
    }
}
