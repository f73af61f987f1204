//! `Dropout`: PyTorch's `nn.Dropout(p)`. Training: a fresh mask per forward from the GPU's counter-based
//! RNG (seed fixed at construction, step advanced on the GPU by each training forward), the backward
//! using that forward's mask. Eval: the identity (a copy).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::dropout::{check_p, rng_state, DropoutOp};
use crate::record::Record;

/// Dropout over samples of a fixed shape.
#[derive(Debug)]
pub struct Dropout {
    gpu: Arc<Gpu>,
    /// Values per sample.
    pub features: usize,
    /// Drop probability.
    pub p: f32,
    training: bool,
    rng: RngStream,
    ops: HashMap<usize, DropoutOp>,
}

impl Dropout {
    /// Dropout with probability `p` on samples of `sample_shape`, mask stream `seed`, in training mode.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] for `p` outside [0, 1]; device errors.
    pub fn new(gpu: &Arc<Gpu>, sample_shape: &[usize], p: f32, seed: u64) -> Result<Self> {
        check_p(p)?;
        Ok(Dropout {
            gpu: gpu.clone(),
            features: sample_shape.iter().product(),
            p,
            training: true,
            rng: RngStream::new(gpu, "dropout.rng", seed)?,
            ops: HashMap::new(),
        })
    }

    /// Training (masks) or eval (identity).
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

    /// Sets the counter of training forwards (what a resumed run continues from), so the next forward
    /// draws the mask an uninterrupted run would have drawn.
    pub fn set_step(&self, step: u32) {
        self.rng.set_step(step);
    }

    fn op(&mut self, n: usize) -> Result<&DropoutOp> {
        if !self.ops.contains_key(&n) {
            let op = DropoutOp::new(&self.gpu, n * self.features, self.p)?;
            self.ops.insert(n, op);
        }
        Ok(&self.ops[&n])
    }

    /// Records the forward over `n` samples: in training, the advance to a new mask and `y = x · mask`.
    ///
    /// # Errors
    /// As [`DropoutOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        n: usize,
    ) -> Result<()> {
        let training = self.training;
        let op = self.op(n)?.clone();
        if !training {
            let bytes = 4 * (n * self.features) as u64;
            return record_identity(
                &self.gpu,
                encoder,
                ("dropout x", x),
                ("dropout y", y),
                bytes,
            );
        }
        op.record_advance(encoder, self.rng.at())?;
        op.record_forward(encoder, x, y, self.rng.at())
    }

    /// Records the backward over `n` samples with the last training forward's mask (the identity in eval).
    ///
    /// # Errors
    /// As [`DropoutOp::record_backward`].
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        dy: BufferRef,
        dx: BufferRef,
        n: usize,
    ) -> Result<()> {
        let training = self.training;
        let op = self.op(n)?.clone();
        if !training {
            let bytes = 4 * (n * self.features) as u64;
            return record_identity(
                &self.gpu,
                encoder,
                ("dropout dy", dy),
                ("dropout dx", dx),
                bytes,
            );
        }
        op.record_backward(encoder, dy, dx, self.rng.at())
    }
}

/// A counter-based random stream's state on the GPU, `[seed_lo, seed_hi, step, 0]`: the kernels of a
/// training-only perturbation (Dropout, Noise) advance `step` once per training forward, in encoder
/// order, and derive every draw from (seed, step, index).
#[derive(Debug)]
pub struct RngStream {
    gpu: Arc<Gpu>,
    state: wgpu::Buffer,
}

impl RngStream {
    /// A stream of `seed` at step 0.
    ///
    /// # Errors
    /// Device errors.
    pub fn new(gpu: &Arc<Gpu>, label: &str, seed: u64) -> Result<Self> {
        Ok(RngStream {
            gpu: gpu.clone(),
            state: gpu.upload(label, &rng_state(seed))?,
        })
    }

    /// Training forwards recorded and run so far (reads the GPU's counter; waits).
    ///
    /// # Errors
    /// Device errors.
    pub fn step(&self) -> Result<u32> {
        Ok(self.gpu.download::<u32>(&self.state, 0, 4)?[2])
    }

    /// Sets the step (a resumed run continues the stream where it was); ordered with later submissions.
    pub fn set_step(&self, step: u32) {
        self.gpu
            .queue
            .write_buffer(&self.state, 8, bytemuck::bytes_of(&step));
    }

    /// The state buffer, as the kernels bind it.
    pub fn at(&self) -> BufferRef<'_> {
        (&self.state).into()
    }
}

/// The eval-mode pass of a training-only perturbation (Dropout, Noise): checks both buffers and records
/// a copy of `bytes` bytes from `from` to `to`.
///
/// # Errors
/// Buffer errors naming the buffer.
pub(crate) fn record_identity(
    gpu: &Gpu,
    encoder: &mut impl Record,
    from: (&str, BufferRef),
    to: (&str, BufferRef),
    bytes: u64,
) -> Result<()> {
    crate::ops::kernel::check(gpu, from.0, &from.1, bytes)?;
    crate::ops::kernel::check(gpu, to.0, &to.1, bytes)?;
    encoder.encoder().copy_buffer_to_buffer(
        from.1.buffer,
        from.1.offset,
        to.1.buffer,
        to.1.offset,
        bytes,
    );
    Ok(())
}
