//! ReLU in f64.

/// `y = max(x, 0)` as torch.relu: NaN stays NaN, -0 stays -0.
pub fn forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| if v < 0.0 { 0.0 } else { v }).collect()
}

/// `dx = 0` where `act <= 0`, else `dy`; `act` the forward's input or output (gradient 0 at 0 and dy at
/// NaN, as PyTorch's threshold_backward).
pub fn backward(act: &[f64], dy: &[f64]) -> Vec<f64> {
    act.iter()
        .zip(dy)
        .map(|(&a, &g)| if a <= 0.0 { 0.0 } else { g })
        .collect()
}
