//! 2-D pooling over NCHW: max (PyTorch's `MaxPool2d(k, s)`: first maximum wins ties, backward routes each
//! output's gradient to its argmax) and average (`AvgPool2d(k, s)`: every window value weighs `1/k²`).
//! Square windows, no padding, no dilation, floor output size: `OH = (H − k) / s + 1`.
//!
//! # Shapes
//! x and dx `[N, C, H, W]`; y and dy `[N, C, OH, OW]`; max pooling's argmax `[N, C, OH, OW]` u32 (the
//! index of the maximum within its `H × W` plane), written by the forward and read by the backward.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero, FLOAT_BITS_WGSL};
use crate::record::Record;

const POOL_WGSL: &str = include_str!("../../shaders/pool.wgsl");

/// Which reduction a window applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// The window's maximum.
    Max,
    /// The window's mean.
    Avg,
}

/// A pooling problem: input shape, window and stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dShape {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
}

impl Pool2dShape {
    /// Checks the sizes: none zero, the window no larger than the input.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the bad size.
    pub fn validate(&self) -> Result<()> {
        nonzero("pool batch size", self.n)?;
        nonzero("pool channels", self.c)?;
        nonzero("pool height", self.h)?;
        nonzero("pool width", self.w)?;
        nonzero("pool kernel size", self.kernel)?;
        nonzero("pool stride", self.stride)?;
        if self.kernel > self.h || self.kernel > self.w {
            return Err(Error::config(format!(
                "pool kernel {} is larger than the {}x{} input: the output would be empty",
                self.kernel, self.h, self.w
            )));
        }
        nonzero("pool input values", self.n * self.c * self.h * self.w)?;
        Ok(())
    }

    /// Output `(OH, OW)`.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h - self.kernel) / self.stride + 1,
            (self.w - self.kernel) / self.stride + 1,
        )
    }

    /// Values in the input.
    pub fn in_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Values in the output.
    pub fn out_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * self.c * oh * ow
    }
}

/// The pooling op for one shape and kind.
#[derive(Clone, Debug)]
pub struct Pool2dOp {
    gpu: Arc<Gpu>,
    /// The problem.
    pub shape: Pool2dShape,
    /// Max or average.
    pub kind: PoolKind,
}

impl Pool2dOp {
    /// An op for `shape`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] from [`Pool2dShape::validate`].
    pub fn new(gpu: &Arc<Gpu>, shape: Pool2dShape, kind: PoolKind) -> Result<Self> {
        shape.validate()?;
        Ok(Pool2dOp {
            gpu: gpu.clone(),
            shape,
            kind,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let s = self.shape;
        let (oh, ow) = s.out_hw();
        let planes = s.n * s.c;
        let key = format!(
            "pool.{entry_point}.{planes}.{}.{}.{}.{}",
            s.h, s.w, s.kernel, s.stride
        );
        self.gpu.pipeline(&key, entry_point, || {
            format!(
                "const PLANES: u32 = {planes}u;\nconst H: u32 = {}u;\nconst W: u32 = {}u;\n\
                 const OH: u32 = {oh}u;\nconst OW: u32 = {ow}u;\nconst K: u32 = {}u;\n\
                 const S: u32 = {}u;\n{FLOAT_BITS_WGSL}{POOL_WGSL}",
                s.h, s.w, s.kernel, s.stride
            )
        })
    }

    fn groups(&self, len: usize) -> (u32, u32, u32) {
        let (x, y) = grid(&self.gpu, len.div_ceil(256) as u32);
        (x, y, 1)
    }

    fn argmax_for<'a>(&self, argmax: Option<BufferRef<'a>>) -> Result<Option<BufferRef<'a>>> {
        match (self.kind, argmax) {
            (PoolKind::Max, None) => Err(Error::config(
                "max pooling needs an argmax buffer (u32 per output value) for its backward",
            )),
            (PoolKind::Max, Some(a)) => {
                check(
                    &self.gpu,
                    "pool argmax",
                    &a,
                    f32_bytes(self.shape.out_len()),
                )?;
                Ok(Some(a))
            }
            (PoolKind::Avg, _) => Ok(None),
        }
    }

    /// Records the forward `x → y`; max pooling also writes `argmax` (required for it, ignored by
    /// average pooling).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a missing argmax buffer; [`Error::ShapeMismatch`] /
    /// [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        argmax: Option<BufferRef>,
    ) -> Result<()> {
        let (xb, yb) = (
            f32_bytes(self.shape.in_len()),
            f32_bytes(self.shape.out_len()),
        );
        check(&self.gpu, "pool x", &x, xb)?;
        check(&self.gpu, "pool y", &y, yb)?;
        let argmax = self.argmax_for(argmax)?;
        let mut entries = vec![entry(0, &x, xb), entry(1, &y, yb)];
        let name = match argmax {
            Some(a) => {
                entries.push(entry(2, &a, yb));
                "max_forward"
            }
            None => "avg_forward",
        };
        let pipeline = self.pipeline(name)?;
        dispatch(
            &self.gpu,
            encoder,
            "pool.forward",
            &pipeline,
            &entries,
            self.groups(self.shape.out_len()),
        );
        Ok(())
    }

    /// Records the backward `dy → dx` (every input value written; those no window covers get 0). Max
    /// pooling reads the forward's `argmax`.
    ///
    /// # Errors
    /// As [`Self::record_forward`].
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        dy: BufferRef,
        argmax: Option<BufferRef>,
        dx: BufferRef,
    ) -> Result<()> {
        let (xb, yb) = (
            f32_bytes(self.shape.in_len()),
            f32_bytes(self.shape.out_len()),
        );
        check(&self.gpu, "pool dy", &dy, yb)?;
        check(&self.gpu, "pool dx", &dx, xb)?;
        let argmax = self.argmax_for(argmax)?;
        let mut entries = vec![entry(3, &dy, yb), entry(4, &dx, xb)];
        let name = match argmax {
            Some(a) => {
                entries.push(entry(2, &a, yb));
                "max_backward"
            }
            None => "avg_backward",
        };
        let pipeline = self.pipeline(name)?;
        dispatch(
            &self.gpu,
            encoder,
            "pool.backward",
            &pipeline,
            &entries,
            self.groups(self.shape.in_len()),
        );
        Ok(())
    }
}
