//! SGD with momentum, weight decay and optional Nesterov, as PyTorch's `torch.optim.SGD` (dampening 0),
//! over one flat arena of parameters, gradients and momentum buffers: one dispatch updates a whole model.
//!
//! `d = grad + weight_decay·param; buf = momentum·buf + d; param -= lr·(nesterov ? d + momentum·buf : buf)`

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{
    check, copy_target_texture, dispatch, entry, f32_bytes, grid, nonzero, operand_entry,
    texture_entry, Texels,
};
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

/// Texture mirrors ([`Texels`]) through which [`SgdOp::record_step_via`] reads its operands: on CPU
/// devices, a model's arenas and the optimizer's momentum arena. `None` reads the buffer itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct SgdTexels<'a> {
    /// Mirrors the parameters.
    pub param: Option<&'a Texels>,
    /// Mirrors the gradients.
    pub grad: Option<&'a Texels>,
    /// Mirrors the momentum buffers.
    pub buf: Option<&'a Texels>,
}

/// `shaders/sgd.wgsl` over `units` units (vec4s where `vec4`, else f32s), each of param, grad and buf
/// loaded from its mirror where `textures` says so (vec4s only): bindings 0 param, 1 grad (or its
/// texture), 2 buf, 3 the hyperparameters, 4 and 5 the mirrors of param and buf.
pub(crate) fn sgd_module(vec4: bool, units: usize, textures: (bool, bool, bool)) -> String {
    let (param_t, grad_t, buf_t) = textures;
    let loads = if vec4 {
        // param and buf are bound as storage for the stores; from a mirror, their loads fetch
        // texels of `param_texels` / `buf_texels` at bindings 4 and 5 instead.
        let load = |name: &str, binding: u32, texture: bool| {
            if texture {
                Texels::wgsl_load(name, binding, true)
            } else {
                format!("fn load_{name}(i: u32) -> T {{ return {name}[i]; }}\n")
            }
        };
        format!(
            "{}{}{}",
            Texels::wgsl_load("grad", 1, grad_t),
            load("param", 4, param_t),
            load("buf", 5, buf_t)
        )
    } else {
        "@group(0) @binding(1) var<storage, read_write> grad: array<f32>;\n\
         fn load_grad(i: u32) -> f32 { return grad[i]; }\n\
         fn load_param(i: u32) -> f32 { return param[i]; }\n\
         fn load_buf(i: u32) -> f32 { return buf[i]; }\n"
            .to_string()
    };
    let unit = if vec4 { "vec4<f32>" } else { "f32" };
    format!("alias T = {unit};\nconst LEN: u32 = {units}u;\n{loads}{SGD_WGSL}")
}

/// What a kernel needs to run SGD's update inside its own dispatch
/// ([`crate::ops::linear::LinearOp::record_dw_with_sgd`]): the optimizer's op (its hyperparameters)
/// and its momentum arena with the arena's mirror; the model adds its own arenas.
#[derive(Clone, Copy, Debug)]
pub struct SgdFusion<'a> {
    /// The update (its hyperparameters' texel, its length).
    pub op: &'a SgdOp,
    /// The momentum arena.
    pub momentum: &'a wgpu::Buffer,
    /// Its mirror, where it has one.
    pub momentum_texels: Option<&'a Texels>,
}

/// The update kernel over `len` values, with its hyperparameters in one rgba32uint texel: every lane
/// fetches the same texel, which lavapipe gathers at once, where a storage load is a loop over the lanes
/// even at one address (a uniform it would inline into a shader variant per value, the way BatchNorm's
/// Params once leaked).
#[derive(Debug)]
pub struct SgdOp {
    gpu: Arc<Gpu>,
    /// Values in each arena.
    pub len: usize,
    hyper: wgpu::Texture,
    hyper_view: wgpu::TextureView,
}

impl SgdOp {
    /// An op over arenas of `len` values, with `config`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for `len == 0` or a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, len: usize, config: SgdConfig) -> Result<Self> {
        nonzero("parameter count", len)?;
        let hyper = copy_target_texture(
            gpu,
            "sgd.hyper",
            (1, 1),
            wgpu::TextureFormat::Rgba32Uint,
            wgpu::TextureUsages::TEXTURE_BINDING,
        );
        let op = SgdOp {
            gpu: gpu.clone(),
            len,
            hyper_view: hyper.create_view(&Default::default()),
            hyper,
        };
        op.set_config(config)?;
        Ok(op)
    }

    /// The hyperparameters' texel, for a kernel that runs the update in its own dispatch.
    pub(crate) fn hyper_view(&self) -> &wgpu::TextureView {
        &self.hyper_view
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
        self.gpu.queue.write_texture(
            self.hyper.as_image_copy(),
            bytemuck::bytes_of(&h),
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(16),
                rows_per_image: None,
            },
            wgpu::Extent3d {
                width: 1,
                height: 1,
                depth_or_array_layers: 1,
            },
        );
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
        self.record_step_via(encoder, param, grad, buf, SgdTexels::default())
    }

    /// [`Self::record_step`], reading each operand through its mirror in `texels` where one mirrors it
    /// ([`Texels::mirrors`], whole vec4s): the copies are recorded first (ending a
    /// [`crate::record::OnePass`]'s pass), then the update reads the textures (image loads, which
    /// lavapipe does without its per-lane loop), and writes `param` and `buf` as storage.
    ///
    /// # Errors
    /// As [`Self::record_step`].
    pub fn record_step_via(
        &self,
        encoder: &mut impl Record,
        param: BufferRef,
        grad: BufferRef,
        buf: BufferRef,
        texels: SgdTexels,
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
        // A mirror applies where it mirrors this operand (its buffer, offset and length).
        let applies = |t: &&Texels, r: &BufferRef| vec4 && t.mirrors(r, self.len);
        let param_t = texels.param.filter(|t| applies(t, &param));
        let grad_t = texels.grad.filter(|t| applies(t, &grad));
        let buf_t = texels.buf.filter(|t| applies(t, &buf));
        let key = format!(
            "sgd.sgd_step.{unit}.{units}.{}{}{}",
            param_t.is_some() as u8,
            grad_t.is_some() as u8,
            buf_t.is_some() as u8
        );
        let textures = (param_t.is_some(), grad_t.is_some(), buf_t.is_some());
        let pipeline = self
            .gpu
            .pipeline(&key, "sgd_step", || sgd_module(vec4, units, textures))?;
        for t in [param_t, grad_t, buf_t].into_iter().flatten() {
            t.record_copy(encoder, self.len);
        }
        let mut entries = vec![
            entry(0, &param, bytes),
            operand_entry(1, &grad, bytes, grad_t),
            entry(2, &buf, bytes),
            texture_entry(3, &self.hyper_view),
        ];
        if let Some(t) = param_t {
            entries.push(texture_entry(4, &t.view));
        }
        if let Some(t) = buf_t {
            entries.push(texture_entry(5, &t.view));
        }
        // 8 units per invocation (UNITS in the shader).
        let (gx, gy) = grid(&self.gpu, units.div_ceil(8 * 256) as u32);
        dispatch(
            &self.gpu,
            encoder,
            "sgd.step",
            &pipeline,
            &entries,
            (gx, gy, 1),
        );
        Ok(())
    }
}
