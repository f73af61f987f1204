//! f64 references for the BatchNorm kernel variants: BN followed by ReLU (fused on the GPU, with the ReLU
//! mask kept as bits), and f16 storage.
//!
//! f16 storage changes no math: the kernels compute in f32 on the stored f16 values, so the reference is
//! [`super::batchnorm`] on the f16-rounded inputs, with its outputs rounded to f16 for comparison
//! ([`crate::tensor::round_to_f16`]).

use crate::error::{Error, Result};
use crate::reference::batchnorm::{self as bn, BackwardOut, ForwardOut};
use crate::tensor::Layout;

/// y = relu(z) for a BatchNorm forward's output z, and the mask (z > 0) ReLU's backward uses.
pub fn relu_forward(out: &ForwardOut) -> (Vec<f64>, Vec<bool>) {
    // Where z <= 0 is false (z > 0, or NaN): where threshold_backward passes the gradient.
    let mask: Vec<bool> = out.y.iter().map(|&z| z > 0.0 || z.is_nan()).collect();
    let y = out
        .y
        .iter()
        .map(|&z| if z < 0.0 { 0.0 } else { z })
        .collect();
    (y, mask)
}

/// The backward of y = relu(bn(x)): the BatchNorm backward of dy where the mask passed and 0 elsewhere
/// (PyTorch's threshold_backward, then batch_norm_backward).
///
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths (as [`bn::backward`]).
#[allow(clippy::too_many_arguments)]
pub fn relu_backward(
    x: &[f64],
    dy: &[f64],
    mask: &[bool],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    mean: &[f64],
    invstd: &[f64],
    batch_stats: bool,
) -> Result<BackwardOut> {
    if mask.len() != dy.len() {
        return Err(Error::ShapeMismatch {
            what: "ReLU mask".into(),
            expected: format!("{} values (one per dy)", dy.len()),
            got: format!("{} values", mask.len()),
        });
    }
    let dy_eff: Vec<f64> = dy
        .iter()
        .zip(mask)
        .map(|(&g, &m)| if m { g } else { 0.0 })
        .collect();
    bn::backward(x, &dy_eff, shape, layout, weight, mean, invstd, batch_stats)
}

/// Unpacks a GPU ReLU mask (bit e % 32 of word e / 32 for element e) into one bool per element.
pub fn unpack_mask(words: &[u32], numel: usize) -> Vec<bool> {
    (0..numel)
        .map(|e| words.get(e / 32).is_some_and(|w| (w >> (e % 32)) & 1 == 1))
        .collect()
}
