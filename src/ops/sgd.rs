//! SGD with momentum, weight decay and optional Nesterov, as PyTorch's `torch.optim.SGD` (dampening 0),
//! over one flat arena of parameters, gradients and momentum buffers: one dispatch updates a whole model.
//!
//! `d = grad + weight_decay·param; buf = momentum·buf + d; param -= lr·(nesterov ? d + momentum·buf : buf)`

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero, texture_entry, Texels};
use crate::record::Record;

const SGD_WGSL: &str = include_str!("../../shaders/sgd.wgsl");

/// SGD hyperparameters. The default is the MNIST setting (lr 0.1, momentum 0.9), not
/// `torch.optim.SGD`'s (momentum 0; PyTorch requires an lr); no weight decay, no Nesterov, dampening 0
/// as in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 = plain SGD).
    pub momentum: f32,
    /// L2 penalty added to the gradient (0 = none).
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// Checks the ranges PyTorch checks.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a negative or non-finite value, or Nesterov without momentum.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::config(format!(
                    "SGD {name} must be finite and >= 0, got {v}"
                )));
            }
        }
        if self.nesterov && self.momentum <= 0.0 {
            return Err(Error::config("Nesterov momentum requires a momentum > 0"));
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Hyper {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: u32,
}

/// The update kernel over `len` values, with its hyperparameters in a small read-only storage buffer (as a
/// uniform, lavapipe inlines its values into a shader variant, the way BatchNorm's Params once leaked).
#[derive(Debug)]
pub struct SgdOp {
    gpu: Arc<Gpu>,
    /// Values in each arena.
    pub len: usize,
    hyper: wgpu::Buffer,
}

impl SgdOp {
    /// An op over arenas of `len` values, with `config`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for `len == 0` or a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, len: usize, config: SgdConfig) -> Result<Self> {
        nonzero("parameter count", len)?;
        let hyper = gpu.create_buffer(
            "sgd.hyper",
            std::mem::size_of::<Hyper>() as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        let op = SgdOp {
            gpu: gpu.clone(),
            len,
            hyper,
        };
        op.set_config(config)?;
        Ok(op)
    }

    /// Sets the hyperparameters used by updates submitted from now on (a learning-rate schedule calls
    /// this between steps).
    ///
    /// # Errors
    /// [`Error::BadConfig`] as [`SgdConfig::validate`].
    pub fn set_config(&self, config: SgdConfig) -> Result<()> {
        config.validate()?;
        let h = Hyper {
            lr: config.lr,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            nesterov: config.nesterov as u32,
        };
        self.gpu
            .queue
            .write_buffer(&self.hyper, 0, bytemuck::bytes_of(&h));
        Ok(())
    }

    /// Records one update of `param` from `grad`, with momentum buffers `buf` (zeros before the first).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_step(
        &self,
        encoder: &mut impl Record,
        param: BufferRef,
        grad: BufferRef,
        buf: BufferRef,
    ) -> Result<()> {
        self.record_step_via(encoder, param, grad, None, buf)
    }

    /// [`Self::record_step`], reading `grad` through `grad_texels` where they mirror it (its buffer at
    /// offset 0, whole vec4s): the copy is recorded first (ending a [`crate::record::OnePass`]'s pass),
    /// then the update reads the texture, which lavapipe gathers without its per-lane loop.
    ///
    /// # Errors
    /// As [`Self::record_step`].
    pub fn record_step_via(
        &self,
        encoder: &mut impl Record,
        param: BufferRef,
        grad: BufferRef,
        grad_texels: Option<&Texels>,
        buf: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "sgd param", &param, bytes)?;
        check(&self.gpu, "sgd grad", &grad, bytes)?;
        check(&self.gpu, "sgd momentum buffer", &buf, bytes)?;
        // A length in whole vec4s at 16-byte offsets binds as array<vec4<f32>>.
        let aligned = [&param, &grad, &buf].iter().all(|r| r.offset % 16 == 0);
        let vec4 = self.len % 4 == 0 && aligned;
        let (unit, units) = if vec4 {
            ("vec4<f32>", self.len / 4)
        } else {
            ("f32", self.len)
        };
        let texels = grad_texels.filter(|t| {
            vec4 && *grad.buffer == t.buffer && grad.offset == 0 && units as u64 <= t.texels
        });
        let tex = texels.is_some();
        let key = format!("sgd.sgd_step.{unit}.{units}.{tex}");
        let pipeline = self.gpu.pipeline(&key, "sgd_step", || {
            let grad = if vec4 {
                Texels::wgsl_load("grad", 1, tex)
            } else {
                "@group(0) @binding(1) var<storage, read_write> grad: array<f32>;\n\
                 fn load_grad(i: u32) -> f32 { return grad[i]; }\n"
                    .to_string()
            };
            format!("alias T = {unit};\nconst LEN: u32 = {units}u;\n{grad}{SGD_WGSL}")
        })?;
        if let Some(t) = texels {
            t.record_copy(encoder, self.len);
        }
        let grad_entry = match texels {
            Some(t) => texture_entry(1, &t.view),
            None => entry(1, &grad, bytes),
        };
        // 4 units per invocation (UNITS in the shader).
        let (gx, gy) = grid(&self.gpu, units.div_ceil(4 * 256) as u32);
        let hyper = wgpu::BindGroupEntry {
            binding: 3,
            resource: self.hyper.as_entire_binding(),
        };
        dispatch(
            &self.gpu,
            encoder,
            "sgd.step",
            &pipeline,
            &[
                entry(0, &param, bytes),
                grad_entry,
                entry(2, &buf, bytes),
                hyper,
            ],
            (gx, gy, 1),
        );
        Ok(())
    }
}
