//! Inference folding: an eval-mode BatchNorm after a `Linear` is an affine map per output feature, so it
//! can be folded into that Linear's weight and bias and dropped from the network
//! (`W' = s[o] * W[o, :]`, `b' = s * (b - running_mean) + beta`, `s = gamma / sqrt(running_var + eps)`).
//!
//! The arithmetic is [`crate::reference::bn_variants::fold_linear`], in f64 on the host (it runs once per
//! model, on C values per layer); the folded network runs on the GPU like any other.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{BatchNorm, Layer, Linear, MlpConfig, Sequential, StateDict};
use crate::reference::bn_variants::fold_linear;

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The BatchNorm's eval-mode statistics, or an error naming why it cannot be folded.
fn eval_stats(bn: &BatchNorm) -> Result<(Vec<f64>, Vec<f64>)> {
    match (&bn.running_mean, &bn.running_var) {
        (Some(m), Some(v)) => Ok((f64s(&bn.read(m)?), f64s(&bn.read(v)?))),
        _ => Err(Error::config(
            "cannot fold a BatchNorm without running statistics (track_running_stats=false): \
             its eval mode uses batch statistics",
        )),
    }
}

/// Folds `bn` (its eval mode: running statistics, gamma, beta) into `linear`, whose parameters live in
/// `params` (the model's arena); the Linear then computes what Linear followed by `bn` in eval mode did.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `bn` is not over the Linear's outputs; [`Error::BadConfig`] for a
/// BatchNorm without running statistics or a Linear without a bias; device errors.
pub fn fold_into_linear(
    gpu: &Arc<Gpu>,
    params: &wgpu::Buffer,
    linear: &Linear,
    bn: &BatchNorm,
) -> Result<()> {
    if bn.num_features() != linear.out_features {
        return Err(Error::ShapeMismatch {
            what: "BatchNorm folded into a Linear".into(),
            expected: format!(
                "{} features (the Linear's out_features)",
                linear.out_features
            ),
            got: format!("{}", bn.num_features()),
        });
    }
    let bias_slot = linear.bias.as_ref().ok_or_else(|| {
        Error::config("cannot fold a BatchNorm into a Linear without a bias: the shift needs one")
    })?;
    let w = gpu.download::<f32>(params, 4 * linear.weight.offset as u64, linear.weight.len())?;
    let b = gpu.download::<f32>(params, 4 * bias_slot.offset as u64, bias_slot.len())?;
    let (rm, rv) = eval_stats(bn)?;
    let gamma = bn.weight.as_ref().map(|g| bn.read(g)).transpose()?;
    let beta = bn.bias.as_ref().map(|g| bn.read(g)).transpose()?;
    let (fw, fb) = fold_linear(
        &f64s(&w),
        Some(&f64s(&b)),
        linear.out_features,
        gamma.as_deref().map(f64s).as_deref(),
        beta.as_deref().map(f64s).as_deref(),
        &rm,
        &rv,
        bn.config().eps as f64,
    )?;
    let write = |offset: usize, v: &[f64]| {
        gpu.queue
            .write_buffer(params, 4 * offset as u64, bytemuck::cast_slice(&f32s(v)))
    };
    write(linear.weight.offset, &fw);
    write(bias_slot.offset, &fb);
    gpu.wait()
}

/// A copy of the MLP `model` for inference with every BatchNorm folded into the Linear before it: the
/// same widths and activations without the BatchNorm layers (state-dict indices as PyTorch numbers
/// the shorter `nn.Sequential`), holding `capacity` rows per call. In eval mode its outputs equal
/// `model`'s in eval mode up to f32 rounding.
///
/// # Errors
/// [`Error::BadConfig`] for a BatchNorm that does not follow a Linear or has no running statistics;
/// device errors.
pub fn fold_mlp(gpu: &Arc<Gpu>, model: &Sequential, capacity: usize) -> Result<Sequential> {
    let sd = model.state_dict()?;
    let mut sizes = vec![model.in_features()];
    let mut folded = StateDict::default();
    let mut new_index = 0usize;
    let layers = &model.layers;
    let mut i = 0;
    while i < layers.len() {
        match &layers[i] {
            Layer::Linear(l) => {
                let get = |k: String| {
                    sd.get(&k)
                        .map(f64s)
                        .ok_or_else(|| Error::config(format!("state dict lacks '{k}'")))
                };
                let mut w = get(format!("{i}.weight"))?;
                let mut b = get(format!("{i}.bias"))?;
                if let Some(Layer::BatchNorm { bn, .. }) = layers.get(i + 1) {
                    let (rm, rv) = eval_stats(bn)?;
                    let gamma = get(format!("{}.weight", i + 1))?;
                    let beta = get(format!("{}.bias", i + 1))?;
                    (w, b) = fold_linear(
                        &w,
                        Some(&b),
                        l.out_features,
                        Some(&gamma),
                        Some(&beta),
                        &rm,
                        &rv,
                        bn.config().eps as f64,
                    )?;
                    i += 1;
                }
                let shape = vec![l.out_features, l.in_features];
                folded
                    .tensors
                    .push((format!("{new_index}.weight"), shape, f32s(&w)));
                folded
                    .tensors
                    .push((format!("{new_index}.bias"), vec![l.out_features], f32s(&b)));
                sizes.push(l.out_features);
            }
            Layer::BatchNorm { .. } => {
                return Err(Error::config(format!(
                    "layer {i}: only a BatchNorm right after a Linear can be folded"
                )))
            }
            Layer::Sigmoid(_) => {}
        }
        new_index += 1;
        i += 1;
    }
    let config = MlpConfig {
        sizes,
        bn: false,
        init: crate::nn::Init::Gaussian { std: 0.0 },
        seed: 0,
    };
    let mut out = Sequential::mlp(gpu, &config, capacity)?;
    out.load_state_dict(&folded)?;
    out.train(false);
    Ok(out)
}
