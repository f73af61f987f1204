// SGD with momentum over one flat arena holding every parameter (one dispatch per step for the whole
// model), PyTorch's torch.optim.SGD with dampening 0:
//   d = grad + weight_decay * param; buf = momentum * buf + d; d = nesterov ? d + momentum * buf : buf;
//   param -= lr * d
// A zero-initialized buf equals PyTorch's first-step buf = d. The host prepends `alias T` (vec4<f32> when
// the length is a multiple of 4, as a model's arena always is: a quarter of the lane loads on lavapipe,
// which issues storage loads lane by lane; f32 otherwise) and `const LEN: u32`, the length in units of T.

struct Hyper {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: u32,
}

@group(0) @binding(0) var<storage, read_write> param: array<T>;
@group(0) @binding(1) var<storage, read_write> grad: array<T>;
@group(0) @binding(2) var<storage, read_write> buf: array<T>;
@group(0) @binding(3) var<storage, read> hyper: Hyper;

@compute @workgroup_size(256)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let p = param[i];
    let d = grad[i] + hyper.weight_decay * p;
    let m = hyper.momentum * buf[i] + d;
    buf[i] = m;
    var step = m;
    if (hyper.nesterov != 0u) {
        step = d + hyper.momentum * m;
    }
    param[i] = p - hyper.lr * step;
}
