//! Residual add in f64.

/// `y = a + b`.
pub fn forward(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `(da, db) = (dy, dy)`.
pub fn backward(dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (dy.to_vec(), dy.to_vec())
}
