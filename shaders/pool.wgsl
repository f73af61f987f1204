// 2-D max and average pooling over NCHW planes, no padding, floor output size. The host prepends
// PLANES (N*C), H, W, OH, OW, K (kernel), S (stride) as `const u32`s, and shaders/float_bits.wgsl.
//
// Forwards: one invocation per output value walks its K*K window row by row. Max keeps the first maximum
// (a later value replaces it only when strictly greater: PyTorch's tie rule), except that a NaN always
// replaces it (PyTorch's `val > maxval || isnan(val)`: a window holding a NaN gives NaN, its gradient going
// to the last NaN), and records its index within the plane (ih*W + iw) for the backward.
// Backwards gather rather than scatter: one invocation per input value sums the contributions of every
// window that covers it (windows overlap when S < K), so no atomics are needed and the sum's order is fixed.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn max_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = flat(gid, nwg);
    if (o >= PLANES * OH * OW) {
        return;
    }
    let plane = o / (OH * OW);
    let r = o % (OH * OW);
    let h0 = (r / OW) * S;
    let w0 = (r % OW) * S;
    let base = plane * H * W;
    var best_at = h0 * W + w0;
    var best = x[base + best_at];
    for (var i = 0u; i < K; i++) {
        for (var j = 0u; j < K; j++) {
            let at = (h0 + i) * W + w0 + j;
            let v = x[base + at];
            if (v > best || is_nan(v)) {
                best = v;
                best_at = at;
            }
        }
    }
    y[o] = best;
    argmax[o] = best_at;
}

@compute @workgroup_size(256)
fn avg_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = flat(gid, nwg);
    if (o >= PLANES * OH * OW) {
        return;
    }
    let plane = o / (OH * OW);
    let r = o % (OH * OW);
    let h0 = (r / OW) * S;
    let w0 = (r % OW) * S;
    let base = plane * H * W;
    var sum = 0.0;
    for (var i = 0u; i < K; i++) {
        for (var j = 0u; j < K; j++) {
            sum += x[base + (h0 + i) * W + w0 + j];
        }
    }
    y[o] = sum / f32(K * K);
}

// The output rows (or columns) whose windows cover input row i: ceil((i + 1 - K) / S) ..= min(i / S, last).
fn first_window(i: u32) -> u32 {
    return select(0u, (i + 1u - K + S - 1u) / S, i + 1u > K);
}

@compute @workgroup_size(256)
fn max_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if (e >= PLANES * H * W) {
        return;
    }
    let plane = e / (H * W);
    let at = e % (H * W);
    let ih = at / W;
    let iw = at % W;
    let obase = plane * OH * OW;
    var sum = 0.0;
    for (var oh = first_window(ih); oh <= min(ih / S, OH - 1u); oh++) {
        for (var ow = first_window(iw); ow <= min(iw / S, OW - 1u); ow++) {
            let o = obase + oh * OW + ow;
            if (argmax[o] == at) {
                sum += dy[o];
            }
        }
    }
    dx[e] = sum;
}

@compute @workgroup_size(256)
fn avg_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if (e >= PLANES * H * W) {
        return;
    }
    let plane = e / (H * W);
    let at = e % (H * W);
    let ih = at / W;
    let iw = at % W;
    let obase = plane * OH * OW;
    var sum = 0.0;
    for (var oh = first_window(ih); oh <= min(ih / S, OH - 1u); oh++) {
        for (var ow = first_window(iw); ow <= min(iw / S, OW - 1u); ow++) {
            sum += dy[obase + oh * OW + ow];
        }
    }
    dx[e] = sum / f32(K * K);
}
