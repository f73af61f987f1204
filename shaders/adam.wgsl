// Adam over one flat arena holding every parameter (one dispatch per step for the whole model),
// PyTorch's torch.optim.Adam (amsgrad off, L2 weight decay added to the gradient):
//   g = grad + weight_decay * param
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
//   param -= step_size * m / (sqrt(v) / bias2_sqrt + eps)
// The host folds the bias corrections into the uniform in f64, as PyTorch computes them in Python
// floats: step_size = lr / (1 - beta1^t), bias2_sqrt = sqrt(1 - beta2^t), and 1 - beta1, 1 - beta2 (in f32,
// 1 - 0.999 would be 1.3e-5 off). Zero-initialized m and v are PyTorch's initial state. The host prepends `const LEN: u32`.

struct Hyper {
    step_size: f32,
    bias2_sqrt: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
}

@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(4) var<uniform> hyper: Hyper;

@compute @workgroup_size(256)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let p = param[i];
    let g = grad[i] + hyper.weight_decay * p;
    // m + (1 - beta1)(g - m) is PyTorch's lerp form of the first-moment update.
    let m = exp_avg[i] + hyper.one_minus_beta1 * (g - exp_avg[i]);
    let v = hyper.beta2 * exp_avg_sq[i] + hyper.one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    let denom = sqrt(v) / hyper.bias2_sqrt + hyper.eps;
    param[i] = p - hyper.step_size * (m / denom);
}
