//! Inference folding: an eval-mode BatchNorm after a `Linear` (or a `Conv2d`) is an affine map per output feature, so it
//! can be folded into that Linear's weight and bias and dropped from the network
//! (`W' = s[o] * W[o, :]`, `b' = s * (b - running_mean) + beta`, `s = gamma / sqrt(running_var + eps)`).
//!
//! The arithmetic is [`crate::reference::bn_variants::fold_linear`], in f64 on the host (it runs once per
//! model, on C values per layer); the folded network runs on the GPU like any other.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{BatchNorm, Conv2d, Layer, Linear, MlpConfig, ParamSlot, Sequential, StateDict};
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

/// The folded weight and bias of a layer whose `[out, ...]` weight and optional `[out]` bias sit in
/// `params` at `weight` and `bias`, followed by `bn` over its `out` outputs.
fn folded(
    gpu: &Arc<Gpu>,
    params: &wgpu::Buffer,
    weight: &ParamSlot,
    bias: Option<&ParamSlot>,
    out: usize,
    bn: &BatchNorm,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if bn.num_features() != out {
        return Err(Error::ShapeMismatch {
            what: "BatchNorm folded into the layer before it".into(),
            expected: format!("{out} features (the layer's outputs)"),
            got: format!("{}", bn.num_features()),
        });
    }
    let w = gpu.download::<f32>(params, 4 * weight.offset as u64, weight.len())?;
    let b = bias
        .map(|s| gpu.download::<f32>(params, 4 * s.offset as u64, s.len()))
        .transpose()?;
    let (rm, rv) = eval_stats(bn)?;
    let gamma = bn.weight_values()?;
    let beta = bn.bias_values()?;
    let (fw, fb) = fold_linear(
        &f64s(&w),
        b.as_deref().map(f64s).as_deref(),
        out,
        gamma.as_deref().map(f64s).as_deref(),
        beta.as_deref().map(f64s).as_deref(),
        &rm,
        &rv,
        bn.config().eps as f64,
    )?;
    Ok((f32s(&fw), f32s(&fb)))
}

fn write_folded(
    gpu: &Arc<Gpu>,
    params: &wgpu::Buffer,
    weight: &ParamSlot,
    bias: &ParamSlot,
    (w, b): (Vec<f32>, Vec<f32>),
) -> Result<()> {
    gpu.queue
        .write_buffer(params, 4 * weight.offset as u64, bytemuck::cast_slice(&w));
    gpu.queue
        .write_buffer(params, 4 * bias.offset as u64, bytemuck::cast_slice(&b));
    gpu.wait()
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
    let bias = linear.bias.as_ref().ok_or_else(|| {
        Error::config("cannot fold a BatchNorm into a Linear without a bias: the shift needs one")
    })?;
    let values = folded(
        gpu,
        params,
        &linear.weight,
        Some(bias),
        linear.out_features,
        bn,
    )?;
    write_folded(gpu, params, &linear.weight, bias, values)
}

/// The weight `[out, in, kh, kw]` and bias `[out]` of a convolution equal to `conv` followed by `bn` in
/// eval mode (a convolution is linear per output channel: the same rule as for a Linear, over
/// `in * kh * kw` inputs). Conv-BN blocks usually have no conv bias; the folded one needs a bias, so
/// build it with `Conv2dConfig::bias(true)` and load these values.
///
/// # Errors
/// As [`fold_into_linear`], a convolution without bias allowed.
pub fn folded_conv2d(
    gpu: &Arc<Gpu>,
    params: &wgpu::Buffer,
    conv: &Conv2d,
    bn: &BatchNorm,
) -> Result<(Vec<f32>, Vec<f32>)> {
    folded(
        gpu,
        params,
        &conv.weight,
        conv.bias.as_ref(),
        conv.config.out_channels,
        bn,
    )
}

/// Folds `bn` into `conv` in place (its weight and bias in `params`).
///
/// # Errors
/// As [`fold_into_linear`]; [`Error::BadConfig`] for a convolution without a bias slot (use
/// [`folded_conv2d`] and a convolution with one).
pub fn fold_into_conv2d(
    gpu: &Arc<Gpu>,
    params: &wgpu::Buffer,
    conv: &Conv2d,
    bn: &BatchNorm,
) -> Result<()> {
    let bias = conv.bias.as_ref().ok_or_else(|| {
        Error::config(
            "cannot fold a BatchNorm into a Conv2d without a bias slot in place: use folded_conv2d \
             and a Conv2d with a bias",
        )
    })?;
    let values = folded_conv2d(gpu, params, conv, bn)?;
    write_folded(gpu, params, &conv.weight, bias, values)
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
        // if-let rather than a match: the layer enum grows (conv, pooling) and this folds MLPs only.
        if let Layer::Linear(l) = &layers[i] {
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
        } else if !matches!(layers[i], Layer::Sigmoid(_)) {
            return Err(Error::config(format!(
                "layer {i}: fold_mlp folds MLPs (Linear, BatchNorm right after a Linear, Sigmoid) only"
            )));
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
