//! `BatchNorm1d/2d/3d`: the layer with PyTorch's parameters, buffers, defaults and train/eval semantics.
//!
//! Forward (training, or `track_running_stats=false`): batch mean and biased variance per channel over
//! (N, spatial); `y = (x - mean) / sqrt(var + eps) * weight + bias`; when tracking and training, the running
//! statistics move by the momentum (unbiased variance) and `num_batches_tracked` counts the call.
//! Forward (eval with tracking): the running statistics instead.
//!
//! # Shapes
//! NCHW `[N, C]`, `[N, C, L]`, `[N, C, H, W]`, `[N, C, D, H, W]`; NHWC `[N, ..., C]`; NC `[N, C]`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, ForwardBuffers, PlanChoice,
};
use crate::tensor::{Layout, Tensor};

/// Which PyTorch class a layer stands for: it fixes the input ranks accepted, as PyTorch's do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BatchNormDims {
    /// Any rank from 2 to 5 (the crate's own default).
    #[default]
    Any,
    /// `BatchNorm1d`: (N, C) or (N, C, L) (or (N, L, C) channel-last).
    D1,
    /// `BatchNorm2d`: (N, C, H, W) or (N, H, W, C).
    D2,
    /// `BatchNorm3d`: (N, C, D, H, W) or (N, D, H, W, C).
    D3,
}

impl BatchNormDims {
    fn check(self, shape: &[usize]) -> Result<()> {
        let (ok, want) = match self {
            BatchNormDims::Any => (true, ""),
            BatchNormDims::D1 => (matches!(shape.len(), 2 | 3), "2D or 3D"),
            BatchNormDims::D2 => (shape.len() == 4, "4D"),
            BatchNormDims::D3 => (shape.len() == 5, "5D"),
        };
        if ok {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            what: format!("input of {self:?} BatchNorm"),
            expected: format!("{want} input"),
            got: format!("{}D input {shape:?}", shape.len()),
        })
    }
}

/// A BatchNorm layer over `num_features` channels. [`BatchNorm::new`] accepts any rank from 2 to 5;
/// [`BatchNorm::new_1d`], [`BatchNorm::new_2d`] and [`BatchNorm::new_3d`] accept the ranks PyTorch's
/// `BatchNorm1d`, `2d` and `3d` do.
pub struct BatchNorm {
    gpu: Arc<Gpu>,
    config: BatchNormConfig,
    num_features: usize,
    /// Gamma, C values (present when affine; starts at 1).
    pub weight: Option<wgpu::Buffer>,
    /// Beta, C values (present when affine; starts at 0).
    pub bias: Option<wgpu::Buffer>,
    /// Running mean, C values (present when tracking; starts at 0).
    pub running_mean: Option<wgpu::Buffer>,
    /// Running unbiased variance, C values (present when tracking; starts at 1).
    pub running_var: Option<wgpu::Buffer>,
    /// Gradient of gamma from the last backward.
    pub dweight: Option<wgpu::Buffer>,
    /// Gradient of beta from the last backward.
    pub dbias: Option<wgpu::Buffer>,
    /// save_mean [C] then save_invstd [C] from the last forward.
    pub saved: wgpu::Buffer,
    /// Training calls counted while tracking (PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: i64,
    training: bool,
    last_forward_batch_stats: Option<bool>,
    choice: PlanChoice,
    dims: BatchNormDims,
    ops: HashMap<(Vec<usize>, Layout), BatchNormOp>,
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNorm")
            .field("num_features", &self.num_features)
            .field("config", &self.config)
            .field("training", &self.training)
            .field("num_batches_tracked", &self.num_batches_tracked)
            .finish()
    }
}

impl BatchNorm {
    /// A layer in training mode with PyTorch's initial state (weight 1, bias 0, running mean 0, running
    /// var 1, no batches tracked).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for `num_features == 0` or a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, num_features: usize, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        if num_features == 0 {
            return Err(Error::config("num_features must be at least 1"));
        }
        let c = num_features;
        let vec = |label: &str, v: f32| gpu.upload(label, &vec![v; c]);
        let (weight, bias, dweight, dbias) = if config.affine {
            (
                Some(vec("bn.weight", 1.0)?),
                Some(vec("bn.bias", 0.0)?),
                Some(vec("bn.weight.grad", 0.0)?),
                Some(vec("bn.bias.grad", 0.0)?),
            )
        } else {
            (None, None, None, None)
        };
        let (running_mean, running_var) = if config.track_running_stats {
            (
                Some(vec("bn.running_mean", 0.0)?),
                Some(vec("bn.running_var", 1.0)?),
            )
        } else {
            (None, None)
        };
        Ok(BatchNorm {
            gpu: gpu.clone(),
            config,
            num_features,
            weight,
            bias,
            running_mean,
            running_var,
            dweight,
            dbias,
            saved: gpu.upload("bn.saved", &vec![0.0f32; 2 * c])?,
            num_batches_tracked: 0,
            training: true,
            last_forward_batch_stats: None,
            choice: PlanChoice::Auto,
            dims: BatchNormDims::Any,
            ops: HashMap::new(),
        })
    }

    /// PyTorch's `BatchNorm1d`: inputs (N, C) or (N, C, L).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn new_1d(gpu: &Arc<Gpu>, num_features: usize, config: BatchNormConfig) -> Result<Self> {
        Ok(Self {
            dims: BatchNormDims::D1,
            ..Self::new(gpu, num_features, config)?
        })
    }

    /// PyTorch's `BatchNorm2d`: inputs (N, C, H, W).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn new_2d(gpu: &Arc<Gpu>, num_features: usize, config: BatchNormConfig) -> Result<Self> {
        Ok(Self {
            dims: BatchNormDims::D2,
            ..Self::new(gpu, num_features, config)?
        })
    }

    /// PyTorch's `BatchNorm3d`: inputs (N, C, D, H, W).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn new_3d(gpu: &Arc<Gpu>, num_features: usize, config: BatchNormConfig) -> Result<Self> {
        Ok(Self {
            dims: BatchNormDims::D3,
            ..Self::new(gpu, num_features, config)?
        })
    }

    /// Forces a kernel plan (tests and benchmarks); `Auto` by default.
    pub fn set_plan(&mut self, choice: PlanChoice) {
        self.choice = choice;
        self.ops.clear();
    }

    /// Training mode (batch statistics, running statistics updated) or eval mode.
    pub fn train(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// C.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// Whether the next forward normalizes with batch statistics.
    pub fn uses_batch_stats(&self) -> bool {
        self.training || !self.config.track_running_stats
    }

    /// The plan for inputs of `shape` in `layout` (built on first use).
    ///
    /// # Errors
    /// Shape errors when C does not match `num_features`; planning errors.
    pub fn op(&mut self, shape: &[usize], layout: Layout) -> Result<&BatchNormOp> {
        let key = (shape.to_vec(), layout);
        if !self.ops.contains_key(&key) {
            self.dims.check(shape)?;
            let dims = layout.dims(shape)?;
            if dims.c != self.num_features {
                return Err(Error::ShapeMismatch {
                    what: "input channels".into(),
                    expected: format!("{} (num_features)", self.num_features),
                    got: format!("{} in shape {shape:?} ({})", dims.c, layout.name()),
                });
            }
            let op = BatchNormOp::new(&self.gpu, shape, layout, self.config, self.choice)?;
            self.ops.insert(key.clone(), op);
        }
        Ok(&self.ops[&key])
    }

    /// Records the forward of an input of `shape` in `layout` from `x` into `y` (caller's buffers), in the
    /// layer's mode. In training with tracking this counts the batch in `num_batches_tracked`.
    ///
    /// # Errors
    /// As [`BatchNormOp::record_forward_train`].
    pub fn record_forward(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        x: BufferRef,
        y: BufferRef,
        shape: &[usize],
        layout: Layout,
    ) -> Result<()> {
        let batch_stats = self.uses_batch_stats();
        let update = self.training && self.config.track_running_stats;
        let factor = if update {
            let n = self.num_batches_tracked + 1;
            Some(self.config.momentum.unwrap_or(1.0 / n as f32))
        } else {
            None
        };
        // Plan first (mutable borrow), then record with the immutable one.
        self.op(shape, layout)?;
        let op = &self.ops[&(shape.to_vec(), layout)];
        let bufs = ForwardBuffers {
            x,
            y,
            weight: self.weight.as_ref().map(BufferRef::from),
            bias: self.bias.as_ref().map(BufferRef::from),
            running_mean: self.running_mean.as_ref().map(BufferRef::from),
            running_var: self.running_var.as_ref().map(BufferRef::from),
            saved: BufferRef::from(&self.saved),
        };
        if batch_stats {
            op.record_forward_train(encoder, &bufs, factor)?;
        } else {
            op.record_forward_eval(encoder, &bufs)?;
        }
        if update {
            self.num_batches_tracked += 1;
        }
        self.last_forward_batch_stats = Some(batch_stats);
        Ok(())
    }

    /// Records the backward of the last forward: dx into `dx`, and the parameter gradients into
    /// `self.dweight` / `self.dbias` (overwritten).
    ///
    /// # Errors
    /// [`Error::BadConfig`] when no forward was recorded; as [`BatchNormOp::record_backward`].
    pub fn record_backward(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        x: BufferRef,
        dy: BufferRef,
        dx: BufferRef,
        shape: &[usize],
        layout: Layout,
    ) -> Result<()> {
        let batch_stats = self
            .last_forward_batch_stats
            .ok_or_else(|| Error::config("backward before any forward"))?;
        self.op(shape, layout)?;
        let op = &self.ops[&(shape.to_vec(), layout)];
        let bufs = BackwardBuffers {
            x,
            dy,
            dx,
            weight: self.weight.as_ref().map(BufferRef::from),
            saved: BufferRef::from(&self.saved),
            dweight: self.dweight.as_ref().map(BufferRef::from),
            dbias: self.dbias.as_ref().map(BufferRef::from),
        };
        op.record_backward(encoder, &bufs, batch_stats)
    }

    /// Forward on the crate's own tensors: allocates y, records, submits and waits.
    ///
    /// # Errors
    /// As [`Self::record_forward`]; device errors.
    pub fn forward(&mut self, x: &Tensor, layout: Layout) -> Result<Tensor> {
        let y = Tensor::filled(&self.gpu, &x.shape, 0.0)?;
        let mut encoder = self.gpu.encoder("batchnorm forward");
        self.record_forward(
            &mut encoder,
            (&x.buffer).into(),
            (&y.buffer).into(),
            &x.shape,
            layout,
        )?;
        self.gpu.submit_and_wait(encoder)?;
        Ok(y)
    }

    /// Backward on the crate's own tensors: returns dx; gradients land in `dweight`/`dbias`.
    ///
    /// # Errors
    /// As [`Self::record_backward`]; device errors.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, layout: Layout) -> Result<Tensor> {
        if dy.shape != x.shape {
            return Err(Error::ShapeMismatch {
                what: "dy".into(),
                expected: format!("{:?} (the shape of x)", x.shape),
                got: format!("{:?}", dy.shape),
            });
        }
        let dx = Tensor::filled(&self.gpu, &x.shape, 0.0)?;
        let mut encoder = self.gpu.encoder("batchnorm backward");
        self.record_backward(
            &mut encoder,
            (&x.buffer).into(),
            (&dy.buffer).into(),
            (&dx.buffer).into(),
            &x.shape,
            layout,
        )?;
        self.gpu.submit_and_wait(encoder)?;
        Ok(dx)
    }

    /// Reads a per-channel buffer (`weight`, `running_mean`, ...) back to the host.
    pub fn read(&self, buffer: &wgpu::Buffer) -> Result<Vec<f32>> {
        self.gpu.download(buffer, 0, self.num_features)
    }

    /// save_mean and save_invstd of the last forward.
    pub fn read_saved(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let v = self
            .gpu
            .download::<f32>(&self.saved, 0, 2 * self.num_features)?;
        Ok((
            v[..self.num_features].to_vec(),
            v[self.num_features..].to_vec(),
        ))
    }

    /// Overwrites a per-channel buffer with `values` (C of them).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `values.len() != num_features`.
    pub fn write(&self, what: &str, buffer: &wgpu::Buffer, values: &[f32]) -> Result<()> {
        if values.len() != self.num_features {
            return Err(Error::ShapeMismatch {
                what: what.to_string(),
                expected: format!("{} values (num_features)", self.num_features),
                got: format!("{} values", values.len()),
            });
        }
        self.gpu
            .queue
            .write_buffer(buffer, 0, bytemuck::cast_slice(values));
        Ok(())
    }

    /// The state dict with PyTorch's key names: `weight`, `bias`, `running_mean`, `running_var` (f32) and
    /// `num_batches_tracked` (kept apart: an integer). Keys are prefixed with `prefix` (e.g. `"1."`).
    pub fn state_dict(&self, prefix: &str) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        for (name, b) in [
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ] {
            if let Some(b) = b {
                out.push((format!("{prefix}{name}"), self.read(b)?));
            }
        }
        Ok(out)
    }
}
