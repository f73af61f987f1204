// Linear layer kernels: y = x W^T + b and its backward, all through one strided matmul.
// The host prepends `const M, N, K, SAM, SAK, SBK, SBN: u32`: C[m, n] = sum_k A[m*SAM + k*SAK] * B[k*SBK + n*SBN],
// C row-major [M, N]. Forward: A = x, B = W^T; dx: A = dy, B = W; dW: A = dy^T, B = x. The strides make the
// transposes free, so one kernel serves all three.
//
// matmul, matmul_bias: a 4x4 output block per invocation in registers, K walked in order (below).
// column_sum: db[n] = sum_m A[m*SAM + n*SAK], one invocation per column (N is small: the layer width).

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;

// A 4x4 block of C per invocation, accumulated in registers; no workgroup memory and no barriers.
// (A 16x16 workgroup-memory tiled version ran at ~0.1 GFLOP/s on lavapipe, where every barrier switches
// between 256 invocations' contexts on a CPU core; register blocking reuses each loaded value 4 times.)
const TM: u32 = 4u;
const TN: u32 = 4u;
const BLOCKS_M: u32 = (M + TM - 1u) / TM;
const BLOCKS_N: u32 = (N + TN - 1u) / TN;

struct Block {
    m0: u32,
    n0: u32,
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

fn block_product(blk: u32) -> Block {
    let m0 = (blk / BLOCKS_N) * TM;
    let n0 = (blk % BLOCKS_N) * TN;
    // Edge blocks load clamped rows/columns (valid addresses) and drop them at the store.
    let ar = vec4<u32>(min(m0, M - 1u), min(m0 + 1u, M - 1u), min(m0 + 2u, M - 1u), min(m0 + 3u, M - 1u)) * SAM;
    let bc = vec4<u32>(min(n0, N - 1u), min(n0 + 1u, N - 1u), min(n0 + 2u, N - 1u), min(n0 + 3u, N - 1u)) * SBN;
    var r0 = vec4<f32>(0.0);
    var r1 = vec4<f32>(0.0);
    var r2 = vec4<f32>(0.0);
    var r3 = vec4<f32>(0.0);
    for (var k = 0u; k < K; k++) {
        let ka = k * SAK;
        let kb = k * SBK;
        let bv = vec4<f32>(b[kb + bc.x], b[kb + bc.y], b[kb + bc.z], b[kb + bc.w]);
        r0 = fma(vec4<f32>(a[ar.x + ka]), bv, r0);
        r1 = fma(vec4<f32>(a[ar.y + ka]), bv, r1);
        r2 = fma(vec4<f32>(a[ar.z + ka]), bv, r2);
        r3 = fma(vec4<f32>(a[ar.w + ka]), bv, r3);
    }
    return Block(m0, n0, r0, r1, r2, r3);
}

fn store_row(m: u32, n0: u32, v: vec4<f32>) {
    if (m >= M) {
        return;
    }
    for (var j = 0u; j < TN; j++) {
        if (n0 + j < N) {
            c[m * N + n0 + j] = v[j];
        }
    }
}

fn store_block(blk: Block, add: vec4<f32>) {
    store_row(blk.m0, blk.n0, blk.r0 + add);
    store_row(blk.m0 + 1u, blk.n0, blk.r1 + add);
    store_row(blk.m0 + 2u, blk.n0, blk.r2 + add);
    store_row(blk.m0 + 3u, blk.n0, blk.r3 + add);
}

@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = gid.x + gid.y * nwg.x * 64u;
    if (blk >= BLOCKS_M * BLOCKS_N) {
        return;
    }
    store_block(block_product(blk), vec4<f32>(0.0));
}

@compute @workgroup_size(64)
fn matmul_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = gid.x + gid.y * nwg.x * 64u;
    if (blk >= BLOCKS_M * BLOCKS_N) {
        return;
    }
    let p = block_product(blk);
    let bc = vec4<u32>(min(p.n0, N - 1u), min(p.n0 + 1u, N - 1u), min(p.n0 + 2u, N - 1u), min(p.n0 + 3u, N - 1u));
    store_block(p, vec4<f32>(bias[bc.x], bias[bc.y], bias[bc.z], bias[bc.w]));
}

@compute @workgroup_size(64)
fn column_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    if (col >= N) {
        return;
    }
    var acc = 0.0;
    for (var m = 0u; m < M; m++) {
        acc += a[m * SAM + col * SAK];
    }
    c[col] = acc;
}
