//! Adam, as PyTorch's `torch.optim.Adam` (amsgrad off, L2 weight decay), over one flat arena of
//! parameters, gradients and moment buffers: one dispatch updates a whole model.
//!
//! `g = grad + wd·param; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
//! param −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)`
//!
//! The step number `t` only enters through the two bias corrections, which the host computes in f64
//! (as PyTorch does in Python floats) and writes to the op's uniform before each step
//! ([`AdamOp::set_step`]): 32 bytes through the queue, nothing allocated.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero};
use crate::record::Record;

const ADAM_WGSL: &str = include_str!("../../shaders/adam.wgsl");

/// Adam hyperparameters, PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first-moment average.
    pub beta1: f32,
    /// Decay of the second-moment average.
    pub beta2: f32,
    /// Added to the denominator for numerical stability.
    pub eps: f32,
    /// L2 penalty added to the gradient (0 = none), as `torch.optim.Adam`'s (not AdamW's).
    pub weight_decay: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamConfig {
    /// Checks the ranges PyTorch checks.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the value: a negative or non-finite lr, eps or weight decay, or a beta
    /// outside [0, 1).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::config(format!(
                    "Adam {name} must be finite and >= 0, got {v}"
                )));
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(format!(
                    "Adam {name} must be in [0, 1), got {v}"
                )));
            }
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Hyper {
    step_size: f32,
    bias2_sqrt: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
}

/// The decimal a user wrote for an f32 setting, as an f64: the shortest decimal that rounds to `v`
/// (what `--betas 0.9,0.999` parses from). PyTorch keeps its betas as Python floats and computes
/// `1 - beta2` and `beta2^t` in f64 before rounding to f32: 1 − f32(0.999) is 0.0009999871, 1.3e-5 off
/// PyTorch's f32(1 − 0.999) = 0.001.
pub fn decimal_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// The update kernel over `len` values, with its hyperparameters and bias corrections in a uniform
/// buffer.
#[derive(Debug)]
pub struct AdamOp {
    gpu: Arc<Gpu>,
    /// Values in each arena.
    pub len: usize,
    hyper: wgpu::Buffer,
}

impl AdamOp {
    /// An op over arenas of `len` values, set up for the first step (`t = 1`) with `config`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for `len == 0` or a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, len: usize, config: AdamConfig) -> Result<Self> {
        nonzero("parameter count", len)?;
        let hyper = gpu.create_buffer(
            "adam.hyper",
            std::mem::size_of::<Hyper>() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let op = AdamOp {
            gpu: gpu.clone(),
            len,
            hyper,
        };
        op.set_step(config, 1)?;
        Ok(op)
    }

    /// Sets the hyperparameters and the step number `t` (1 for the first update) used by updates
    /// submitted from now on: a training loop calls this before recording each step.
    ///
    /// # Errors
    /// [`Error::BadConfig`] as [`AdamConfig::validate`], or for `t == 0`.
    pub fn set_step(&self, config: AdamConfig, t: u64) -> Result<()> {
        config.validate()?;
        if t == 0 {
            return Err(Error::config(
                "Adam step numbers start at 1 (the bias corrections divide by 1 - beta^t)",
            ));
        }
        // Past 2^31 steps the corrections are exactly 1 in f64 anyway.
        let t = t.min(i32::MAX as u64) as i32;
        let (beta1, beta2) = (decimal_f64(config.beta1), decimal_f64(config.beta2));
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        let h = Hyper {
            step_size: (config.lr as f64 / bias1) as f32,
            bias2_sqrt: bias2.sqrt() as f32,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
        };
        self.gpu
            .queue
            .write_buffer(&self.hyper, 0, bytemuck::bytes_of(&h));
        Ok(())
    }

    /// Records one update of `param` from `grad`, with first and second moment buffers `exp_avg` and
    /// `exp_avg_sq` (zeros before the first step).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_step(
        &self,
        encoder: &mut impl Record,
        param: BufferRef,
        grad: BufferRef,
        exp_avg: BufferRef,
        exp_avg_sq: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "adam param", &param, bytes)?;
        check(&self.gpu, "adam grad", &grad, bytes)?;
        check(&self.gpu, "adam exp_avg", &exp_avg, bytes)?;
        check(&self.gpu, "adam exp_avg_sq", &exp_avg_sq, bytes)?;
        let len = self.len;
        let pipeline = self
            .gpu
            .pipeline(&format!("adam.adam_step.{len}"), "adam_step", || {
                format!("const LEN: u32 = {len}u;\n{ADAM_WGSL}")
            })?;
        let (gx, gy) = grid(&self.gpu, len.div_ceil(256) as u32);
        let hyper = wgpu::BindGroupEntry {
            binding: 4,
            resource: self.hyper.as_entire_binding(),
        };
        dispatch(
            &self.gpu,
            encoder,
            "adam.step",
            &pipeline,
            &[
                entry(0, &param, bytes),
                entry(1, &grad, bytes),
                entry(2, &exp_avg, bytes),
                entry(3, &exp_avg_sq, bytes),
                hyper,
            ],
            (gx, gy, 1),
        );
        Ok(())
    }
}
