// matmul_outer: C = A B where B runs along N in memory (B[k, n] at k * SBK + n, SBK % 4 == 0) and N % 4 == 0:
// a Linear's dx = dy W (B = W [o, i]) and dW = dy^T x (B = x [n, i]); A at m * SAM + k * SAK, any strides, any
// K (a last group of fewer than 4 steps reads zeros past K). Needs subgroups of >= 8 lanes (as matmul_sub)
// and 16-byte aligned bindings for B and C; the host prepends `const M, N, K, SAM, SAK, SBK: u32`, binding 3
// (`bias`: f32s, or vec4s for the sigmoid's s, 16-byte aligned) with `fn store_bias(j, v)` (a row sum) and
// `fn epilogue4(i, v)` (4 values of C at flat index i, as stored), A's binding 0 with `fn a_at(i) -> f32`,
// `fn a_quad(i4) -> vec4<f32>` and `const A_QUADS: u32` (how A is read, below), appends `fn product_block(blk,
// lane, rowsum) -> vec4<f32>` (product_outer, or product_outer_m32 with its file for A_ALONG_M), and checks
// the rest.
//
// A 16x64 block of C per subgroup of 8: lane l owns columns n0 + 4l .. 4l + 3 and n0 + 32 + 4l .. 4l + 35 (two
// vec4s) of all 16 rows. Per 4 steps of K each lane loads 8 vec4s of B (its 2 columns at 4 steps) and A's
// 16 rows x 4 steps are shared by subgroupBroadcast as one vec4 of 4 steps per row; each of its 32 vec4
// accumulators then takes 4 steps of K in one chain of fma. As in matmul_dot (linear_dot.wgsl), what this
// saves on lavapipe is accumulator updates: a mask blend and a spill per update, one per 4 steps instead of
// one per step as in matmul_sub. A is read
// - A_SCALARS: lane l loads steps k .. k + 3 of rows m0 + l and m0 + 8 + l as 8 scalars;
// - A_ALONG_K (SAK == 1, 4 dividing K and SAM, A bound as vec4s: a Linear's dx, A = dy): the same as 2 vec4s;
// - A_ALONG_M (SAM == 1, 4 dividing M and SAK, A bound as vec4s: a Linear's dW, A = dy^T): in 32-row blocks,
//   shaders/linear_outer_m32.wgsl.
// A storage load is a loop over the lanes on lavapipe, as dear for a vec4 as for a scalar: on one thread the
// vec4 forms took 14% off the MNIST MLP's first-layer dW and db ([100 x 60] x [60 x 784]) and 7-11% off its
// other backward products, alternated with the scalar form in one process (2026-12-04). For the same reason
// the epilogue takes a vec4: the sigmoid's s is one load per 4 values (4 scalar loads of s cost this product
// ~0.04-0.1 ms on the MLP's 60x100 dx).

// B comes from the host with `fn load_b(i4) -> vec4<f32>` (its vec4 i4 in row-major order): a storage array,
// or on CPU drivers the Linear's x mirrored into a texture, as `load_a` in shaders/linear_dot.wgsl. A too
// (`a_quad`, `a_at`): on CPU drivers dy's mirror.
@group(0) @binding(2) var<storage, read_write> c4: array<vec4<f32>>;

const A_SCALARS: u32 = 0u;
const A_ALONG_K: u32 = 1u;
const A_ALONG_M: u32 = 2u;
// 32-row blocks for A_ALONG_M (shaders/linear_outer_m32.wgsl), 16 otherwise.
const OUT_ROWS: u32 = 16u + 16u * u32(A_QUADS == A_ALONG_M);
const OUT_COLS: u32 = 64u;
const OUT_COL_BLOCKS: u32 = (N + OUT_COLS - 1u) / OUT_COLS;
const N4: u32 = N / 4u;
const SBK4: u32 = SBK / 4u;

fn outer_blocks() -> u32 {
    return (M + OUT_ROWS - 1u) / OUT_ROWS * OUT_COL_BLOCKS;
}

// Steps k .. k + 3 of row m of A (m clamped to M: a valid value that is never stored; steps past K: 0).
fn a_steps(m: u32, k: u32) -> vec4<f32> {
    let o = min(m, M - 1u) * SAM;
    if (A_QUADS == A_ALONG_K) {
        return a_quad((o + k) / 4u);
    }
    if (K % 4u == 0u) {
        let ok = o + k * SAK;
        return vec4<f32>(a_at(ok), a_at(ok + SAK), a_at(ok + 2u * SAK), a_at(ok + 3u * SAK));
    }
    let t = min(vec4<u32>(k, k + 1u, k + 2u, k + 3u), vec4<u32>(K - 1u)) * SAK + o;
    let v = vec4<f32>(a_at(t.x), a_at(t.y), a_at(t.z), a_at(t.w));
    return select(vec4<f32>(0.0), v, vec4<u32>(k, k + 1u, k + 2u, k + 3u) < vec4<u32>(K));
}

// A_ALONG_M: the row quad `quad` of A (4 rows) at step `step` (zeros past K).
fn a_quad_m(quad: u32, step: u32) -> vec4<f32> {
    let v = a_quad(min(step, K - 1u) * (SAK / 4u) + quad);
    return select(vec4<f32>(0.0), v, step < K);
}

// Column vec4 `col` of B's row k + t (0 past K, so that a short last group adds exact zeros).
fn b_load(k: u32, t: u32, col: u32) -> vec4<f32> {
    if (K % 4u == 0u) {
        return load_b((k + t) * SBK4 + col);
    }
    let v = load_b(min(k + t, K - 1u) * SBK4 + col);
    return select(vec4<f32>(0.0), v, k + t < K);
}

// acc + sum_t s[t] * v_t: 4 steps of K into one accumulator, one chain of fma.
fn steps4(acc: vec4<f32>, s: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(s.w), v3, fma(vec4<f32>(s.z), v2, fma(vec4<f32>(s.y), v1, fma(vec4<f32>(s.x), v0, acc))));
}

// Stores columns 4 * q4 .. 4 * q4 + 3 of row m through the epilogue, dropping what falls outside C.
fn store_outer(m: u32, q4: u32, v: vec4<f32>) {
    if (m >= M || q4 >= N4) {
        return;
    }
    let i = m * N + 4u * q4;
    c4[m * N4 + q4] = epilogue4(i, v);
}

// Block blk of C (16-row blocks: A_SCALARS, A_ALONG_K); returns the sums over K of rows m0 + lane and m0 + 8
// + lane of A in x and y when `rowsum` (in order, k ascending; zeros otherwise).
fn product_outer(blk: u32, lane: u32, rowsum: bool) -> vec4<f32> {
    let m0 = (blk / OUT_COL_BLOCKS) * OUT_ROWS;
    let q0 = (blk % OUT_COL_BLOCKS) * (OUT_COLS / 4u) + lane;
    // Column vec4s past N load a valid value that is never stored.
    let col0 = min(q0, N4 - 1u);
    let col1 = min(q0 + 8u, N4 - 1u);
    var r0_0 = vec4<f32>(0.0);
    var r0_1 = vec4<f32>(0.0);
    var r1_0 = vec4<f32>(0.0);
    var r1_1 = vec4<f32>(0.0);
    var r2_0 = vec4<f32>(0.0);
    var r2_1 = vec4<f32>(0.0);
    var r3_0 = vec4<f32>(0.0);
    var r3_1 = vec4<f32>(0.0);
    var r4_0 = vec4<f32>(0.0);
    var r4_1 = vec4<f32>(0.0);
    var r5_0 = vec4<f32>(0.0);
    var r5_1 = vec4<f32>(0.0);
    var r6_0 = vec4<f32>(0.0);
    var r6_1 = vec4<f32>(0.0);
    var r7_0 = vec4<f32>(0.0);
    var r7_1 = vec4<f32>(0.0);
    var r8_0 = vec4<f32>(0.0);
    var r8_1 = vec4<f32>(0.0);
    var r9_0 = vec4<f32>(0.0);
    var r9_1 = vec4<f32>(0.0);
    var r10_0 = vec4<f32>(0.0);
    var r10_1 = vec4<f32>(0.0);
    var r11_0 = vec4<f32>(0.0);
    var r11_1 = vec4<f32>(0.0);
    var r12_0 = vec4<f32>(0.0);
    var r12_1 = vec4<f32>(0.0);
    var r13_0 = vec4<f32>(0.0);
    var r13_1 = vec4<f32>(0.0);
    var r14_0 = vec4<f32>(0.0);
    var r14_1 = vec4<f32>(0.0);
    var r15_0 = vec4<f32>(0.0);
    var r15_1 = vec4<f32>(0.0);
    var rs = vec4<f32>(0.0);
    for (var k = 0u; k < K; k += 4u) {
        let p0 = b_load(k, 0u, col0);
        let p1 = b_load(k, 1u, col0);
        let p2 = b_load(k, 2u, col0);
        let p3 = b_load(k, 3u, col0);
        let q0_ = b_load(k, 0u, col1);
        let q1_ = b_load(k, 1u, col1);
        let q2_ = b_load(k, 2u, col1);
        let q3_ = b_load(k, 3u, col1);
        let lo = a_steps(m0 + lane, k);
        let hi = a_steps(m0 + 8u + lane, k);
        if (rowsum) {
            rs.x = rs.x + lo.x + lo.y + lo.z + lo.w;
            rs.y = rs.y + hi.x + hi.y + hi.z + hi.w;
        }
        let s0 = subgroupBroadcast(lo, 0u);
        r0_0 = steps4(r0_0, s0, p0, p1, p2, p3);
        r0_1 = steps4(r0_1, s0, q0_, q1_, q2_, q3_);
        let s1 = subgroupBroadcast(lo, 1u);
        r1_0 = steps4(r1_0, s1, p0, p1, p2, p3);
        r1_1 = steps4(r1_1, s1, q0_, q1_, q2_, q3_);
        let s2 = subgroupBroadcast(lo, 2u);
        r2_0 = steps4(r2_0, s2, p0, p1, p2, p3);
        r2_1 = steps4(r2_1, s2, q0_, q1_, q2_, q3_);
        let s3 = subgroupBroadcast(lo, 3u);
        r3_0 = steps4(r3_0, s3, p0, p1, p2, p3);
        r3_1 = steps4(r3_1, s3, q0_, q1_, q2_, q3_);
        let s4 = subgroupBroadcast(lo, 4u);
        r4_0 = steps4(r4_0, s4, p0, p1, p2, p3);
        r4_1 = steps4(r4_1, s4, q0_, q1_, q2_, q3_);
        let s5 = subgroupBroadcast(lo, 5u);
        r5_0 = steps4(r5_0, s5, p0, p1, p2, p3);
        r5_1 = steps4(r5_1, s5, q0_, q1_, q2_, q3_);
        let s6 = subgroupBroadcast(lo, 6u);
        r6_0 = steps4(r6_0, s6, p0, p1, p2, p3);
        r6_1 = steps4(r6_1, s6, q0_, q1_, q2_, q3_);
        let s7 = subgroupBroadcast(lo, 7u);
        r7_0 = steps4(r7_0, s7, p0, p1, p2, p3);
        r7_1 = steps4(r7_1, s7, q0_, q1_, q2_, q3_);
        let s8 = subgroupBroadcast(hi, 0u);
        r8_0 = steps4(r8_0, s8, p0, p1, p2, p3);
        r8_1 = steps4(r8_1, s8, q0_, q1_, q2_, q3_);
        let s9 = subgroupBroadcast(hi, 1u);
        r9_0 = steps4(r9_0, s9, p0, p1, p2, p3);
        r9_1 = steps4(r9_1, s9, q0_, q1_, q2_, q3_);
        let s10 = subgroupBroadcast(hi, 2u);
        r10_0 = steps4(r10_0, s10, p0, p1, p2, p3);
        r10_1 = steps4(r10_1, s10, q0_, q1_, q2_, q3_);
        let s11 = subgroupBroadcast(hi, 3u);
        r11_0 = steps4(r11_0, s11, p0, p1, p2, p3);
        r11_1 = steps4(r11_1, s11, q0_, q1_, q2_, q3_);
        let s12 = subgroupBroadcast(hi, 4u);
        r12_0 = steps4(r12_0, s12, p0, p1, p2, p3);
        r12_1 = steps4(r12_1, s12, q0_, q1_, q2_, q3_);
        let s13 = subgroupBroadcast(hi, 5u);
        r13_0 = steps4(r13_0, s13, p0, p1, p2, p3);
        r13_1 = steps4(r13_1, s13, q0_, q1_, q2_, q3_);
        let s14 = subgroupBroadcast(hi, 6u);
        r14_0 = steps4(r14_0, s14, p0, p1, p2, p3);
        r14_1 = steps4(r14_1, s14, q0_, q1_, q2_, q3_);
        let s15 = subgroupBroadcast(hi, 7u);
        r15_0 = steps4(r15_0, s15, p0, p1, p2, p3);
        r15_1 = steps4(r15_1, s15, q0_, q1_, q2_, q3_);
    }
    store_outer(m0 + 0u, q0, r0_0);
    store_outer(m0 + 0u, q0 + 8u, r0_1);
    store_outer(m0 + 1u, q0, r1_0);
    store_outer(m0 + 1u, q0 + 8u, r1_1);
    store_outer(m0 + 2u, q0, r2_0);
    store_outer(m0 + 2u, q0 + 8u, r2_1);
    store_outer(m0 + 3u, q0, r3_0);
    store_outer(m0 + 3u, q0 + 8u, r3_1);
    store_outer(m0 + 4u, q0, r4_0);
    store_outer(m0 + 4u, q0 + 8u, r4_1);
    store_outer(m0 + 5u, q0, r5_0);
    store_outer(m0 + 5u, q0 + 8u, r5_1);
    store_outer(m0 + 6u, q0, r6_0);
    store_outer(m0 + 6u, q0 + 8u, r6_1);
    store_outer(m0 + 7u, q0, r7_0);
    store_outer(m0 + 7u, q0 + 8u, r7_1);
    store_outer(m0 + 8u, q0, r8_0);
    store_outer(m0 + 8u, q0 + 8u, r8_1);
    store_outer(m0 + 9u, q0, r9_0);
    store_outer(m0 + 9u, q0 + 8u, r9_1);
    store_outer(m0 + 10u, q0, r10_0);
    store_outer(m0 + 10u, q0 + 8u, r10_1);
    store_outer(m0 + 11u, q0, r11_0);
    store_outer(m0 + 11u, q0 + 8u, r11_1);
    store_outer(m0 + 12u, q0, r12_0);
    store_outer(m0 + 12u, q0 + 8u, r12_1);
    store_outer(m0 + 13u, q0, r13_0);
    store_outer(m0 + 13u, q0 + 8u, r13_1);
    store_outer(m0 + 14u, q0, r14_0);
    store_outer(m0 + 14u, q0 + 8u, r14_1);
    store_outer(m0 + 15u, q0, r15_0);
    store_outer(m0 + 15u, q0 + 8u, r15_1);
    return rs;
}

fn outer_plain(blk: u32, lane: u32) {
    _ = product_block(blk, lane, false);
}

// The block, and the row sums of A into `bias` (a Linear's db for dW = dy^T x), each row's once: from the
// blocks of C's first column block.
fn outer_rowsum(blk: u32, lane: u32) {
    let rs = product_block(blk, lane, true);
    if (blk % OUT_COL_BLOCKS != 0u) {
        return;
    }
    let m0 = (blk / OUT_COL_BLOCKS) * OUT_ROWS;
    if (A_QUADS == A_ALONG_M) {
        // Lane l holds rows m0 + 4l .. + 3.
        for (var c = 0u; c < 4u; c++) {
            if (m0 + 4u * lane + c < M) {
                store_bias(m0 + 4u * lane + c, rs[c]);
            }
        }
        return;
    }
    if (m0 + lane < M) {
        store_bias(m0 + lane, rs.x);
    }
    if (m0 + 8u + lane < M) {
        store_bias(m0 + 8u + lane, rs.y);
    }
}

@compute @workgroup_size(8)
fn matmul_outer(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < outer_blocks()) {
        outer_plain(blk, lane);
    }
}

@compute @workgroup_size(8)
fn matmul_outer_rowsum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < outer_blocks()) {
        outer_rowsum(blk, lane);
    }
}
