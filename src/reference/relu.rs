//! ReLU in f64.

/// `y = max(x, 0)`.
pub fn forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

/// `dx = dy · [act > 0]`, `act` the forward's input or output (gradient 0 at 0, as PyTorch).
pub fn backward(act: &[f64], dy: &[f64]) -> Vec<f64> {
    act.iter()
        .zip(dy)
        .map(|(&a, &g)| if a > 0.0 { g } else { 0.0 })
        .collect()
}
