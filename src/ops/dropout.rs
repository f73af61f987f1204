//! Dropout (PyTorch's `nn.Dropout(p)` in training mode): each value is zeroed with probability `p` and the
//! kept ones scaled by `1/(1 − p)`. The mask comes from a counter-based hash of (seed, step, index) on the
//! GPU, so it needs no RNG state beyond a 4-word buffer `[seed_lo, seed_hi, step, 0]` and the backward
//! recomputes exactly the forward's mask. [`crate::reference::dropout`] computes the same mask on the CPU.
//!
//! The step lives on the GPU: [`DropoutOp::record_advance`] moves it forward in encoder order (so several
//! steps may share one submission). Eval-mode dropout is the identity and runs no kernel (the layer
//! copies, see [`crate::nn::Dropout`]).
//!
//! # Shapes
//! Any; `len` values, contiguous.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{
    check, dispatch, entry, f32_bytes, grid, nonzero, FLOAT_BITS_WGSL, HASH_WGSL,
};
use crate::record::Record;

const DROPOUT_WGSL: &str = include_str!("../../shaders/dropout.wgsl");

/// Bytes of the RNG state buffer.
pub const RNG_STATE_BYTES: u64 = 16;

/// The RNG state a dropout layer starts from: `seed` at step 0.
pub fn rng_state(seed: u64) -> [u32; 4] {
    [seed as u32, (seed >> 32) as u32, 0, 0]
}

/// The dropout op over `len` values with drop probability `p`.
#[derive(Clone, Debug)]
pub struct DropoutOp {
    gpu: Arc<Gpu>,
    /// Number of values.
    pub len: usize,
    /// Probability of zeroing a value.
    pub p: f32,
}

impl DropoutOp {
    /// An op over `len` values.
    ///
    /// # Errors
    /// [`Error::BadConfig`] when `len` is 0 or `p` is outside [0, 1].
    pub fn new(gpu: &Arc<Gpu>, len: usize, p: f32) -> Result<Self> {
        nonzero("dropout length", len)?;
        check_p(p)?;
        Ok(DropoutOp {
            gpu: gpu.clone(),
            len,
            p,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let (len, p) = (self.len, self.p);
        let scale = scale(p);
        self.gpu.pipeline(
            &format!("dropout.{entry_point}.{len}.{:08x}", p.to_bits()),
            entry_point,
            || {
                // `{:e}` prints the shortest text that parses back to the same f32.
                format!(
                    "const LEN: u32 = {len}u;\nconst P: f32 = {p:e};\nconst SCALE: f32 = {scale:e};\n\
                     {HASH_WGSL}{FLOAT_BITS_WGSL}{DROPOUT_WGSL}"
                )
            },
        )
    }

    fn groups(&self) -> (u32, u32, u32) {
        let (x, y) = grid(&self.gpu, self.len.div_ceil(256) as u32);
        (x, y, 1)
    }

    /// Records the move to the next step's mask (`rng[2] += 1`).
    ///
    /// # Errors
    /// Buffer errors for `rng`.
    pub fn record_advance(&self, encoder: &mut impl Record, rng: BufferRef) -> Result<()> {
        check(&self.gpu, "dropout rng", &rng, RNG_STATE_BYTES)?;
        let pipeline = self.pipeline("advance")?;
        dispatch(
            &self.gpu,
            encoder,
            "dropout.advance",
            &pipeline,
            &[entry(2, &rng, RNG_STATE_BYTES)],
            (1, 1, 1),
        );
        Ok(())
    }

    /// Records `y = x · mask / (1 − p)` with the mask of `rng`'s current step.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        rng: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "dropout x", &x, bytes)?;
        check(&self.gpu, "dropout y", &y, bytes)?;
        check(&self.gpu, "dropout rng", &rng, RNG_STATE_BYTES)?;
        let pipeline = self.pipeline("forward")?;
        dispatch(
            &self.gpu,
            encoder,
            "dropout.forward",
            &pipeline,
            &[
                entry(0, &x, bytes),
                entry(1, &y, bytes),
                entry(2, &rng, RNG_STATE_BYTES),
            ],
            self.groups(),
        );
        Ok(())
    }

    /// Records `dx = dy · mask / (1 − p)` with the mask of `rng`'s current step (the forward's, when no
    /// advance was recorded in between).
    ///
    /// # Errors
    /// As [`Self::record_forward`].
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        dy: BufferRef,
        dx: BufferRef,
        rng: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "dropout dy", &dy, bytes)?;
        check(&self.gpu, "dropout dx", &dx, bytes)?;
        check(&self.gpu, "dropout rng", &rng, RNG_STATE_BYTES)?;
        let pipeline = self.pipeline("backward")?;
        dispatch(
            &self.gpu,
            encoder,
            "dropout.backward",
            &pipeline,
            &[
                entry(2, &rng, RNG_STATE_BYTES),
                entry(3, &dy, bytes),
                entry(4, &dx, bytes),
            ],
            self.groups(),
        );
        Ok(())
    }
}

/// Rejects a drop probability outside [0, 1] (NaN included).
///
/// # Errors
/// [`Error::BadConfig`] naming `p`.
pub fn check_p(p: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::config(format!(
            "dropout probability has to be between 0 and 1, but got {p}"
        )));
    }
    Ok(())
}

/// The factor kept values are multiplied by: `1/(1 − p)`, or 0 when every value is dropped.
pub fn scale(p: f32) -> f32 {
    if p >= 1.0 {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}
