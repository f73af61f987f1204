// Small kernels for the BatchNorm variants (src/ops/bn_variants.rs); the BatchNorm kernels themselves
// (batchnorm_*.wgsl) do the heavy passes. The host prepends:
//   C: channels; LEN: tensor values; S: spatial size; M: values per channel (N * S);
//   CHANNEL_MAJOR: NCHW (true) or NHWC/NC (false); G: ghost batches; SLOT: stride of a ghost's saved
//   slot (f32); GSLOT: stride of a ghost's gradient slot (f32).
// Every binding is read_write (wgpu tracks usage per buffer; callers may share buffers between calls).
// The host prepends shaders/float_bits.wgsl too.

@group(0) @binding(0) var<storage, read_write> t: array<f32>;
@group(0) @binding(1) var<storage, read_write> coef: array<f32>;
@group(0) @binding(2) var<storage, read_write> saved: array<f32>;
@group(0) @binding(3) var<storage, read_write> snap: array<f32>;
@group(0) @binding(4) var<storage, read_write> weight: array<f32>;
@group(0) @binding(5) var<storage, read_write> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> rd: array<f32>;
@group(0) @binding(7) var<storage, read_write> weff: array<f32>;
@group(0) @binding(8) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(9) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(10) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(11) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(12) var<storage, read_write> params: array<f32>;
@group(0) @binding(13) var<storage, read_write> acc: array<f32>;
@group(0) @binding(14) var<storage, read_write> gw: array<f32>;
@group(0) @binding(15) var<storage, read_write> gb: array<f32>;

fn channel_of(i: u32) -> u32 {
    if (CHANNEL_MAJOR) {
        return (i / S) % C;
    }
    return i % C;
}

// t = t * coef[c] + coef[C + c]: Batch Renorm's correction applied to the standard output in place.
@compute @workgroup_size(256)
fn channel_affine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let c = channel_of(i);
    t[i] = t[i] * coef[c] + coef[C + c];
}

// t = t * coef[c]: Batch Renorm's r on dx when there is no gamma to carry it.
@compute @workgroup_size(256)
fn channel_scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    t[i] = t[i] * coef[channel_of(i)];
}

// Per channel, from the batch statistics the forward saved (mean, invstd) and the running statistics
// copied before that forward updated them (snap: mean, var):
//   r = clip(sigma_B / sigma_run, 1/rmax, rmax), d = clip((mu_B - mu_run) / sigma_run, -dmax, dmax)
// into rd; the correction of the standard output y_std = gamma*xhat + beta,
//   y = r * y_std + (beta * (1 - r) + gamma * d) = gamma * (r * xhat + d) + beta,
// into coef; and gamma * r, the weight under which the standard backward gives Renorm's dx, into weff.
// params: rmax, dmax, eps.
@compute @workgroup_size(64)
fn renorm_coef(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= C) {
        return;
    }
    let rmax = params[0];
    let dmax = params[1];
    let eps = params[2];
    let sigma_b = 1.0 / saved[C + c];
    let sigma_run = sqrt(snap[C + c] + eps);
    let r = clamp(sigma_b / sigma_run, 1.0 / rmax, rmax);
    let d = clamp((saved[c] - snap[c]) / sigma_run, -dmax, dmax);
    rd[c] = r;
    rd[C + c] = d;
    let g = weight[c];
    coef[c] = r;
    coef[C + c] = bias[c] * (1.0 - r) + g * d;
    weff[c] = g * r;
}

// The standard backward left dweight = sum(dy * xhat), dbias = sum(dy); Renorm's dgamma is
// sum(dy * (r * xhat + d)) = r * dweight + d * dbias.
@compute @workgroup_size(64)
fn renorm_dweight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= C) {
        return;
    }
    dweight[c] = rd[c] * dweight[c] + rd[C + c] * dbias[c];
}

// Ghost BN's one running update per step: the average of the G ghost means and of their variances
// (recovered from invstd: var = 1/invstd^2 - eps), the latter made unbiased over a ghost's M values.
// params: factor (momentum or 1/num_batches_tracked), eps, M/(M-1).
@compute @workgroup_size(64)
fn ghost_running(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= C) {
        return;
    }
    let f = params[0];
    let eps = params[1];
    var mean = 0.0;
    var var_sum = 0.0;
    for (var g = 0u; g < G; g++) {
        let inv = saved[g * SLOT + C + c];
        mean += saved[g * SLOT + c];
        var_sum += 1.0 / (inv * inv) - eps;
    }
    mean /= f32(G);
    let unbiased = var_sum / f32(G) * params[2];
    running_mean[c] = (1.0 - f) * running_mean[c] + f * mean;
    running_var[c] = (1.0 - f) * running_var[c] + f * unbiased;
}

// Ghost BN's parameter gradients: the sum of each ghost's (one slot per ghost, GSLOT apart).
@compute @workgroup_size(64)
fn sum_grad_slots(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= C) {
        return;
    }
    var w = 0.0;
    var b = 0.0;
    for (var g = 0u; g < G; g++) {
        w += gw[g * GSLOT + c];
        b += gb[g * GSLOT + c];
    }
    dweight[c] = w;
    dbias[c] = b;
}

var<workgroup> wn: array<f32, 64>;
var<workgroup> wmean: array<f32, 64>;
var<workgroup> wm2: array<f32, 64>;

// Flat index of the j-th value (j < M) of channel c.
fn elem(c: u32, j: u32) -> u32 {
    if (CHANNEL_MAJOR) {
        let n = j / S;
        return (n * C + c) * S + (j - n * S);
    }
    return j * C + c;
}

// A Welford or Chan step of a mean, `stepped`, made from `mean` and `v` (a value or another mean): where
// it is NaN only because an infinity met itself (inf - inf in the delta), mean + v instead, the infinity
// (or the NaN of +inf meeting -inf), as a sum over the values gives it and PyTorch's statistics do
// (shaders/batchnorm_common.wgsl's keep_infinite).
fn precise_mean(stepped: f32, mean: f32, v: f32) -> f32 {
    return select(stepped, mean + v, is_nan(stepped));
}

// Chan's merge of lane b's (count, mean, M2) into lane a's.
fn merge_lanes(a: u32, b: u32) {
    let na = wn[a];
    let nb = wn[b];
    let n = na + nb;
    if (nb == 0.0) {
        return;
    }
    let delta = wmean[b] - wmean[a];
    wmean[a] = precise_mean(wmean[a] + delta * (nb / n), wmean[a], wmean[b]);
    wm2[a] = wm2[a] + wm2[b] + delta * delta * (na * nb / n);
    wn[a] = n;
}

// PreciseBN: one workgroup per channel reduces this batch's (count, mean, M2) (Welford per lane, shifted
// by the channel's first value so a large mean keeps the variance's precision; Chan's merge across lanes)
// and merges it into the running population accumulator acc (mean [C], then M2 [C]) with Chan's formula.
// params: the accumulator's count before this batch (0: acc is overwritten).
@compute @workgroup_size(64)
fn precise_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= C) {
        return;
    }
    // 0 where the first value is not finite: an infinite shift would make every value NaN.
    let shift = finite_or_zero1(t[elem(c, 0u)]);
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var j = lid; j < M; j += 64u) {
        let v = t[elem(c, j)] - shift;
        n += 1.0;
        let delta = v - mean;
        mean = precise_mean(mean + delta / n, mean, v);
        m2 += delta * (v - mean);
    }
    wn[lid] = n;
    wmean[lid] = mean;
    wm2[lid] = m2;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride >> 1u) {
        if (lid < stride) {
            merge_lanes(lid, lid + stride);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let na = params[0];
        let nb = wn[0];
        let mb = wmean[0] + shift;
        if (na == 0.0) {
            acc[c] = mb;
            acc[C + c] = wm2[0];
        } else {
            let ntot = na + nb;
            let delta = mb - acc[c];
            acc[c] = precise_mean(acc[c] + delta * (nb / ntot), acc[c], mb);
            acc[C + c] = acc[C + c] + wm2[0] + delta * delta * (na * nb / ntot);
        }
    }
}

// PreciseBN's result: running_mean = population mean, running_var = M2 / (count - 1) (unbiased, as
// PyTorch keeps it). params: 1 / (count - 1).
@compute @workgroup_size(64)
fn precise_finish(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= C) {
        return;
    }
    running_mean[c] = acc[c];
    running_var[c] = acc[C + c] * params[0];
}
