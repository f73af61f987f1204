// matmul_dot_bn: a Linear's forward z = x W^T + b followed by BatchNorm with batch statistics over its
// M rows (PyTorch's BatchNorm1d in training: biased variance for the normalization, unbiased into the
// running variance), and optionally the logistic sigmoid: y = act(gamma (z - mean) / sqrt(var + eps) +
// beta). Appended to shaders/linear_dot.wgsl, whose 64-row blocks hold every row of a batch of M <= 64:
// the block's `dot_out` below stores its DOT_COLS columns of z (the backward reads them) and normalizes
// them from the accumulators it is handed, with the column sums by subgroupAdd over its 8 lanes.
// One dispatch instead of two; on lavapipe a dispatch costs a worker wake-up (~50 us) besides its work.
// `matmul_dot_bn_eval` normalizes with the running statistics instead (eval, FrozenBN): any M, one
// dispatch instead of three (BatchNorm's eval takes two).
//
// The host prepends M and N (M <= 64, N % 4 == 0; K / 4 comes from `dot_dims` below), z's binding 2 as vec4s with `store_dot`,
// `fn dot_init(n0) -> array<vec4<f32>, DOT_QUADS>` (the Linear's bias of the block's columns, or zeros) and
// `fn activation(v: vec4<f32>) -> vec4<f32>` (identity or sigmoid) and `const UPDATE: bool` (move the
// running statistics: a pipeline of its own, as the BatchNorm op's no-update mode is, so that a
// training forward and an eval one recorded into one submission cannot share a flag), and checks the
// alignments. Statistics as in batchnorm_common.wgsl's finalize_forward_channel: the values are shifted by
// the column's first row (0 where it is not finite) before summing, so that a mean far from zero keeps its
// precision in y, then the mean and M2 are summed in two passes over the 8 values each lane holds (never
// E[z^2] - E[z]^2); saved mean = shift + mean, saved invstd = 1 / sqrt(M2 / M + eps).

struct BnParams {
    eps: f32,
    factor: f32,  // running = (1 - factor) running + factor batch
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(4) var<storage, read_write> bn_y: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> bn_weight: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> bn_bias: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> bn_running_mean: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> bn_running_var: array<vec4<f32>>;
// save_mean in [0, N), save_invstd in [N, 2N)
@group(0) @binding(9) var<storage, read_write> bn_saved: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read> bn_params: BnParams;
// The Linear's K / 4 in x: a binding rather than a constant, so that one pipeline serves Linears that
// differ only in their inputs (the 784- and 100-wide layers of the MNIST MLP). Read-only storage, not a
// uniform, for the reason batchnorm_common.wgsl gives for its params (Mesa 22's lavapipe may turn a
// uniform that bounds a loop into a shader variant compiled per dispatch).
@group(0) @binding(11) var<storage, read> dot_dims: vec4<u32>;

fn dot_k4() -> u32 {
    return dot_dims.x;
}

const N4: u32 = N / 4u;
const DOT_OUT_BN_TRAIN: u32 = 1u;
const DOT_OUT_BN_EVAL: u32 = 2u;

// The block's per-column parameters, lane l holding column unit n0 / 4 + l (clamped) of each (the quads
// take theirs by subgroupBroadcast): loaded once by `dot_prologue` instead of once per quad, for on
// lavapipe each storage load is a loop over the lanes even where they all read one address.
var<private> bn_gamma_lanes: vec4<f32>;
var<private> bn_beta_lanes: vec4<f32>;
var<private> bn_mean_lanes: vec4<f32>;
var<private> bn_var_lanes: vec4<f32>;
var<private> bn_eps: f32;

fn dot_prologue(mode: u32, lane: u32, n0: u32) {
    let j = min(n0 / 4u + lane, N4 - 1u);
    bn_gamma_lanes = bn_weight[j];
    bn_beta_lanes = bn_bias[j];
    if (mode == DOT_OUT_BN_EVAL) {
        bn_mean_lanes = bn_running_mean[j];
        bn_var_lanes = bn_running_var[j];
    }
    bn_eps = bn_params.eps;
}

// Lane q's v (q < 8: the block's quad q).
fn bn_from_lane(v: vec4<f32>, q: u32) -> vec4<f32> {
    var r = subgroupBroadcast(v, 0u);
    r = select(r, subgroupBroadcast(v, 1u), q == 1u);
    r = select(r, subgroupBroadcast(v, 2u), q == 2u);
    r = select(r, subgroupBroadcast(v, 3u), q == 3u);
    r = select(r, subgroupBroadcast(v, 4u), q == 4u);
    r = select(r, subgroupBroadcast(v, 5u), q == 5u);
    r = select(r, subgroupBroadcast(v, 6u), q == 6u);
    r = select(r, subgroupBroadcast(v, 7u), q == 7u);
    return r;
}

// v where row m exists, else 0.
fn bn_live(m: u32, v: vec4<f32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), v, m < M);
}

fn bn_store(m: u32, j: u32, d: vec4<f32>, a: vec4<f32>, b: vec4<f32>) {
    if (m < M) {
        bn_y[m * N4 + j] = activation(d * a + b);
    }
}

// Columns 4j .. 4j + 3 of rows lane + 8r, z as the accumulators hold them (rows past M hold row M - 1's
// values, their rows of x clamped; they are never counted or stored).
fn bn_columns(j: u32, q: u32, lane: u32, acc: array<vec4<f32>, 8>) {
    var z = acc;
    // An infinite first value would make every difference NaN: shift by 0 there, so that the sum (and
    // PyTorch's mean, the sum over the rows) is that infinity (NaN for +inf with -inf or a NaN).
    let shift = finite_or_zero4(subgroupBroadcast(z[0], 0u));
    var sum = vec4<f32>(0.0);
    for (var r = 0u; r < 8u; r++) {
        z[r] -= shift;
        sum += bn_live(lane + 8u * r, z[r]);
    }
    let mean = subgroupAdd(sum) / f32(M);
    var sq = vec4<f32>(0.0);
    for (var r = 0u; r < 8u; r++) {
        z[r] -= mean;
        sq += bn_live(lane + 8u * r, z[r] * z[r]);
    }
    let m2 = subgroupAdd(sq);
    let invstd = 1.0 / sqrt(m2 / f32(M) + bn_eps);
    let a = bn_from_lane(bn_gamma_lanes, q) * invstd;
    let b = bn_from_lane(bn_beta_lanes, q);
    for (var r = 0u; r < 8u; r++) {
        bn_store(lane + 8u * r, j, z[r], a, b);
    }
    if (lane == 0u) {
        let batch_mean = shift + mean;
        bn_saved[j] = batch_mean;
        bn_saved[N4 + j] = invstd;
        if (UPDATE) {
            let f = bn_params.factor;
            bn_running_mean[j] = (1.0 - f) * bn_running_mean[j] + f * batch_mean;
            bn_running_var[j] = (1.0 - f) * bn_running_var[j] + f * (m2 / f32(M - 1u));
        }
    }
}

// The block's epilogue (shaders/linear_dot.wgsl): z stored, then normalized with the batch's statistics
// (training) or the running ones (eval), as the entry point's mode says.
fn dot_out(mode: u32, lane: u32, m0: u32, n: u32, q: u32, rows: array<vec4<f32>, 8>) {
    dot_store_rows(m0, n, rows);
    if (n < N) {
        if (mode == DOT_OUT_BN_TRAIN) {
            bn_columns(n / 4u, q, lane, rows);
        } else if (mode == DOT_OUT_BN_EVAL) {
            bn_eval_columns(m0 - lane, n / 4u, q, lane, rows);
        }
    }
}

@compute @workgroup_size(8)
fn matmul_dot_bn(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    // The host spreads more than 65 535 blocks (over a million features) over a 2-D grid.
    let blk = wid.x + wid.y * nwg.x;
    if (blk < DOT_COL_BLOCKS) {
        product_dot(blk, lane, dot_init(dot_block_start(blk)), DOT_OUT_BN_TRAIN);
    }
}

// Columns 4j .. 4j + 3 of the rows m0 + lane + 8r (z as the accumulators hold them), normalized with the
// running statistics (eval, or FrozenBN in training) as eval_coef and the normalize kernels do; the first
// row block saves them.
fn bn_eval_columns(m0: u32, j: u32, q: u32, lane: u32, z: array<vec4<f32>, 8>) {
    let mean = bn_from_lane(bn_mean_lanes, q);
    let invstd = 1.0 / sqrt(bn_from_lane(bn_var_lanes, q) + bn_eps);
    let a = bn_from_lane(bn_gamma_lanes, q) * invstd;
    let b = bn_from_lane(bn_beta_lanes, q);
    for (var r = 0u; r < 8u; r++) {
        bn_store(m0 + lane + 8u * r, j, z[r] - mean, a, b);
    }
    if (m0 == 0u && lane == 0u) {
        bn_saved[j] = mean;
        bn_saved[N4 + j] = invstd;
    }
}

// Any M: every block normalizes its own rows (nothing is summed over the batch).
@compute @workgroup_size(8)
fn matmul_dot_bn_eval(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk < (M + DOT_ROWS - 1u) / DOT_ROWS * DOT_COL_BLOCKS) {
        product_dot(blk, lane, dot_init(dot_block_start(blk)), DOT_OUT_BN_EVAL);
    }
}
