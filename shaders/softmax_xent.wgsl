// Softmax cross-entropy over ROWS rows of CLASSES logits (the host prepends both as consts), with the
// accuracy count, in one workgroup: no float atomics and a fixed summation order, so the result does not
// depend on scheduling. Numerically stable: logsumexp = max + log(sum exp(x - max)).
//
// train: dlogits = (softmax - onehot) / ROWS; stats[0] = mean loss of this batch; and the running totals
//   stats[1] += sum of losses, stats[2] += correct predictions, stats[3] += rows (the host reads and
//   clears them every k steps instead of reading back every step).
// eval: the running totals only.
// A prediction is the first index of the largest logit (torch.argmax's choice on ties; a NaN counts as
// the largest, its first index wins). A label past the classes makes its row's loss and dlogits NaN, and
// the row is not correct: PyTorch raises there, a kernel cannot, and a NaN loss stops a training run where
// a clamped label would train on a wrong class in silence. The loss is (max - logit[label]) + log(sum):
// the difference first, so that large logits keep their precision (max + log(sum) rounds to max's ulp: at
// logits of 1e4 the loss of [1e4, -1e4, 0, 1e4] came out 0.69336 instead of 0.69315), and softmax =
// exp((x - max) - log(sum)).

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;

const WG: u32 = 64u;
var<workgroup> part_loss: array<f32, 64>;
var<workgroup> part_correct: array<f32, 64>;

// (max, log(sum exp(x - max)), argmax) of row r.
fn row_lse(r: u32) -> vec3<f32> {
    let base = r * CLASSES;
    var mx = logits[base];
    var am = 0u;
    for (var c = 1u; c < CLASSES; c++) {
        let v = logits[base + c];
        if (!is_nan(mx) && (v > mx || is_nan(v))) {
            mx = v;
            am = c;
        }
    }
    var s = 0.0;
    for (var c = 0u; c < CLASSES; c++) {
        s += exp(logits[base + c] - mx);
    }
    return vec3<f32>(mx, log(s), f32(am));
}

fn reduce_parts(li: u32) -> vec2<f32> {
    workgroupBarrier();
    var loss = 0.0;
    var correct = 0.0;
    if (li == 0u) {
        for (var i = 0u; i < WG; i++) {
            loss += part_loss[i];
            correct += part_correct[i];
        }
    }
    return vec2<f32>(loss, correct);
}

@compute @workgroup_size(64)
fn train(@builtin(local_invocation_index) li: u32) {
    var loss = 0.0;
    var correct = 0.0;
    let inv_rows = 1.0 / f32(ROWS);
    for (var r = li; r < ROWS; r += WG) {
        let t = row_lse(r);
        let ok = labels[r] < CLASSES;
        let label = min(labels[r], CLASSES - 1u);
        let base = r * CLASSES;
        loss += or_nan((t.x - logits[base + label]) + t.y, ok);
        if (ok && u32(t.z) == label) {
            correct += 1.0;
        }
        for (var c = 0u; c < CLASSES; c++) {
            let p = exp((logits[base + c] - t.x) - t.y);
            dlogits[base + c] = or_nan((p - select(0.0, 1.0, c == label)) * inv_rows, ok);
        }
    }
    part_loss[li] = loss;
    part_correct[li] = correct;
    let total = reduce_parts(li);
    if (li == 0u) {
        stats[0] = total.x * inv_rows;
        stats[1] += total.x;
        stats[2] += total.y;
        stats[3] += f32(ROWS);
    }
}

@compute @workgroup_size(64)
fn eval(@builtin(local_invocation_index) li: u32) {
    var loss = 0.0;
    var correct = 0.0;
    for (var r = li; r < ROWS; r += WG) {
        let t = row_lse(r);
        let ok = labels[r] < CLASSES;
        let label = min(labels[r], CLASSES - 1u);
        loss += or_nan((t.x - logits[r * CLASSES + label]) + t.y, ok);
        if (ok && u32(t.z) == label) {
            correct += 1.0;
        }
    }
    part_loss[li] = loss;
    part_correct[li] = correct;
    let total = reduce_parts(li);
    if (li == 0u) {
        stats[1] += total.x;
        stats[2] += total.y;
        stats[3] += f32(ROWS);
    }
}
