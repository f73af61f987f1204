// BatchNorm, shared by every kernel: parameters, bindings, Welford/Chan statistics and the per-channel
// finalization (batch statistics -> saved mean/invstd, running statistics, normalization coefficients).
//
// The host prepends a prelude defining WG (workgroup size), W (values per unit: 4 = vec4 loads, 1 = scalar
// for shapes not divisible by 4), STEP (1: each invocation walks consecutive units, as lavapipe prefers;
// WG: adjacent invocations on adjacent addresses, as GPUs prefer), `alias V`, `hsum`, `elem`, and `splat`
// (a value in every lane) and `vmul` (lane-wise product); also the tensor bindings in their storage type
// (f32; f16 through `enable f16`; or f16 pairs packed in u32 words where the device lacks SHADER_F16 or
// is a CPU; W = 2 is used for f16 whose contiguous axis is even but not a multiple of 4, and W = 8 for
// packed f16 whose axis 8 divides: V is then a mat2x4<f32>, which has + and - and scaling by an f32 but
// no lane-wise product or one-value constructor, hence `vmul` and `splat` in this file,
// batchnorm_nchw.wgsl and batchnorm_nhwc.wgsl, the kernels W = 8 runs in) with `load_x`/`load_dy`
// (units, as V in f32) and `store_y`/`store_dx`, their per-element forms for
// the word kernels, the ReLU mask's accessors, and the constants RELU (fused ReLU), DEFER (the fused kernels
// leave the elementwise pass to the word kernels) and CHANNEL_LAST.
//
// Numerics: statistics are Welford per invocation (one reciprocal per unit, shared by the W lanes) and
// Chan's merge across lanes, invocations, workgroups and chunks. Never E[x^2] - E[x]^2. Values are
// shifted by one of the channel's own values before accumulating, so the running mean stays small and
// keeps its precision when |mean| >> std (mean 1e4, std 1: an unshifted f32 Welford mean drifts by ulps
// of 1e4 and costs the variance ~1e-4 relative; shifted, ~1e-7).

struct Params {
    channels: u32,    // C
    inner: u32,       // NCHW: units per plane (spatial / W); NHWC: units per row (C / W)
    outer: u32,       // NCHW: samples in this chunk; NHWC: rows (N * spatial) in this chunk
    parts: u32,       // workgroups along the reduced axis in this chunk
    part_base: u32,   // first partial-statistics slot of this chunk
    total_parts: u32, // partial-statistics slots over all chunks
    off: u32,         // first unit of the chunk inside each bound tensor window
    tile_cols: u32,   // NHWC: channel units per workgroup
    col_tiles: u32,   // NHWC: workgroups across the channels
    groups_x: u32,    // dispatch width; workgroup index = id.x + id.y * groups_x
    count: u32,       // M: values per channel over the whole tensor
    flags: u32,
    eps: f32,
    momentum: f32,    // factor for the running statistics this step (momentum, or 1/num_batches_tracked)
    c_base: u32,      // NCHW split plan: first channel of this chunk
    c_count: u32,     // NCHW split plan: channels in this chunk
    win_elem: u32,    // flat index of the first element of this chunk's bound window
    block_base: u32,  // word kernels: first 32-element block this chunk owns
    blocks: u32,      // word kernels: blocks this chunk owns (those starting inside it)
    numel: u32,       // elements in the whole tensor
    words_groups_x: u32, // word kernels: their dispatch's width (block index = id.x + id.y * this * WG)
    columns: u32,     // partial-statistics slots per part: C * col_group
    col_group: u32,   // columns per channel: HW where NCHW is viewed as rows of C*HW values, else 1
}

const AFFINE: u32 = 1u;          // weight and bias are bound and used
const UPDATE_RUNNING: u32 = 2u;  // forward-train updates running_mean / running_var
const BATCH_STATS: u32 = 4u;     // backward: the forward normalized with batch statistics
const WRITE_GRADS: u32 = 8u;     // backward: write dweight / dbias

struct Part {
    n: u32,
    a: f32,     // forward: mean - shift;  backward: sum(dy)
    b: f32,     // forward: M2;            backward: sum(dy * (x - mean))
    shift: f32, // forward: the value subtracted before accumulating (see Welford below);
                // backward: sum(x - mean), mean the saved (f32-rounded) one
}

// Every storage binding is declared read_write, also those the kernels only read: wgpu tracks usage per
// buffer, not per range, and a buffer bound read-only and read-write in one dispatch is an error. With one
// usage everywhere, a caller may keep x, y, dy and dx (or weight, bias, their gradients and the running
// statistics) in one arena buffer at different offsets.
// The plan's parameters are a read-only storage buffer, not a uniform: Mesa's lavapipe (22.x) inlines
// uniform-buffer values used in branch and loop conditions into a new shader variant, recompiled with
// LLVM on every dispatch whose bind group is set (about 5 ms each) and not released (about 0.4 MB of host
// memory per dispatch of forward_fused: `batchnorm train` grew by ~1 MB per step). It does not inline
// storage loads. Only this op binds the buffer, so read-only is safe under wgpu's per-buffer tracking.
@group(0) @binding(0) var<storage, read> params: Params;
// x (1), y (2), dy (3), dx (4) and the ReLU mask (14) are declared by the prelude with their storage type
// (f32, f16, or f16 pairs packed in u32 words); kernels reach them only through the prelude's load_*/store_*.
@group(0) @binding(5) var<storage, read_write> weight: array<f32>;
@group(0) @binding(6) var<storage, read_write> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(8) var<storage, read_write> running_var: array<f32>;
// save_mean in [0, C), save_invstd in [C, 2C)
@group(0) @binding(9) var<storage, read_write> saved: array<f32>;
@group(0) @binding(10) var<storage, read_write> parts: array<Part>;
// per channel: forward (shift, gamma*invstd, beta, mean - shift); backward (mean, A, B, D) with
// dx = A*dy + B*(x - mean) + D
@group(0) @binding(11) var<storage, read_write> coef: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(13) var<storage, read_write> dbias: array<f32>;

// The fused ReLU, on the float's bits (shaders/float_bits.wgsl, prepended by the host): relu(z) = 0 where
// z < 0, else z, so NaN stays NaN and -0 stays -0 as torch.relu gives; the mask bit is set where z <= 0 is
// false (z > 0 or NaN), where PyTorch's threshold_backward passes the gradient.
fn relu1(z: f32) -> f32 {
    return select(z, 0.0, below_zero(bitcast<u32>(z)));
}

fn relu_passes(z: f32) -> bool {
    let b = bitcast<u32>(z);
    return !(below_zero(b) || (b & 0x7fffffffu) == 0u);
}

struct Welford {
    n: u32,
    mean: f32,
    m2: f32,
}

// Welford state of W lanes that have all seen the same number of values.
struct WelfordV {
    n: u32,
    mean: V,
    m2: V,
}

// Infinities: PyTorch's batch mean is the sum over the count, +inf for a channel holding +inf among finite
// values, -inf for -inf, NaN for both or a NaN. A Welford or Chan step meets inf - inf and gives NaN for
// all of these, so where a step's result is NaN it takes the sum of its operands instead (inf + finite =
// inf, inf + inf = inf, inf - inf = NaN, NaN stays): `keep_infinite(stepped, a, b)`, per component for V
// (the host's helpers, from these). A step on finite operands is not NaN and is kept bit for bit; one test
// of the result costs less than testing both operands (the kernels push every value through it). The
// shift (a channel's first value, see Welford below) must be finite for this: `finite_or_zero`
// (shaders/float_bits.wgsl).
fn keep_infinite4(stepped: vec4<f32>, a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    return select(stepped, a + b, is_nan4(stepped));
}

fn keep_infinite2(stepped: vec2<f32>, a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    return select(stepped, a + b, is_nan4(vec4<f32>(stepped, 0.0, 0.0)).xy);
}

fn keep_infinite1(stepped: f32, a: f32, b: f32) -> f32 {
    return select(stepped, a + b, is_nan(stepped));
}

fn welford_push(s: ptr<function, WelfordV>, v: V) {
    (*s).n += 1u;
    let d = v - (*s).mean;
    (*s).mean = keep_infinite((*s).mean + d * (1.0 / f32((*s).n)), (*s).mean, v);
    (*s).m2 += vmul(d, v - (*s).mean);
}

// Chan et al.'s parallel merge of two (count, mean, M2) triples.
fn chan_merge(a: Welford, b: Welford) -> Welford {
    if (b.n == 0u) {
        return a;
    }
    if (a.n == 0u) {
        return b;
    }
    let n = a.n + b.n;
    let fb = f32(b.n) / f32(n);
    let d = b.mean - a.mean;
    return Welford(n, keep_infinite1(a.mean + d * fb, a.mean, b.mean), a.m2 + b.m2 + d * d * f32(a.n) * fb);
}

fn chan_merge_v(a: WelfordV, b: WelfordV) -> WelfordV {
    if (b.n == 0u) {
        return a;
    }
    if (a.n == 0u) {
        return b;
    }
    let n = a.n + b.n;
    let fb = f32(b.n) / f32(n);
    let d = b.mean - a.mean;
    let mean = keep_infinite(a.mean + d * fb, a.mean, b.mean);
    return WelfordV(n, mean, a.m2 + b.m2 + vmul(d, d) * (f32(a.n) * fb));
}

// Merges the W lanes of one channel (NCHW: a unit is W values of the same channel).
fn collapse_lanes(s: WelfordV) -> Welford {
    let mu = hsum(s.mean) / f32(W);
    let d = s.mean - splat(mu);
    return Welford(s.n * W, mu, hsum(s.m2) + f32(s.n) * hsum(vmul(d, d)));
}

// Workgroup index over a dispatch folded into two dimensions (more than 65 535 workgroups).
fn group_index(id: vec3<u32>) -> u32 {
    return id.x + id.y * params.groups_x;
}

fn has(flag: u32) -> bool {
    return (params.flags & flag) != 0u;
}

// Batch statistics of channel c -> saved mean/invstd, running statistics, forward coefficients.
// `w.mean` is relative to `shift`.
fn finalize_forward_channel(c: u32, w: Welford, shift: f32) -> vec4<f32> {
    let mean = shift + w.mean;
    let var_biased = w.m2 / f32(w.n);
    let invstd = 1.0 / sqrt(var_biased + params.eps);
    saved[c] = mean;
    saved[params.channels + c] = invstd;
    if (has(UPDATE_RUNNING)) {
        let m = params.momentum;
        // PyTorch: running_var takes the unbiased variance M2 / (M - 1).
        running_mean[c] = (1.0 - m) * running_mean[c] + m * mean;
        running_var[c] = (1.0 - m) * running_var[c] + m * (w.m2 / f32(w.n - 1u));
    }
    var g = 1.0;
    var b = 0.0;
    if (has(AFFINE)) {
        g = weight[c];
        b = bias[c];
    }
    // The mean goes to the normalization as shift + (mean - shift): x - shift is exact for x near the
    // shift, so a mean rounded to f32 (an ulp of 1e4 is 1e-3) does not enter y.
    return vec4<f32>(shift, g * invstd, b, w.mean);
}

// Reduced gradients of channel c -> dweight, dbias and the dx coefficients (mean, a, b, d): dx = a*dy +
// b*(x - mean) + d. The sums are over x - mean with the saved mean, which is the batch mean rounded to
// f32: at mean 1e4 that rounding (an ulp is 1e-3) would enter every xhat, so with batch statistics the
// exact offset delta = sum(x - mean)/M is taken out here (x - mean is exact for x near the mean, and
// their sum is small), as the forward does with its shift.
fn finalize_backward_channel(c: u32, sum_dy: f32, sum_dy_xmu: f32, sum_xmu: f32) -> vec4<f32> {
    let mean = saved[c];
    let invstd = saved[params.channels + c];
    var g = 1.0;
    if (has(AFFINE)) {
        g = weight[c];
    }
    var delta = 0.0;
    var inv_m = 0.0;
    if (has(BATCH_STATS)) {
        inv_m = 1.0 / f32(params.count);
        delta = sum_xmu * inv_m;
    }
    // sum(dy * xhat) = invstd * sum(dy * (x - mean - delta)) is dweight.
    let sum_dy_xhat = (sum_dy_xmu - delta * sum_dy) * invstd;
    if (has(WRITE_GRADS)) {
        dweight[c] = sum_dy_xhat;
        dbias[c] = sum_dy;
    }
    let a = g * invstd;
    if (has(BATCH_STATS)) {
        // dx = g*invstd*(dy - sum(dy)/M - xhat*sum(dy*xhat)/M), xhat = (x - mean - delta)*invstd
        let b = -a * invstd * sum_dy_xhat * inv_m;
        return vec4<f32>(mean, a, b, -a * sum_dy * inv_m - b * delta);
    }
    // Statistics were constants (eval mode): dx = g*invstd*dy.
    return vec4<f32>(mean, a, 0.0, 0.0);
}
