//! One training step of a layer graph — the CNN (`Conv2d → [BatchNorm2d] → ReLU` blocks, pooling,
//! Flatten, a Linear head) and anything else [`crate::nn::Sequential`] holds — in f64, composed of the
//! per-op references: forward, softmax cross-entropy, backward, SGD with momentum. The whole-step check of
//! the GPU engine's CNN runs against this, as [`super::mlp`] does for the MLP.

use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2dShape;
use crate::ops::pool::{Pool2dShape, PoolKind};
use crate::reference::batchnorm::{self, RunningStats};
use crate::reference::mlp::{Momentum, Sgd};
use crate::reference::{conv2d, linear, pool, relu, sgd, sigmoid, softmax_xent};
use crate::tensor::Layout;

/// One layer with its parameters and state. Parameters are listed weight first, then bias, in layer
/// order: the order of [`Momentum`]'s buffers (and of the GPU model's state dict).
#[derive(Clone, Debug)]
pub enum RefLayer {
    /// `y = x Wᵀ + b` on `[features]` samples; weight `[out, in]`.
    Linear {
        /// `[out, in]`.
        weight: Vec<f64>,
        /// `[out]`.
        bias: Vec<f64>,
    },
    /// 2-D convolution on `[C, H, W]` samples, square kernel; weight `[out, C, k, k]`.
    Conv2d {
        /// `[out, C, k, k]`.
        weight: Vec<f64>,
        /// `[out]`, when the layer has a bias.
        bias: Option<Vec<f64>>,
        /// Output channels.
        out_channels: usize,
        /// Kernel side.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on each side.
        padding: usize,
    },
    /// BatchNorm (1d on `[F]`, 2d on `[C, H, W]` samples), momentum 0.1, eps 1e-5, batch statistics.
    BatchNorm {
        /// γ.
        weight: Vec<f64>,
        /// β.
        bias: Vec<f64>,
        /// Running statistics, updated by the step.
        running: RunningStats,
    },
    /// ReLU.
    Relu,
    /// Sigmoid.
    Sigmoid,
    /// Pooling with a square window.
    Pool {
        /// Max or average.
        kind: PoolKind,
        /// Window side.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// `[C, H, W]` to `[C·H·W]`.
    Flatten,
}

impl RefLayer {
    fn params_mut(&mut self) -> Vec<&mut Vec<f64>> {
        match self {
            RefLayer::Linear { weight, bias } | RefLayer::BatchNorm { weight, bias, .. } => {
                vec![weight, bias]
            }
            RefLayer::Conv2d { weight, bias, .. } => {
                let mut v = vec![weight];
                v.extend(bias.as_mut());
                v
            }
            _ => Vec::new(),
        }
    }

    /// Output sample shape for an input sample shape.
    fn out_shape(&self, x: &[usize]) -> Result<Vec<usize>> {
        let bad = |what: &str| {
            Err(Error::ShapeMismatch {
                what: format!("reference {what} input"),
                expected: "a matching sample shape".into(),
                got: format!("{x:?}"),
            })
        };
        Ok(match self {
            RefLayer::Linear { bias, .. } => {
                if x.len() != 1 {
                    return bad("Linear");
                }
                vec![bias.len()]
            }
            RefLayer::Pool { kernel, stride, .. } => {
                if x.len() != 3 {
                    return bad("pooling");
                }
                let (oh, ow) = pool_shape(1, x, *kernel, *stride).out_hw();
                vec![x[0], oh, ow]
            }
            RefLayer::Conv2d { .. } => {
                if x.len() != 3 {
                    return bad("Conv2d");
                }
                let s = self.conv_shape(1, x).expect("a Conv2d layer");
                let (oh, ow) = s.out_hw()?;
                vec![s.cout, oh, ow]
            }
            RefLayer::Flatten => vec![x.iter().product()],
            _ => x.to_vec(),
        })
    }
}

impl RefLayer {
    /// The op shape of a Conv2d layer for `n` samples of `sample` (`[C, H, W]`).
    fn conv_shape(&self, n: usize, sample: &[usize]) -> Option<Conv2dShape> {
        match self {
            RefLayer::Conv2d {
                bias,
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } => Some(Conv2dShape {
                n,
                cin: sample[0],
                h: sample[1],
                w: sample[2],
                cout: *out_channels,
                kh: *kernel,
                kw: *kernel,
                stride: *stride,
                padding: *padding,
                bias: bias.is_some(),
            }),
            _ => None,
        }
    }
}

/// The op shape of a pooling layer for `n` samples of `sample` (`[C, H, W]`, checked by `out_shape`).
fn pool_shape(n: usize, sample: &[usize], kernel: usize, stride: usize) -> Pool2dShape {
    let [c, h, w] = sample[..] else {
        unreachable!("checked by out_shape")
    };
    Pool2dShape {
        n,
        c,
        h,
        w,
        kernel,
        stride,
    }
}

fn bn_view(n: usize, sample: &[usize]) -> (Vec<usize>, Layout) {
    let mut shape = vec![n];
    shape.extend_from_slice(sample);
    let layout = if sample.len() == 1 {
        Layout::Nc
    } else {
        Layout::Nchw
    };
    (shape, layout)
}

/// What a forward keeps for the backward: every boundary's values, BatchNorm's saved statistics and the
/// max poolings' argmaxes, per layer.
type ForwardTrace = (
    Vec<Vec<f64>>,
    Vec<Option<batchnorm::ForwardOut>>,
    Vec<Vec<usize>>,
);

/// Per-sample shape at every boundary.
fn boundary_shapes(layers: &[RefLayer], input_shape: &[usize]) -> Result<Vec<Vec<usize>>> {
    let mut shapes = vec![input_shape.to_vec()];
    for l in layers.iter() {
        let s = l.out_shape(shapes.last().expect("input shape"))?;
        shapes.push(s);
    }
    Ok(shapes)
}

/// The model's output (logits, `[n, classes]`) on `n` samples `x` in eval mode: BatchNorm with the
/// running statistics (left unchanged).
///
/// # Errors
/// As [`train_step`].
pub fn eval_forward(
    layers: &mut [RefLayer],
    input_shape: &[usize],
    x: &[f64],
    n: usize,
) -> Result<Vec<f64>> {
    let shapes = boundary_shapes(layers, input_shape)?;
    let (mut acts, _, _) = forward(layers, &shapes, x, n, false)?;
    Ok(acts.pop().expect("the output boundary"))
}

/// The model's output on `n` samples `x` with every BatchNorm normalizing with the batch's own
/// statistics (mean, biased variance), as in training; the layers' running statistics are left as they
/// are. This is what an evaluation with mini-batch statistics computes for one batch.
///
/// # Errors
/// As [`train_step`].
pub fn batch_stats_forward(
    layers: &[RefLayer],
    input_shape: &[usize],
    x: &[f64],
    n: usize,
) -> Result<Vec<f64>> {
    let mut scratch = layers.to_vec();
    let shapes = boundary_shapes(&scratch, input_shape)?;
    let (mut acts, _, _) = forward(&mut scratch, &shapes, x, n, true)?;
    Ok(acts.pop().expect("the output boundary"))
}

/// How far the training-mode forward of `n` samples `x` lies from the kinks of the backward, relative to
/// each layer's input RMS: the smallest |ReLU input| and the smallest gap between a max-pooling window's
/// largest value and the next smaller one (`pool::smallest_max_gap`). The running statistics are left
/// unchanged.
///
/// An f32 engine and this f64 reference can fall on different sides of a kink closer than their rounding,
/// after which one whole element's gradient differs (the backward is not continuous there): a whole-step
/// comparison must draw such inputs again instead of widening its tolerance for every case.
///
/// # Errors
/// As [`train_step`].
pub fn kink_margin(layers: &[RefLayer], input_shape: &[usize], x: &[f64], n: usize) -> Result<f64> {
    let mut scratch = layers.to_vec();
    let shapes = boundary_shapes(&scratch, input_shape)?;
    let (acts, _, _) = forward(&mut scratch, &shapes, x, n, true)?;
    let mut margin = f64::INFINITY;
    for (i, layer) in scratch.iter().enumerate() {
        let h = &acts[i];
        let rms = (h.iter().map(|v| v * v).sum::<f64>() / h.len().max(1) as f64).sqrt();
        if rms == 0.0 {
            continue;
        }
        match layer {
            RefLayer::Relu => {
                let nearest = h.iter().fold(f64::INFINITY, |m, v| m.min(v.abs()));
                margin = margin.min(nearest / rms);
            }
            RefLayer::Pool {
                kind: PoolKind::Max,
                kernel,
                stride,
            } => {
                let s = pool_shape(n, &shapes[i], *kernel, *stride);
                margin = margin.min(pool::smallest_max_gap(h, &s) / rms);
            }
            _ => {}
        }
    }
    Ok(margin)
}

/// The forward over every layer; `training`: BatchNorm with batch statistics, updating the running
/// ones (momentum 0.1), else with the running statistics.
fn forward(
    layers: &mut [RefLayer],
    shapes: &[Vec<usize>],
    x: &[f64],
    n: usize,
    training: bool,
) -> Result<ForwardTrace> {
    let mut acts = vec![x.to_vec()];
    let mut bn_saved = vec![None; layers.len()];
    let mut argmaxes = vec![Vec::new(); layers.len()];
    for (i, layer) in layers.iter_mut().enumerate() {
        let h = &acts[i];
        let conv = layer.conv_shape(n, &shapes[i]);
        let y = match layer {
            RefLayer::Linear { weight, bias } => {
                let (out_f, in_f) = (bias.len(), shapes[i][0]);
                linear::forward(h, weight, Some(bias), n, in_f, out_f)
            }
            RefLayer::Conv2d { weight, bias, .. } => {
                let s = conv.expect("a Conv2d layer");
                conv2d::forward(h, weight, bias.as_deref(), &s)?
            }
            RefLayer::BatchNorm {
                weight,
                bias,
                running,
            } => {
                let (shape, layout) = bn_view(n, &shapes[i]);
                let f = batchnorm::forward(
                    h,
                    &shape,
                    layout,
                    Some(weight),
                    Some(bias),
                    Some(running),
                    training,
                    Some(0.1),
                    1e-5,
                )?;
                let y = f.y.clone();
                bn_saved[i] = Some(f);
                y
            }
            RefLayer::Relu => relu::forward(h),
            RefLayer::Sigmoid => sigmoid::forward(h),
            RefLayer::Pool {
                kind,
                kernel,
                stride,
            } => {
                let s = pool_shape(n, &shapes[i], *kernel, *stride);
                let (y, a) = pool::forward(h, &s, *kind);
                argmaxes[i] = a;
                y
            }
            RefLayer::Flatten => h.clone(),
        };
        acts.push(y);
    }
    Ok((acts, bn_saved, argmaxes))
}

/// One step on `x` (`n` samples of `input_shape`, row-major / NCHW) with `labels`: returns the mean loss;
/// updates the layers' parameters and running statistics and `momentum` (one buffer per parameter, in
/// [`RefLayer`]'s order) in place.
///
/// # Errors
/// Shape errors when a layer does not fit its input; the BatchNorm reference's errors.
pub fn train_step(
    layers: &mut [RefLayer],
    input_shape: &[usize],
    momentum: &mut Momentum,
    x: &[f64],
    labels: &[u32],
    opt: Sgd,
) -> Result<f64> {
    let n = labels.len();
    let shapes = boundary_shapes(layers, input_shape)?;
    // Forward, keeping every boundary's values and what the backwards need.
    let (acts, bn_saved, argmaxes) = forward(layers, &shapes, x, n, true)?;
    let classes = shapes.last().map(|s| s.iter().product()).unwrap_or(0);
    let xent = softmax_xent::forward_backward(acts.last().expect("output"), labels, classes);
    // Backward, collecting each layer's parameter gradients.
    let mut dy = xent.dlogits;
    let mut grads: Vec<Vec<Vec<f64>>> = vec![Vec::new(); layers.len()];
    for (i, layer) in layers.iter().enumerate().rev() {
        let h = &acts[i];
        let conv = layer.conv_shape(n, &shapes[i]);
        dy = match layer {
            RefLayer::Linear { weight, bias } => {
                let (out_f, in_f) = (bias.len(), shapes[i][0]);
                let g = linear::backward(h, weight, &dy, n, in_f, out_f);
                grads[i] = vec![g.dweight, g.dbias];
                g.dx
            }
            RefLayer::Conv2d { weight, bias, .. } => {
                let s = conv.expect("a Conv2d layer");
                let g = conv2d::backward(h, weight, &dy, &s)?;
                grads[i] = vec![g.dweight];
                if bias.is_some() {
                    grads[i].push(g.dbias);
                }
                g.dx
            }
            RefLayer::BatchNorm { weight, .. } => {
                let f = bn_saved[i].as_ref().expect("saved by the forward");
                let (shape, layout) = bn_view(n, &shapes[i]);
                let g = batchnorm::backward(
                    h,
                    &dy,
                    &shape,
                    layout,
                    Some(weight),
                    &f.mean,
                    &f.invstd,
                    true,
                )?;
                grads[i] = vec![g.dweight, g.dbias];
                g.dx
            }
            RefLayer::Relu => relu::backward(&acts[i + 1], &dy),
            RefLayer::Sigmoid => sigmoid::backward(&acts[i + 1], &dy),
            RefLayer::Pool {
                kind,
                kernel,
                stride,
            } => {
                let s = pool_shape(n, &shapes[i], *kernel, *stride);
                pool::backward(&dy, &argmaxes[i], &s, *kind)
            }
            RefLayer::Flatten => dy,
        };
    }
    let mut k = 0;
    for (layer, g) in layers.iter_mut().zip(&grads) {
        for (p, gi) in layer.params_mut().into_iter().zip(g) {
            sgd::step(
                p,
                gi,
                &mut momentum[k],
                opt.lr,
                opt.momentum,
                opt.weight_decay,
                opt.nesterov,
            );
            k += 1;
        }
    }
    Ok(xent.loss)
}
