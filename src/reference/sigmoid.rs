//! Logistic sigmoid in f64.

/// `y = 1 / (1 + exp(-x))`.
pub fn forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect()
}

/// `dx = dy · y · (1 − y)` from the forward's output `y`.
pub fn backward(y: &[f64], dy: &[f64]) -> Vec<f64> {
    y.iter().zip(dy).map(|(&s, &g)| g * s * (1.0 - s)).collect()
}
