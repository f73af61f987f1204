// matmul_dot_xent: a network's head y = x W^T + b and softmax cross-entropy over its logits in one
// dispatch, for at most 64 rows and 16 classes (one matmul_dot block holds every logit). Appended to
// shaders/linear_dot.wgsl with C's scalar binding; the host prepends M, N (classes, >= 2), K and the
// bias's `fn dot_init(n0) -> array<vec4<f32>, DOT_QUADS>` (`linear::dot_module_head`) and appends the 16-column
// block (shaders/linear_dot16.wgsl) with the plain store epilogue (`dot_out`), and checks the rest. The block
// stores the logits, then each lane reads back its own rows (no barrier: the lane wrote them) and does
// what shaders/softmax_xent.wgsl's `train` does for them: loss = (max - logit[label]) + log(sum exp(x -
// max)), the prediction is the first index of the largest logit (torch.argmax's choice on ties; a NaN
// counts as the largest), dlogits = (softmax - onehot) / M, a label past the classes gives its row NaNs;
// the lanes' sums by subgroupAdd, then lane 0 writes stats[0] = this batch's mean loss and adds to the
// running totals stats[1..4] (Σ loss, Σ correct, rows).
// One dispatch instead of two; on lavapipe a dispatch costs a worker wake-up (~50 us) besides its work.

@group(0) @binding(4) var<storage, read_write> xent_labels: array<u32>;
@group(0) @binding(5) var<storage, read_write> xent_dlogits: array<f32>;
@group(0) @binding(6) var<storage, read_write> xent_stats: array<f32>;

// (loss, correct) of row m; writes its dlogits. As softmax_xent.wgsl: a NaN logit counts as the largest
// (its first index), the loss is (max - logit[label]) + log(sum) and softmax exp((x - max) - log(sum)),
// so that large logits keep their precision.
fn xent_row(m: u32, r: u32) -> vec2<f32> {
    let base = m * N;
    var mx = c[base];
    var am = 0u;
    for (var k = 1u; k < N; k++) {
        let v = c[base + k];
        if (!is_nan(mx) && (v > mx || is_nan(v))) {
            mx = v;
            am = k;
        }
    }
    var s = 0.0;
    for (var k = 0u; k < N; k++) {
        s += exp(c[base + k] - mx);
    }
    let log_s = log(s);
    let ok = xent_labels[m] < N;
    let label = min(xent_labels[m], N - 1u);
    let inv_rows = 1.0 / f32(M);
    for (var k = 0u; k < N; k++) {
        let p = exp((c[base + k] - mx) - log_s);
        let d = or_nan((p - select(0.0, 1.0, k == label)) * inv_rows, ok);
        xent_dlogits[base + k] = d;
        xent_keep(r, k, d);
    }
    return vec2<f32>(or_nan((mx - c[base + label]) + log_s, ok), select(0.0, 1.0, ok && am == label));
}

// The whole op, for the subgroup that runs it (this entry point, or shaders/linear_head_step.wgsl's).
fn dot_xent(lane: u32) {
    product_dot(0u, lane, dot_init(0u), DOT_OUT_STORE);
    var sums = vec2<f32>(0.0);
    for (var r = 0u; r < 8u; r++) {
        let m = lane + 8u * r;
        if (m < M) {
            sums += xent_row(m, r);
        }
    }
    let total = subgroupAdd(sums);
    if (lane == 0u) {
        xent_stats[0] = total.x * (1.0 / f32(M));
        xent_stats[1] += total.x;
        xent_stats[2] += total.y;
        xent_stats[3] += f32(M);
    }
}

@compute @workgroup_size(8)
fn matmul_dot_xent(@builtin(subgroup_invocation_id) lane: u32) {
    dot_xent(lane);
}
