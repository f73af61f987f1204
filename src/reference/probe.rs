//! The probe measurements in f64.

/// `a + alpha·b`.
pub fn axpy(a: &[f64], alpha: f64, b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| x + alpha * y).collect()
}

/// `[Σ(a−b)², Σa·b, Σa², Σb²]`.
pub fn diff_stats(a: &[f64], b: &[f64]) -> [f64; 4] {
    let mut s = [0.0; 4];
    for (&x, &y) in a.iter().zip(b) {
        s[0] += (x - y) * (x - y);
        s[1] += x * y;
        s[2] += x * x;
        s[3] += y * y;
    }
    s
}

/// The `q`-th percentile (0..=100) of `v` by linear interpolation between closest ranks (NumPy's
/// default); NaN for an empty slice.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = (q / 100.0).clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}
