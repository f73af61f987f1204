// matmul_dot's block of 64 rows x 32 columns (shaders/linear_dot.wgsl, which the host appends this to), for
// CPU devices: lane l owns rows m0 + l + 8r (r = 0..7), 64 accumulators of 4 columns; per 4 steps of K it
// loads 4 rows of B (n0 + l + 8j, j = 0..3) and its 8 rows of A, so each load of A feeds twice the
// arithmetic of the 16-column block. On lavapipe (examples/texture_probe.rs, PROBE_SHAPES) the first
// layer of the MNIST MLP, [60x784]x[784x100], took 0.56 ms in these blocks against 0.63 in 16-column
// ones on one thread, and 100 columns make 4 blocks instead of 7, 2 per worker on two cores instead of
// 4 and 3. Wider blocks spill more than they save (64x56: 0.63 ms).

const DOT_COLS: u32 = 32u;

// v_q, for the quad loop below.
fn dot_pick8(q: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32>) -> vec4<f32> {
    var v = v0;
    v = select(v, v1, q == 1u);
    v = select(v, v2, q == 2u);
    v = select(v, v3, q == 3u);
    v = select(v, v4, q == 4u);
    v = select(v, v5, q == 5u);
    v = select(v, v6, q == 6u);
    v = select(v, v7, q == 7u);
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
    let bn2 = min(n0 + 16u + lane, N - 1u) * k4;
    let bn3 = min(n0 + 24u + lane, N - 1u) * k4;
    var r0_0 = init[0];
    var r0_1 = init[1];
    var r0_2 = init[2];
    var r0_3 = init[3];
    var r0_4 = init[4];
    var r0_5 = init[5];
    var r0_6 = init[6];
    var r0_7 = init[7];
    var r1_0 = init[0];
    var r1_1 = init[1];
    var r1_2 = init[2];
    var r1_3 = init[3];
    var r1_4 = init[4];
    var r1_5 = init[5];
    var r1_6 = init[6];
    var r1_7 = init[7];
    var r2_0 = init[0];
    var r2_1 = init[1];
    var r2_2 = init[2];
    var r2_3 = init[3];
    var r2_4 = init[4];
    var r2_5 = init[5];
    var r2_6 = init[6];
    var r2_7 = init[7];
    var r3_0 = init[0];
    var r3_1 = init[1];
    var r3_2 = init[2];
    var r3_3 = init[3];
    var r3_4 = init[4];
    var r3_5 = init[5];
    var r3_6 = init[6];
    var r3_7 = init[7];
    var r4_0 = init[0];
    var r4_1 = init[1];
    var r4_2 = init[2];
    var r4_3 = init[3];
    var r4_4 = init[4];
    var r4_5 = init[5];
    var r4_6 = init[6];
    var r4_7 = init[7];
    var r5_0 = init[0];
    var r5_1 = init[1];
    var r5_2 = init[2];
    var r5_3 = init[3];
    var r5_4 = init[4];
    var r5_5 = init[5];
    var r5_6 = init[6];
    var r5_7 = init[7];
    var r6_0 = init[0];
    var r6_1 = init[1];
    var r6_2 = init[2];
    var r6_3 = init[3];
    var r6_4 = init[4];
    var r6_5 = init[5];
    var r6_6 = init[6];
    var r6_7 = init[7];
    var r7_0 = init[0];
    var r7_1 = init[1];
    var r7_2 = init[2];
    var r7_3 = init[3];
    var r7_4 = init[4];
    var r7_5 = init[5];
    var r7_6 = init[6];
    var r7_7 = init[7];
    for (var k = 0u; k < k4; k++) {
        let w0 = load_b(bn0 + k);
        let w1 = load_b(bn1 + k);
        let w2 = load_b(bn2 + k);
        let w3 = load_b(bn3 + k);
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
        let v16 = subgroupBroadcast(w2, 0u);
        let v17 = subgroupBroadcast(w2, 1u);
        let v18 = subgroupBroadcast(w2, 2u);
        let v19 = subgroupBroadcast(w2, 3u);
        let v20 = subgroupBroadcast(w2, 4u);
        let v21 = subgroupBroadcast(w2, 5u);
        let v22 = subgroupBroadcast(w2, 6u);
        let v23 = subgroupBroadcast(w2, 7u);
        let v24 = subgroupBroadcast(w3, 0u);
        let v25 = subgroupBroadcast(w3, 1u);
        let v26 = subgroupBroadcast(w3, 2u);
        let v27 = subgroupBroadcast(w3, 3u);
        let v28 = subgroupBroadcast(w3, 4u);
        let v29 = subgroupBroadcast(w3, 5u);
        let v30 = subgroupBroadcast(w3, 6u);
        let v31 = subgroupBroadcast(w3, 7u);
        let x0 = load_a(ar0 + k);
        r0_0 = dot_row(r0_0, x0, v0, v1, v2, v3);
        r0_1 = dot_row(r0_1, x0, v4, v5, v6, v7);
        r0_2 = dot_row(r0_2, x0, v8, v9, v10, v11);
        r0_3 = dot_row(r0_3, x0, v12, v13, v14, v15);
        r0_4 = dot_row(r0_4, x0, v16, v17, v18, v19);
        r0_5 = dot_row(r0_5, x0, v20, v21, v22, v23);
        r0_6 = dot_row(r0_6, x0, v24, v25, v26, v27);
        r0_7 = dot_row(r0_7, x0, v28, v29, v30, v31);
        let x1 = load_a(ar1 + k);
        r1_0 = dot_row(r1_0, x1, v0, v1, v2, v3);
        r1_1 = dot_row(r1_1, x1, v4, v5, v6, v7);
        r1_2 = dot_row(r1_2, x1, v8, v9, v10, v11);
        r1_3 = dot_row(r1_3, x1, v12, v13, v14, v15);
        r1_4 = dot_row(r1_4, x1, v16, v17, v18, v19);
        r1_5 = dot_row(r1_5, x1, v20, v21, v22, v23);
        r1_6 = dot_row(r1_6, x1, v24, v25, v26, v27);
        r1_7 = dot_row(r1_7, x1, v28, v29, v30, v31);
        let x2 = load_a(ar2 + k);
        r2_0 = dot_row(r2_0, x2, v0, v1, v2, v3);
        r2_1 = dot_row(r2_1, x2, v4, v5, v6, v7);
        r2_2 = dot_row(r2_2, x2, v8, v9, v10, v11);
        r2_3 = dot_row(r2_3, x2, v12, v13, v14, v15);
        r2_4 = dot_row(r2_4, x2, v16, v17, v18, v19);
        r2_5 = dot_row(r2_5, x2, v20, v21, v22, v23);
        r2_6 = dot_row(r2_6, x2, v24, v25, v26, v27);
        r2_7 = dot_row(r2_7, x2, v28, v29, v30, v31);
        let x3 = load_a(ar3 + k);
        r3_0 = dot_row(r3_0, x3, v0, v1, v2, v3);
        r3_1 = dot_row(r3_1, x3, v4, v5, v6, v7);
        r3_2 = dot_row(r3_2, x3, v8, v9, v10, v11);
        r3_3 = dot_row(r3_3, x3, v12, v13, v14, v15);
        r3_4 = dot_row(r3_4, x3, v16, v17, v18, v19);
        r3_5 = dot_row(r3_5, x3, v20, v21, v22, v23);
        r3_6 = dot_row(r3_6, x3, v24, v25, v26, v27);
        r3_7 = dot_row(r3_7, x3, v28, v29, v30, v31);
        let x4 = load_a(ar4 + k);
        r4_0 = dot_row(r4_0, x4, v0, v1, v2, v3);
        r4_1 = dot_row(r4_1, x4, v4, v5, v6, v7);
        r4_2 = dot_row(r4_2, x4, v8, v9, v10, v11);
        r4_3 = dot_row(r4_3, x4, v12, v13, v14, v15);
        r4_4 = dot_row(r4_4, x4, v16, v17, v18, v19);
        r4_5 = dot_row(r4_5, x4, v20, v21, v22, v23);
        r4_6 = dot_row(r4_6, x4, v24, v25, v26, v27);
        r4_7 = dot_row(r4_7, x4, v28, v29, v30, v31);
        let x5 = load_a(ar5 + k);
        r5_0 = dot_row(r5_0, x5, v0, v1, v2, v3);
        r5_1 = dot_row(r5_1, x5, v4, v5, v6, v7);
        r5_2 = dot_row(r5_2, x5, v8, v9, v10, v11);
        r5_3 = dot_row(r5_3, x5, v12, v13, v14, v15);
        r5_4 = dot_row(r5_4, x5, v16, v17, v18, v19);
        r5_5 = dot_row(r5_5, x5, v20, v21, v22, v23);
        r5_6 = dot_row(r5_6, x5, v24, v25, v26, v27);
        r5_7 = dot_row(r5_7, x5, v28, v29, v30, v31);
        let x6 = load_a(ar6 + k);
        r6_0 = dot_row(r6_0, x6, v0, v1, v2, v3);
        r6_1 = dot_row(r6_1, x6, v4, v5, v6, v7);
        r6_2 = dot_row(r6_2, x6, v8, v9, v10, v11);
        r6_3 = dot_row(r6_3, x6, v12, v13, v14, v15);
        r6_4 = dot_row(r6_4, x6, v16, v17, v18, v19);
        r6_5 = dot_row(r6_5, x6, v20, v21, v22, v23);
        r6_6 = dot_row(r6_6, x6, v24, v25, v26, v27);
        r6_7 = dot_row(r6_7, x6, v28, v29, v30, v31);
        let x7 = load_a(ar7 + k);
        r7_0 = dot_row(r7_0, x7, v0, v1, v2, v3);
        r7_1 = dot_row(r7_1, x7, v4, v5, v6, v7);
        r7_2 = dot_row(r7_2, x7, v8, v9, v10, v11);
        r7_3 = dot_row(r7_3, x7, v12, v13, v14, v15);
        r7_4 = dot_row(r7_4, x7, v16, v17, v18, v19);
        r7_5 = dot_row(r7_5, x7, v20, v21, v22, v23);
        r7_6 = dot_row(r7_6, x7, v24, v25, v26, v27);
        r7_7 = dot_row(r7_7, x7, v28, v29, v30, v31);
    }
    // One epilogue in a loop over the quads rather than 8 inlined copies (lavapipe builds a large
    // shader slowly), its rows picked out of the accumulators by selects: an array indexed by q would
    // be an indirect access.
    dot_prologue(mode, lane, n0);
    for (var q = 0u; q < DOT_QUADS; q++) {
        dot_out(mode, lane, m0, n0 + 4u * q, q, array<vec4<f32>, 8>(
            dot_pick8(q, r0_0, r0_1, r0_2, r0_3, r0_4, r0_5, r0_6, r0_7),
            dot_pick8(q, r1_0, r1_1, r1_2, r1_3, r1_4, r1_5, r1_6, r1_7),
            dot_pick8(q, r2_0, r2_1, r2_2, r2_3, r2_4, r2_5, r2_6, r2_7),
            dot_pick8(q, r3_0, r3_1, r3_2, r3_3, r3_4, r3_5, r3_6, r3_7),
            dot_pick8(q, r4_0, r4_1, r4_2, r4_3, r4_4, r4_5, r4_6, r4_7),
            dot_pick8(q, r5_0, r5_1, r5_2, r5_3, r5_4, r5_5, r5_6, r5_7),
            dot_pick8(q, r6_0, r6_1, r6_2, r6_3, r6_4, r6_5, r6_6, r6_7),
            dot_pick8(q, r7_0, r7_1, r7_2, r7_3, r7_4, r7_5, r7_6, r7_7)
        ));
    }
}
