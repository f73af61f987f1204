// SGD with momentum over one flat arena holding every parameter (one dispatch per step for the whole
// model), PyTorch's torch.optim.SGD with dampening 0:
//   d = grad + weight_decay * param; buf = momentum * buf + d; d = nesterov ? d + momentum * buf : buf;
//   param -= lr * d
// A zero-initialized buf equals PyTorch's first-step buf = d. The host prepends `alias T` (vec4<f32> when
// the length is a multiple of 4, as a model's arena always is: a quarter of the lane loads on lavapipe,
// which issues storage loads lane by lane; f32 otherwise) and `const LEN: u32`, the length in units of T,
// and the loads `fn load_grad(i: u32) -> T` (the gradient's binding 1), `load_param` and `load_buf`: each a
// storage load, or on CPU drivers, where the arenas are mirrored into textures (`Texels` in
// src/ops/kernel.rs), an image load (bindings 1, 4 and 5), which lavapipe does for all lanes at once
// instead of looping over them. param and buf are written as storage either way.

// Each invocation updates UNITS consecutive units and reads the hyperparameters once, as one texel of
// u32s: (lr, momentum, weight_decay, nesterov) as the host's `Hyper` lays them out. A storage read of them
// was a loop over the lanes on lavapipe even at one address: with it, SGD took 0.75 / 0.55 / 0.45 ms at
// 2 / 4 / 8 units an invocation on one thread of the AVX2 host; from the texel, 0.41 / 0.39 / 0.38 at
// 4 / 8 / 16 (examples/step_profile.rs, 2026-12-04 21:55).
const UNITS: u32 = 8u;

@group(0) @binding(0) var<storage, read_write> param: array<T>;
@group(0) @binding(2) var<storage, read_write> buf: array<T>;
@group(0) @binding(3) var hyper: texture_2d<u32>;

// One unit's update from its gradient g, with the hyperparameters' texel h. Also the update that
// `matmul_outer_sgd` (src/ops/linear.rs) applies to the first Linear's W and b as its dW product stores
// them and to the other units of the arena in the same dispatch: one function, so that both round alike.
fn sgd_apply(i: u32, g: T, h: vec4<u32>) {
    let lr = bitcast<f32>(h.x);
    let momentum = bitcast<f32>(h.y);
    let weight_decay = bitcast<f32>(h.z);
    let p = load_param(i);
    let d = g + weight_decay * p;
    let m = momentum * load_buf(i) + d;
    buf[i] = m;
    var step = m;
    if (h.w != 0u) {
        step = d + momentum * m;
    }
    param[i] = p - lr * step;
}

@compute @workgroup_size(256)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = (gid.x + gid.y * nwg.x * 256u) * UNITS;
    if (first >= LEN) {
        return;
    }
    let h = textureLoad(hyper, vec2<u32>(0u), 0);
    for (var i = first; i < min(first + UNITS, LEN); i++) {
        sgd_apply(i, load_grad(i), h);
    }
}
