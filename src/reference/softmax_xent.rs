//! Softmax cross-entropy in f64 (PyTorch's `CrossEntropyLoss`, mean over the batch) and accuracy.

/// Result of [`forward_backward`].
#[derive(Clone, Debug)]
pub struct XentOut {
    /// Mean loss over the rows.
    pub loss: f64,
    /// `(softmax − onehot) / rows`, the gradient of the mean loss.
    pub dlogits: Vec<f64>,
    /// Rows whose first largest logit is at the label.
    pub correct: usize,
}

/// Loss, gradient and correct count for `[rows, classes]` logits. A label `>= classes` gives its row a NaN
/// loss and NaN gradients and never counts as correct, as the kernels do (PyTorch raises instead).
pub fn forward_backward(logits: &[f64], labels: &[u32], classes: usize) -> XentOut {
    let rows = labels.len();
    let mut loss = 0.0;
    let mut correct = 0;
    let mut dlogits = vec![0.0; logits.len()];
    for (r, &label) in labels.iter().enumerate() {
        let z = &logits[r * classes..(r + 1) * classes];
        let (mut am, mut mx) = (0, z[0]);
        // torch.argmax: the first largest; a NaN counts as the largest (its first index wins).
        for (c, &v) in z.iter().enumerate().skip(1) {
            if !mx.is_nan() && (v > mx || v.is_nan()) {
                mx = v;
                am = c;
            }
        }
        let log_sum = z.iter().map(|&v| (v - mx).exp()).sum::<f64>().ln();
        if label as usize >= classes {
            loss += f64::NAN;
            dlogits[r * classes..(r + 1) * classes].fill(f64::NAN);
            continue;
        }
        loss += (mx - z[label as usize]) + log_sum;
        correct += (am == label as usize) as usize;
        for c in 0..classes {
            let p = ((z[c] - mx) - log_sum).exp();
            dlogits[r * classes + c] =
                (p - if c == label as usize { 1.0 } else { 0.0 }) / rows as f64;
        }
    }
    XentOut {
        loss: loss / rows as f64,
        dlogits,
        correct,
    }
}
