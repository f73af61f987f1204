//! Logistic sigmoid: `y = 1 / (1 + exp(-x))`, backward `dx = dy * y * (1 - y)` (from the output, so the
//! forward's input need not be kept).
//!
//! # Shapes
//! Any; `len` values, contiguous.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero};
use crate::record::Record;

const SIGMOID_WGSL: &str = include_str!("../../shaders/sigmoid.wgsl");

/// The sigmoid op over `len` values.
#[derive(Clone, Debug)]
pub struct SigmoidOp {
    gpu: Arc<Gpu>,
    /// Number of values.
    pub len: usize,
}

impl SigmoidOp {
    /// An op over `len` values.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] when `len` is 0.
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<Self> {
        nonzero("sigmoid length", len)?;
        Ok(SigmoidOp {
            gpu: gpu.clone(),
            len,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let len = self.len;
        self.gpu
            .pipeline(&format!("sigmoid.{entry_point}.{len}"), entry_point, || {
                format!("const LEN: u32 = {len}u;\n{SIGMOID_WGSL}")
            })
    }

    fn groups(&self) -> (u32, u32, u32) {
        let (x, y) = grid(&self.gpu, self.len.div_ceil(256) as u32);
        (x, y, 1)
    }

    /// Records `y = sigmoid(x)`.
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
        check(&self.gpu, "sigmoid x", &x, bytes)?;
        check(&self.gpu, "sigmoid y", &y, bytes)?;
        let pipeline = self.pipeline("forward")?;
        dispatch(
            &self.gpu,
            encoder,
            "sigmoid.forward",
            &pipeline,
            &[entry(0, &x, bytes), entry(1, &y, bytes)],
            self.groups(),
        );
        Ok(())
    }

    /// Records `dx = dy * y * (1 - y)` from the forward's output `y`.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        y: BufferRef,
        dy: BufferRef,
        dx: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "sigmoid y", &y, bytes)?;
        check(&self.gpu, "sigmoid dy", &dy, bytes)?;
        check(&self.gpu, "sigmoid dx", &dx, bytes)?;
        let pipeline = self.pipeline("backward")?;
        dispatch(
            &self.gpu,
            encoder,
            "sigmoid.backward",
            &pipeline,
            &[
                entry(1, &y, bytes),
                entry(2, &dy, bytes),
                entry(3, &dx, bytes),
            ],
            self.groups(),
        );
        Ok(())
    }
}
