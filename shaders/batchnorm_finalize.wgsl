// BatchNorm per-channel passes, independent of layout: one invocation per channel.
//   finalize_forward   split plan, pass 2: Chan-merge the partial statistics of all parts and chunks, write
//                      save_mean/save_invstd, update the running statistics, write the forward coefficients
//   finalize_backward  split plan, pass 2: sum the partial gradient sums, write dweight/dbias and the dx
//                      coefficients
//   eval_coef          eval pass 1: coefficients (and saved mean/invstd for a backward) from the running
//                      statistics

fn channel_index(id: vec3<u32>) -> u32 {
    return id.x + id.y * params.groups_x * 64u;
}

@compute @workgroup_size(64)
fn finalize_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = channel_index(id);
    if (c >= params.channels) {
        return;
    }
    // Chunks may have shifted by different values: re-express each part's mean relative to the first
    // part's shift (a difference of two nearby values is exact in f32).
    // Chunks that cover only some channels leave the other channels' slots cleared (n = 0): take the shift
    // of a slot that holds values.
    // A channel's slots are col_group consecutive columns of each part (one unless NCHW is viewed as
    // rows, where each of the channel's HW positions has its own).
    let g = params.col_group;
    var shift = 0.0;
    for (var k = params.total_parts; k > 0u; k--) {
        let q = parts[(k - 1u) * params.columns + c * g];
        if (q.n > 0u) {
            shift = q.shift;
        }
    }
    // Columns merge in blocks of 32 before joining the part's total, and parts join the channel's total:
    // a long chain of merges would round the mean once per link (NCHW as rows has HW columns per part).
    var w = Welford(0u, 0.0, 0.0);
    for (var k = 0u; k < params.total_parts; k++) {
        var part = Welford(0u, 0.0, 0.0);
        for (var s0 = 0u; s0 < g; s0 += 32u) {
            var block = Welford(0u, 0.0, 0.0);
            for (var s = s0; s < min(s0 + 32u, g); s++) {
                let q = parts[k * params.columns + c * g + s];
                block = chan_merge(block, Welford(q.n, (q.shift - shift) + q.a, q.b));
            }
            part = chan_merge(part, block);
        }
        w = chan_merge(w, part);
    }
    coef[c] = finalize_forward_channel(c, w, shift);
}

@compute @workgroup_size(64)
fn finalize_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = channel_index(id);
    if (c >= params.channels) {
        return;
    }
    // Summed in blocks of 32 columns, then per part, as finalize_forward merges.
    let g = params.col_group;
    var s = vec3<f32>(0.0);
    for (var k = 0u; k < params.total_parts; k++) {
        var part = vec3<f32>(0.0);
        for (var j0 = 0u; j0 < g; j0 += 32u) {
            var block = vec3<f32>(0.0);
            for (var j = j0; j < min(j0 + 32u, g); j++) {
                let q = parts[k * params.columns + c * g + j];
                block += vec3<f32>(q.a, q.b, q.shift);
            }
            part += block;
        }
        s += part;
    }
    coef[c] = finalize_backward_channel(c, s.x, s.y, s.z);
}

@compute @workgroup_size(64)
fn eval_coef(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = channel_index(id);
    if (c >= params.channels) {
        return;
    }
    let mean = running_mean[c];
    let invstd = 1.0 / sqrt(running_var[c] + params.eps);
    saved[c] = mean;
    saved[params.channels + c] = invstd;
    var g = 1.0;
    var b = 0.0;
    if (has(AFFINE)) {
        g = weight[c];
        b = bias[c];
    }
    coef[c] = vec4<f32>(mean, g * invstd, b, 0.0);
}

// The split plan's pass 2 with one workgroup per channel, for GPUs (`Merge::Workgroup`). The kernels above
// walk every part of a channel in one invocation: a chain of dependent loads, 0.4-3.5 ms on an H200 for
// NHWC with 1024 parts per channel, where the whole eval forward takes 0.035 ms. Here invocation t takes
// the links t, t + 64, ... (a link: one part's slot of one of the channel's columns), and the 64 results
// merge pairwise in a tree (6 levels): shorter chains than the serial walk's, so no coarser rounding.
// The shift is the serial kernel's: that of the first part holding values.
const MERGE_WG: u32 = 64u;
var<workgroup> merge_first: atomic<u32>;
var<workgroup> merge_n: array<u32, MERGE_WG>;
var<workgroup> merge_a: array<f32, MERGE_WG>;
var<workgroup> merge_b: array<f32, MERGE_WG>;
var<workgroup> merge_sums: array<vec3<f32>, MERGE_WG>;

// The slot of link j of channel c: part j / col_group, column j % col_group of the channel's group.
fn link_slot(c: u32, j: u32) -> u32 {
    let g = params.col_group;
    return (j / g) * params.columns + c * g + j % g;
}

@compute @workgroup_size(64)
fn finalize_forward_wg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let c = wid.x + wid.y * groups.x;
    if (c >= params.channels) {
        return;
    }
    let g = params.col_group;
    if (t == 0u) {
        atomicStore(&merge_first, 0xffffffffu);
    }
    workgroupBarrier();
    for (var k = t; k < params.total_parts; k += MERGE_WG) {
        if (parts[k * params.columns + c * g].n > 0u) {
            atomicMin(&merge_first, k);
            break;
        }
    }
    workgroupBarrier();
    let first = atomicLoad(&merge_first);
    var shift = 0.0;
    if (first < params.total_parts) {
        shift = parts[first * params.columns + c * g].shift;
    }
    var w = Welford(0u, 0.0, 0.0);
    let links = params.total_parts * g;
    for (var j = t; j < links; j += MERGE_WG) {
        let q = parts[link_slot(c, j)];
        w = chan_merge(w, Welford(q.n, (q.shift - shift) + q.a, q.b));
    }
    merge_n[t] = w.n;
    merge_a[t] = w.mean;
    merge_b[t] = w.m2;
    for (var half = MERGE_WG / 2u; half > 0u; half >>= 1u) {
        workgroupBarrier();
        if (t < half) {
            let m = chan_merge(
                Welford(merge_n[t], merge_a[t], merge_b[t]),
                Welford(merge_n[t + half], merge_a[t + half], merge_b[t + half]),
            );
            merge_n[t] = m.n;
            merge_a[t] = m.mean;
            merge_b[t] = m.m2;
        }
    }
    if (t == 0u) {
        coef[c] = finalize_forward_channel(c, Welford(merge_n[0], merge_a[0], merge_b[0]), shift);
    }
}

@compute @workgroup_size(64)
fn finalize_backward_wg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let c = wid.x + wid.y * groups.x;
    if (c >= params.channels) {
        return;
    }
    var s = vec3<f32>(0.0);
    let links = params.total_parts * params.col_group;
    for (var j = t; j < links; j += MERGE_WG) {
        let q = parts[link_slot(c, j)];
        s += vec3<f32>(q.a, q.b, q.shift);
    }
    merge_sums[t] = s;
    for (var half = MERGE_WG / 2u; half > 0u; half >>= 1u) {
        workgroupBarrier();
        if (t < half) {
            merge_sums[t] += merge_sums[t + half];
        }
    }
    if (t == 0u) {
        let v = merge_sums[0];
        coef[c] = finalize_backward_channel(c, v.x, v.y, v.z);
    }
}
