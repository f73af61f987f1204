//! ReLU: `y = max(x, 0)`, backward `dx = dy · [act > 0]` where `act` is the forward's input or output
//! (both are positive at the same places, so a layer keeps whichever buffer it already holds; the
//! gradient at exactly 0 is 0, as in PyTorch).
//!
//! # Shapes
//! Any; `len` values, contiguous.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero, FLOAT_BITS_WGSL};
use crate::record::Record;

const RELU_WGSL: &str = include_str!("../../shaders/relu.wgsl");

/// The ReLU op over `len` values.
#[derive(Clone, Debug)]
pub struct ReluOp {
    gpu: Arc<Gpu>,
    /// Number of values.
    pub len: usize,
}

impl ReluOp {
    /// An op over `len` values.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] when `len` is 0 or too large.
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<Self> {
        nonzero("relu length", len)?;
        Ok(ReluOp {
            gpu: gpu.clone(),
            len,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let len = self.len;
        self.gpu
            .pipeline(&format!("relu.{entry_point}.{len}"), entry_point, || {
                format!("const LEN: u32 = {len}u;\n{FLOAT_BITS_WGSL}{RELU_WGSL}")
            })
    }

    fn groups(&self) -> (u32, u32, u32) {
        let (x, y) = grid(&self.gpu, self.len.div_ceil(256) as u32);
        (x, y, 1)
    }

    /// Records `y = max(x, 0)`.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "relu x", &x, bytes)?;
        check(&self.gpu, "relu y", &y, bytes)?;
        let pipeline = self.pipeline("forward")?;
        dispatch(
            &self.gpu,
            encoder,
            "relu.forward",
            &pipeline,
            &[entry(0, &x, bytes), entry(1, &y, bytes)],
            self.groups(),
        );
        Ok(())
    }

    /// Records `dx = dy · [act > 0]`, `act` being the forward's input or output.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        act: BufferRef,
        dy: BufferRef,
        dx: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "relu act", &act, bytes)?;
        check(&self.gpu, "relu dy", &dy, bytes)?;
        check(&self.gpu, "relu dx", &dx, bytes)?;
        let pipeline = self.pipeline("backward")?;
        dispatch(
            &self.gpu,
            encoder,
            "relu.backward",
            &pipeline,
            &[
                entry(2, &act, bytes),
                entry(3, &dy, bytes),
                entry(4, &dx, bytes),
            ],
            self.groups(),
        );
        Ok(())
    }
}
