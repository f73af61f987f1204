//! Linear layer in f64: `y = x W^T + b`, `W` stored `[out, in]` as in PyTorch; backward
//! `dx = dy W`, `dW = dy^T x`, `db = Σ_rows dy`.

/// `y [n, out] = x [n, in] · W^T + b`.
pub fn forward(
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    n: usize,
    in_f: usize,
    out_f: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; n * out_f];
    for r in 0..n {
        for o in 0..out_f {
            let dot: f64 = (0..in_f)
                .map(|i| x[r * in_f + i] * weight[o * in_f + i])
                .sum();
            y[r * out_f + o] = dot + bias.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// Gradients of [`forward`].
#[derive(Clone, Debug)]
pub struct LinearGrads {
    /// `dx [n, in] = dy · W`.
    pub dx: Vec<f64>,
    /// `dW [out, in] = dy^T · x`.
    pub dweight: Vec<f64>,
    /// `db [out] = Σ_rows dy`.
    pub dbias: Vec<f64>,
}

/// Backward of [`forward`].
pub fn backward(
    x: &[f64],
    weight: &[f64],
    dy: &[f64],
    n: usize,
    in_f: usize,
    out_f: usize,
) -> LinearGrads {
    let mut dx = vec![0.0; n * in_f];
    let mut dweight = vec![0.0; out_f * in_f];
    let mut dbias = vec![0.0; out_f];
    for r in 0..n {
        for o in 0..out_f {
            let g = dy[r * out_f + o];
            dbias[o] += g;
            for i in 0..in_f {
                dx[r * in_f + i] += g * weight[o * in_f + i];
                dweight[o * in_f + i] += g * x[r * in_f + i];
            }
        }
    }
    LinearGrads { dx, dweight, dbias }
}
