//! SGD with momentum in f64, PyTorch's `torch.optim.SGD` with dampening 0.

/// One update in place: `d = grad + wd·param; buf = momentum·buf + d;
/// param -= lr·(nesterov ? d + momentum·buf : buf)`. `buf` starts at zeros.
pub fn step(
    param: &mut [f64],
    grad: &[f64],
    buf: &mut [f64],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) {
    for i in 0..param.len() {
        let d = grad[i] + weight_decay * param[i];
        buf[i] = momentum * buf[i] + d;
        let s = if nesterov {
            d + momentum * buf[i]
        } else {
            buf[i]
        };
        param[i] -= lr * s;
    }
}
