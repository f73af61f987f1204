//! Optimizers as GPU kernels over a [`Sequential`]'s arenas (one dispatch per step for the whole model),
//! the [`Optimizer`] a trainer holds (SGD or Adam), and learning-rate schedules ([`LrSchedule`]).
//!
//! Optimizer state is saved under PyTorch-like keys: `optimizer.<param>.momentum_buffer` for SGD,
//! `optimizer.<param>.exp_avg`, `.exp_avg_sq` and `.step` (a 0-d f32, as PyTorch keeps it) for Adam.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{NamedTensor, Sequential};
use crate::ops::adam::{AdamConfig, AdamOp};
use crate::ops::kernel::Texels;
use crate::ops::sgd::{SgdConfig, SgdFusion, SgdOp, SgdTexels};
use crate::record::Record;

/// SGD with momentum (PyTorch's `torch.optim.SGD`, dampening 0), its momentum buffers in an arena laid out
/// like the model's parameters.
#[derive(Debug)]
pub struct Sgd {
    gpu: Arc<Gpu>,
    config: SgdConfig,
    op: SgdOp,
    /// Momentum buffers, same offsets as the model's parameter arena; zeros before the first step.
    pub momentum: wgpu::Buffer,
    /// Their texture mirror on CPU devices, through which the update reads them ([`Texels`]).
    momentum_texels: Option<Texels>,
}

impl Sgd {
    /// An optimizer for `model`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, model: &Sequential, config: SgdConfig) -> Result<Self> {
        let len = model.arena_len();
        let (momentum, momentum_texels) =
            Texels::mirrored_buffer(gpu, "sgd.momentum", &vec![0.0f32; len])?;
        Ok(Sgd {
            gpu: gpu.clone(),
            config,
            op: SgdOp::new(gpu, len, config)?,
            momentum,
            momentum_texels,
        })
    }

    /// The hyperparameters in use.
    pub fn config(&self) -> SgdConfig {
        self.config
    }

    /// Changes the hyperparameters (a learning-rate schedule) for steps submitted from now on.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config.
    pub fn set_config(&mut self, config: SgdConfig) -> Result<()> {
        self.op.set_config(config)?;
        self.config = config;
        Ok(())
    }

    /// Records one update of every parameter of `model` from its gradients, then the copies that keep
    /// BatchNorm's own parameter buffers in step.
    ///
    /// # Errors
    /// Buffer errors from [`SgdOp::record_step`].
    pub fn record_step(&self, encoder: &mut impl Record, model: &Sequential) -> Result<()> {
        // On CPU devices all three arenas are read through their mirrors.
        let texels = SgdTexels {
            param: model.params_texels(),
            grad: model.grads_texels(),
            buf: self.momentum_texels.as_ref(),
        };
        self.op.record_step_via(
            encoder,
            (&model.params).into(),
            (&model.grads).into(),
            (&self.momentum).into(),
            texels,
        )?;
        Ok(())
    }

    /// What a kernel running this update inside its own dispatch needs
    /// ([`Sequential::record_backward_with_sgd`]).
    pub(crate) fn fusion(&self) -> SgdFusion<'_> {
        SgdFusion {
            op: &self.op,
            momentum: &self.momentum,
            momentum_texels: self.momentum_texels.as_ref(),
        }
    }

    /// The momentum buffers as `(key, shape, values)`, keyed `optimizer.<param>.momentum_buffer`.
    ///
    /// # Errors
    /// Device errors.
    pub fn state(&self, model: &Sequential) -> Result<Vec<NamedTensor>> {
        let arena = self
            .gpu
            .download::<f32>(&self.momentum, 0, model.arena_len())?;
        Ok(model
            .slots()
            .iter()
            .map(|s| {
                (
                    state_key(&s.name),
                    s.shape.clone(),
                    s.values(&arena).to_vec(),
                )
            })
            .collect())
    }

    /// Restores momentum buffers saved by [`Self::state`].
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming a missing key; [`Error::ShapeMismatch`] for a wrong length.
    pub fn load_state(&self, model: &Sequential, tensors: &[NamedTensor]) -> Result<()> {
        for s in model.slots() {
            let key = state_key(&s.name);
            let (_, _, v) = tensors
                .iter()
                .find(|t| t.0 == key)
                .ok_or_else(|| Error::config(format!("optimizer state '{key}' is missing")))?;
            if v.len() != s.len() {
                return Err(Error::ShapeMismatch {
                    what: format!("optimizer state '{key}'"),
                    expected: format!("{} values", s.len()),
                    got: format!("{} values", v.len()),
                });
            }
            self.gpu.queue.write_buffer(
                &self.momentum,
                4 * s.offset as u64,
                bytemuck::cast_slice(v),
            );
        }
        Ok(())
    }
}

/// The checkpoint key of a parameter's momentum buffer.
pub fn state_key(param: &str) -> String {
    format!("optimizer.{param}.momentum_buffer")
}

/// Downloads one arena and cuts it into per-parameter tensors keyed `optimizer.<param>.<suffix>`.
fn arena_state(
    gpu: &Gpu,
    model: &Sequential,
    arena: &wgpu::Buffer,
    suffix: &str,
) -> Result<Vec<NamedTensor>> {
    let values = gpu.download::<f32>(arena, 0, model.arena_len())?;
    Ok(model
        .slots()
        .iter()
        .map(|s| {
            (
                format!("optimizer.{}.{suffix}", s.name),
                s.shape.clone(),
                s.values(&values).to_vec(),
            )
        })
        .collect())
}

/// Writes the tensors keyed `optimizer.<param>.<suffix>` into their slots of `arena`.
fn load_arena(
    gpu: &Gpu,
    model: &Sequential,
    arena: &wgpu::Buffer,
    suffix: &str,
    tensors: &[NamedTensor],
) -> Result<()> {
    for s in model.slots() {
        let key = format!("optimizer.{}.{suffix}", s.name);
        let v = find_state(tensors, &key)?;
        if v.len() != s.len() {
            return Err(Error::ShapeMismatch {
                what: format!("optimizer state '{key}'"),
                expected: format!("{} values", s.len()),
                got: format!("{} values", v.len()),
            });
        }
        gpu.queue
            .write_buffer(arena, 4 * s.offset as u64, bytemuck::cast_slice(v));
    }
    Ok(())
}

fn find_state<'a>(tensors: &'a [NamedTensor], key: &str) -> Result<&'a [f32]> {
    tensors
        .iter()
        .find(|t| t.0 == key)
        .map(|t| t.2.as_slice())
        .ok_or_else(|| {
            Error::config(format!(
                "optimizer state '{key}' is missing (a checkpoint of another optimizer?)"
            ))
        })
}

/// Adam (PyTorch's `torch.optim.Adam`), its moment buffers in arenas laid out like the model's
/// parameters.
#[derive(Debug)]
pub struct Adam {
    gpu: Arc<Gpu>,
    config: AdamConfig,
    op: AdamOp,
    /// Updates applied so far (PyTorch's `state['step']`); the next one is number `steps + 1`.
    pub steps: u64,
    /// First-moment averages; zeros before the first step.
    pub exp_avg: wgpu::Buffer,
    /// Second-moment averages; zeros before the first step.
    pub exp_avg_sq: wgpu::Buffer,
}

impl Adam {
    /// An optimizer for `model`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, model: &Sequential, config: AdamConfig) -> Result<Self> {
        let len = model.arena_len();
        Ok(Adam {
            gpu: gpu.clone(),
            config,
            op: AdamOp::new(gpu, len, config)?,
            steps: 0,
            exp_avg: gpu.upload("adam.exp_avg", &vec![0.0f32; len])?,
            exp_avg_sq: gpu.upload("adam.exp_avg_sq", &vec![0.0f32; len])?,
        })
    }

    /// The hyperparameters in use.
    pub fn config(&self) -> AdamConfig {
        self.config
    }

    /// Changes the hyperparameters for steps recorded from now on.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config.
    pub fn set_config(&mut self, config: AdamConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Records one update of every parameter of `model` (step number `steps + 1`), then the copies that
    /// keep BatchNorm's own parameter buffers in step. Writes the step's bias corrections to the op's
    /// uniform first, so steps must be recorded in the order they are submitted.
    ///
    /// # Errors
    /// Buffer errors from [`AdamOp::record_step`].
    pub fn record_step(&mut self, encoder: &mut impl Record, model: &Sequential) -> Result<()> {
        self.op.set_step(self.config, self.steps + 1)?;
        self.op.record_step(
            encoder,
            (&model.params).into(),
            (&model.grads).into(),
            (&self.exp_avg).into(),
            (&self.exp_avg_sq).into(),
        )?;
        self.steps += 1;
        Ok(())
    }

    /// The moments and step count as `(key, shape, values)`.
    ///
    /// # Errors
    /// Device errors.
    pub fn state(&self, model: &Sequential) -> Result<Vec<NamedTensor>> {
        let mut out = arena_state(&self.gpu, model, &self.exp_avg, "exp_avg")?;
        out.extend(arena_state(
            &self.gpu,
            model,
            &self.exp_avg_sq,
            "exp_avg_sq",
        )?);
        // PyTorch keeps a step per parameter as a 0-d float32 tensor; so does this (exact to 2^24).
        out.extend(model.slots().iter().map(|s| {
            (
                format!("optimizer.{}.step", s.name),
                vec![],
                vec![self.steps as f32],
            )
        }));
        Ok(out)
    }

    /// Restores state saved by [`Self::state`].
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming a missing key or inconsistent step counts; [`Error::ShapeMismatch`]
    /// for a wrong length.
    pub fn load_state(&mut self, model: &Sequential, tensors: &[NamedTensor]) -> Result<()> {
        let mut steps = None;
        for s in model.slots() {
            let key = format!("optimizer.{}.step", s.name);
            let v = find_state(tensors, &key)?;
            let t = match v {
                [t] if t.is_finite() && *t >= 0.0 && t.fract() == 0.0 => *t as u64,
                _ => {
                    return Err(Error::config(format!(
                        "optimizer state '{key}' must be one whole number >= 0, got {v:?}"
                    )))
                }
            };
            if steps.is_some_and(|prev| prev != t) {
                return Err(Error::config(format!(
                    "optimizer state '{key}' is {t}, other parameters' step is {}: this engine \
                     updates every parameter every step",
                    steps.unwrap_or_default()
                )));
            }
            steps = Some(t);
        }
        load_arena(&self.gpu, model, &self.exp_avg, "exp_avg", tensors)?;
        load_arena(&self.gpu, model, &self.exp_avg_sq, "exp_avg_sq", tensors)?;
        self.steps = steps.unwrap_or(0);
        Ok(())
    }
}

/// Which optimizer, with its hyperparameters (the learning rate is the schedule's base).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// `torch.optim.SGD` (dampening 0).
    Sgd(SgdConfig),
    /// `torch.optim.Adam` (amsgrad off).
    Adam(AdamConfig),
}

impl From<SgdConfig> for OptimizerConfig {
    fn from(c: SgdConfig) -> Self {
        OptimizerConfig::Sgd(c)
    }
}

impl From<AdamConfig> for OptimizerConfig {
    fn from(c: AdamConfig) -> Self {
        OptimizerConfig::Adam(c)
    }
}

impl OptimizerConfig {
    /// `sgd` or `adam`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::Adam(_) => "adam",
        }
    }

    /// The (base) learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::Sgd(c) => c.lr,
            OptimizerConfig::Adam(c) => c.lr,
        }
    }

    /// The same settings with learning rate `lr`.
    pub fn with_lr(self, lr: f32) -> Self {
        match self {
            OptimizerConfig::Sgd(c) => OptimizerConfig::Sgd(SgdConfig { lr, ..c }),
            OptimizerConfig::Adam(c) => OptimizerConfig::Adam(AdamConfig { lr, ..c }),
        }
    }

    /// Checks the ranges PyTorch checks.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the value.
    pub fn validate(&self) -> Result<()> {
        match self {
            OptimizerConfig::Sgd(c) => c.validate(),
            OptimizerConfig::Adam(c) => c.validate(),
        }
    }

    /// A one-line description, e.g. `sgd(momentum=0.9, nesterov=false, weight_decay=0)` (summaries and
    /// the progress header).
    pub fn describe(&self) -> String {
        match self {
            OptimizerConfig::Sgd(c) => format!(
                "sgd(momentum={}, nesterov={}, weight_decay={})",
                c.momentum, c.nesterov, c.weight_decay
            ),
            OptimizerConfig::Adam(c) => format!(
                "adam(betas=({}, {}), eps={}, weight_decay={})",
                c.beta1, c.beta2, c.eps, c.weight_decay
            ),
        }
    }
}

/// A learning rate as a function of the step (0 for the first update), from a base rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// `base · gamma^⌊step / every⌋` (PyTorch's `StepLR` stepped once per update).
    Step {
        /// Steps between decays.
        every: u64,
        /// Factor per decay.
        gamma: f64,
    },
    /// Linear warmup from `base/warmup` to `base` over `warmup` steps, then half a cosine from `base`
    /// to 0 over the remaining `total − warmup` steps (PyTorch's `CosineAnnealingLR`, `eta_min = 0`).
    /// With warmup it is PyTorch's `SequentialLR([LinearLR(start_factor=1/warmup,
    /// total_iters=warmup−1), CosineAnnealingLR(T_max=total−warmup)], milestones=[warmup])` (checked to
    /// 1e-16 against torch 2.15): the rate reaches `base` at step `warmup − 1` and holds it one more step.
    Cosine {
        /// Steps of the whole run (the rate reaches 0 after the last).
        total: u64,
        /// Warmup steps (0 for none).
        warmup: u64,
    },
}

impl LrSchedule {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::BadConfig`]: a step schedule with `every == 0` or a non-finite or non-positive gamma; a
    /// cosine schedule with `total == 0` or `warmup >= total`.
    pub fn validate(&self) -> Result<()> {
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::Step { every, gamma } => {
                if every == 0 {
                    return Err(Error::config("step schedule: the step count must be >= 1"));
                }
                if !gamma.is_finite() || gamma <= 0.0 {
                    return Err(Error::config(format!(
                        "step schedule: gamma must be finite and > 0, got {gamma}"
                    )));
                }
                Ok(())
            }
            LrSchedule::Cosine { total, warmup } => {
                if total == 0 || warmup >= total {
                    return Err(Error::config(format!(
                        "cosine schedule: warmup ({warmup}) must be less than the total steps ({total})"
                    )));
                }
                Ok(())
            }
        }
    }

    /// The learning rate of update number `step` (0-based) from base rate `base`.
    pub fn lr_at(&self, base: f64, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, gamma } => {
                let decays = (step / every.max(1)).min(i32::MAX as u64) as i32;
                base * gamma.powi(decays)
            }
            LrSchedule::Cosine { total, warmup } => {
                if step < warmup {
                    return base * (step + 1) as f64 / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let t = (step - warmup) as f64;
                if t >= span {
                    return 0.0;
                }
                base * 0.5 * (1.0 + (std::f64::consts::PI * t / span).cos())
            }
        }
    }

    /// A one-line description, e.g. `cosine(total=3000, warmup=100)`.
    pub fn describe(&self) -> String {
        match self {
            LrSchedule::Constant => "constant".into(),
            LrSchedule::Step { every, gamma } => format!("step(every={every}, gamma={gamma})"),
            LrSchedule::Cosine { total, warmup } => {
                format!("cosine(total={total}, warmup={warmup})")
            }
        }
    }
}

/// The optimizer of a training run: SGD or Adam, with a learning-rate schedule applied per step.
///
/// The schedule's rate goes to the GPU only when it changes (SGD's hyperparameter buffer), or with the
/// step's bias corrections (Adam writes its uniform every step anyway); no buffer is allocated per step.
#[derive(Debug)]
pub enum Optimizer {
    /// SGD with momentum.
    Sgd {
        /// The optimizer (boxed: its textures make it twice Adam's size).
        opt: Box<Sgd>,
        /// Its schedule.
        schedule: LrSchedule,
        /// The base learning rate the schedule scales.
        base_lr: f32,
        /// Updates applied (the schedule's clock).
        steps: u64,
    },
    /// Adam.
    Adam {
        /// The optimizer (its own step count is the schedule's clock).
        opt: Adam,
        /// Its schedule.
        schedule: LrSchedule,
        /// The base learning rate the schedule scales.
        base_lr: f32,
    },
}

impl Optimizer {
    /// An optimizer for `model` with a constant learning rate.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, model: &Sequential, config: OptimizerConfig) -> Result<Self> {
        Ok(match config {
            OptimizerConfig::Sgd(c) => Optimizer::Sgd {
                opt: Box::new(Sgd::new(gpu, model, c)?),
                schedule: LrSchedule::Constant,
                base_lr: c.lr,
                steps: 0,
            },
            OptimizerConfig::Adam(c) => Optimizer::Adam {
                opt: Adam::new(gpu, model, c)?,
                schedule: LrSchedule::Constant,
                base_lr: c.lr,
            },
        })
    }

    /// Uses `schedule` (scaling the config's learning rate) from the next step on.
    ///
    /// # Errors
    /// [`Error::BadConfig`] as [`LrSchedule::validate`].
    pub fn set_schedule(&mut self, schedule: LrSchedule) -> Result<()> {
        schedule.validate()?;
        match self {
            Optimizer::Sgd { schedule: s, .. } | Optimizer::Adam { schedule: s, .. } => {
                *s = schedule
            }
        }
        Ok(())
    }

    /// The schedule in use.
    pub fn schedule(&self) -> LrSchedule {
        match self {
            Optimizer::Sgd { schedule, .. } | Optimizer::Adam { schedule, .. } => *schedule,
        }
    }

    /// The hyperparameters, with the base (unscheduled) learning rate.
    pub fn config(&self) -> OptimizerConfig {
        match self {
            Optimizer::Sgd { opt, base_lr, .. } => {
                OptimizerConfig::Sgd(opt.config()).with_lr(*base_lr)
            }
            Optimizer::Adam { opt, base_lr, .. } => {
                OptimizerConfig::Adam(opt.config()).with_lr(*base_lr)
            }
        }
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::Sgd { steps, .. } => *steps,
            Optimizer::Adam { opt, .. } => opt.steps,
        }
    }

    /// The learning rate the next update uses.
    pub fn current_lr(&self) -> f32 {
        let base = self.config().lr();
        self.schedule().lr_at(base as f64, self.steps()) as f32
    }

    /// Records one update of every parameter of `model` at the scheduled learning rate.
    ///
    /// # Errors
    /// Buffer errors from the update kernel.
    pub fn record_step(&mut self, encoder: &mut impl Record, model: &Sequential) -> Result<()> {
        self.apply_schedule()?;
        match self {
            Optimizer::Sgd { opt, steps, .. } => {
                opt.record_step(encoder, model)?;
                *steps += 1;
            }
            Optimizer::Adam { opt, .. } => opt.record_step(encoder, model)?,
        }
        Ok(())
    }

    /// For SGD, the update ready (at this step's learning rate) for a kernel to run in its own
    /// dispatch ([`Sequential::record_backward_with_sgd`]); call [`Self::fused_step_recorded`] if one
    /// did. `None` for Adam.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a scheduled rate SGD refuses.
    pub(crate) fn sgd_fusion(&mut self) -> Result<Option<SgdFusion<'_>>> {
        self.apply_schedule()?;
        Ok(match self {
            Optimizer::Sgd { opt, .. } => Some(opt.fusion()),
            Optimizer::Adam { .. } => None,
        })
    }

    /// Counts the update a kernel recorded from [`Self::sgd_fusion`] (the schedule's clock).
    pub(crate) fn fused_step_recorded(&mut self) {
        if let Optimizer::Sgd { steps, .. } = self {
            *steps += 1;
        }
    }

    /// Writes this step's learning rate into the optimizer where the schedule changed it.
    fn apply_schedule(&mut self) -> Result<()> {
        let lr = self.current_lr();
        match self {
            Optimizer::Sgd { opt, .. } => {
                // Float equality on purpose: the hyperparameters are rewritten only when the rate changed.
                if opt.config().lr != lr {
                    opt.set_config(SgdConfig { lr, ..opt.config() })?;
                }
            }
            Optimizer::Adam { opt, .. } => {
                if opt.config().lr != lr {
                    opt.set_config(AdamConfig { lr, ..opt.config() })?;
                }
            }
        }
        Ok(())
    }

    /// The state tensors for a checkpoint, under PyTorch-like keys (see the module docs).
    ///
    /// # Errors
    /// Device errors.
    pub fn state(&self, model: &Sequential) -> Result<Vec<NamedTensor>> {
        match self {
            Optimizer::Sgd { opt, .. } => opt.state(model),
            Optimizer::Adam { opt, .. } => opt.state(model),
        }
    }

    /// Restores state saved by [`Self::state`] after `steps` updates (the checkpoint's step).
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming a missing key (e.g. a checkpoint of the other optimizer) or an Adam
    /// step count that disagrees with `steps`; [`Error::ShapeMismatch`] for a wrong length.
    pub fn load_state(
        &mut self,
        model: &Sequential,
        tensors: &[NamedTensor],
        steps: u64,
    ) -> Result<()> {
        match self {
            Optimizer::Sgd { opt, steps: s, .. } => {
                opt.load_state(model, tensors)?;
                *s = steps;
            }
            Optimizer::Adam { opt, .. } => {
                opt.load_state(model, tensors)?;
                if opt.steps != steps {
                    return Err(Error::config(format!(
                        "the checkpoint's Adam state has taken {} steps, the run {steps}",
                        opt.steps
                    )));
                }
            }
        }
        Ok(())
    }
}
