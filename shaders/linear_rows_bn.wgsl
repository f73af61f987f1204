// rows_bn: the backward of `BatchNorm -> Sigmoid -> Linear` from the Linear's output gradient, for a batch
// of M <= 64 rows, as the first product of a `matmul_pair` (the Linear's dW is the second):
//   dz = (dy W) * s * (1 - s)       the gradient at the BatchNorm's output (s: the sigmoid's output)
//   dx = BatchNorm's backward of dz  with batch statistics, as batchnorm_common.wgsl's
//                                    finalize_backward_channel computes it; dgamma and dbeta too.
// dy is [M, K] (the Linear's output gradient), W [K, N] (its weight), s, z (the BatchNorm's input) and dx
// [M, N]. One block holds every row of its 16 columns, so the column sums the BatchNorm's backward needs
// are subgroupAdds over its 8 lanes, and dz never leaves the registers: the BatchNorm's backward costs no
// dispatch of its own (on lavapipe a dispatch costs a worker wake-up, ~50 us, besides its work).
//
// A 64x16 block of dx per subgroup of 8, as matmul_dot (linear_dot.wgsl): lane l owns rows l + 8r (r =
// 0..7) and all 16 columns. Per 4 steps of K each lane loads 2 of the 16 vec4s of W (4 rows of K by 4
// column vec4s) and the subgroup shares them by subgroupBroadcast; each lane loads 4 steps of its 8 rows
// of dy; each of its 32 vec4 accumulators takes the 4 steps in one chain of fma.
//
// The host prepends `const M, N, K: u32` (N % 4 == 0), `fn dy_steps_of(lane, r, k) -> vec4<f32>` (steps k ..
// k + 3 of dy's row lane + 8r, zeros past K: from dy's binding 0, vec4 loads where 4 divides K, or from the
// registers the head step's loss left them in), and `fn load_w(i)`,
// `load_s(i)` and `load_z(i) -> vec4<f32>` (vec4 i of W, s and z; bindings 1, 3 and 8), each from storage
// or from a texture mirror (CPU devices: W from the parameter arena's), and checks the alignments.

@group(0) @binding(2) var<storage, read_write> dx4: array<vec4<f32>>;
// The BatchNorm's saved mean [N] then invstd [N], gamma, and its gradients (its input z is binding 8).
@group(0) @binding(9) var<storage, read_write> saved4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> gamma4: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> dgamma4: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dbeta4: array<vec4<f32>>;

const N4: u32 = N / 4u;
const RB_COL_BLOCKS: u32 = (N + 15u) / 16u;

fn rows_bn_blocks() -> u32 {
    return RB_COL_BLOCKS;
}

// Row k + t of W, column vec4 j (clamped: rows past K meet zeros of dy, columns past N are never stored).
fn rb_w(k: u32, t: u32, j: u32) -> vec4<f32> {
    return load_w(min(k + t, K - 1u) * N4 + min(j, N4 - 1u));
}

// acc + sum_t a[t] * v_t: 4 steps of K into one accumulator, one chain of fma.
fn rb_steps(acc: vec4<f32>, a: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.w), v3, fma(vec4<f32>(a.z), v2, fma(vec4<f32>(a.y), v1, fma(vec4<f32>(a.x), v0, acc))));
}

fn rb_live(m: u32, v: vec4<f32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), v, m < M);
}

// Column vec4 j of rows lane + 8r: dz from the accumulators, then the BatchNorm's backward. mean,
// invstd and gamma are the column's (`rows_bn_block` loads the block's at once).
fn rb_finish(j: u32, lane: u32, acc: array<vec4<f32>, 8>, mean: vec4<f32>, invstd: vec4<f32>, gamma: vec4<f32>) {
    var dz: array<vec4<f32>, 8>;
    var xm: array<vec4<f32>, 8>;
    var sum_dy = vec4<f32>(0.0);
    var sum_dyx = vec4<f32>(0.0);
    var sum_x = vec4<f32>(0.0);
    for (var r = 0u; r < 8u; r++) {
        let m = lane + 8u * r;
        let i = min(m, M - 1u) * N4 + j;
        let s = load_s(i);
        dz[r] = rb_live(m, acc[r] * s * (1.0 - s));
        xm[r] = rb_live(m, load_z(i) - mean);
        sum_dy += dz[r];
        sum_dyx += dz[r] * xm[r];
        sum_x += xm[r];
    }
    sum_dy = subgroupAdd(sum_dy);
    sum_dyx = subgroupAdd(sum_dyx);
    sum_x = subgroupAdd(sum_x);
    // finalize_backward_channel with batch statistics: the sums are over x - mean with the saved (f32)
    // mean, so the exact offset delta = sum(x - mean) / M is taken out.
    let inv_m = 1.0 / f32(M);
    let delta = sum_x * inv_m;
    let sum_dy_xhat = (sum_dyx - delta * sum_dy) * invstd;
    if (lane == 0u) {
        dgamma4[j] = sum_dy_xhat;
        dbeta4[j] = sum_dy;
    }
    let a = gamma * invstd;
    let b = -a * invstd * sum_dy_xhat * inv_m;
    let d = -a * sum_dy * inv_m - b * delta;
    for (var r = 0u; r < 8u; r++) {
        let m = lane + 8u * r;
        if (m < M) {
            dx4[m * N4 + j] = a * dz[r] + b * xm[r] + d;
        }
    }
}

fn rows_bn_block(blk: u32, lane: u32) {
    let j0 = blk * 4u;
    // This lane's two vec4s of W per 4 steps: row 4k + lane / 2, column vec4s j0 + 2 (lane % 2) + {0, 1}.
    let t = lane / 2u;
    let ja = j0 + 2u * (lane % 2u);
    var r0_0 = vec4<f32>(0.0);
    var r0_1 = vec4<f32>(0.0);
    var r0_2 = vec4<f32>(0.0);
    var r0_3 = vec4<f32>(0.0);
    var r1_0 = vec4<f32>(0.0);
    var r1_1 = vec4<f32>(0.0);
    var r1_2 = vec4<f32>(0.0);
    var r1_3 = vec4<f32>(0.0);
    var r2_0 = vec4<f32>(0.0);
    var r2_1 = vec4<f32>(0.0);
    var r2_2 = vec4<f32>(0.0);
    var r2_3 = vec4<f32>(0.0);
    var r3_0 = vec4<f32>(0.0);
    var r3_1 = vec4<f32>(0.0);
    var r3_2 = vec4<f32>(0.0);
    var r3_3 = vec4<f32>(0.0);
    var r4_0 = vec4<f32>(0.0);
    var r4_1 = vec4<f32>(0.0);
    var r4_2 = vec4<f32>(0.0);
    var r4_3 = vec4<f32>(0.0);
    var r5_0 = vec4<f32>(0.0);
    var r5_1 = vec4<f32>(0.0);
    var r5_2 = vec4<f32>(0.0);
    var r5_3 = vec4<f32>(0.0);
    var r6_0 = vec4<f32>(0.0);
    var r6_1 = vec4<f32>(0.0);
    var r6_2 = vec4<f32>(0.0);
    var r6_3 = vec4<f32>(0.0);
    var r7_0 = vec4<f32>(0.0);
    var r7_1 = vec4<f32>(0.0);
    var r7_2 = vec4<f32>(0.0);
    var r7_3 = vec4<f32>(0.0);
    for (var k = 0u; k < K; k += 4u) {
        let wa = rb_w(k, t, ja);
        let wb = rb_w(k, t, ja + 1u);
        // v{t}_{q}: row k + t of W, column vec4 j0 + q, from lane 2t + q / 2.
        let v0_0 = subgroupBroadcast(wa, 0u);
        let v0_1 = subgroupBroadcast(wb, 0u);
        let v0_2 = subgroupBroadcast(wa, 1u);
        let v0_3 = subgroupBroadcast(wb, 1u);
        let v1_0 = subgroupBroadcast(wa, 2u);
        let v1_1 = subgroupBroadcast(wb, 2u);
        let v1_2 = subgroupBroadcast(wa, 3u);
        let v1_3 = subgroupBroadcast(wb, 3u);
        let v2_0 = subgroupBroadcast(wa, 4u);
        let v2_1 = subgroupBroadcast(wb, 4u);
        let v2_2 = subgroupBroadcast(wa, 5u);
        let v2_3 = subgroupBroadcast(wb, 5u);
        let v3_0 = subgroupBroadcast(wa, 6u);
        let v3_1 = subgroupBroadcast(wb, 6u);
        let v3_2 = subgroupBroadcast(wa, 7u);
        let v3_3 = subgroupBroadcast(wb, 7u);
        let a0 = dy_steps_of(lane, 0u, k);
        r0_0 = rb_steps(r0_0, a0, v0_0, v1_0, v2_0, v3_0);
        r0_1 = rb_steps(r0_1, a0, v0_1, v1_1, v2_1, v3_1);
        r0_2 = rb_steps(r0_2, a0, v0_2, v1_2, v2_2, v3_2);
        r0_3 = rb_steps(r0_3, a0, v0_3, v1_3, v2_3, v3_3);
        let a1 = dy_steps_of(lane, 1u, k);
        r1_0 = rb_steps(r1_0, a1, v0_0, v1_0, v2_0, v3_0);
        r1_1 = rb_steps(r1_1, a1, v0_1, v1_1, v2_1, v3_1);
        r1_2 = rb_steps(r1_2, a1, v0_2, v1_2, v2_2, v3_2);
        r1_3 = rb_steps(r1_3, a1, v0_3, v1_3, v2_3, v3_3);
        let a2 = dy_steps_of(lane, 2u, k);
        r2_0 = rb_steps(r2_0, a2, v0_0, v1_0, v2_0, v3_0);
        r2_1 = rb_steps(r2_1, a2, v0_1, v1_1, v2_1, v3_1);
        r2_2 = rb_steps(r2_2, a2, v0_2, v1_2, v2_2, v3_2);
        r2_3 = rb_steps(r2_3, a2, v0_3, v1_3, v2_3, v3_3);
        let a3 = dy_steps_of(lane, 3u, k);
        r3_0 = rb_steps(r3_0, a3, v0_0, v1_0, v2_0, v3_0);
        r3_1 = rb_steps(r3_1, a3, v0_1, v1_1, v2_1, v3_1);
        r3_2 = rb_steps(r3_2, a3, v0_2, v1_2, v2_2, v3_2);
        r3_3 = rb_steps(r3_3, a3, v0_3, v1_3, v2_3, v3_3);
        let a4 = dy_steps_of(lane, 4u, k);
        r4_0 = rb_steps(r4_0, a4, v0_0, v1_0, v2_0, v3_0);
        r4_1 = rb_steps(r4_1, a4, v0_1, v1_1, v2_1, v3_1);
        r4_2 = rb_steps(r4_2, a4, v0_2, v1_2, v2_2, v3_2);
        r4_3 = rb_steps(r4_3, a4, v0_3, v1_3, v2_3, v3_3);
        let a5 = dy_steps_of(lane, 5u, k);
        r5_0 = rb_steps(r5_0, a5, v0_0, v1_0, v2_0, v3_0);
        r5_1 = rb_steps(r5_1, a5, v0_1, v1_1, v2_1, v3_1);
        r5_2 = rb_steps(r5_2, a5, v0_2, v1_2, v2_2, v3_2);
        r5_3 = rb_steps(r5_3, a5, v0_3, v1_3, v2_3, v3_3);
        let a6 = dy_steps_of(lane, 6u, k);
        r6_0 = rb_steps(r6_0, a6, v0_0, v1_0, v2_0, v3_0);
        r6_1 = rb_steps(r6_1, a6, v0_1, v1_1, v2_1, v3_1);
        r6_2 = rb_steps(r6_2, a6, v0_2, v1_2, v2_2, v3_2);
        r6_3 = rb_steps(r6_3, a6, v0_3, v1_3, v2_3, v3_3);
        let a7 = dy_steps_of(lane, 7u, k);
        r7_0 = rb_steps(r7_0, a7, v0_0, v1_0, v2_0, v3_0);
        r7_1 = rb_steps(r7_1, a7, v0_1, v1_1, v2_1, v3_1);
        r7_2 = rb_steps(r7_2, a7, v0_2, v1_2, v2_2, v3_2);
        r7_3 = rb_steps(r7_3, a7, v0_3, v1_3, v2_3, v3_3);
    }
    // The block's 4 column units' saved mean (lanes 0-3) and invstd (lanes 4-7), and gamma (lanes 0-3):
    // two loads, which the units take by subgroupBroadcast, where a load per unit would cost lavapipe a
    // loop over the lanes each.
    let unit = min(j0 + lane % 4u, N4 - 1u);
    let stats = saved4[select(unit, N4 + unit, lane >= 4u)];
    let gammas = gamma4[unit];
    rb_finish(j0, lane, array<vec4<f32>, 8>(r0_0, r1_0, r2_0, r3_0, r4_0, r5_0, r6_0, r7_0),
        subgroupBroadcast(stats, 0u), subgroupBroadcast(stats, 4u), subgroupBroadcast(gammas, 0u));
    if (j0 + 1u < N4) {
        rb_finish(j0 + 1u, lane, array<vec4<f32>, 8>(r0_1, r1_1, r2_1, r3_1, r4_1, r5_1, r6_1, r7_1),
            subgroupBroadcast(stats, 1u), subgroupBroadcast(stats, 5u), subgroupBroadcast(gammas, 1u));
    }
    if (j0 + 2u < N4) {
        rb_finish(j0 + 2u, lane, array<vec4<f32>, 8>(r0_2, r1_2, r2_2, r3_2, r4_2, r5_2, r6_2, r7_2),
            subgroupBroadcast(stats, 2u), subgroupBroadcast(stats, 6u), subgroupBroadcast(gammas, 2u));
    }
    if (j0 + 3u < N4) {
        rb_finish(j0 + 3u, lane, array<vec4<f32>, 8>(r0_3, r1_3, r2_3, r3_3, r4_3, r5_3, r6_3, r7_3),
            subgroupBroadcast(stats, 3u), subgroupBroadcast(stats, 7u), subgroupBroadcast(gammas, 3u));
    }
}
