//! `Sequential`: layers applied in order, with an explicit backward, every trainable parameter in one
//! flat arena (and every gradient in another) so one optimizer dispatch updates the whole model.
//!
//! Activations live in per-boundary buffers sized for `capacity` rows, allocated once; a step records
//! forward and backward into the caller's encoder and allocates no buffers.
//!
//! BatchNorm layers keep their own `weight`/`bias` buffers (as [`BatchNorm`] requires): their gradients
//! are copied into the gradient arena after the backward, and the updated values copied back after the
//! optimizer step ([`Sequential::record_sync_params`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::nn::init::{self, Init};
use crate::nn::{BatchNorm, Linear, Sigmoid};
use crate::ops::batchnorm::{BatchNormConfig, BufferRef};
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

/// One layer of a [`Sequential`].
#[derive(Debug)]
pub enum Layer {
    /// Fully connected.
    Linear(Linear),
    /// BatchNorm1d over `[N, C]`, with the arena slots mirroring its `weight` and `bias`.
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
}

/// A feed-forward network on `[N, features]` rows.
#[derive(Debug)]
pub struct Sequential {
    gpu: Arc<Gpu>,
    /// The layers, in order (their indices are the state-dict prefixes).
    pub layers: Vec<Layer>,
    widths: Vec<usize>,
    slots: Vec<ParamSlot>,
    arena_len: usize,
    /// Every trainable parameter.
    pub params: wgpu::Buffer,
    /// Every gradient, same offsets as `params`.
    pub grads: wgpu::Buffer,
    capacity: usize,
    acts: Vec<wgpu::Buffer>,
    dacts: Vec<Option<wgpu::Buffer>>,
}

impl Sequential {
    /// `Linear → [BatchNorm] → Sigmoid` per hidden layer, then a `Linear` head, for up to `capacity` rows
    /// per call. Layer indices follow PyTorch's `nn.Sequential` of the same modules.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for fewer than two sizes, a zero size or `capacity`; device errors.
    pub fn mlp(gpu: &Arc<Gpu>, config: &MlpConfig, capacity: usize) -> Result<Self> {
        let sizes = &config.sizes;
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::config(format!(
                "MLP sizes {sizes:?}: need at least an input and an output width, none zero"
            )));
        }
        if capacity == 0 {
            return Err(Error::config(
                "MLP capacity (rows per call) must be at least 1",
            ));
        }
        enum Spec {
            Linear(usize, usize),
            Bn(usize),
            Sigmoid(usize),
        }
        let mut specs = Vec::new();
        for (i, w) in sizes.windows(2).enumerate() {
            specs.push(Spec::Linear(w[0], w[1]));
            if i + 2 < sizes.len() {
                if config.bn {
                    specs.push(Spec::Bn(w[1]));
                }
                specs.push(Spec::Sigmoid(w[1]));
            }
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
        let mut rng = init::rng(config.seed);
        let mut values: Vec<(ParamSlot, Vec<f32>)> = Vec::new();
        let mut layers = Vec::new();
        let mut widths = vec![sizes[0]];
        for (i, spec) in specs.iter().enumerate() {
            match *spec {
                Spec::Linear(fan_in, fan_out) => {
                    let w = slot(format!("{i}.weight"), vec![fan_out, fan_in]);
                    let b = slot(format!("{i}.bias"), vec![fan_out]);
                    values.push((w.clone(), config.init.weight(&mut rng, fan_out, fan_in)));
                    values.push((b.clone(), vec![0.0; fan_out]));
                    layers.push(Layer::Linear(Linear::new(gpu, fan_in, fan_out, w, Some(b))));
                    widths.push(fan_out);
                }
                Spec::Bn(c) => {
                    let w = slot(format!("{i}.weight"), vec![c]);
                    let b = slot(format!("{i}.bias"), vec![c]);
                    values.push((w.clone(), vec![1.0; c]));
                    values.push((b.clone(), vec![0.0; c]));
                    let bn = BatchNorm::new(gpu, c, BatchNormConfig::default())?;
                    layers.push(Layer::BatchNorm {
                        bn: Box::new(bn),
                        weight: w,
                        bias: b,
                    });
                    widths.push(c);
                }
                Spec::Sigmoid(c) => {
                    layers.push(Layer::Sigmoid(Sigmoid::new(gpu, c)));
                    widths.push(c);
                }
            }
        }
        let mut arena = vec![0.0f32; arena_len];
        for (s, v) in &values {
            arena[s.offset..s.offset + v.len()].copy_from_slice(v);
        }
        let params = gpu.upload("mlp.params", &arena)?;
        let grads = gpu.upload("mlp.grads", &vec![0.0f32; arena_len])?;
        let buffer = |label: &str, width: usize| {
            gpu.create_buffer(label, 4 * (capacity * width) as u64, storage_usage())
        };
        let acts = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| buffer(&format!("mlp.act{i}"), w))
            .collect::<Result<Vec<_>>>()?;
        let first_is_linear = matches!(layers.first(), Some(Layer::Linear(_)));
        let dacts = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                if i == 0 && first_is_linear {
                    Ok(None)
                } else {
                    buffer(&format!("mlp.dact{i}"), w).map(Some)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Sequential {
            gpu: gpu.clone(),
            layers,
            widths,
            slots: values.into_iter().map(|(s, _)| s).collect(),
            arena_len,
            params,
            grads,
            capacity,
            acts,
            dacts,
        })
    }

    /// The parameter slots in state-dict order.
    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    /// Values in each arena (parameters, gradients, optimizer state), padding included.
    pub fn arena_len(&self) -> usize {
        self.arena_len
    }

    /// Trainable parameters (padding excluded).
    pub fn num_params(&self) -> usize {
        self.slots.iter().map(ParamSlot::len).sum()
    }

    /// Rows per call the activation buffers hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.widths[0]
    }

    /// Output width (classes).
    pub fn out_features(&self) -> usize {
        self.widths[self.widths.len() - 1]
    }

    /// The input buffer: the caller writes `[n, in_features]` rows here before recording a forward.
    pub fn input(&self) -> &wgpu::Buffer {
        &self.acts[0]
    }

    /// The output (logits) of the last forward.
    pub fn output(&self) -> &wgpu::Buffer {
        &self.acts[self.acts.len() - 1]
    }

    /// Where the loss writes the gradient of the output before [`Self::record_backward`].
    pub fn output_grad(&self) -> &wgpu::Buffer {
        self.dacts[self.dacts.len() - 1]
            .as_ref()
            .expect("the output gradient buffer always exists")
    }

    /// The input of layer `i` (`i == layers.len()`: the output) from the last forward.
    pub fn activation(&self, i: usize) -> Option<&wgpu::Buffer> {
        self.acts.get(i)
    }

    /// Training or eval mode (BatchNorm: batch or running statistics).
    pub fn train(&mut self, training: bool) {
        for layer in &mut self.layers {
            if let Layer::BatchNorm { bn, .. } = layer {
                bn.train(training);
            }
        }
    }

    fn check_rows(&self, n: usize) -> Result<()> {
        if n == 0 || n > self.capacity {
            return Err(Error::ShapeMismatch {
                what: "batch rows".into(),
                expected: format!("1..={} (the model's capacity)", self.capacity),
                got: n.to_string(),
            });
        }
        Ok(())
    }

    /// Records the forward of `n` rows from [`Self::input`] to [`Self::output`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `n` exceeds the capacity; the layers' errors.
    pub fn record_forward(&mut self, encoder: &mut wgpu::CommandEncoder, n: usize) -> Result<()> {
        self.check_rows(n)?;
        let Sequential {
            layers,
            acts,
            params,
            widths,
            ..
        } = self;
        for (i, layer) in layers.iter_mut().enumerate() {
            let (x, y) = ((&acts[i]).into(), (&acts[i + 1]).into());
            match layer {
                Layer::Linear(l) => l.record_forward(encoder, params, x, y, n)?,
                Layer::BatchNorm { bn, .. } => {
                    bn.record_forward(encoder, x, y, &[n, widths[i]], Layout::Nc)?
                }
                Layer::Sigmoid(s) => s.record_forward(encoder, x, y, n)?,
            }
        }
        Ok(())
    }

    /// Records the backward of the last forward from [`Self::output_grad`]: every gradient into
    /// [`Self::grads`] (overwritten).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `n` exceeds the capacity; the layers' errors.
    pub fn record_backward(&mut self, encoder: &mut wgpu::CommandEncoder, n: usize) -> Result<()> {
        self.check_rows(n)?;
        let Sequential {
            layers,
            acts,
            dacts,
            params,
            grads,
            widths,
            ..
        } = self;
        for (i, layer) in layers.iter_mut().enumerate().rev() {
            let x: BufferRef = (&acts[i]).into();
            let y: BufferRef = (&acts[i + 1]).into();
            let dy: BufferRef = dacts[i + 1]
                .as_ref()
                .expect("gradient buffers exist past the input")
                .into();
            let dx: Option<BufferRef> = dacts[i].as_ref().map(Into::into);
            let need_dx = || dx.ok_or_else(|| Error::config("missing input gradient buffer"));
            match layer {
                Layer::Linear(l) => l.record_backward(encoder, params, grads, x, dy, dx, n)?,
                Layer::BatchNorm { bn, weight, bias } => {
                    bn.record_backward(encoder, x, dy, need_dx()?, &[n, widths[i]], Layout::Nc)?;
                    let c = 4 * widths[i] as u64;
                    if let (Some(dw), Some(db)) = (&bn.dweight, &bn.dbias) {
                        encoder.copy_buffer_to_buffer(dw, 0, grads, weight.at(grads).offset, c);
                        encoder.copy_buffer_to_buffer(db, 0, grads, bias.at(grads).offset, c);
                    }
                }
                Layer::Sigmoid(s) => s.record_backward(encoder, y, dy, need_dx()?, n)?,
            }
        }
        Ok(())
    }

    /// Records the copies that bring layers keeping their own parameter buffers (BatchNorm) up to date
    /// with the arena, after an optimizer step or a load.
    pub fn record_sync_params(&self, encoder: &mut wgpu::CommandEncoder) {
        for layer in &self.layers {
            if let Layer::BatchNorm { bn, weight, bias } = layer {
                if let (Some(w), Some(b)) = (&bn.weight, &bn.bias) {
                    let c = 4 * weight.len() as u64;
                    encoder.copy_buffer_to_buffer(
                        &self.params,
                        weight.at(&self.params).offset,
                        w,
                        0,
                        c,
                    );
                    encoder.copy_buffer_to_buffer(
                        &self.params,
                        bias.at(&self.params).offset,
                        b,
                        0,
                        c,
                    );
                }
            }
        }
    }

    /// The state dict with PyTorch's keys and order: `i.weight`, `i.bias` per Linear;
    /// `i.weight`, `i.bias`, `i.running_mean`, `i.running_var` and the counter `i.num_batches_tracked`
    /// per BatchNorm.
    ///
    /// # Errors
    /// Device errors.
    pub fn state_dict(&self) -> Result<StateDict> {
        let arena = self.gpu.download::<f32>(&self.params, 0, self.arena_len)?;
        let mut sd = StateDict::default();
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Layer::Linear(l) => {
                    for s in std::iter::once(&l.weight).chain(l.bias.as_ref()) {
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
                    for (name, b) in [
                        ("running_mean", &bn.running_mean),
                        ("running_var", &bn.running_var),
                    ] {
                        if let Some(b) = b {
                            sd.tensors.push((
                                format!("{i}.{name}"),
                                vec![bn.num_features()],
                                bn.read(b)?,
                            ));
                        }
                    }
                    sd.counters
                        .push((format!("{i}.num_batches_tracked"), bn.num_batches_tracked));
                }
                Layer::Sigmoid(_) => {}
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
        let missing: Vec<&str> = expected
            .tensors
            .iter()
            .map(|t| t.0.as_str())
            .chain(expected.counters.iter().map(|c| c.0.as_str()))
            .filter(|k| !given.contains_key(k) && !counters.contains_key(k))
            .collect();
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
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(Error::config(format!(
                "state dict does not fit the model: missing keys {missing:?}, unexpected keys {unexpected:?}"
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
                for (name, b) in [
                    ("running_mean", &bn.running_mean),
                    ("running_var", &bn.running_var),
                ] {
                    if let Some(b) = b {
                        bn.write(name, b, given[format!("{i}.{name}").as_str()].1)?;
                    }
                }
                bn.num_batches_tracked = counters[format!("{i}.num_batches_tracked").as_str()];
            }
        }
        let mut encoder = self.gpu.encoder("load state dict");
        self.record_sync_params(&mut encoder);
        self.gpu.submit_and_wait(encoder)
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
