//! `Sequential`: layers applied in order, with an explicit backward, every trainable parameter in one
//! flat arena (and every gradient in another) so one optimizer dispatch updates the whole model.
//!
//! Samples have a fixed shape, `[features]` or `[C, H, W]` (NCHW batches); each layer's output shape is
//! inferred from its input's. Activations live in per-boundary buffers sized for `capacity` samples,
//! allocated once (a Flatten's output shares its input's buffer); a step records forward and backward into
//! the caller's encoder and allocates no buffers.
//!
//! BatchNorm layers bind their `weight`/`bias` and write their gradients in the arenas themselves
//! ([`BatchNorm::use_arena`]), so a step copies nothing between a layer and the arenas.
//!
//! A BatchNorm immediately followed by a ReLU runs as one fused BN+ReLU ([`BatchNorm::set_fuse_relu`]:
//! y = relu(bn(x)) and a 1-bit mask the BatchNorm owns; the backward applies the mask inside the
//! BatchNorm backward), unless [`Sequential::set_fuse_bn_relu`] turned it off, the BatchNorm runs ghost
//! BatchNorm or Batch Renorm, or the device has fewer than [`FUSED_RELU_STORAGE_BUFFERS`] storage
//! buffers per shader stage. The ReLU keeps its index (state-dict names are PyTorch's either way) but
//! records nothing; the boundary between the two (the BatchNorm's output before the ReLU) is not
//! written, so [`Sequential::activation`] returns `None` for it.
//!
//! A BatchNorm immediately followed by a Sigmoid writes sigmoid(bn(x)) itself (`OpOptions::sigmoid`,
//! set for its forward only) and the Sigmoid records no forward, unless
//! [`Sequential::set_fuse_bn_sigmoid`] turned it off or the BatchNorm runs ghost BatchNorm or Batch
//! Renorm; the boundary between the two is not written ([`Sequential::activation`] returns `None`).
//!
//! The backward of a Sigmoid that a Linear follows runs inside that Linear's dx product
//! ([`Linear::record_backward_through_sigmoid`]): the gradient at the boundary between the two is not
//! written, only the one at the Sigmoid's input.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::nn::conv2d::{Conv2d, Conv2dConfig};
use rand::Rng;

use crate::nn::init::{self, Init};
use crate::nn::{BatchNorm, Dropout, Linear, Noise, Pool2d, Relu, Sigmoid};
use crate::ops::batchnorm::{BatchNormConfig, BufferRef, OpOptions, FUSED_RELU_STORAGE_BUFFERS};
use crate::ops::kernel::{texel_buffer_bytes, Texels, TEXTURE_ROW_TEXELS};
use crate::ops::linear::LinearTexels;
use crate::ops::noise::NoiseConfig;
use crate::ops::pool::PoolKind;
use crate::ops::sgd::{SgdFusion, SgdTexels};
use crate::record::Record;
use crate::tensor::Layout;

/// Arena offsets are multiples of this many f32 (256 bytes): the strictest storage offset alignment
/// wgpu allows a device to ask for.
const SLOT_ALIGN: usize = 64;

/// Where one parameter tensor lives in the parameter, gradient and optimizer arenas (same offset in all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSlot {
    /// PyTorch state-dict key, e.g. `0.weight`.
    pub name: String,
    /// Shape, e.g. `[100, 784]`.
    pub shape: Vec<usize>,
    /// Offset in f32 elements.
    pub offset: usize,
}

impl ParamSlot {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the slot holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This slot inside `arena`.
    pub fn at<'a>(&self, arena: &'a wgpu::Buffer) -> BufferRef<'a> {
        BufferRef {
            buffer: arena,
            offset: 4 * self.offset as u64,
        }
    }

    /// This slot's values in a downloaded arena.
    pub fn values<'a>(&self, arena: &'a [f32]) -> &'a [f32] {
        &arena[self.offset..self.offset + self.len()]
    }
}

/// What a [`Sequential`] is built from: one entry per layer; shapes are inferred from the input's.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerSpec {
    /// `nn.Linear(in, out_features)` on `[features]` samples (bias included).
    Linear {
        /// Output features.
        out_features: usize,
    },
    /// `nn.Conv2d(C, out_channels, kernel, stride, padding, bias)` on `[C, H, W]` samples.
    Conv2d {
        /// Output channels.
        out_channels: usize,
        /// Square kernel side.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on each side.
        padding: usize,
        /// Whether it adds a bias (PyTorch's VGG-with-BN leaves it out before a BatchNorm).
        bias: bool,
    },
    /// `nn.BatchNorm1d` on `[features]` samples, `nn.BatchNorm2d` on `[C, H, W]` samples.
    BatchNorm,
    /// `nn.Sigmoid`.
    Sigmoid,
    /// `nn.ReLU`.
    Relu,
    /// `nn.MaxPool2d(kernel, stride)` on `[C, H, W]` samples.
    MaxPool2d {
        /// Window side.
        kernel: usize,
        /// Step between windows.
        stride: usize,
    },
    /// `nn.AvgPool2d(kernel, stride)` on `[C, H, W]` samples.
    AvgPool2d {
        /// Window side.
        kernel: usize,
        /// Step between windows.
        stride: usize,
    },
    /// `nn.Dropout(p)`.
    Dropout {
        /// Drop probability.
        p: f32,
    },
    /// `nn.Flatten()`: `[C, H, W]` to `[C·H·W]`, a view (no kernel, no copy).
    Flatten,
    /// Santurkar et al.'s noisy-BatchNorm perturbation ([`crate::ops::noise`]): `y = x·s + m` with
    /// fresh draws per training step; the identity in eval.
    Noise(NoiseConfig),
}

/// One layer of a [`Sequential`].
#[derive(Debug)]
pub enum Layer {
    /// Fully connected.
    Linear(Linear),
    /// 2-D convolution over NCHW maps.
    Conv2d(Conv2d),
    /// BatchNorm1d over `[N, F]` or BatchNorm2d over `[N, C, H, W]`, with the arena slots mirroring its
    /// `weight` and `bias`.
    BatchNorm {
        /// The layer.
        bn: Box<BatchNorm>,
        /// Arena slot of `weight`.
        weight: ParamSlot,
        /// Arena slot of `bias`.
        bias: ParamSlot,
    },
    /// Logistic sigmoid.
    Sigmoid(Sigmoid),
    /// ReLU.
    Relu(Relu),
    /// Max or average pooling.
    Pool(Pool2d),
    /// Dropout.
    Dropout(Dropout),
    /// Flatten: its output is its input's buffer seen as `[N, features]`.
    Flatten,
    /// Noisy-BatchNorm perturbation.
    Noise(Noise),
}

/// What an MLP is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpConfig {
    /// Widths from input to output, e.g. `[784, 100, 100, 100, 10]` (Ioffe & Szegedy's MNIST network).
    pub sizes: Vec<usize>,
    /// BatchNorm before each hidden sigmoid.
    pub bn: bool,
    /// Weight initializer.
    pub init: Init,
    /// Seed of the initializer.
    pub seed: u64,
}

impl MlpConfig {
    /// Ioffe & Szegedy's MNIST MLP: 784-100-100-100-10, sigmoid, small Gaussian init.
    pub fn ioffe(bn: bool, seed: u64) -> Self {
        MlpConfig {
            sizes: vec![784, 100, 100, 100, 10],
            bn,
            init: Init::Gaussian { std: 0.1 },
            seed,
        }
    }

    /// The layer list: `Linear → [BatchNorm] → Sigmoid` per hidden width, then a `Linear` head.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for fewer than two sizes or a zero size.
    pub fn specs(&self) -> Result<Vec<LayerSpec>> {
        let sizes = &self.sizes;
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::config(format!(
                "MLP sizes {sizes:?}: need at least an input and an output width, none zero"
            )));
        }
        let mut specs = Vec::new();
        for (i, &w) in sizes[1..].iter().enumerate() {
            specs.push(LayerSpec::Linear { out_features: w });
            if i + 2 < sizes.len() {
                if self.bn {
                    specs.push(LayerSpec::BatchNorm);
                }
                specs.push(LayerSpec::Sigmoid);
            }
        }
        Ok(specs)
    }
}

/// What the small VGG-style CNN is made of: per stage, 3×3 convolutions (padding 1, no bias when a
/// BatchNorm follows) each followed by `[BatchNorm2d] → ReLU`, then a 2×2 max pooling; then Flatten,
/// hidden `Linear → [BatchNorm1d] → ReLU` layers, and a Linear head.
#[derive(Clone, Debug, PartialEq)]
pub struct CnnConfig {
    /// BatchNorm2d after every convolution.
    pub bn: bool,
    /// Seed of the initializer.
    pub seed: u64,
    /// Input channels (1 for MNIST-style images).
    pub in_channels: usize,
    /// Input height and width.
    pub in_hw: (usize, usize),
    /// Classes (the head's width).
    pub classes: usize,
    /// Output channels of each convolution, per stage (each stage ends in a 2×2 max pooling).
    pub stages: Vec<Vec<usize>>,
    /// Widths of the hidden Linear layers between Flatten and the head (each followed by
    /// `[BatchNorm1d] → ReLU`); empty: the head alone. `batchnorm train --model cnn` uses `[128]`: with
    /// [`Self::small`]'s convolutions it lifts the network over 91% on Fashion-MNIST in 2 epochs
    /// (`scripts/pytorch-cnn-anchor.py`), for ~10% more compute per step.
    pub hidden: Vec<usize>,
    /// Weight initializer; `None` (the default) is PyTorch's: weights and biases U(±1/√fan_in) (what
    /// `kaiming_uniform_(a=√5)` comes to), the initialization PyTorch's anchor run of this network had.
    pub init: Option<Init>,
}

impl CnnConfig {
    /// The default network for 28×28 grey images and 10 classes (MNIST, Fashion-MNIST):
    /// conv 1→16, pool, conv 16→32, pool, Linear 1568→10 (chosen for what a training step costs on a CPU
    /// Vulkan driver; see the README for its accuracy).
    pub fn small(bn: bool, seed: u64) -> Self {
        CnnConfig {
            bn,
            seed,
            in_channels: 1,
            in_hw: (28, 28),
            classes: 10,
            stages: vec![vec![16], vec![32]],
            hidden: Vec::new(),
            init: None,
        }
    }

    /// The layer list, with PyTorch `nn.Sequential` indices.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for no stages, an empty stage or a zero width.
    pub fn specs(&self) -> Result<Vec<LayerSpec>> {
        if self.stages.is_empty()
            || self.stages.iter().any(|s| s.is_empty() || s.contains(&0))
            || self.hidden.contains(&0)
            || self.classes == 0
        {
            return Err(Error::config(format!(
                "CNN stages {:?}, hidden {:?}, {} classes: need at least one stage, each with at least \
                 one convolution, no zero width or class count",
                self.stages, self.hidden, self.classes
            )));
        }
        let mut specs = Vec::new();
        for stage in &self.stages {
            for &width in stage {
                specs.push(LayerSpec::Conv2d {
                    out_channels: width,
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                    bias: !self.bn,
                });
                if self.bn {
                    specs.push(LayerSpec::BatchNorm);
                }
                specs.push(LayerSpec::Relu);
            }
            specs.push(LayerSpec::MaxPool2d {
                kernel: 2,
                stride: 2,
            });
        }
        specs.push(LayerSpec::Flatten);
        for &width in &self.hidden {
            specs.push(LayerSpec::Linear {
                out_features: width,
            });
            if self.bn {
                specs.push(LayerSpec::BatchNorm);
            }
            specs.push(LayerSpec::Relu);
        }
        specs.push(LayerSpec::Linear {
            out_features: self.classes,
        });
        Ok(specs)
    }
}

/// Which network to build: what the trainer and `batchnorm train --model` take.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// A sigmoid MLP on `[features]` samples ([`Sequential::mlp`]).
    Mlp(MlpConfig),
    /// The VGG-style CNN on `[C, H, W]` samples ([`Sequential::cnn`]).
    Cnn(CnnConfig),
    /// Any layer list ([`Sequential::new`]).
    Layers {
        /// Per-sample input shape.
        input_shape: Vec<usize>,
        /// The layers.
        specs: Vec<LayerSpec>,
        /// Weight initializer (`None`: PyTorch's default, see [`Sequential::new`]).
        init: Option<Init>,
        /// Seed of the initializer.
        seed: u64,
    },
}

impl From<&MlpConfig> for ModelConfig {
    fn from(c: &MlpConfig) -> Self {
        ModelConfig::Mlp(c.clone())
    }
}

impl From<MlpConfig> for ModelConfig {
    fn from(c: MlpConfig) -> Self {
        ModelConfig::Mlp(c)
    }
}

impl From<&CnnConfig> for ModelConfig {
    fn from(c: &CnnConfig) -> Self {
        ModelConfig::Cnn(c.clone())
    }
}

impl From<CnnConfig> for ModelConfig {
    fn from(c: CnnConfig) -> Self {
        ModelConfig::Cnn(c)
    }
}

impl From<&ModelConfig> for ModelConfig {
    fn from(c: &ModelConfig) -> Self {
        c.clone()
    }
}

impl ModelConfig {
    /// Whether the network has BatchNorm layers.
    pub fn bn(&self) -> bool {
        match self {
            ModelConfig::Mlp(c) => c.bn,
            ModelConfig::Cnn(c) => c.bn,
            ModelConfig::Layers { specs, .. } => specs.contains(&LayerSpec::BatchNorm),
        }
    }

    /// The seed of the initializer (and the batch order, by the trainer's convention).
    pub fn seed(&self) -> u64 {
        match self {
            ModelConfig::Mlp(c) => c.seed,
            ModelConfig::Cnn(c) => c.seed,
            ModelConfig::Layers { seed, .. } => *seed,
        }
    }

    /// The weight initializer (`None`: PyTorch's default).
    pub fn init(&self) -> Option<Init> {
        match self {
            ModelConfig::Mlp(c) => Some(c.init),
            ModelConfig::Cnn(c) => c.init,
            ModelConfig::Layers { init, .. } => *init,
        }
    }

    /// The initializer as the run summary names it, e.g. `Gaussian { std: 0.1 }` or `pytorch-default`.
    pub fn init_name(&self) -> String {
        match self.init() {
            Some(init) => format!("{init:?}"),
            None => "pytorch-default".into(),
        }
    }

    /// Sets the seed.
    pub fn set_seed(&mut self, seed: u64) {
        match self {
            ModelConfig::Mlp(c) => c.seed = seed,
            ModelConfig::Cnn(c) => c.seed = seed,
            ModelConfig::Layers { seed: s, .. } => *s = seed,
        }
    }

    /// A name that identifies the architecture (checkpoints record it), e.g. `mlp-784-100-100-100-10-bn`.
    pub fn name(&self) -> String {
        match self {
            ModelConfig::Mlp(c) => {
                let sizes: Vec<String> = c.sizes.iter().map(|s| s.to_string()).collect();
                format!("mlp-{}{}", sizes.join("-"), if c.bn { "-bn" } else { "" })
            }
            ModelConfig::Cnn(c) => {
                let stages: Vec<String> = c
                    .stages
                    .iter()
                    .map(|s| {
                        s.iter()
                            .map(|w| w.to_string())
                            .collect::<Vec<_>>()
                            .join("-")
                    })
                    .collect();
                let hidden: String = c.hidden.iter().map(|w| format!("-f{w}")).collect();
                format!(
                    "cnn-{}x{}x{}-{}{hidden}-{}{}",
                    c.in_channels,
                    c.in_hw.0,
                    c.in_hw.1,
                    stages.join("-p-"),
                    c.classes,
                    if c.bn { "-bn" } else { "" }
                )
            }
            ModelConfig::Layers {
                input_shape, specs, ..
            } => format!("layers-{input_shape:?}-{specs:?}"),
        }
    }
}

/// A feed-forward layer graph over samples of a fixed shape (`[features]` or `[C, H, W]`).
#[derive(Debug)]
pub struct Sequential {
    gpu: Arc<Gpu>,
    /// The layers, in order (their indices are the state-dict prefixes).
    pub layers: Vec<Layer>,
    /// Per-sample shape at each boundary: `shapes[i]` is layer i's input, the last the output.
    shapes: Vec<Vec<usize>>,
    slots: Vec<ParamSlot>,
    arena_len: usize,
    /// Every trainable parameter.
    pub params: wgpu::Buffer,
    /// Every gradient, same offsets as `params`.
    pub grads: wgpu::Buffer,
    capacity: usize,
    /// Activation buffers; boundary i lives in `acts[act_at[i]]` (a Flatten's two boundaries share one).
    acts: Vec<wgpu::Buffer>,
    act_at: Vec<usize>,
    /// Gradient buffers; boundary i's gradient lives in `dacts[dact_at[i]]`, `None` where no layer needs it
    /// (the input, unless a BatchNorm reads it: the op always writes a dx).
    dacts: Vec<wgpu::Buffer>,
    dact_at: Vec<Option<usize>>,
    /// Fuse each BatchNorm with a ReLU right after it (on by default).
    fuse_bn_relu: bool,
    /// Fuse the sigmoid into the output of each BatchNorm a Sigmoid follows (on by default).
    fuse_bn_sigmoid: bool,
    /// Fuse each training BatchNorm into the Linear before it where the kernel allows (on by default).
    fuse_linear_bn: bool,
    /// Why this device cannot fuse them, if it cannot.
    fusion_unavailable: Option<String>,
    /// Per layer: a BatchNorm the last forward fused with the ReLU after it (the backward mirrors it).
    fused_last: Vec<bool>,
    /// On CPU devices, per layer: for a Linear whose in_features 4 divides, its input's buffer mirrored
    /// into a texture, which its forward copies and reads and its backward reads
    /// ([`LinearTexels::x`]), and whether that is on.
    x_texels: Vec<Option<Arc<Texels>>>,
    x_texels_on: bool,
    /// On CPU devices: the gradient arena mirrored into a texture, which SGD reads
    /// ([`Self::grads_texels`]), and whether that is on.
    grads_texels: Option<Texels>,
    grads_texels_on: bool,
    /// On CPU devices: the parameter arena mirrored into a texture, from which SGD reads the
    /// parameters, and whether that and the weights' mirrors are on.
    params_texels: Option<Arc<Texels>>,
    params_texels_on: bool,
    /// On CPU devices, per layer: for a Linear whose in_features 4 divides, its weight (a region of
    /// the parameter arena) mirrored into a texture at each forward's start, from which its forward
    /// and fused backward read W ([`LinearTexels::w`]).
    w_texels: Vec<Option<Arc<Texels>>>,
    /// On CPU devices, per layer: for a Linear, its output gradient's buffer mirrored into a texture,
    /// which its backward copies and reads ([`LinearTexels::dy`]), and whether that is on.
    dy_texels: Vec<Option<Arc<Texels>>>,
    dy_texels_on: bool,
    /// On CPU devices, per layer: for a Linear after `BatchNorm → Sigmoid`, the BatchNorm's input
    /// mirrored into a texture, which the three layers' fused backward copies and reads
    /// ([`LinearTexels::z`]), on with the dy mirrors.
    z_texels: Vec<Option<Arc<Texels>>>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Sequential {
    /// `Linear → [BatchNorm] → Sigmoid` per hidden layer, then a `Linear` head, for up to `capacity` rows
    /// per call. Layer indices follow PyTorch's `nn.Sequential` of the same modules.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for fewer than two sizes, a zero size or `capacity`; device errors.
    pub fn mlp(gpu: &Arc<Gpu>, config: &MlpConfig, capacity: usize) -> Result<Self> {
        let specs = config.specs()?;
        Self::new(
            gpu,
            &[config.sizes[0]],
            &specs,
            Some(config.init),
            config.seed,
            capacity,
        )
    }

    /// The VGG-style CNN of `config` ([`CnnConfig::specs`]) on `[in_channels, H, W]` samples, for up to
    /// `capacity` samples per call. State-dict names follow PyTorch's `nn.Sequential` of the same modules
    /// (`0.weight`, `1.running_mean`, ...).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config (no stages, zero sizes, an input too small for the
    /// poolings); device errors.
    pub fn cnn(gpu: &Arc<Gpu>, config: &CnnConfig, capacity: usize) -> Result<Self> {
        let specs = config.specs()?;
        let (h, w) = config.in_hw;
        Self::new(
            gpu,
            &[config.in_channels, h, w],
            &specs,
            config.init,
            config.seed,
            capacity,
        )
    }

    /// The network `config` describes.
    ///
    /// # Errors
    /// As [`Self::mlp`] / [`Self::new`].
    pub fn build(gpu: &Arc<Gpu>, config: &ModelConfig, capacity: usize) -> Result<Self> {
        match config {
            ModelConfig::Mlp(c) => Self::mlp(gpu, c, capacity),
            ModelConfig::Cnn(c) => Self::cnn(gpu, c, capacity),
            ModelConfig::Layers {
                input_shape,
                specs,
                init,
                seed,
            } => Self::new(gpu, input_shape, specs, *init, *seed, capacity),
        }
    }

    /// A network of `specs` on samples of `input_shape` (`[features]` or `[C, H, W]`), for up to
    /// `capacity` samples per call. Weights are drawn with `init` from a generator seeded with `seed`, in
    /// layer order, biases starting at 0; with `init = None`, PyTorch's defaults for Linear and Conv2d
    /// instead (weight and bias U(±1/√fan_in)). BatchNorm starts at weight 1, bias 0; Dropout layer i
    /// draws its masks from stream `seed + i`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when a layer does not accept its input's shape (e.g. Linear on `[C, H, W]`
    /// without a Flatten); [`Error::BadConfig`] for zero sizes or `capacity`; device errors.
    pub fn new(
        gpu: &Arc<Gpu>,
        input_shape: &[usize],
        specs: &[LayerSpec],
        init: Option<Init>,
        seed: u64,
        capacity: usize,
    ) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::config(
                "model capacity (samples per call) must be at least 1",
            ));
        }
        if input_shape.is_empty() || input_shape.contains(&0) {
            return Err(Error::config(format!(
                "input shape {input_shape:?}: need at least one dimension, none zero"
            )));
        }
        if specs.iter().all(|s| *s == LayerSpec::Flatten) {
            return Err(Error::config(
                "a model needs at least one layer besides Flatten (a Flatten alone is a view)",
            ));
        }
        let mut arena_len = 0usize;
        let mut slot = |name: String, shape: Vec<usize>| {
            let s = ParamSlot {
                name,
                shape,
                offset: arena_len,
            };
            arena_len += s.len().div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
            s
        };
        let mut rng = init::rng(seed);
        let mut values: Vec<(ParamSlot, Vec<f32>)> = Vec::new();
        let mut layers = Vec::new();
        let mut shapes = vec![input_shape.to_vec()];
        for (i, spec) in specs.iter().enumerate() {
            let x = shapes[i].clone();
            let wrong = |want: &str| Error::ShapeMismatch {
                what: format!("input of layer {i} ({spec:?})"),
                expected: want.to_string(),
                got: format!("samples of shape {x:?}"),
            };
            let y = match *spec {
                LayerSpec::Linear { out_features } => {
                    let [fan_in] = x[..] else {
                        return Err(wrong("[features] samples (add a Flatten before it)"));
                    };
                    if out_features == 0 {
                        return Err(Error::config(format!("layer {i}: Linear with 0 outputs")));
                    }
                    let w = slot(format!("{i}.weight"), vec![out_features, fan_in]);
                    let b = slot(format!("{i}.bias"), vec![out_features]);
                    let (wv, bv) = match init {
                        Some(init) => (
                            init.weight(&mut rng, out_features, fan_in, out_features),
                            vec![0.0; out_features],
                        ),
                        None => {
                            let bound = 1.0 / (fan_in as f64).sqrt();
                            let mut draw = |len: usize| -> Vec<f32> {
                                (0..len)
                                    .map(|_| rng.random_range(-bound..bound) as f32)
                                    .collect()
                            };
                            (draw(out_features * fan_in), draw(out_features))
                        }
                    };
                    values.push((w.clone(), wv));
                    values.push((b.clone(), bv));
                    layers.push(Layer::Linear(Linear::new(
                        gpu,
                        fan_in,
                        out_features,
                        w,
                        Some(b),
                    )));
                    vec![out_features]
                }
                LayerSpec::Conv2d {
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    bias,
                } => {
                    let [c, h, w] = x[..] else {
                        return Err(wrong("[C, H, W] samples"));
                    };
                    let config = Conv2dConfig::new(c, out_channels, kernel)
                        .stride(stride)
                        .padding(padding)
                        .bias(bias);
                    let (oh, ow) = config.out_hw((h, w))?;
                    let ws = slot(format!("{i}.weight"), config.weight_shape());
                    let bs = bias.then(|| slot(format!("{i}.bias"), vec![out_channels]));
                    let (wv, bv) = config.initial_values(init, &mut rng);
                    values.push((ws.clone(), wv));
                    if let (Some(bs), Some(bv)) = (&bs, bv) {
                        values.push((bs.clone(), bv));
                    }
                    layers.push(Layer::Conv2d(Conv2d::new(gpu, config, ws, bs)?));
                    vec![out_channels, oh, ow]
                }
                LayerSpec::BatchNorm => {
                    let c = x[0];
                    let bn = match x.len() {
                        1 => BatchNorm::new_1d(gpu, c, BatchNormConfig::default())?,
                        3 => BatchNorm::new_2d(gpu, c, BatchNormConfig::default())?,
                        _ => return Err(wrong("[features] or [C, H, W] samples")),
                    };
                    let w = slot(format!("{i}.weight"), vec![c]);
                    let b = slot(format!("{i}.bias"), vec![c]);
                    values.push((w.clone(), vec![1.0; c]));
                    values.push((b.clone(), vec![0.0; c]));
                    layers.push(Layer::BatchNorm {
                        bn: Box::new(bn),
                        weight: w,
                        bias: b,
                    });
                    x.clone()
                }
                LayerSpec::Sigmoid => {
                    layers.push(Layer::Sigmoid(Sigmoid::new(gpu, numel(&x))));
                    x.clone()
                }
                LayerSpec::Relu => {
                    layers.push(Layer::Relu(Relu::new(gpu, numel(&x))));
                    x.clone()
                }
                LayerSpec::MaxPool2d { kernel, stride }
                | LayerSpec::AvgPool2d { kernel, stride } => {
                    let [c, h, w] = x[..] else {
                        return Err(wrong("[C, H, W] samples"));
                    };
                    let kind = if matches!(spec, LayerSpec::MaxPool2d { .. }) {
                        PoolKind::Max
                    } else {
                        PoolKind::Avg
                    };
                    let pool = Pool2d::new(gpu, kind, [c, h, w], kernel, stride)?;
                    let out = pool.out_chw().to_vec();
                    layers.push(Layer::Pool(pool));
                    out
                }
                LayerSpec::Dropout { p } => {
                    let stream = seed.wrapping_add(i as u64);
                    layers.push(Layer::Dropout(Dropout::new(gpu, &x, p, stream)?));
                    x.clone()
                }
                LayerSpec::Noise(config) => {
                    let stream = seed.wrapping_add(i as u64);
                    layers.push(Layer::Noise(Noise::new(gpu, &x, config, stream)?));
                    x.clone()
                }
                LayerSpec::Flatten => {
                    layers.push(Layer::Flatten);
                    vec![numel(&x)]
                }
            };
            shapes.push(y);
        }
        let mut arena = vec![0.0f32; arena_len];
        for (s, v) in &values {
            arena[s.offset..s.offset + v.len()].copy_from_slice(v);
        }
        // On CPU devices SGD reads the arenas through texture mirrors, and each Linear its weight
        // through a mirror of its own (below), which copies whole texture rows from the weight's
        // offset: one row of slack past the arena keeps the last one inside the buffer.
        if gpu.caps().cpu_device {
            arena.resize(arena_len + 4 * TEXTURE_ROW_TEXELS as usize, 0.0);
        }
        let (params, params_texels) = Texels::mirrored_buffer(gpu, "model.params", &arena)?;
        let params_texels = params_texels.map(Arc::new);
        let (grads, grads_texels) =
            Texels::mirrored_buffer(gpu, "model.grads", &vec![0.0f32; arena_len])?;
        // BatchNorm's gamma and beta are read and their gradients written in the arenas themselves:
        // no copies between the layer's buffers and the arenas in a step.
        for layer in &mut layers {
            if let Layer::BatchNorm { bn, weight, bias } = layer {
                let (w, b) = (4 * weight.offset as u64, 4 * bias.offset as u64);
                bn.use_arena(&params, &grads, w, b)?;
            }
        }
        // On CPU devices the Linears read their inputs and output gradients through texture
        // mirrors (`Texels`): every boundary buffer is padded to whole texture rows so that one copy
        // moves it.
        let cpu = gpu.caps().cpu_device;
        let boundary = |label: String, shape: &[usize]| {
            let values = capacity * numel(shape);
            let bytes = if cpu {
                texel_buffer_bytes(values)
            } else {
                4 * values as u64
            };
            gpu.create_buffer(&label, bytes, storage_usage())
        };
        // Boundary buffers: a Flatten's output is its input's buffer.
        let (mut acts, mut act_at) = (Vec::new(), Vec::new());
        let (mut dacts, mut dact_at): (Vec<wgpu::Buffer>, Vec<Option<usize>>) =
            (Vec::new(), Vec::new());
        let first_real = layers.iter().find(|l| !matches!(l, Layer::Flatten));
        let input_needs_grad = matches!(first_real, Some(Layer::BatchNorm { .. }));
        for (b, shape) in shapes.iter().enumerate() {
            if b > 0 && matches!(layers[b - 1], Layer::Flatten) {
                act_at.push(act_at[b - 1]);
                dact_at.push(dact_at[b - 1]);
                continue;
            }
            act_at.push(acts.len());
            acts.push(boundary(format!("model.act{b}"), shape)?);
            if b > 0 || input_needs_grad {
                dact_at.push(Some(dacts.len()));
                dacts.push(boundary(format!("model.dact{b}"), shape)?);
            } else {
                dact_at.push(None);
            }
        }
        let have = gpu.limits().max_storage_buffers_per_shader_stage;
        let fusion_unavailable = (have < FUSED_RELU_STORAGE_BUFFERS).then(|| {
            format!(
                "the fused BN+ReLU kernels bind {FUSED_RELU_STORAGE_BUFFERS} storage buffers and this \
                 device allows {have} per shader stage: BatchNorm and ReLU run unfused"
            )
        });
        let fused_last = vec![false; layers.len()];
        // Each Linear's mirrors of its input and of its output's gradient.
        let mirror = |buffer: &wgpu::Buffer, label: String, values: usize| {
            Texels::new(gpu, &label, buffer, values).map(Arc::new)
        };
        let (mut x_texels, mut w_texels, mut dy_texels) = (Vec::new(), Vec::new(), Vec::new());
        for (i, layer) in layers.iter().enumerate() {
            let (x, dy) = match (layer, dact_at[i + 1]) {
                (Layer::Linear(l), Some(d)) if cpu => (
                    (l.in_features % 4 == 0)
                        .then(|| {
                            let label = format!("model.act{i} texels");
                            mirror(&acts[act_at[i]], label, capacity * l.in_features)
                        })
                        .flatten(),
                    mirror(
                        &dacts[d],
                        format!("model.dact{} texels", i + 1),
                        capacity * l.out_features,
                    ),
                ),
                _ => (None, None),
            };
            x_texels.push(x);
            dy_texels.push(dy);
            w_texels.push(match layer {
                // A weight at the arena's start has the arena's mirror for its own (the same texels):
                // the forward's copy of its rows then serves SGD's update too, which reads W there
                // (`LinearOp::record_dw_with_sgd`), so that update copies only the rows past W.
                Layer::Linear(l) if cpu && l.in_features % 4 == 0 && l.weight.offset == 0 => {
                    params_texels.clone()
                }
                Layer::Linear(l) if cpu && l.in_features % 4 == 0 => {
                    let (offset, values) = (4 * l.weight.offset as u64, l.weight.len());
                    let label = format!("model.{i}.weight texels");
                    Texels::new_at(gpu, &label, &params, offset, values).map(Arc::new)
                }
                _ => None,
            });
        }
        // The BatchNorm input z that `BatchNorm → Sigmoid → Linear`'s fused backward reads.
        let z_texels = (0..layers.len())
            .map(|i| match (i.checked_sub(2).map(|b| &layers[b..=i]), cpu) {
                (
                    Some([Layer::BatchNorm { bn, .. }, Layer::Sigmoid(_), Layer::Linear(_)]),
                    true,
                ) => {
                    let values = capacity * bn.num_features();
                    mirror(
                        &acts[act_at[i - 2]],
                        format!("model.act{} texels", i - 2),
                        values,
                    )
                }
                _ => None,
            })
            .collect();
        let mut model = Sequential {
            x_texels,
            x_texels_on: true,
            w_texels,
            grads_texels,
            grads_texels_on: true,
            params_texels,
            params_texels_on: true,
            dy_texels,
            dy_texels_on: true,
            z_texels,
            gpu: gpu.clone(),
            fuse_bn_relu: true,
            fuse_bn_sigmoid: true,
            fuse_linear_bn: true,
            fusion_unavailable,
            fused_last,
            layers,
            shapes,
            slots: values.into_iter().map(|(s, _)| s).collect(),
            arena_len,
            params,
            grads,
            capacity,
            acts,
            act_at,
            dacts,
            dact_at,
        };
        // The Linears take the mirrors that apply (on by default).
        model.hand_out_texels();
        Ok(model)
    }

    /// The parameter slots in state-dict order.
    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    /// Bytes of the model's own buffers for `rows` samples a call: the parameter and gradient arenas,
    /// and the activations and their gradients (which scale with the rows; the layers' small buffers
    /// and texture mirrors aside).
    pub fn buffer_bytes(&self, rows: usize) -> u64 {
        let arenas = self.params.size() + self.grads.size();
        let per_row: u64 = self
            .acts
            .iter()
            .chain(&self.dacts)
            .map(|b| b.size() / self.capacity as u64)
            .sum();
        arenas + per_row * rows as u64
    }

    /// Values in each arena (parameters, gradients, optimizer state), padding included.
    pub fn arena_len(&self) -> usize {
        self.arena_len
    }

    /// Trainable parameters (padding excluded).
    pub fn num_params(&self) -> usize {
        self.slots.iter().map(ParamSlot::len).sum()
    }

    /// Samples per call the activation buffers hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Per-sample input shape (`[features]` or `[C, H, W]`).
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[0]
    }

    /// Per-sample shape of boundary `i` (layer i's input; `i == layers.len()`: the output).
    pub fn shape_at(&self, i: usize) -> Option<&[usize]> {
        self.shapes.get(i).map(Vec::as_slice)
    }

    /// Values per input sample.
    pub fn in_features(&self) -> usize {
        numel(&self.shapes[0])
    }

    /// Output width (classes).
    pub fn out_features(&self) -> usize {
        numel(&self.shapes[self.shapes.len() - 1])
    }

    /// The input buffer: the caller writes `[n, in_features]` rows here before recording a forward.
    pub fn input(&self) -> &wgpu::Buffer {
        &self.acts[self.act_at[0]]
    }

    /// The output (logits) of the last forward.
    pub fn output(&self) -> &wgpu::Buffer {
        &self.acts[self.act_at[self.act_at.len() - 1]]
    }

    /// Where the loss writes the gradient of the output before [`Self::record_backward`].
    pub fn output_grad(&self) -> &wgpu::Buffer {
        let at = self.dact_at[self.dact_at.len() - 1].expect("every layer output has a gradient");
        &self.dacts[at]
    }

    /// The buffer holding the input of layer `i` (`i == layers.len()`: the output) after a forward under
    /// the current fusion setting; `None` past the output, and for the ReLU of a fused BN+ReLU pair (its
    /// input, the BatchNorm's output before the ReLU, is never written). The answer follows the current
    /// setting, not the last forward's: after [`Self::set_fuse_bn_relu`]`(false)` the buffer is returned
    /// at once and holds the pre-ReLU values once a forward has run.
    pub fn activation(&self, i: usize) -> Option<&wgpu::Buffer> {
        if i > 0 && (self.fuses(i - 1) || self.fuses_sigmoid(i - 1)) {
            return None;
        }
        self.act_at.get(i).map(|&b| &self.acts[b])
    }

    /// Fuse every BatchNorm that a ReLU immediately follows with that ReLU (default: on). Takes effect
    /// from the next forward; results are the same either way (to f32 rounding), the fused pair
    /// reads and writes the tensor fewer times.
    pub fn set_fuse_bn_relu(&mut self, on: bool) {
        self.fuse_bn_relu = on;
    }

    /// Whether fusing BatchNorm with a following ReLU is asked for ([`Self::set_fuse_bn_relu`]).
    pub fn fuse_bn_relu(&self) -> bool {
        self.fuse_bn_relu
    }

    /// Why this device cannot fuse BatchNorm with ReLU (too few storage buffers per shader stage), when
    /// it cannot; the layers then run unfused.
    pub fn fusion_unavailable(&self) -> Option<&str> {
        self.fusion_unavailable.as_deref()
    }

    /// Fuse the sigmoid into the output of every BatchNorm that a Sigmoid immediately follows (default:
    /// on): the BatchNorm writes sigmoid(bn(x)) as it stores its output and the Sigmoid records no
    /// forward (its backward is unchanged: it needs only its output). Takes effect from the next forward;
    /// the boundary between the two (the sigmoid's input) is then not written, so
    /// [`Self::activation`] returns `None` for it; experiments that follow sigmoid inputs switch it off.
    pub fn set_fuse_bn_sigmoid(&mut self, on: bool) {
        self.fuse_bn_sigmoid = on;
    }

    /// Whether fusing BatchNorm with a following Sigmoid is asked for ([`Self::set_fuse_bn_sigmoid`]).
    pub fn fuse_bn_sigmoid(&self) -> bool {
        self.fuse_bn_sigmoid
    }

    /// Record a Linear and the BatchNorm right after it as one dispatch in the forward, and the
    /// backward of `BatchNorm → Sigmoid → Linear` as one, where the layers and shapes allow it
    /// (default: on; see [`BatchNorm::record_linear_forward`] and
    /// [`Linear::record_backward_through_sigmoid_bn`] for where). The forward still writes the Linear's
    /// output z (the BatchNorm's backward reads it), so every activation stays available; the fused
    /// backward does not write the gradient between the BatchNorm and the Sigmoid. Turning it off
    /// records the layers apart, as tests do to compare.
    pub fn set_fuse_linear_bn(&mut self, on: bool) {
        self.fuse_linear_bn = on;
    }

    /// Whether the Linears read their inputs through textures ([`Texels`]; on CPU devices, where 4
    /// divides a Linear's in_features: lavapipe loads texels without its per-lane loop), each
    /// copied by the Linear's forward and read again by its backward. On by default where it applies;
    /// off reads the buffers, as tests do to compare (the results are the same to the bit).
    pub fn set_x_texels(&mut self, on: bool) {
        self.x_texels_on = on;
        self.hand_out_texels();
    }

    /// Gives each Linear the mirrors that are on ([`LinearTexels`]).
    fn hand_out_texels(&mut self) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if let Layer::Linear(l) = layer {
                l.set_texels(LinearTexels {
                    x: self.x_texels[i].clone().filter(|_| self.x_texels_on),
                    w: self.w_texels[i].clone().filter(|_| self.params_texels_on),
                    dy: self.dy_texels[i].clone().filter(|_| self.dy_texels_on),
                    z: self.z_texels[i].clone().filter(|_| self.dy_texels_on),
                });
            }
        }
    }

    /// Whether the Linears' backwards read the gradient of their outputs through texture mirrors,
    /// each copied just before the backward that reads it (on CPU devices; on by default there; the
    /// results are the same to the bit).
    pub fn set_dy_texels(&mut self, on: bool) {
        self.dy_texels_on = on;
        self.hand_out_texels();
    }

    /// Whether the Linears' backwards read dy through textures ([`Self::set_dy_texels`]).
    pub fn dy_texels(&self) -> bool {
        self.dy_texels_on && self.dy_texels.iter().any(Option::is_some)
    }

    /// The gradient arena's texture mirror, where the optimizer should read the gradients through one
    /// ([`Texels`]: on CPU devices, unless [`Self::set_grads_texels`] turned it off). The optimizer
    /// records the copy.
    pub fn grads_texels(&self) -> Option<&Texels> {
        self.grads_texels.as_ref().filter(|_| self.grads_texels_on)
    }

    /// Whether SGD reads the gradients through a texture on CPU devices (on by default where it
    /// applies; the results are the same to the bit).
    pub fn set_grads_texels(&mut self, on: bool) {
        self.grads_texels_on = on;
    }

    /// Whether the Linears read their weights through texture mirrors of their own, copied at the start
    /// of each forward, and SGD the parameters through the arena's mirror (on CPU devices; on by
    /// default there; the results are the same to the bit).
    pub fn set_params_texels(&mut self, on: bool) {
        self.params_texels_on = on;
        self.hand_out_texels();
    }

    /// The parameter arena's texture mirror, where SGD should read the parameters through it
    /// ([`Self::set_params_texels`]). The optimizer records the copy.
    pub fn params_texels(&self) -> Option<&Texels> {
        self.params_texels
            .as_deref()
            .filter(|_| self.params_texels_on)
    }

    /// Whether the Linears read their inputs through textures ([`Self::set_x_texels`]).
    pub fn x_texels(&self) -> bool {
        self.x_texels_on && self.x_texels.iter().any(Option::is_some)
    }

    /// For each Linear (by layer index), which of its input, weight and output gradient it reads
    /// through texture mirrors over `n` rows ([`Linear::texel_reads`]).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for `n` past the capacity.
    pub fn linear_texel_reads(&mut self, n: usize) -> Result<Vec<(usize, [bool; 3])>> {
        self.check_rows(n)?;
        let mut reads = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if let (Layer::Linear(l), Some(d)) = (layer, self.dact_at[i + 1]) {
                let x = (&self.acts[self.act_at[i]]).into();
                let dy = (&self.dacts[d]).into();
                reads.push((i, l.texel_reads(n, &self.params, x, dy)?));
            }
        }
        Ok(reads)
    }

    /// Takes `other`'s switches (the fusions and texture mirrors) and tells whether this model now
    /// records the same kernels as `other` does: the same layers, the same texture mirrors, and
    /// BatchNorm layers with the same settings. For a twin of `other` built from the same configuration
    /// ([`crate::train::Trainer::prebuild_pipelines`]).
    pub(crate) fn copy_switches_from(&mut self, other: &Sequential) -> bool {
        self.fuse_bn_relu = other.fuse_bn_relu;
        self.fuse_bn_sigmoid = other.fuse_bn_sigmoid;
        self.fuse_linear_bn = other.fuse_linear_bn;
        self.x_texels_on = other.x_texels_on;
        self.dy_texels_on = other.dy_texels_on;
        self.params_texels_on = other.params_texels_on;
        self.grads_texels_on = other.grads_texels_on;
        self.hand_out_texels();
        // Which mirrors exist follows the capacity too (a texture has at most so many rows).
        fn present<T>(v: &[Option<T>]) -> Vec<bool> {
            v.iter().map(Option::is_some).collect()
        }
        let same_mirrors = present(&self.x_texels) == present(&other.x_texels)
            && present(&self.w_texels) == present(&other.w_texels)
            && present(&self.dy_texels) == present(&other.dy_texels)
            && present(&self.z_texels) == present(&other.z_texels)
            && self.grads_texels.is_some() == other.grads_texels.is_some()
            && self.params_texels.is_some() == other.params_texels.is_some();
        same_mirrors
            && self.shapes == other.shapes
            && self.layers.len() == other.layers.len()
            && self
                .layers
                .iter()
                .zip(&other.layers)
                .all(|pair| match pair {
                    (Layer::BatchNorm { bn: a, .. }, Layer::BatchNorm { bn: b, .. }) => {
                        a.records_as(b)
                    }
                    (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
                })
    }

    /// Whether a Linear's forward takes the BatchNorm after it along ([`Self::set_fuse_linear_bn`]).
    pub fn fuse_linear_bn(&self) -> bool {
        self.fuse_linear_bn
    }

    /// Whether layer `i` is a BatchNorm the next forward fuses with the Sigmoid at `i + 1`.
    fn fuses_sigmoid(&self, i: usize) -> bool {
        self.fuse_bn_sigmoid
            && matches!(self.layers.get(i + 1), Some(Layer::Sigmoid(_)))
            && matches!(self.layers.get(i), Some(Layer::BatchNorm { bn, .. }) if bn.can_fuse_sigmoid())
    }

    /// Indices of the BatchNorm layers the next forward fuses with the ReLU after them.
    pub fn fused_bn_relu_layers(&self) -> Vec<usize> {
        (0..self.layers.len()).filter(|&i| self.fuses(i)).collect()
    }

    /// Whether layer `i` is a BatchNorm the next forward fuses with the ReLU at `i + 1`.
    fn fuses(&self, i: usize) -> bool {
        self.fuse_bn_relu
            && self.fusion_unavailable.is_none()
            && matches!(self.layers.get(i + 1), Some(Layer::Relu(_)))
            && matches!(self.layers.get(i), Some(Layer::BatchNorm { bn, .. }) if bn.can_fuse_relu())
    }

    /// Training or eval mode (BatchNorm: batch or running statistics; Dropout: masks or identity).
    pub fn train(&mut self, training: bool) {
        for layer in &mut self.layers {
            match layer {
                Layer::BatchNorm { bn, .. } => bn.train(training),
                Layer::Dropout(d) => d.train(training),
                Layer::Noise(z) => z.train(training),
                _ => {}
            }
        }
    }

    pub(crate) fn check_rows(&self, n: usize) -> Result<()> {
        if n == 0 || n > self.capacity {
            return Err(Error::ShapeMismatch {
                what: "batch rows".into(),
                expected: format!("1..={} (the model's capacity)", self.capacity),
                got: n.to_string(),
            });
        }
        Ok(())
    }

    /// The shape and layout BatchNorm sees for `n` samples of `sample` (NC for features, NCHW for maps).
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

    /// Records the forward of `n` samples from [`Self::input`] to [`Self::output`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `n` exceeds the capacity; the layers' errors.
    pub fn record_forward(&mut self, encoder: &mut impl Record, n: usize) -> Result<()> {
        self.record_layers(encoder, n, self.layers.len())
    }

    /// [`Self::record_forward`] and softmax cross-entropy against `labels` (`[n]` u32), as
    /// [`crate::ops::softmax_xent::SoftmaxXentOp::record_train`] records it into [`Self::output_grad`]
    /// and `stats`, with the head: where the last layer is a Linear whose fused kernel takes the shapes
    /// ([`LinearOp::can_fuse_xent`](crate::ops::linear::LinearOp::can_fuse_xent): at most 64 rows and 16 classes), its forward and the loss run as
    /// one dispatch and this returns `true`; elsewhere it records the forward alone and returns `false`,
    /// and the caller records the loss.
    ///
    /// # Errors
    /// As [`Self::record_forward`] and [`LinearOp::record_forward_xent`](crate::ops::linear::LinearOp::record_forward_xent).
    pub fn record_forward_with_loss(
        &mut self,
        encoder: &mut impl Record,
        n: usize,
        labels: BufferRef,
        stats: BufferRef,
    ) -> Result<bool> {
        let last = self.layers.len() - 1;
        let x: BufferRef = (&self.acts[self.act_at[last]]).into();
        let fusable = match &mut self.layers[last] {
            Layer::Linear(l) => l.can_fuse_xent(&self.params, x, n)?,
            _ => false,
        };
        if !fusable {
            self.record_forward(encoder, n)?;
            return Ok(false);
        }
        self.record_layers(encoder, n, last)?;
        let out = self.act_at[last + 1];
        let dout = self.dact_at[last + 1].expect("the output has a gradient");
        let Layer::Linear(l) = &mut self.layers[last] else {
            unreachable!("checked above")
        };
        l.record_forward_xent(
            encoder,
            &self.params,
            (&self.acts[self.act_at[last]]).into(),
            (&self.acts[out]).into(),
            labels,
            (&self.dacts[dout]).into(),
            stats,
            n,
        )?;
        Ok(true)
    }

    /// Records layers `0..end` of the forward.
    fn record_layers(&mut self, encoder: &mut impl Record, n: usize, end: usize) -> Result<()> {
        self.check_rows(n)?;
        if self.params_texels_on {
            // The weights as the last update left them (before the first dispatch: no compute pass
            // is open yet in a step).
            for (w, layer) in self.w_texels.iter().zip(&self.layers) {
                if let (Some(w), Layer::Linear(l)) = (w, layer) {
                    w.record_copy(encoder, l.out_features * l.in_features);
                }
            }
        }
        let fused: Vec<bool> = (0..self.layers.len()).map(|i| self.fuses(i)).collect();
        let sigmoid: Vec<bool> = (0..self.layers.len())
            .map(|i| self.fuses_sigmoid(i))
            .collect();
        let linear_bn = self.fuse_linear_bn;
        let Sequential {
            layers,
            acts,
            act_at,
            params,
            shapes,
            fused_last,
            ..
        } = self;
        // Before recording, so a failed forward leaves no stale pairing for a backward to mirror.
        fused_last.fill(false);
        // Layers before this one were recorded inside an earlier layer's dispatch.
        let mut next = 0;
        for i in 0..end {
            if i < next || (i > 0 && (fused[i - 1] || sigmoid[i - 1])) {
                continue; // this ReLU or Sigmoid ran inside the BatchNorm before it
            }
            let x: BufferRef = (&acts[act_at[i]]).into();
            // A fused BatchNorm writes the ReLU's or Sigmoid's output boundary.
            let y: BufferRef = (&acts[act_at[i + 1 + (fused[i] || sigmoid[i]) as usize]]).into();
            if linear_bn && i + 1 < layers.len() && !fused[i + 1] {
                let (head, tail) = layers.split_at_mut(i + 1);
                if let (Layer::Linear(l), Layer::BatchNorm { bn, .. }) =
                    (&mut head[i], &mut tail[0])
                {
                    bn.set_fuse_relu(false)?;
                    // The BatchNorm's output boundary, past the Sigmoid it runs.
                    let bn_y: BufferRef = (&acts[act_at[i + 2 + sigmoid[i + 1] as usize]]).into();
                    if l.record_forward_with_bn(encoder, params, bn, x, y, bn_y, n, sigmoid[i + 1])?
                    {
                        next = i + 2;
                        continue;
                    }
                }
            }
            let layer = &mut layers[i];
            match layer {
                Layer::Linear(l) => l.record_forward(encoder, params, x, y, n)?,
                Layer::Conv2d(c) => {
                    let hw = (shapes[i][1], shapes[i][2]);
                    c.record_forward(encoder, params, x, y, n, hw)?
                }
                Layer::BatchNorm { bn, .. } => {
                    let (shape, layout) = Self::bn_view(n, &shapes[i]);
                    bn.set_fuse_relu(fused[i])?;
                    if !sigmoid[i] {
                        bn.record_forward(encoder, x, y, &shape, layout)?;
                        continue;
                    }
                    // On for this forward only: the backward does not depend on it, and the layer's
                    // options stay free for its other setters (ghost batches refuse fused outputs).
                    let plain = bn.options();
                    bn.set_options(OpOptions {
                        sigmoid: true,
                        ..plain
                    })?;
                    let recorded = bn.record_forward(encoder, x, y, &shape, layout);
                    bn.set_options(plain)?;
                    recorded?
                }
                Layer::Sigmoid(s) => s.record_forward(encoder, x, y, n)?,
                Layer::Relu(r) => r.record_forward(encoder, x, y, n)?,
                Layer::Pool(p) => p.record_forward(encoder, x, y, n)?,
                Layer::Dropout(d) => d.record_forward(encoder, x, y, n)?,
                Layer::Noise(z) => z.record_forward(encoder, x, y, n)?,
                Layer::Flatten => {}
            }
        }
        *fused_last = fused;
        Ok(())
    }

    /// Records the backward of the last forward from [`Self::output_grad`]: every gradient into
    /// [`Self::grads`] (overwritten).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `n` exceeds the capacity; the layers' errors.
    pub fn record_backward(&mut self, encoder: &mut impl Record, n: usize) -> Result<()> {
        self.record_backward_with_sgd(encoder, n, None).map(|_| ())
    }

    /// [`Self::record_backward`], and where `sgd` is given and the network's first Linear can take it
    /// ([`LinearOp::record_dw_with_sgd`]: on CPU devices, for the MLPs), SGD's update of every
    /// parameter inside that Linear's dW dispatch, the backward's last: `true` when it did (the
    /// optimizer then records no update of its own), `false` when it recorded the backward alone.
    ///
    /// # Errors
    /// As [`Self::record_backward`].
    pub(crate) fn record_backward_with_sgd(
        &mut self,
        encoder: &mut impl Record,
        n: usize,
        sgd: Option<&SgdFusion>,
    ) -> Result<bool> {
        let all = self.layers.len();
        self.record_backward_below(encoder, n, sgd, all)
    }

    /// The forward, the loss and the backward of a training step (with SGD's update where `sgd`
    /// fuses, as [`Self::record_backward_with_sgd`]), with the head in one dispatch where it can: on
    /// CPU devices, for a network ending `BatchNorm → Sigmoid → Linear` whose Linear takes the loss
    /// ([`Self::record_forward_with_loss`]) and whose backward runs through both layers before it
    /// ([`Linear::record_head_step`]): one dispatch fewer than the forward with the loss and the
    /// backward apart, and a thread instead of two workers woken for the small head (lavapipe).
    /// `Ok(None)` with nothing recorded where the network does not end so or the head cannot take
    /// the loss; otherwise everything is recorded and this returns whether SGD's update was.
    ///
    /// # Errors
    /// As [`Self::record_forward_with_loss`] and [`Self::record_backward_with_sgd`].
    pub(crate) fn record_step_with_head(
        &mut self,
        encoder: &mut impl Record,
        n: usize,
        labels: BufferRef,
        stats: BufferRef,
        sgd: Option<&SgdFusion>,
    ) -> Result<Option<bool>> {
        let last = self.layers.len() - 1;
        let ends_so = last >= 2
            && matches!(
                &self.layers[last - 2..],
                [Layer::BatchNorm { .. }, Layer::Sigmoid(_), Layer::Linear(_)]
            )
            && self.dact_at[last - 2..=last].iter().all(Option::is_some);
        if !(self.gpu.caps().cpu_device && self.fuse_linear_bn && ends_so) {
            return Ok(None);
        }
        let x: BufferRef = (&self.acts[self.act_at[last]]).into();
        let Layer::Linear(l) = &mut self.layers[last] else {
            unreachable!("checked above")
        };
        if !l.can_fuse_xent(&self.params, x, n)? {
            return Ok(None);
        }
        // The BatchNorm's backward depends on how its forward ran (`BatchNorm::fused_backward_buffers`):
        // the layers first, then the head as one dispatch or, where it cannot be, as two.
        self.record_layers(encoder, n, last)?;
        let Sequential {
            layers,
            acts,
            act_at,
            dacts,
            dact_at,
            params,
            grads,
            ..
        } = self;
        let (head, tail) = layers.split_at_mut(last);
        let (Layer::BatchNorm { bn, .. }, Layer::Linear(l)) = (&head[last - 2], &mut tail[0])
        else {
            unreachable!("checked above")
        };
        let dout = dact_at[last + 1].expect("the output has a gradient");
        let dz_at = dact_at[last - 2].expect("checked above");
        let outputs = (
            (&acts[act_at[last + 1]]).into(),
            labels,
            (&dacts[dout]).into(),
            stats,
        );
        let fused = l.record_head_step(
            encoder,
            (params, grads),
            bn,
            (&acts[act_at[last]]).into(),
            outputs,
            ((&acts[act_at[last - 2]]).into(), (&dacts[dz_at]).into()),
            n,
        )?;
        if fused {
            return self
                .record_backward_below(encoder, n, sgd, last - 2)
                .map(Some);
        }
        l.record_forward_xent(
            encoder,
            params,
            (&acts[act_at[last]]).into(),
            outputs.0,
            outputs.1,
            outputs.2,
            outputs.3,
            n,
        )?;
        self.record_backward_with_sgd(encoder, n, sgd).map(Some)
    }

    /// [`Self::record_backward_with_sgd`] for layers `0..end` (the layers from `end` on recorded theirs).
    fn record_backward_below(
        &mut self,
        encoder: &mut impl Record,
        n: usize,
        sgd: Option<&SgdFusion>,
        end: usize,
    ) -> Result<bool> {
        self.check_rows(n)?;
        let fuse_bn = self.fuse_linear_bn;
        let mut updated = false;
        let Sequential {
            layers,
            acts,
            act_at,
            dacts,
            dact_at,
            params,
            grads,
            shapes,
            fused_last,
            params_texels,
            params_texels_on,
            grads_texels,
            grads_texels_on,
            ..
        } = self;
        let sgd_texels = SgdTexels {
            param: params_texels.as_deref().filter(|_| *params_texels_on),
            grad: grads_texels.as_ref().filter(|_| *grads_texels_on),
            buf: None,
        };
        // Whether the layer just recorded was a Linear that ran the Sigmoid before it inside its dx product.
        let mut sigmoid_done = false;
        // Layers from this index up were recorded inside a later layer's dispatch (or before).
        let mut done_from = end;
        for i in (0..layers.len()).rev() {
            if i >= done_from {
                continue; // a Linear ran this Sigmoid's and BatchNorm's backwards in its dispatch
            }
            if i > 0 && fused_last[i - 1] {
                continue; // the fused BatchNorm before this ReLU applies its mask
            }
            if std::mem::take(&mut sigmoid_done) {
                continue; // the Linear after this Sigmoid wrote the gradient of its input
            }
            // A Linear reading a Sigmoid's output: the sigmoid's backward rides on the dx product.
            let sigmoid_input_grad = match (i.checked_sub(1).map(|p| &layers[p]), &layers[i]) {
                // (dact_at[i]: the Linear has an input gradient; dact_at[i - 1]: so has the Sigmoid.)
                (Some(Layer::Sigmoid(_)), Layer::Linear(_)) if dact_at[i].is_some() => {
                    dact_at[i - 1]
                }
                _ => None,
            };
            // `BatchNorm → Sigmoid → Linear`: the Linear's dx product also runs both backwards.
            if let (true, Some(_), Some(Some(dz_at))) = (
                fuse_bn,
                sigmoid_input_grad,
                i.checked_sub(2).map(|b| dact_at[b]),
            ) {
                let (head, tail) = layers.split_at_mut(i);
                if let (Layer::BatchNorm { bn, .. }, Layer::Linear(l)) =
                    (&head[i - 2], &mut tail[0])
                {
                    let out = dact_at[i + 1].expect("layer outputs have gradients");
                    let fused = l.record_backward_through_sigmoid_bn(
                        encoder,
                        params,
                        grads,
                        bn,
                        (&acts[act_at[i]]).into(),
                        (&dacts[out]).into(),
                        (&acts[act_at[i - 2]]).into(),
                        (&dacts[dz_at]).into(),
                        n,
                    )?;
                    if fused {
                        done_from = i - 2;
                        continue;
                    }
                }
            }
            let layer = &mut layers[i];
            let x: BufferRef = (&acts[act_at[i]]).into();
            let y: BufferRef = (&acts[act_at[i + 1]]).into();
            // A fused BatchNorm takes the gradient of the ReLU's output.
            let out = i + 1 + fused_last[i] as usize;
            let dy: BufferRef =
                (&dacts[dact_at[out].expect("layer outputs have gradients")]).into();
            let dx: Option<BufferRef> = dact_at[i].map(|d| (&dacts[d]).into());
            if let (Layer::Linear(l), Some(dz_at)) = (&mut *layer, sigmoid_input_grad) {
                let dz = (&dacts[dz_at]).into();
                l.record_backward_through_sigmoid(encoder, params, grads, x, dy, dz, n)?;
                sigmoid_done = true;
                continue;
            }
            match (layer, dx) {
                (Layer::Linear(l), None) if sgd.is_some() => {
                    let sgd = sgd.expect("checked");
                    updated =
                        l.record_dw_with_sgd(encoder, (params, grads), x, dy, n, sgd_texels, sgd)?;
                    if !updated {
                        l.record_backward(encoder, params, grads, x, dy, None, n)?;
                    }
                }
                (Layer::Linear(l), dx) => {
                    l.record_backward(encoder, params, grads, x, dy, dx, n)?
                }
                (Layer::Conv2d(c), dx) => {
                    let hw = (shapes[i][1], shapes[i][2]);
                    c.record_backward(encoder, params, grads, x, dy, dx, n, hw)?
                }
                // Its gradients land in `grads` directly (`BatchNorm::use_arena`).
                (Layer::BatchNorm { bn, .. }, Some(dx)) => {
                    let (shape, layout) = Self::bn_view(n, &shapes[i]);
                    bn.record_backward(encoder, x, dy, dx, &shape, layout)?;
                }
                (Layer::BatchNorm { .. }, None) => {
                    return Err(Error::config("missing input gradient buffer for BatchNorm"))
                }
                (Layer::Sigmoid(s), Some(dx)) => s.record_backward(encoder, y, dy, dx, n)?,
                (Layer::Relu(r), Some(dx)) => r.record_backward(encoder, y, dy, dx, n)?,
                (Layer::Pool(p), Some(dx)) => p.record_backward(encoder, dy, dx, n)?,
                (Layer::Dropout(d), Some(dx)) => d.record_backward(encoder, dy, dx, n)?,
                (Layer::Noise(z), Some(dx)) => z.record_backward(encoder, dy, dx, n)?,
                // No input gradient wanted (the network's input) and no parameters: nothing to do.
                // Flatten's gradient is its output gradient's buffer already.
                (
                    Layer::Sigmoid(_)
                    | Layer::Relu(_)
                    | Layer::Pool(_)
                    | Layer::Dropout(_)
                    | Layer::Noise(_),
                    None,
                )
                | (Layer::Flatten, _) => {}
            }
        }
        Ok(updated)
    }

    /// The state dict with PyTorch's keys and order: `i.weight`, `i.bias` per Linear;
    /// `i.weight`, `i.bias`, `i.running_mean`, `i.running_var` and the counter `i.num_batches_tracked`
    /// per BatchNorm; nothing for layers without parameters or buffers. A BatchNorm with several
    /// domains ([`BatchNorm::set_num_domains`]) keeps domain 0 under those names, whichever domain is
    /// selected, and adds `i.domains.{d}.running_mean`, `.running_var`, `.num_batches_tracked` for each
    /// other domain d (the selection itself is a mode, like train/eval, and is not saved).
    ///
    /// # Errors
    /// Device errors.
    pub fn state_dict(&self) -> Result<StateDict> {
        let arena = self.gpu.download::<f32>(&self.params, 0, self.arena_len)?;
        let mut sd = StateDict::default();
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Layer::Conv2d(Conv2d { weight, bias, .. })
                | Layer::Linear(Linear { weight, bias, .. }) => {
                    for s in std::iter::once(weight).chain(bias.as_ref()) {
                        sd.tensors.push((
                            s.name.clone(),
                            s.shape.clone(),
                            s.values(&arena).to_vec(),
                        ));
                    }
                }
                Layer::BatchNorm { bn, weight, bias } => {
                    for s in [weight, bias] {
                        sd.tensors.push((
                            s.name.clone(),
                            s.shape.clone(),
                            s.values(&arena).to_vec(),
                        ));
                    }
                    if bn.running_mean.is_none() {
                        // PyTorch registers running_mean, running_var and num_batches_tracked as None
                        // without track_running_stats: none of them is in its state dict.
                        continue;
                    }
                    for d in 0..bn.num_domains() {
                        let (mean, var, nbt) = bn.domain_stats(d)?;
                        let p = domain_prefix(i, d);
                        let c = vec![bn.num_features()];
                        sd.tensors
                            .push((format!("{p}running_mean"), c.clone(), bn.read(mean)?));
                        sd.tensors
                            .push((format!("{p}running_var"), c, bn.read(var)?));
                        sd.counters.push((format!("{p}num_batches_tracked"), nbt));
                    }
                }
                Layer::Sigmoid(_)
                | Layer::Relu(_)
                | Layer::Pool(_)
                | Layer::Dropout(_)
                | Layer::Noise(_)
                | Layer::Flatten => {}
            }
        }
        Ok(sd)
    }

    /// Loads a state dict strictly (PyTorch's `strict=True`): every key present, no unknown key, shapes
    /// equal.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming missing or unexpected keys; [`Error::ShapeMismatch`] naming the key.
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let expected = self.state_dict()?;
        let given: HashMap<&str, (&Vec<usize>, &Vec<f32>)> = sd
            .tensors
            .iter()
            .map(|(k, s, v)| (k.as_str(), (s, v)))
            .collect();
        let counters: HashMap<&str, i64> =
            sd.counters.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        // Tensors must come as f32 tensors and counters as integers: a key of the wrong kind (say a
        // num_batches_tracked saved as a float) is named, not looked up in the wrong map.
        let mut missing = Vec::new();
        let mut wrong_kind = Vec::new();
        for t in &expected.tensors {
            let k = t.0.as_str();
            if counters.contains_key(k) {
                wrong_kind.push(format!("{k} (an integer, expected an f32 tensor)"));
            } else if !given.contains_key(k) {
                missing.push(k);
            }
        }
        for c in &expected.counters {
            let k = c.0.as_str();
            if given.contains_key(k) {
                wrong_kind.push(format!("{k} (an f32 tensor, expected a 0-d int64)"));
            } else if !counters.contains_key(k) {
                missing.push(k);
            }
        }
        let known: Vec<&str> = expected
            .tensors
            .iter()
            .map(|t| t.0.as_str())
            .chain(expected.counters.iter().map(|c| c.0.as_str()))
            .collect();
        let unexpected: Vec<&str> = given
            .keys()
            .chain(counters.keys())
            .copied()
            .filter(|k| !known.contains(k))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() || !wrong_kind.is_empty() {
            return Err(Error::config(format!(
                "state dict does not fit the model: missing keys {missing:?}, unexpected keys \
                 {unexpected:?}, keys of the wrong type {wrong_kind:?}"
            )));
        }
        for (key, shape, _) in &expected.tensors {
            let (s, v) = given[key.as_str()];
            if s != shape || v.len() != shape.iter().product::<usize>() {
                return Err(Error::ShapeMismatch {
                    what: format!("state dict entry '{key}'"),
                    expected: format!("{shape:?}"),
                    got: format!("{s:?} ({} values)", v.len()),
                });
            }
        }
        for s in &self.slots {
            let (_, v) = given[s.name.as_str()];
            self.gpu
                .queue
                .write_buffer(&self.params, 4 * s.offset as u64, bytemuck::cast_slice(v));
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if let Layer::BatchNorm { bn, .. } = layer {
                if bn.running_mean.is_none() {
                    continue;
                }
                for d in 0..bn.num_domains() {
                    let p = domain_prefix(i, d);
                    let (mean, var, _) = bn.domain_stats(d)?;
                    for (name, b) in [("running_mean", mean), ("running_var", var)] {
                        let key = format!("{p}{name}");
                        bn.write(&key, b, given[key.as_str()].1)?;
                    }
                    let nbt = counters[format!("{p}num_batches_tracked").as_str()];
                    bn.set_domain_num_batches_tracked(d, nbt)?;
                }
            }
        }
        // An empty submission flushes the queued writes: the state is in place when this returns.
        self.gpu
            .submit_and_wait(self.gpu.encoder("load state dict"))
    }
}

/// State-dict prefix of BatchNorm layer `i`'s running statistics for `domain`: PyTorch's `i.` for
/// domain 0, `i.domains.{d}.` for the others ([`BatchNorm::set_num_domains`]).
fn domain_prefix(i: usize, domain: usize) -> String {
    if domain == 0 {
        format!("{i}.")
    } else {
        format!("{i}.domains.{domain}.")
    }
}

/// A named f32 tensor: `(key, shape, values)`.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A model's state: f32 tensors `(key, shape, values)` and integer counters (`num_batches_tracked`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    /// Parameters and buffers, in the model's order.
    pub tensors: Vec<NamedTensor>,
    /// Integer state (PyTorch stores these as 0-d int64 tensors).
    pub counters: Vec<(String, i64)>,
}

impl StateDict {
    /// The tensor named `key`.
    pub fn get(&self, key: &str) -> Option<&[f32]> {
        self.tensors
            .iter()
            .find(|t| t.0 == key)
            .map(|t| t.2.as_slice())
    }
}
