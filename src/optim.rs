//! Optimizers as GPU kernels over a [`Sequential`]'s arenas: one dispatch per step for the whole model.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{NamedTensor, Sequential};
use crate::ops::sgd::{SgdConfig, SgdOp};

/// SGD with momentum (PyTorch's `torch.optim.SGD`, dampening 0), its momentum buffers in an arena laid out
/// like the model's parameters.
#[derive(Debug)]
pub struct Sgd {
    gpu: Arc<Gpu>,
    config: SgdConfig,
    op: SgdOp,
    /// Momentum buffers, same offsets as the model's parameter arena; zeros before the first step.
    pub momentum: wgpu::Buffer,
}

impl Sgd {
    /// An optimizer for `model`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config; device errors.
    pub fn new(gpu: &Arc<Gpu>, model: &Sequential, config: SgdConfig) -> Result<Self> {
        let len = model.arena_len();
        Ok(Sgd {
            gpu: gpu.clone(),
            config,
            op: SgdOp::new(gpu, len, config)?,
            momentum: gpu.upload("sgd.momentum", &vec![0.0f32; len])?,
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
    pub fn record_step(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        model: &Sequential,
    ) -> Result<()> {
        self.op.record_step(
            encoder,
            (&model.params).into(),
            (&model.grads).into(),
            (&self.momentum).into(),
        )?;
        model.record_sync_params(encoder);
        Ok(())
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
