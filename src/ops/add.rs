//! Residual add: `y = a + b`; backward `da = db = dy`.
//!
//! # Shapes
//! Any; `len` values each, contiguous.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero};
use crate::record::Record;

const ADD_WGSL: &str = include_str!("../../shaders/add.wgsl");

/// The add op over `len` values.
#[derive(Clone, Debug)]
pub struct AddOp {
    gpu: Arc<Gpu>,
    /// Number of values.
    pub len: usize,
}

impl AddOp {
    /// An op over `len` values.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] when `len` is 0 or too large.
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<Self> {
        nonzero("add length", len)?;
        Ok(AddOp {
            gpu: gpu.clone(),
            len,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let len = self.len;
        self.gpu
            .pipeline(&format!("add.{entry_point}.{len}"), entry_point, || {
                format!("const LEN: u32 = {len}u;\n{ADD_WGSL}")
            })
    }

    fn groups(&self) -> (u32, u32, u32) {
        let (x, y) = grid(&self.gpu, self.len.div_ceil(256) as u32);
        (x, y, 1)
    }

    /// Records `y = a + b`.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        a: BufferRef,
        b: BufferRef,
        y: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "add a", &a, bytes)?;
        check(&self.gpu, "add b", &b, bytes)?;
        check(&self.gpu, "add y", &y, bytes)?;
        let pipeline = self.pipeline("forward")?;
        dispatch(
            &self.gpu,
            encoder,
            "add.forward",
            &pipeline,
            &[
                entry(0, &a, bytes),
                entry(1, &b, bytes),
                entry(2, &y, bytes),
            ],
            self.groups(),
        );
        Ok(())
    }

    /// Records `da = dy` and `db = dy`.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] / [`crate::Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        dy: BufferRef,
        da: BufferRef,
        db: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "add dy", &dy, bytes)?;
        check(&self.gpu, "add da", &da, bytes)?;
        check(&self.gpu, "add db", &db, bytes)?;
        let pipeline = self.pipeline("backward")?;
        dispatch(
            &self.gpu,
            encoder,
            "add.backward",
            &pipeline,
            &[
                entry(3, &dy, bytes),
                entry(4, &da, bytes),
                entry(5, &db, bytes),
            ],
            self.groups(),
        );
        Ok(())
    }
}
