//! `BatchNorm1d/2d/3d`: the layer with PyTorch's parameters, buffers, defaults and train/eval semantics.
//!
//! Forward (training, or `track_running_stats=false`): batch mean and biased variance per channel over
//! (N, spatial); `y = (x - mean) / sqrt(var + eps) * weight + bias`; when tracking and training, the running
//! statistics move by the momentum (unbiased variance) and `num_batches_tracked` counts the call.
//! Forward (eval with tracking): the running statistics instead.
//!
//! # Shapes
//! NCHW `[N, C]`, `[N, C, L]`, `[N, C, H, W]`, `[N, C, D, H, W]`; NHWC `[N, ..., C]`; NC `[N, C]`.
//!
//! # Variants (issue 6), each off by default
//! - **Ghost BatchNorm** ([`BatchNorm::set_virtual_batch_size`], Keras's `virtual_batch_size`): batch
//!   statistics per run of V consecutive samples (V must divide N); gamma/beta shared; the running
//!   statistics move once per step towards the average of the ghost means and of the ghost unbiased
//!   variances (Keras averages the ghost moments the same way); backward per ghost batch, parameter
//!   gradients summed.
//! - **Batch Renormalization** ([`BatchNorm::set_renorm`], Ioffe 2017): in training,
//!   `y = gamma * (xhat * r + d) + beta` with r, d from the batch and the running statistics from before
//!   this step's update, clipped by rmax/dmax ([`crate::ops::bn_variants::RenormSchedule`] gives the
//!   paper's schedule); r and d are constants in the backward.
//! - **FrozenBN** ([`BatchNorm::set_frozen`]): training normalizes with the running statistics and leaves
//!   them (and `num_batches_tracked`) alone; gradients reach x, gamma and beta.
//! - **PreciseBN** ([`BatchNorm::precise_begin`], [`BatchNorm::record_precise_accumulate`],
//!   [`BatchNorm::precise_finish`]): exact population statistics over any number of batches, merged on
//!   the GPU with Chan's formula, replacing the running statistics (variance unbiased).
//! - **Per-domain statistics** ([`BatchNorm::set_num_domains`], [`BatchNorm::set_domain`], detectron2's
//!   `CycleBatchNormList`): D sets of running statistics, shared gamma/beta; the selected domain's set is
//!   the one in `running_mean`/`running_var`/`num_batches_tracked`.
//! - **f16 storage and fused BN+ReLU** ([`BatchNorm::set_options`], [`BatchNorm::set_dtype`],
//!   [`BatchNorm::set_fuse_relu`]; the op's [`OpOptions`]): x, y, dy, dx in f16 (statistics,
//!   parameters and gradients stay f32), and/or y = relu(bn(x)) with the ReLU mask (one bit per
//!   element) in a buffer the layer owns, applied to dy inside the backward. Both combine with train,
//!   eval and FrozenBN, not with ghost BatchNorm or Batch Renorm (their extra kernels read and write f32
//!   tensors and know no mask), nor f16 with PreciseBN (its merge reads f32).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, F16Path, ForwardBuffers, OpOptions,
    PlanChoice,
};
use crate::ops::bn_variants::{BnVariantOp, Renorm};
use crate::ops::linear::{BnBackwardEpilogue, BnEpilogue, BnEpilogueParams, LinearOp};
use crate::record::Record;
use crate::reference::bn_variants::ghost_shape;
use crate::tensor::{DType, Layout, Tensor};

/// `r` moved on by `bytes`.
fn shifted(r: BufferRef<'_>, bytes: u64) -> BufferRef<'_> {
    BufferRef {
        buffer: r.buffer,
        offset: r.offset + bytes,
    }
}

/// What the last forward did, so the backward can mirror it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LastForward {
    /// Plain BatchNorm (FrozenBN included: `batch_stats` false), with or without the fused ReLU.
    Standard { batch_stats: bool, relu: bool },
    /// Ghost BatchNorm over `ghosts` sub-batches.
    Ghost { ghosts: usize },
    /// Batch Renormalization (r, d in the layer's `rd` buffer).
    Renorm,
}

/// One domain's running statistics while another domain is selected.
#[derive(Debug)]
struct DomainStats {
    mean: wgpu::Buffer,
    var: wgpu::Buffer,
    num_batches_tracked: i64,
}

/// Device buffers the variants need, allocated on first use.
#[derive(Default)]
struct VariantBuffers {
    /// Renorm: running mean then var from before the step's update (2C).
    snapshot: Option<wgpu::Buffer>,
    /// Renorm: r then d (2C).
    rd: Option<wgpu::Buffer>,
    /// Renorm: the output correction, scale then shift (2C).
    coef: Option<wgpu::Buffer>,
    /// Renorm: gamma * r (C).
    weff: Option<wgpu::Buffer>,
    /// Renorm without affine: gamma = 1 and beta = 0 (C each).
    ones: Option<wgpu::Buffer>,
    zeros: Option<wgpu::Buffer>,
    /// Ghost: per ghost batch, saved mean/invstd, and dweight, dbias slots; (ghosts, buffers).
    ghost_saved: Option<(usize, wgpu::Buffer)>,
    ghost_grads: Option<(usize, wgpu::Buffer, wgpu::Buffer)>,
    /// Ghost batches that are not at aligned offsets go through these (ghost bytes, x, y/dy, dx).
    ghost_scratch: Option<(u64, [wgpu::Buffer; 3])>,
    /// PreciseBN: population mean then M2 (2C), and the values per channel merged so far.
    precise: Option<(wgpu::Buffer, u64)>,
}

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
    /// Gamma, C values (present when affine and the layer keeps its own parameters; starts at 1).
    /// `None` once [`BatchNorm::use_arena`] moved the parameters into a model's arena: read them with
    /// [`BatchNorm::weight_values`] wherever they live.
    pub weight: Option<wgpu::Buffer>,
    /// Beta, C values (as `weight`; starts at 0).
    pub bias: Option<wgpu::Buffer>,
    /// Running mean, C values (present when tracking; starts at 0).
    pub running_mean: Option<wgpu::Buffer>,
    /// Running unbiased variance, C values (present when tracking; starts at 1).
    pub running_var: Option<wgpu::Buffer>,
    /// Gradient of gamma from the last backward (`None` in a model's arena, as `weight`).
    pub dweight: Option<wgpu::Buffer>,
    /// Gradient of beta from the last backward (`None` in a model's arena, as `weight`).
    pub dbias: Option<wgpu::Buffer>,
    /// Where gamma, beta and their gradients live when a model's arenas hold them ([`Self::use_arena`]).
    arena: Option<ParamArena>,
    /// save_mean `[C]` then save_invstd `[C]` from the last forward.
    pub saved: wgpu::Buffer,
    /// Training calls counted while tracking (PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: i64,
    training: bool,
    choice: PlanChoice,
    dims: BatchNormDims,
    /// Plans by input shape, layout and options (switching options, e.g. the fused ReLU, keeps both).
    ops: HashMap<(Vec<usize>, Layout, OpOptions), BatchNormOp>,
    last_forward: Option<LastForward>,
    /// Values of the last forward's input (what `saved` holds the statistics of).
    last_values: usize,
    virtual_batch_size: Option<usize>,
    renorm: Option<Renorm>,
    frozen: bool,
    /// Whether training forwards move the running statistics (off: evaluation with batch statistics).
    update_running: bool,
    /// One slot per domain; the selected one is `None` (its statistics are in the public fields).
    domains: Vec<Option<DomainStats>>,
    domain: usize,
    variant_ops: HashMap<(Vec<usize>, Layout), BnVariantOp>,
    vbufs: VariantBuffers,
    options: OpOptions,
    /// The fused ReLU's mask of the last forward (grown to the largest input seen).
    relu_mask: Option<wgpu::Buffer>,
    /// Parameters of the forward fused into the Linear before the layer, and their last value written.
    epilogue: Option<(wgpu::Buffer, Option<BnEpilogueParams>)>,
}

/// A model's parameter and gradient arenas and the byte offsets of this layer's gamma and beta in both.
#[derive(Clone, Debug)]
struct ParamArena {
    params: wgpu::Buffer,
    grads: wgpu::Buffer,
    weight: u64,
    bias: u64,
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
            arena: None,
            saved: gpu.upload("bn.saved", &vec![0.0f32; 2 * c])?,
            num_batches_tracked: 0,
            training: true,
            choice: PlanChoice::Auto,
            dims: BatchNormDims::Any,
            ops: HashMap::new(),
            last_forward: None,
            last_values: 0,
            virtual_batch_size: None,
            renorm: None,
            frozen: false,
            update_running: true,
            domains: vec![None],
            domain: 0,
            variant_ops: HashMap::new(),
            vbufs: VariantBuffers::default(),
            options: OpOptions::default(),
            relu_mask: None,
            epilogue: None,
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

    /// Whether the next forward normalizes with batch statistics (not in eval mode with tracking, nor
    /// in training when frozen).
    pub fn uses_batch_stats(&self) -> bool {
        (self.training && !self.frozen) || !self.config.track_running_stats
    }

    /// The plan for inputs of `shape` in `layout` under the layer's options (built on first use).
    ///
    /// # Errors
    /// Shape errors when C does not match `num_features`; planning errors.
    pub fn op(&mut self, shape: &[usize], layout: Layout) -> Result<&BatchNormOp> {
        let key = (shape.to_vec(), layout, self.options);
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
            let op = BatchNormOp::with_options(
                &self.gpu,
                shape,
                layout,
                self.config,
                self.choice,
                self.options,
            )?;
            self.ops.insert(key.clone(), op);
        }
        Ok(&self.ops[&key])
    }

    /// Records the forward of an input of `shape` in `layout` from `x` into `y` (caller's buffers), in the
    /// layer's mode and variant (ghost batches, Batch Renorm, FrozenBN: see the module docs). In training
    /// with tracking this counts the batch in `num_batches_tracked` (not when frozen).
    ///
    /// # Errors
    /// As [`BatchNormOp::record_forward_train`]; [`Error::BadConfig`] when the ghost batch size does not
    /// divide N or eps is 0 with batch statistics; [`Error::OneValuePerChannel`] for a ghost batch of one value per channel.
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        shape: &[usize],
        layout: Layout,
    ) -> Result<()> {
        let batch_stats = self.uses_batch_stats();
        // The op checks this too, but Batch Renorm records copies before it reaches the op: refuse
        // before anything is recorded.
        if batch_stats {
            self.config.check_eps_for_batch_stats()?;
        }
        let update =
            batch_stats && self.training && self.config.track_running_stats && self.update_running;
        let factor = if update {
            let n = self.num_batches_tracked + 1;
            Some(self.config.momentum.unwrap_or(1.0 / n as f32))
        } else {
            None
        };
        // Plan first (mutable borrow), then record with the immutable one.
        self.op(shape, layout)?;
        if let (true, Some(v)) = (batch_stats, self.virtual_batch_size) {
            if v != shape[0] {
                return self.record_ghost_forward(encoder, x, y, shape, layout, v, factor);
            }
        }
        let renorm = self.renorm.filter(|_| update);
        if renorm.is_some() {
            self.variant_op(shape, layout)?;
            self.ensure_renorm_buffers()?;
            let c = 4 * self.num_features as u64;
            let (rm, rv) = self.running()?;
            let snap = self.vbufs.snapshot.as_ref().expect("renorm buffers");
            encoder.encoder().copy_buffer_to_buffer(rm, 0, snap, 0, c);
            encoder.encoder().copy_buffer_to_buffer(rv, 0, snap, c, c);
        }
        let relu = self.options.fuse_relu;
        if relu {
            let bytes = self.ops[&(shape.to_vec(), layout, self.options)].mask_bytes();
            self.ensure_relu_mask(bytes)?;
        }
        let op = &self.ops[&(shape.to_vec(), layout, self.options)];
        let mask = self
            .relu_mask
            .as_ref()
            .filter(|_| relu)
            .map(BufferRef::from);
        let bufs = ForwardBuffers {
            x,
            y,
            weight: self.weight_ref(),
            bias: self.bias_ref(),
            running_mean: self.running_mean.as_ref().map(BufferRef::from),
            running_var: self.running_var.as_ref().map(BufferRef::from),
            saved: BufferRef::from(&self.saved),
        };
        match (batch_stats, mask) {
            (true, None) => op.record_forward_train(encoder, &bufs, factor)?,
            (true, Some(m)) => op.record_forward_train_relu(encoder, &bufs, m, factor)?,
            (false, None) => op.record_forward_eval(encoder, &bufs)?,
            (false, Some(m)) => op.record_forward_eval_relu(encoder, &bufs, m)?,
        }
        if let Some(renorm) = renorm {
            let vb = &self.vbufs;
            fn need(b: &Option<wgpu::Buffer>) -> &wgpu::Buffer {
                b.as_ref().expect("renorm buffers")
            }
            let vop = &self.variant_ops[&(shape.to_vec(), layout)];
            vop.record_renorm_coef(
                encoder,
                BufferRef::from(&self.saved),
                need(&vb.snapshot).into(),
                self.weight_ref().unwrap_or_else(|| need(&vb.ones).into()),
                self.bias_ref().unwrap_or_else(|| need(&vb.zeros).into()),
                need(&vb.rd).into(),
                need(&vb.coef).into(),
                need(&vb.weff).into(),
                renorm,
                self.config.eps,
            )?;
            vop.record_channel_affine(encoder, y, need(&vb.coef).into())?;
        }
        if update {
            self.num_batches_tracked += 1;
        }
        self.last_forward = Some(if renorm.is_some() {
            LastForward::Renorm
        } else {
            LastForward::Standard { batch_stats, relu }
        });
        self.last_values = shape.iter().product();
        Ok(())
    }

    /// Records `Linear → this layer [→ Sigmoid]` as one dispatch ([`LinearOp::record_forward_bn`]):
    /// `linear` computes z = x Wᵀ + b into `z` from `x`, `weight` and `bias`, and this layer normalizes
    /// z into `y` (through the sigmoid when `sigmoid`) with the statistics [`Self::record_forward`]
    /// would use (the batch's in training, the running ones in eval or when frozen), saves them for the
    /// backward and moves the running statistics as it does. Applies where the layer is affine and
    /// tracks running statistics, with the default options (no f16 or fused ReLU) and the automatic
    /// plan, and, with batch statistics, without ghost batches or Batch Renorm, on an `(N, C)` input
    /// the Linear's fused kernel takes ([`LinearOp::can_fuse_bn`]: with batch statistics at most 64
    /// rows); elsewhere it records nothing and returns `false`, and the caller records the two layers
    /// apart.
    ///
    /// The running statistics' factor is written to a buffer when recorded, as the op's momentum is:
    /// one value per submission.
    ///
    /// # Errors
    /// As [`Self::record_forward`] (eps 0 with batch statistics, shape errors) and
    /// [`LinearOp::record_forward_bn`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_linear_forward(
        &mut self,
        encoder: &mut impl Record,
        linear: &LinearOp,
        x: BufferRef,
        weight: BufferRef,
        bias: Option<BufferRef>,
        z: BufferRef,
        y: BufferRef,
        sigmoid: bool,
    ) -> Result<bool> {
        let (n, c) = (linear.n, self.num_features);
        // As `record_forward` decides: ghost batches and Batch Renorm act only with batch statistics.
        let batch_stats = self.uses_batch_stats();
        let variants_off = self.virtual_batch_size.is_none_or(|v| v == n) && self.renorm.is_none();
        let plain = self.config.affine
            && self.config.track_running_stats
            && (!batch_stats || variants_off)
            && self.options == OpOptions::default()
            && self.choice == PlanChoice::Auto
            && linear.out_features == c
            && linear.can_fuse_bn(&x, &weight, &z, &y, batch_stats);
        let aligned = |r: Option<BufferRef>| r.is_some_and(|r| r.offset % 16 == 0);
        if !plain || !aligned(self.weight_ref()) || !aligned(self.bias_ref()) {
            return Ok(false);
        }
        if batch_stats {
            self.config.check_eps_for_batch_stats()?;
        }
        // Plans the op its backward runs (and checks the shape, as a forward through it would).
        self.op(&[n, c], Layout::Nc)?;
        let update = batch_stats && self.training && self.update_running;
        let params = BnEpilogueParams {
            eps: self.config.eps,
            // A forward that moves nothing leaves the factor as written: a training forward recorded
            // before it into the same submission reads the buffer too.
            factor: if update {
                let batches = self.num_batches_tracked + 1;
                self.config.momentum.unwrap_or(1.0 / batches as f32)
            } else {
                self.epilogue
                    .as_ref()
                    .and_then(|(_, written)| written.map(|p| p.factor))
                    .unwrap_or(0.0)
            },
            pad: [0; 2],
        };
        if self.epilogue.is_none() {
            let bytes = std::mem::size_of::<BnEpilogueParams>() as u64;
            let usage = crate::gpu::storage_usage();
            let buffer = self.gpu.create_buffer("bn.epilogue", bytes, usage)?;
            self.epilogue = Some((buffer, None));
        }
        let (buffer, written) = self.epilogue.as_mut().expect("made above");
        if *written != Some(params) {
            self.gpu
                .queue
                .write_buffer(buffer, 0, bytemuck::bytes_of(&params));
            *written = Some(params);
        }
        let (Some(gamma), Some(beta), Some(running_mean), Some(running_var), Some((buffer, _))) = (
            self.weight_ref(),
            self.bias_ref(),
            self.running_mean.as_ref(),
            self.running_var.as_ref(),
            self.epilogue.as_ref(),
        ) else {
            return Err(Error::config(
                "internal: affine and tracking buffers missing",
            ));
        };
        let bn = BnEpilogue {
            y,
            weight: gamma,
            bias: beta,
            running_mean: running_mean.into(),
            running_var: running_var.into(),
            saved: (&self.saved).into(),
            params: buffer.into(),
            sigmoid,
            batch_stats,
            update_running: update,
        };
        linear.record_forward_bn(encoder, x, weight, bias, z, &bn)?;
        if update {
            self.num_batches_tracked += 1;
        }
        self.last_forward = Some(LastForward::Standard {
            batch_stats,
            relu: false,
        });
        self.last_values = n * c;
        Ok(true)
    }

    /// The buffers a fused backward of `this layer → Sigmoid → Linear` needs
    /// ([`LinearOp::record_backward_through_sigmoid_bn`]), with `z` the layer's input and `dx` its input
    /// gradient, where the last forward was plain BatchNorm with batch statistics over `[n, C]` (affine,
    /// default options, the automatic plan, no ghost batches or Batch Renorm) and the buffers sit at
    /// 16-byte aligned offsets; `None` elsewhere (record the layers' backwards apart).
    pub fn fused_backward_buffers<'a>(
        &'a self,
        z: BufferRef<'a>,
        dx: BufferRef<'a>,
    ) -> Option<BnBackwardEpilogue<'a>> {
        let plain = self.last_forward
            == Some(LastForward::Standard {
                batch_stats: true,
                relu: false,
            })
            && self.options == OpOptions::default()
            && self.choice == PlanChoice::Auto
            && self.config.affine;
        let bn = BnBackwardEpilogue {
            z,
            saved: (&self.saved).into(),
            weight: self.weight_ref()?,
            dweight: self.dweight_ref()?,
            dbias: self.dbias_ref()?,
            dx,
            values: self.last_values,
        };
        let aligned = [&bn.z, &bn.weight, &bn.dweight, &bn.dbias, &bn.dx]
            .iter()
            .all(|r| r.offset % 16 == 0);
        (plain && aligned).then_some(bn)
    }

    /// Records the backward of the last forward, mirroring its variant: dx into `dx`, and the parameter
    /// gradients into `self.dweight` / `self.dbias` (overwritten; summed over ghost batches).
    ///
    /// # Errors
    /// [`Error::BadConfig`] when no forward was recorded; as [`BatchNormOp::record_backward`].
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        dy: BufferRef,
        dx: BufferRef,
        shape: &[usize],
        layout: Layout,
    ) -> Result<()> {
        let last = self
            .last_forward
            .ok_or_else(|| Error::config("backward before any forward"))?;
        self.op(shape, layout)?;
        match last {
            LastForward::Ghost { ghosts } => {
                return self.record_ghost_backward(encoder, x, dy, dx, shape, layout, ghosts)
            }
            LastForward::Renorm => self.variant_op(shape, layout).map(|_| ())?,
            LastForward::Standard { relu, .. } => {
                if relu != self.options.fuse_relu {
                    return Err(Error::config(
                        "the fused ReLU was switched between the forward and the backward: record \
                         the backward with the options of its forward",
                    ));
                }
            }
        }
        let op = &self.ops[&(shape.to_vec(), layout, self.options)];
        let renorm = last == LastForward::Renorm;
        // Renorm's dx is the standard dx under the weight gamma * r (kept in `weff`).
        let weight = if renorm && self.config.affine {
            self.vbufs.weff.as_ref().map(BufferRef::from)
        } else {
            self.weight_ref()
        };
        let bufs = BackwardBuffers {
            x,
            dy,
            dx,
            weight,
            saved: BufferRef::from(&self.saved),
            dweight: self.dweight_ref(),
            dbias: self.dbias_ref(),
        };
        let batch_stats = !matches!(
            last,
            LastForward::Standard {
                batch_stats: false,
                ..
            }
        );
        match self.relu_mask.as_ref().filter(|_| self.options.fuse_relu) {
            Some(m) => op.record_backward_relu(encoder, &bufs, m.into(), batch_stats)?,
            None => op.record_backward(encoder, &bufs, batch_stats)?,
        }
        if renorm {
            let vop = &self.variant_ops[&(shape.to_vec(), layout)];
            let rd = self.vbufs.rd.as_ref().expect("renorm buffers");
            match (self.dweight_ref(), self.dbias_ref()) {
                (Some(dw), Some(db)) => vop.record_renorm_dweight(encoder, rd.into(), dw, db)?,
                // No gamma to carry r: scale dx by r itself (the first C values of rd).
                _ => vop.record_channel_scale(encoder, dx, rd.into())?,
            }
        }
        Ok(())
    }

    /// Whether training forwards update the running statistics and `num_batches_tracked` (default
    /// true). Off, a training forward still normalizes with batch statistics (ghost batches included) but
    /// leaves the running statistics alone (the kernels' no-update mode): evaluation with mini-batch
    /// statistics (Wu & Johnson 2021, Sec. 4).
    pub fn set_update_running_stats(&mut self, update: bool) {
        self.update_running = update;
    }

    /// See [`Self::set_update_running_stats`].
    pub fn updates_running_stats(&self) -> bool {
        self.update_running
    }

    /// Ghost BatchNorm: normalize over runs of `virtual_batch_size` consecutive samples (`None`: off).
    /// Each batch's N must be a multiple of it (checked per forward); V = N is plain BatchNorm.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for 0, or together with Batch Renormalization or FrozenBN.
    pub fn set_virtual_batch_size(&mut self, virtual_batch_size: Option<usize>) -> Result<()> {
        if let Some(v) = virtual_batch_size {
            if v == 0 {
                return Err(Error::config("virtual_batch_size must be at least 1"));
            }
            if self.renorm.is_some() || self.frozen {
                return Err(Error::config(
                    "ghost BatchNorm (virtual_batch_size) does not combine with batch \
                     renormalization or FrozenBN in this layer",
                ));
            }
            self.check_plain_storage("ghost BatchNorm (virtual_batch_size)")?;
        }
        self.virtual_batch_size = virtual_batch_size;
        Ok(())
    }

    /// The ghost batch size, when ghost BatchNorm is on.
    pub fn virtual_batch_size(&self) -> Option<usize> {
        self.virtual_batch_size
    }

    /// Batch Renormalization with these bounds in training (`None`: off). Change them every step to
    /// follow a schedule ([`crate::ops::bn_variants::RenormSchedule`]).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for bad bounds, without running statistics, or together with ghost
    /// BatchNorm or FrozenBN.
    pub fn set_renorm(&mut self, renorm: Option<Renorm>) -> Result<()> {
        if let Some(r) = renorm {
            r.validate()?;
            if !self.config.track_running_stats {
                return Err(Error::config(
                    "batch renormalization needs running statistics (track_running_stats=true)",
                ));
            }
            if self.virtual_batch_size.is_some() || self.frozen {
                return Err(Error::config(
                    "batch renormalization does not combine with ghost BatchNorm or FrozenBN in \
                     this layer",
                ));
            }
            self.check_plain_storage("batch renormalization")?;
        }
        self.renorm = renorm;
        Ok(())
    }

    /// The Batch Renormalization bounds, when on.
    pub fn renorm(&self) -> Option<Renorm> {
        self.renorm
    }

    /// FrozenBN: in training, normalize with the running statistics and leave them as they are;
    /// gradients still reach x, gamma and beta.
    ///
    /// # Errors
    /// [`Error::BadConfig`] without running statistics, or together with ghost BatchNorm or Batch
    /// Renormalization.
    pub fn set_frozen(&mut self, frozen: bool) -> Result<()> {
        if frozen {
            if !self.config.track_running_stats {
                return Err(Error::config(
                    "FrozenBN needs running statistics (track_running_stats=true)",
                ));
            }
            if self.virtual_batch_size.is_some() || self.renorm.is_some() {
                return Err(Error::config(
                    "FrozenBN does not combine with ghost BatchNorm or batch renormalization",
                ));
            }
        }
        self.frozen = frozen;
        Ok(())
    }

    /// Whether FrozenBN is on.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Keeps `domains` sets of running statistics (detectron2's `CycleBatchNormList`); new sets start
    /// at PyTorch's initial state. Domain 0 keeps the current statistics; the selection resets to 0.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for 0 domains, or more than one without running statistics.
    pub fn set_num_domains(&mut self, domains: usize) -> Result<()> {
        if domains == 0 {
            return Err(Error::config("num_domains must be at least 1"));
        }
        if domains > 1 && !self.config.track_running_stats {
            return Err(Error::config(
                "per-domain statistics need running statistics (track_running_stats=true)",
            ));
        }
        self.set_domain(0)?;
        let c = self.num_features;
        self.domains.truncate(domains);
        while self.domains.len() < domains {
            self.domains.push(Some(DomainStats {
                mean: self
                    .gpu
                    .upload("bn.domain.running_mean", &vec![0.0f32; c])?,
                var: self.gpu.upload("bn.domain.running_var", &vec![1.0f32; c])?,
                num_batches_tracked: 0,
            }));
        }
        Ok(())
    }

    /// The number of running-statistics sets (1 unless [`Self::set_num_domains`] said otherwise).
    pub fn num_domains(&self) -> usize {
        self.domains.len()
    }

    /// The selected domain.
    pub fn domain(&self) -> usize {
        self.domain
    }

    /// Selects the running statistics of `domain` for the following forwards: they move into
    /// `running_mean`, `running_var` and `num_batches_tracked`, the previous domain's are kept aside.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a domain out of range.
    pub fn set_domain(&mut self, domain: usize) -> Result<()> {
        if domain >= self.domains.len() {
            return Err(Error::config(format!(
                "domain {domain} out of range: the layer has {} domain(s)",
                self.domains.len()
            )));
        }
        if domain == self.domain {
            return Ok(());
        }
        let incoming = self.domains[domain]
            .take()
            .expect("an unselected domain keeps its statistics");
        let (Some(mean), Some(var)) = (self.running_mean.take(), self.running_var.take()) else {
            return Err(Error::config(
                "per-domain statistics need running statistics",
            ));
        };
        self.domains[self.domain] = Some(DomainStats {
            mean,
            var,
            num_batches_tracked: self.num_batches_tracked,
        });
        self.running_mean = Some(incoming.mean);
        self.running_var = Some(incoming.var);
        self.num_batches_tracked = incoming.num_batches_tracked;
        self.domain = domain;
        Ok(())
    }

    /// Every domain's running statistics with detectron2's `CycleBatchNormList` names
    /// (`{prefix}{d}.running_mean`, `{prefix}{d}.running_var`; gamma/beta are `{prefix}weight`/`bias`
    /// from [`Self::state_dict`]), and each domain's `{prefix}{d}.num_batches_tracked`.
    ///
    /// # Errors
    /// Device errors.
    #[allow(clippy::type_complexity)]
    pub fn domain_state_dict(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Vec<f32>)>, Vec<(String, i64)>)> {
        let mut tensors = Vec::new();
        let mut counters = Vec::new();
        for d in 0..self.domains.len() {
            let (mean, var, nbt) = self.domain_stats(d)?;
            tensors.push((format!("{prefix}{d}.running_mean"), self.read(mean)?));
            tensors.push((format!("{prefix}{d}.running_var"), self.read(var)?));
            counters.push((format!("{prefix}{d}.num_batches_tracked"), nbt));
        }
        Ok((tensors, counters))
    }

    /// Domain `d`'s running mean and variance buffers and its `num_batches_tracked`, wherever they are
    /// kept (the selected domain's are the public fields).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a domain out of range, or without running statistics.
    pub fn domain_stats(&self, d: usize) -> Result<(&wgpu::Buffer, &wgpu::Buffer, i64)> {
        match self.domains.get(d) {
            Some(Some(s)) => Ok((&s.mean, &s.var, s.num_batches_tracked)),
            Some(None) => {
                let (m, v) = self.running()?;
                Ok((m, v, self.num_batches_tracked))
            }
            None => Err(Error::config(format!(
                "domain {d} out of range: the layer has {} domain(s)",
                self.domains.len()
            ))),
        }
    }

    /// Sets domain `d`'s `num_batches_tracked` (a checkpoint's value).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a domain out of range.
    pub fn set_domain_num_batches_tracked(&mut self, d: usize, value: i64) -> Result<()> {
        match self.domains.get_mut(d) {
            Some(Some(s)) => s.num_batches_tracked = value,
            Some(None) => self.num_batches_tracked = value,
            None => {
                return Err(Error::config(format!(
                    "domain {d} out of range: the layer has {} domain(s)",
                    self.domains.len()
                )))
            }
        }
        Ok(())
    }

    /// Starts PreciseBN: the population statistics accumulate from zero.
    ///
    /// # Errors
    /// [`Error::BadConfig`] without running statistics; device errors.
    pub fn precise_begin(&mut self) -> Result<()> {
        self.running()?;
        let acc = match self.vbufs.precise.take() {
            Some((acc, _)) => acc,
            None => self
                .gpu
                .upload("bn.precise.acc", &vec![0.0f32; 2 * self.num_features])?,
        };
        self.vbufs.precise = Some((acc, 0));
        Ok(())
    }

    /// Records PreciseBN's merge of the batch `x` (of `shape` in `layout`: the layer's input as the frozen
    /// model produces it) into the population statistics, on the device (Chan's formula). Several may be
    /// recorded into one encoder.
    ///
    /// # Errors
    /// [`Error::BadConfig`] before [`Self::precise_begin`]; shape and buffer errors.
    pub fn record_precise_accumulate(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        shape: &[usize],
        layout: Layout,
    ) -> Result<()> {
        self.check_input(shape, layout)?;
        if self.options.dtype != DType::F32 {
            return Err(Error::config(
                "PreciseBN merges f32 inputs; this layer stores f16 (pass its input as f32)",
            ));
        }
        self.variant_op(shape, layout)?;
        let vop = &self.variant_ops[&(shape.to_vec(), layout)];
        let (acc, count) = self
            .vbufs
            .precise
            .as_mut()
            .ok_or_else(|| Error::config("PreciseBN: precise_begin was not called"))?;
        *count = vop.record_precise_merge(encoder, x, BufferRef::from(&*acc), *count)?;
        Ok(())
    }

    /// PreciseBN's merge on the crate's own tensors (records and submits).
    ///
    /// # Errors
    /// As [`Self::record_precise_accumulate`]; device errors.
    pub fn precise_accumulate(&mut self, x: &Tensor, layout: Layout) -> Result<()> {
        let mut encoder = self.gpu.encoder("batchnorm precise accumulate");
        self.record_precise_accumulate(&mut encoder, (&x.buffer).into(), &x.shape, layout)?;
        self.gpu.submit_and_wait(encoder)
    }

    /// Records the end of PreciseBN: `running_mean` and `running_var` (unbiased) become the population
    /// statistics of every batch accumulated; `num_batches_tracked` is left as it is.
    ///
    /// # Errors
    /// [`Error::BadConfig`] before [`Self::precise_begin`] or with fewer than two values per channel.
    pub fn record_precise_finish(&mut self, encoder: &mut impl Record) -> Result<()> {
        let (acc, count) = self
            .vbufs
            .precise
            .take()
            .ok_or_else(|| Error::config("PreciseBN: precise_begin was not called"))?;
        let c = self.num_features;
        let vop = BnVariantOp::new(&self.gpu, &[1, c], Layout::Nc)?;
        let (rm, rv) = self.running()?;
        let result = vop.record_precise_finish(encoder, (&acc).into(), count, rm.into(), rv.into());
        self.vbufs.precise = Some((acc, 0));
        result
    }

    /// [`Self::record_precise_finish`], submitted.
    ///
    /// # Errors
    /// As [`Self::record_precise_finish`]; device errors.
    pub fn precise_finish(&mut self) -> Result<()> {
        let mut encoder = self.gpu.encoder("batchnorm precise finish");
        self.record_precise_finish(&mut encoder)?;
        self.gpu.submit_and_wait(encoder)
    }

    fn running(&self) -> Result<(&wgpu::Buffer, &wgpu::Buffer)> {
        match (&self.running_mean, &self.running_var) {
            (Some(m), Some(v)) => Ok((m, v)),
            _ => Err(Error::config(
                "this needs running statistics (track_running_stats=true)",
            )),
        }
    }

    fn check_input(&self, shape: &[usize], layout: Layout) -> Result<()> {
        self.dims.check(shape)?;
        let dims = layout.dims(shape)?;
        if dims.c != self.num_features {
            return Err(Error::ShapeMismatch {
                what: "input channels".into(),
                expected: format!("{} (num_features)", self.num_features),
                got: format!("{} in shape {shape:?} ({})", dims.c, layout.name()),
            });
        }
        Ok(())
    }

    /// The storage type and fusion of the layer's tensors: f16 x/y/dy/dx (native or packed words) and/or
    /// the fused ReLU (y = relu(bn(x)), mask owned by the layer). Default: f32 without ReLU. Takes effect
    /// from the next forward (plans are rebuilt); record the backward of a forward under the options of
    /// that forward.
    ///
    /// # Errors
    /// As [`OpOptions::check`]; [`Error::BadConfig`] for f16 or the fused ReLU together with ghost
    /// BatchNorm or batch renormalization.
    pub fn set_options(&mut self, options: OpOptions) -> Result<()> {
        options.check(&self.gpu)?;
        if options != OpOptions::default() {
            let what = match (options.dtype, options.fuse_relu, options.sigmoid) {
                (DType::F16, true, _) => "f16 storage with the fused ReLU",
                (DType::F16, _, true) => "f16 storage with the fused sigmoid",
                (DType::F16, false, false) => "f16 storage",
                (_, _, true) => "the fused sigmoid",
                _ => "the fused ReLU",
            };
            if self.virtual_batch_size.is_some() || self.renorm.is_some() {
                return Err(Error::config(format!(
                    "{what} does not combine with ghost BatchNorm or batch renormalization in this \
                     layer (their kernels read and write f32 tensors without a mask)"
                )));
            }
        }
        self.options = options;
        Ok(())
    }

    /// The layer's storage and fusion options.
    pub fn options(&self) -> OpOptions {
        self.options
    }

    /// [`Self::set_options`] with only the element type of x, y, dy and dx changed (`f16_path` applies
    /// to `DType::F16`; pass `F16Path::Auto` for f32).
    ///
    /// # Errors
    /// As [`Self::set_options`].
    pub fn set_dtype(&mut self, dtype: DType, f16_path: F16Path) -> Result<()> {
        self.set_options(OpOptions {
            dtype,
            f16_path,
            ..self.options
        })
    }

    /// Whether this layer's training forward and backward record the kernels `other`'s do: the same
    /// configuration, plan, variants (ghost batches, renormalization, frozen, running statistics,
    /// domains) and element type. (The fused ReLU and sigmoid follow the model's switches.)
    pub(crate) fn records_as(&self, other: &BatchNorm) -> bool {
        self.config == other.config
            && self.num_features == other.num_features
            && self.choice == other.choice
            && self.virtual_batch_size == other.virtual_batch_size
            && self.renorm == other.renorm
            && self.frozen == other.frozen
            && self.update_running == other.update_running
            && self.domains.len() == other.domains.len()
            && (self.options.dtype, self.options.f16_path)
                == (other.options.dtype, other.options.f16_path)
    }

    /// [`Self::set_options`] with only the fused ReLU changed.
    ///
    /// # Errors
    /// As [`Self::set_options`].
    pub fn set_fuse_relu(&mut self, fuse_relu: bool) -> Result<()> {
        self.set_options(OpOptions {
            fuse_relu,
            ..self.options
        })
    }

    /// Whether the ReLU could be fused under the layer's variants (not with ghost BatchNorm or batch
    /// renormalization) and on its device.
    pub fn can_fuse_relu(&self) -> bool {
        self.virtual_batch_size.is_none()
            && self.renorm.is_none()
            && OpOptions {
                fuse_relu: true,
                ..self.options
            }
            .check(&self.gpu)
            .is_ok()
    }

    /// Whether the sigmoid could be fused into the output ([`OpOptions::sigmoid`]) under the layer's
    /// variants (not with ghost BatchNorm, batch renormalization or the fused ReLU). A `Sequential`
    /// sets it for the forward of a BatchNorm that a Sigmoid follows and clears it right after: the
    /// backward does not depend on it.
    pub fn can_fuse_sigmoid(&self) -> bool {
        self.virtual_batch_size.is_none()
            && self.renorm.is_none()
            && OpOptions {
                sigmoid: true,
                ..self.options
            }
            .check(&self.gpu)
            .is_ok()
    }

    /// The fused ReLU's mask from the last forward: bit e % 32 of u32 word e / 32 is set where
    /// bn(x) > 0 for flat element e (`None` before the first fused forward).
    pub fn relu_mask(&self) -> Option<&wgpu::Buffer> {
        self.relu_mask.as_ref()
    }

    fn ensure_relu_mask(&mut self, bytes: u64) -> Result<()> {
        if self.relu_mask.as_ref().is_none_or(|m| m.size() < bytes) {
            let usage = crate::gpu::storage_usage();
            self.relu_mask = Some(self.gpu.create_buffer("bn.relu_mask", bytes, usage)?);
        }
        Ok(())
    }

    /// Ghost BatchNorm and batch renormalization run f32 kernels without a mask.
    fn check_plain_storage(&self, what: &str) -> Result<()> {
        if self.options != OpOptions::default() {
            return Err(Error::config(format!(
                "{what} does not combine with f16 storage or the fused ReLU in this layer: set \
                 OpOptions::default() first (set_fuse_relu(false) for a BatchNorm that a Sequential \
                 fused with the ReLU after it; the Sequential then leaves it unfused)"
            )));
        }
        Ok(())
    }

    fn variant_op(&mut self, shape: &[usize], layout: Layout) -> Result<&BnVariantOp> {
        let key = (shape.to_vec(), layout);
        if !self.variant_ops.contains_key(&key) {
            let op = BnVariantOp::new(&self.gpu, shape, layout)?;
            self.variant_ops.insert(key.clone(), op);
        }
        Ok(&self.variant_ops[&key])
    }

    fn ensure_renorm_buffers(&mut self) -> Result<()> {
        if self.vbufs.rd.is_some() {
            return Ok(());
        }
        let c = self.num_features;
        let vb = &mut self.vbufs;
        vb.snapshot = Some(
            self.gpu
                .upload("bn.renorm.snapshot", &vec![0.0f32; 2 * c])?,
        );
        vb.rd = Some(self.gpu.upload("bn.renorm.rd", &vec![0.0f32; 2 * c])?);
        vb.coef = Some(self.gpu.upload("bn.renorm.coef", &vec![0.0f32; 2 * c])?);
        vb.weff = Some(self.gpu.upload("bn.renorm.weff", &vec![0.0f32; c])?);
        if !self.config.affine {
            vb.ones = Some(self.gpu.upload("bn.renorm.ones", &vec![1.0f32; c])?);
            vb.zeros = Some(self.gpu.upload("bn.renorm.zeros", &vec![0.0f32; c])?);
        }
        Ok(())
    }

    /// Storage offsets must be multiples of this (the device's alignment, and 16 for vec4 loads).
    fn align(&self) -> u64 {
        (self.gpu.limits().min_storage_buffer_offset_alignment as u64).max(16)
    }

    /// Ghost slots and scratch for `ghosts` ghost batches of `ghost_bytes` each.
    fn ensure_ghost_buffers(&mut self, ghosts: usize, ghost_bytes: u64, grads: bool) -> Result<()> {
        let (saved_stride, grad_stride) = self.ghost_strides();
        if self
            .vbufs
            .ghost_saved
            .as_ref()
            .is_none_or(|(g, _)| *g < ghosts)
        {
            let b = self.gpu.create_buffer(
                "bn.ghost.saved",
                4 * (ghosts * saved_stride) as u64,
                crate::gpu::storage_usage(),
            )?;
            self.vbufs.ghost_saved = Some((ghosts, b));
        }
        if grads
            && self
                .vbufs
                .ghost_grads
                .as_ref()
                .is_none_or(|(g, _, _)| *g < ghosts)
        {
            let bytes = 4 * (ghosts * grad_stride) as u64;
            let usage = crate::gpu::storage_usage();
            self.vbufs.ghost_grads = Some((
                ghosts,
                self.gpu.create_buffer("bn.ghost.dweight", bytes, usage)?,
                self.gpu.create_buffer("bn.ghost.dbias", bytes, usage)?,
            ));
        }
        if ghost_bytes % self.align() != 0
            && self
                .vbufs
                .ghost_scratch
                .as_ref()
                .is_none_or(|(b, _)| *b != ghost_bytes)
        {
            let usage = crate::gpu::storage_usage();
            let mk = |l: &str| self.gpu.create_buffer(l, ghost_bytes, usage);
            self.vbufs.ghost_scratch = Some((
                ghost_bytes,
                [mk("bn.ghost.x")?, mk("bn.ghost.y")?, mk("bn.ghost.dx")?],
            ));
        }
        Ok(())
    }

    /// Strides in f32 of a ghost's saved slot (2C) and gradient slot (C), rounded up to the alignment.
    fn ghost_strides(&self) -> (usize, usize) {
        let a = self.align() as usize / 4;
        let c = self.num_features;
        ((2 * c).div_ceil(a) * a, c.div_ceil(a) * a)
    }

    /// Ghost batches at unaligned offsets go through scratch buffers by copies: the caller's buffers must
    /// allow them (a typed error here rather than a validation error on the caller's device).
    fn check_ghost_copies(
        &self,
        gbytes: u64,
        reads: &[(&str, &BufferRef)],
        writes: &[(&str, &BufferRef)],
    ) -> Result<()> {
        if gbytes % self.align() == 0 {
            return Ok(());
        }
        let need = |what: &str, r: &BufferRef, usage: wgpu::BufferUsages, name: &str| {
            if r.buffer.usage().contains(usage) {
                Ok(())
            } else {
                Err(Error::config(format!(
                    "{what}: ghost batches of {gbytes} bytes are not at {}-byte aligned offsets, so \
                     they are copied through scratch buffers and {what} needs {name} usage (or pick a \
                     virtual_batch_size whose ghost batch is a multiple of {} bytes)",
                    self.align(),
                    self.align()
                )))
            }
        };
        for (what, r) in reads {
            need(what, r, wgpu::BufferUsages::COPY_SRC, "COPY_SRC")?;
        }
        for (what, r) in writes {
            need(what, r, wgpu::BufferUsages::COPY_DST, "COPY_DST")?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn record_ghost_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        shape: &[usize],
        layout: Layout,
        virtual_batch_size: usize,
        factor: Option<f32>,
    ) -> Result<()> {
        self.check_input(shape, layout)?;
        let ghost = ghost_shape(shape, virtual_batch_size)?;
        let ghosts = shape[0] / virtual_batch_size;
        // The running statistics and the parameter gradients are merged over the ghosts by one loop
        // per channel: lavapipe stops it short past its loop limit.
        crate::ops::kernel::check_loop_iterations(
            &self.gpu,
            &format!("ghost BatchNorm's merge over {ghosts} ghost batches"),
            ghosts,
        )?;
        let gdims = layout.dims(&ghost)?;
        let gbytes = 4 * gdims.numel() as u64;
        let total = gbytes * ghosts as u64;
        for (what, r) in [("x", &x), ("y", &y)] {
            crate::ops::kernel::check_region(what, r, total, self.align())?;
        }
        self.check_ghost_copies(gbytes, &[("x", &x)], &[("y", &y)])?;
        self.op(&ghost, layout)?;
        self.variant_op(&ghost, layout)?;
        self.ensure_ghost_buffers(ghosts, gbytes, false)?;
        let (saved_stride, _) = self.ghost_strides();
        let op = &self.ops[&(ghost.clone(), layout, self.options)];
        let slots = &self.vbufs.ghost_saved.as_ref().expect("ghost buffers").1;
        let scratch = self.vbufs.ghost_scratch.as_ref().map(|s| &s.1);
        for g in 0..ghosts as u64 {
            let at = |r: &BufferRef<'_>| r.offset + g * gbytes;
            let (xg, yg) = match (gbytes % self.align() == 0, scratch) {
                (true, _) => (shifted(x, g * gbytes), shifted(y, g * gbytes)),
                (false, Some(s)) => {
                    encoder
                        .encoder()
                        .copy_buffer_to_buffer(x.buffer, at(&x), &s[0], 0, gbytes);
                    ((&s[0]).into(), (&s[1]).into())
                }
                (false, None) => unreachable!("scratch exists for unaligned ghost batches"),
            };
            let bufs = ForwardBuffers {
                x: xg,
                y: yg,
                weight: self.weight_ref(),
                bias: self.bias_ref(),
                running_mean: None,
                running_var: None,
                saved: BufferRef {
                    buffer: slots,
                    offset: 4 * g * saved_stride as u64,
                },
            };
            op.record_forward_train(encoder, &bufs, None)?;
            if let (false, Some(s)) = (gbytes % self.align() == 0, scratch) {
                encoder
                    .encoder()
                    .copy_buffer_to_buffer(&s[1], 0, y.buffer, at(&y), gbytes);
            }
        }
        if let Some(f) = factor {
            let (rm, rv) = self.running()?;
            self.variant_ops[&(ghost, layout)].record_ghost_running(
                encoder,
                slots.into(),
                saved_stride,
                ghosts,
                gdims.per_channel(),
                rm.into(),
                rv.into(),
                f,
                self.config.eps,
            )?;
            self.num_batches_tracked += 1;
        }
        self.last_forward = Some(LastForward::Ghost { ghosts });
        self.last_values = shape.iter().product();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn record_ghost_backward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        dy: BufferRef,
        dx: BufferRef,
        shape: &[usize],
        layout: Layout,
        ghosts: usize,
    ) -> Result<()> {
        self.check_input(shape, layout)?;
        if ghosts == 0 || shape[0] % ghosts != 0 {
            return Err(Error::ShapeMismatch {
                what: "ghost BatchNorm backward input".into(),
                expected: format!("a batch of {ghosts} ghost batches, as in the forward"),
                got: format!("{shape:?}"),
            });
        }
        let ghost = ghost_shape(shape, shape[0] / ghosts)?;
        let gdims = layout.dims(&ghost)?;
        let gbytes = 4 * gdims.numel() as u64;
        let total = gbytes * ghosts as u64;
        for (what, r) in [("x", &x), ("dy", &dy), ("dx", &dx)] {
            crate::ops::kernel::check_region(what, r, total, self.align())?;
        }
        self.check_ghost_copies(gbytes, &[("x", &x), ("dy", &dy)], &[("dx", &dx)])?;
        self.op(&ghost, layout)?;
        self.variant_op(&ghost, layout)?;
        self.ensure_ghost_buffers(ghosts, gbytes, self.config.affine)?;
        let (saved_stride, grad_stride) = self.ghost_strides();
        let op = &self.ops[&(ghost.clone(), layout, self.options)];
        let slots = &self.vbufs.ghost_saved.as_ref().expect("ghost buffers").1;
        let grads = self
            .vbufs
            .ghost_grads
            .as_ref()
            .filter(|_| self.config.affine);
        let scratch = self.vbufs.ghost_scratch.as_ref().map(|s| &s.1);
        let aligned = gbytes % self.align() == 0;
        for g in 0..ghosts as u64 {
            let at = |r: &BufferRef<'_>| r.offset + g * gbytes;
            let (xg, dyg, dxg) = match (aligned, scratch) {
                (true, _) => (
                    shifted(x, g * gbytes),
                    shifted(dy, g * gbytes),
                    shifted(dx, g * gbytes),
                ),
                (false, Some(s)) => {
                    encoder
                        .encoder()
                        .copy_buffer_to_buffer(x.buffer, at(&x), &s[0], 0, gbytes);
                    encoder
                        .encoder()
                        .copy_buffer_to_buffer(dy.buffer, at(&dy), &s[1], 0, gbytes);
                    ((&s[0]).into(), (&s[1]).into(), (&s[2]).into())
                }
                (false, None) => unreachable!("scratch exists for unaligned ghost batches"),
            };
            let grad_slot = |b| shifted(BufferRef::from(b), 4 * g * grad_stride as u64);
            let bufs = BackwardBuffers {
                x: xg,
                dy: dyg,
                dx: dxg,
                weight: self.weight_ref(),
                saved: BufferRef {
                    buffer: slots,
                    offset: 4 * g * saved_stride as u64,
                },
                dweight: grads.map(|(_, w, _)| grad_slot(w)),
                dbias: grads.map(|(_, _, b)| grad_slot(b)),
            };
            op.record_backward(encoder, &bufs, true)?;
            if let (false, Some(s)) = (aligned, scratch) {
                encoder
                    .encoder()
                    .copy_buffer_to_buffer(&s[2], 0, dx.buffer, at(&dx), gbytes);
            }
        }
        if let (Some((_, gw, gb)), Some(dw), Some(db)) =
            (grads, self.dweight_ref(), self.dbias_ref())
        {
            self.variant_ops[&(ghost, layout)].record_sum_grad_slots(
                encoder,
                gw.into(),
                gb.into(),
                grad_stride,
                ghosts,
                dw,
                db,
            )?;
        }
        Ok(())
    }

    /// A zero tensor of `like`'s shape in the layer's dtype, after checking `like` is in that dtype.
    fn check_dtype(&self, what: &str, t: &Tensor) -> Result<()> {
        let dtype = self.options.dtype;
        if t.dtype != dtype {
            return Err(Error::ShapeMismatch {
                what: format!("element type of {what}"),
                expected: format!("{} (the layer's dtype)", dtype.name()),
                got: t.dtype.name().to_string(),
            });
        }
        Ok(())
    }

    fn output_like(&self, what: &str, like: &Tensor) -> Result<Tensor> {
        self.check_dtype(what, like)?;
        let zeros = vec![0.0; like.numel()];
        match self.options.dtype {
            DType::F32 => Tensor::from_f32(&self.gpu, &like.shape, &zeros),
            DType::F16 => Tensor::from_f32_as_f16(&self.gpu, &like.shape, &zeros),
        }
    }

    /// Forward on the crate's own tensors (in the layer's dtype): allocates y, records, submits and waits.
    ///
    /// # Errors
    /// As [`Self::record_forward`]; [`Error::ShapeMismatch`] for x not in the layer's dtype; device
    /// errors.
    pub fn forward(&mut self, x: &Tensor, layout: Layout) -> Result<Tensor> {
        let y = self.output_like("x", x)?;
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
        self.check_dtype("x", x)?;
        let dx = self.output_like("dy", dy)?;
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

    /// Binds gamma and beta (and their gradients) inside a model's arenas from now on: `params` and
    /// `grads` at the byte offsets `weight` and `bias` (C f32 values each, offsets aligned to the
    /// device's storage offset alignment), so an optimizer updating the arena updates the layer with no
    /// copies. The current values move into the arena; the layer's own buffers are dropped.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a layer without affine parameters, misaligned offsets or ranges past the
    /// arenas' ends; device errors.
    pub fn use_arena(
        &mut self,
        params: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        weight: u64,
        bias: u64,
    ) -> Result<()> {
        if !self.config.affine {
            return Err(Error::config(
                "a BatchNorm without affine parameters has nothing to keep in an arena",
            ));
        }
        let align = self.gpu.limits().min_storage_buffer_offset_alignment as u64;
        let bytes = 4 * self.num_features as u64;
        for (what, off) in [("weight", weight), ("bias", bias)] {
            if off % align != 0 || off + bytes > params.size().min(grads.size()) {
                return Err(Error::config(format!(
                    "arena offset {off} of the BatchNorm {what} is not a multiple of {align} or runs \
                     past the arenas ({} and {} bytes)",
                    params.size(),
                    grads.size()
                )));
            }
        }
        let mut encoder = self.gpu.encoder("batchnorm parameters into the arena");
        for (own, off) in [(&self.weight, weight), (&self.bias, bias)] {
            if let Some(own) = own {
                encoder
                    .encoder()
                    .copy_buffer_to_buffer(own, 0, params, off, bytes);
            }
        }
        self.gpu.queue.submit([encoder.finish()]);
        self.arena = Some(ParamArena {
            params: params.clone(),
            grads: grads.clone(),
            weight,
            bias,
        });
        (self.weight, self.bias, self.dweight, self.dbias) = (None, None, None, None);
        Ok(())
    }

    /// Gamma as bound by the kernels: the layer's own buffer or its range of the model's arena.
    fn weight_ref(&self) -> Option<BufferRef<'_>> {
        match &self.arena {
            Some(a) => Some(BufferRef {
                buffer: &a.params,
                offset: a.weight,
            }),
            None => self.weight.as_ref().map(BufferRef::from),
        }
    }

    fn bias_ref(&self) -> Option<BufferRef<'_>> {
        match &self.arena {
            Some(a) => Some(BufferRef {
                buffer: &a.params,
                offset: a.bias,
            }),
            None => self.bias.as_ref().map(BufferRef::from),
        }
    }

    fn dweight_ref(&self) -> Option<BufferRef<'_>> {
        match &self.arena {
            Some(a) => Some(BufferRef {
                buffer: &a.grads,
                offset: a.weight,
            }),
            None => self.dweight.as_ref().map(BufferRef::from),
        }
    }

    fn dbias_ref(&self) -> Option<BufferRef<'_>> {
        match &self.arena {
            Some(a) => Some(BufferRef {
                buffer: &a.grads,
                offset: a.bias,
            }),
            None => self.dbias.as_ref().map(BufferRef::from),
        }
    }

    fn read_ref(&self, r: Option<BufferRef>) -> Result<Option<Vec<f32>>> {
        r.map(|r| self.gpu.download(r.buffer, r.offset, self.num_features))
            .transpose()
    }

    /// Gamma's values wherever they live (`None` without affine parameters).
    ///
    /// # Errors
    /// Device errors.
    pub fn weight_values(&self) -> Result<Option<Vec<f32>>> {
        self.read_ref(self.weight_ref())
    }

    /// Beta's values wherever they live (`None` without affine parameters).
    ///
    /// # Errors
    /// Device errors.
    pub fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.read_ref(self.bias_ref())
    }

    /// The gradients of gamma and beta from the last backward, wherever they live.
    ///
    /// # Errors
    /// Device errors.
    pub fn grad_values(&self) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        Ok(self
            .read_ref(self.dweight_ref())?
            .zip(self.read_ref(self.dbias_ref())?))
    }

    /// save_mean and save_invstd of the last forward (not written by a ghost-BN forward: its statistics
    /// are per ghost batch).
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
        for (name, r) in [
            ("weight", self.weight_ref()),
            ("bias", self.bias_ref()),
            (
                "running_mean",
                self.running_mean.as_ref().map(BufferRef::from),
            ),
            (
                "running_var",
                self.running_var.as_ref().map(BufferRef::from),
            ),
        ] {
            if let Some(v) = self.read_ref(r)? {
                out.push((format!("{prefix}{name}"), v));
            }
        }
        Ok(out)
    }
}
