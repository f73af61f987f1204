//! Adam in f64, PyTorch's `torch.optim.Adam` (amsgrad off, L2 weight decay added to the gradient).

/// One update in place at step `t` (1 for the first update): `g = grad + wd·param;
/// m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; param −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)`.
/// `m` and `v` start at zeros.
#[allow(clippy::too_many_arguments)]
pub fn step(
    param: &mut [f64],
    grad: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    t: u64,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
) {
    let (b1, b2) = betas;
    let bias1 = 1.0 - b1.powi(t as i32);
    let bias2_sqrt = (1.0 - b2.powi(t as i32)).sqrt();
    for i in 0..param.len() {
        let g = grad[i] + weight_decay * param[i];
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        param[i] -= lr / bias1 * m[i] / (v[i].sqrt() / bias2_sqrt + eps);
    }
}
