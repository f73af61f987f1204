//! `Noise`: Santurkar et al.'s noisy-BatchNorm perturbation as a layer ([`crate::ops::noise`]). Training:
//! fresh draws per forward from the GPU's counter-based RNG (seed fixed at construction, step advanced on
//! the GPU by each training forward), the backward using that forward's scales. Eval: the identity (a
//! copy): the noise is a training-time perturbation, centred on scale 1 and shift 0 over steps.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::dropout::{record_identity, RngStream};
use crate::ops::batchnorm::BufferRef;
use crate::ops::noise::{NoiseConfig, NoiseOp};
use crate::record::Record;

/// Noise over samples of a fixed shape (`[F]`: F units; `[C, H, W]`: C units of H·W values).
#[derive(Debug)]
pub struct Noise {
    gpu: Arc<Gpu>,
    /// Values per sample.
    pub features: usize,
    /// Units per sample (features, or channels).
    pub units: usize,
    /// Consecutive values of one unit (1, or H·W).
    pub inner: usize,
    /// The scheme.
    pub config: NoiseConfig,
    training: bool,
    rng: RngStream,
    ops: HashMap<usize, NoiseOp>,
}

impl Noise {
    /// Noise of `config` on samples of `sample_shape` (`[F]` or `[C, H, W]`), stream `seed`, in training
    /// mode.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a bad config or another sample rank; device errors.
    pub fn new(
        gpu: &Arc<Gpu>,
        sample_shape: &[usize],
        config: NoiseConfig,
        seed: u64,
    ) -> Result<Self> {
        config.check()?;
        let (units, inner) = match sample_shape {
            [f] => (*f, 1),
            [c, h, w] => (*c, h * w),
            _ => {
                return Err(Error::config(format!(
                    "noise on samples of shape {sample_shape:?}: needs [features] or [C, H, W]"
                )))
            }
        };
        Ok(Noise {
            gpu: gpu.clone(),
            features: units * inner,
            units,
            inner,
            config,
            training: true,
            rng: RngStream::new(gpu, "noise.rng", seed)?,
            ops: HashMap::new(),
        })
    }

    /// Training (noise) or eval (identity).
    pub fn train(&mut self, training: bool) {
        self.training = training;
    }

    /// Training forwards recorded and run so far (reads the GPU's counter; waits).
    ///
    /// # Errors
    /// Device errors.
    pub fn step(&self) -> Result<u32> {
        self.rng.step()
    }

    /// Sets the counter of training forwards (a resumed run continues the noise stream where it was).
    pub fn set_step(&self, step: u32) {
        self.rng.set_step(step);
    }

    fn op(&mut self, n: usize) -> Result<NoiseOp> {
        if !self.ops.contains_key(&n) {
            let op = NoiseOp::new(
                &self.gpu,
                n * self.features,
                self.units,
                self.inner,
                self.config,
            )?;
            self.ops.insert(n, op);
        }
        Ok(self.ops[&n].clone())
    }

    /// Records the forward over `n` samples: in training, the advance to new draws and `y = x·s + m`.
    ///
    /// # Errors
    /// As [`NoiseOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        n: usize,
    ) -> Result<()> {
        let op = self.op(n)?;
        if !self.training {
            let bytes = 4 * (n * self.features) as u64;
            return record_identity(&self.gpu, encoder, ("noise x", x), ("noise y", y), bytes);
        }
        op.record_advance(encoder, self.rng.at())?;
        op.record_forward(encoder, x, y, self.rng.at())
    }

    /// Records the backward over `n` samples with the last training forward's scales (the identity in
    /// eval).
    ///
    /// # Errors
    /// As [`NoiseOp::record_backward`].
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        dy: BufferRef,
        dx: BufferRef,
        n: usize,
    ) -> Result<()> {
        let op = self.op(n)?;
        if !self.training {
            let bytes = 4 * (n * self.features) as u64;
            return record_identity(
                &self.gpu,
                encoder,
                ("noise dy", dy),
                ("noise dx", dx),
                bytes,
            );
        }
        op.record_backward(encoder, dy, dx, self.rng.at())
    }
}
