//! `Conv2d`: PyTorch's `nn.Conv2d` (dilation 1, groups 1, zero padding) on NCHW activations, `weight
//! [out, in, kh, kw]`, `bias [out]`. Its parameters and gradients live in the model's arenas (see
//! [`crate::nn::ParamSlot`]); the output stays NCHW, so a BatchNorm after it is BatchNorm2d.

use std::collections::HashMap;
use std::sync::Arc;

use rand::Rng;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{Init, ParamSlot};
use crate::ops::batchnorm::BufferRef;
use crate::ops::conv2d::{Conv2dOp, Conv2dShape};
use crate::record::Record;

/// What a convolution layer is; defaults as PyTorch's (`stride` 1, `padding` 0, with bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel_size: (usize, usize),
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding on each side (both axes).
    pub padding: usize,
    /// Whether the layer adds a bias.
    pub bias: bool,
}

impl Conv2dConfig {
    /// A `kernel_size × kernel_size` convolution with stride 1, no padding and a bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel_size: (kernel_size, kernel_size),
            stride: 1,
            padding: 0,
            bias: true,
        }
    }

    /// With this stride.
    pub fn stride(self, stride: usize) -> Self {
        Conv2dConfig { stride, ..self }
    }

    /// With this padding.
    pub fn padding(self, padding: usize) -> Self {
        Conv2dConfig { padding, ..self }
    }

    /// With or without a bias.
    pub fn bias(self, bias: bool) -> Self {
        Conv2dConfig { bias, ..self }
    }

    /// The state-dict shape of `weight`: `[out, in, kh, kw]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.out_channels,
            self.in_channels,
            self.kernel_size.0,
            self.kernel_size.1,
        ]
    }

    /// Inputs per output value: `in · kh · kw`.
    pub fn fan_in(&self) -> usize {
        self.in_channels * self.kernel_size.0 * self.kernel_size.1
    }

    /// The op's shape for an input `[n, in, h, w]`.
    pub fn shape(&self, n: usize, (h, w): (usize, usize)) -> Conv2dShape {
        Conv2dShape {
            n,
            cin: self.in_channels,
            h,
            w,
            cout: self.out_channels,
            kh: self.kernel_size.0,
            kw: self.kernel_size.1,
            stride: self.stride,
            padding: self.padding,
            bias: self.bias,
        }
    }

    /// Output height and width for an input of `(h, w)`.
    ///
    /// # Errors
    /// As [`Conv2dShape::out_hw`].
    pub fn out_hw(&self, hw: (usize, usize)) -> Result<(usize, usize)> {
        self.shape(1, hw).out_hw()
    }

    /// Initial `weight` (and `bias` when the layer has one) drawn with `rng`: `init` for the weight with
    /// `fan_in = in · kh · kw`, `fan_out = out · kh · kw` (PyTorch's fans) and a zero bias, or, for `None`, PyTorch's default (weight and bias both
    /// U(±1/√fan_in), what `kaiming_uniform_(a=√5)` comes to).
    pub fn initial_values(
        &self,
        init: Option<Init>,
        rng: &mut impl Rng,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let (out, fan_in) = (self.out_channels, self.fan_in());
        let fan_out = out * self.kernel_size.0 * self.kernel_size.1;
        match init {
            Some(init) => (
                init.weight(rng, out, fan_in, fan_out),
                self.bias.then(|| vec![0.0; out]),
            ),
            None => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                let mut draw = |len: usize| -> Vec<f32> {
                    (0..len)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                };
                let w = draw(out * fan_in);
                (w, self.bias.then(|| draw(out)))
            }
        }
    }
}

/// A 2-D convolution layer.
#[derive(Debug)]
pub struct Conv2d {
    gpu: Arc<Gpu>,
    /// What the layer is.
    pub config: Conv2dConfig,
    /// Where `weight [out, in, kh, kw]` lives in the arenas.
    pub weight: ParamSlot,
    /// Where `bias [out]` lives, when the layer has one.
    pub bias: Option<ParamSlot>,
    ops: HashMap<(usize, usize, usize), Conv2dOp>,
}

impl Conv2d {
    /// A layer whose parameters occupy `weight` and `bias` in the model's arenas.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a zero size or stride; [`Error::ShapeMismatch`] when a slot's shape is not
    /// the config's (`weight [out, in, kh, kw]`, `bias [out]`) or a bias slot is given exactly when the
    /// config has no bias (or the reverse).
    pub fn new(
        gpu: &Arc<Gpu>,
        config: Conv2dConfig,
        weight: ParamSlot,
        bias: Option<ParamSlot>,
    ) -> Result<Self> {
        // Checks the sizes (the spatial size is not known yet: any will do that a kernel fits).
        config
            .shape(1, config.kernel_size)
            .out_hw()
            .map_err(|e| match e {
                Error::ShapeMismatch { .. } => Error::config(format!("conv2d {config:?}: {e}")),
                e => e,
            })?;
        if weight.shape != config.weight_shape() {
            return Err(Error::ShapeMismatch {
                what: format!("conv2d weight slot '{}'", weight.name),
                expected: format!("{:?}", config.weight_shape()),
                got: format!("{:?}", weight.shape),
            });
        }
        match (&bias, config.bias) {
            (Some(b), true) if b.shape != [config.out_channels] => {
                return Err(Error::ShapeMismatch {
                    what: format!("conv2d bias slot '{}'", b.name),
                    expected: format!("[{}]", config.out_channels),
                    got: format!("{:?}", b.shape),
                })
            }
            (Some(_), true) | (None, false) => {}
            (given, _) => {
                return Err(Error::ShapeMismatch {
                    what: "conv2d bias slot".into(),
                    expected: if config.bias { "a slot" } else { "none" }.into(),
                    got: if given.is_some() { "a slot" } else { "none" }.into(),
                })
            }
        }
        Ok(Conv2d {
            gpu: gpu.clone(),
            config,
            weight,
            bias,
            ops: HashMap::new(),
        })
    }

    /// The op for inputs `[n, in, h, w]` (built on first use, then reused).
    ///
    /// # Errors
    /// As [`Conv2dOp::new`].
    pub fn op(&mut self, n: usize, hw: (usize, usize)) -> Result<&Conv2dOp> {
        let key = (n, hw.0, hw.1);
        if !self.ops.contains_key(&key) {
            let op = Conv2dOp::new(&self.gpu, self.config.shape(n, hw))?;
            self.ops.insert(key, op);
        }
        Ok(&self.ops[&key])
    }

    /// Records the forward of `x [n, in, h, w]` into `y [n, out, ho, wo]`, parameters from `params`.
    ///
    /// # Errors
    /// As [`Conv2dOp::new`] and [`Conv2dOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        x: BufferRef,
        y: BufferRef,
        n: usize,
        hw: (usize, usize),
    ) -> Result<()> {
        let (w, b) = (
            self.weight.at(params),
            self.bias.as_ref().map(|s| s.at(params)),
        );
        self.op(n, hw)?.record_forward(encoder, x, w, b, y)
    }

    /// Records the backward: gradients into `grads` at the parameters' offsets (overwritten), and `dx`
    /// when given.
    ///
    /// # Errors
    /// As [`Conv2dOp::new`] and [`Conv2dOp::record_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        params: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        x: BufferRef,
        dy: BufferRef,
        dx: Option<BufferRef>,
        n: usize,
        hw: (usize, usize),
    ) -> Result<()> {
        let w = self.weight.at(params);
        let dw = self.weight.at(grads);
        let db = self.bias.as_ref().map(|s| s.at(grads));
        self.op(n, hw)?
            .record_backward(encoder, x, w, dy, dx, dw, db)
    }
}
