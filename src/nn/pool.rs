//! `Pool2d`: PyTorch's `nn.MaxPool2d(k, s)` and `nn.AvgPool2d(k, s)` on `[N, C, H, W]` (no parameters).
//! Max pooling keeps the forward's argmax in a buffer of its own for the backward.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::{storage_usage, Gpu};
use crate::ops::batchnorm::BufferRef;
use crate::ops::pool::{Pool2dOp, Pool2dShape, PoolKind};
use crate::record::Record;

/// A 2-D pooling layer over samples `[c, h, w]`.
#[derive(Debug)]
pub struct Pool2d {
    gpu: Arc<Gpu>,
    /// Max or average.
    pub kind: PoolKind,
    /// Sample shape `[c, h, w]`.
    pub in_chw: [usize; 3],
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    ops: HashMap<usize, Pool2dOp>,
    /// Max pooling's argmax from the last forward (grown to the largest batch seen; `None` for average).
    argmax: Option<(wgpu::Buffer, usize)>,
}

impl Pool2d {
    /// A pooling layer; the shape is checked here.
    ///
    /// # Errors
    /// [`crate::Error::BadConfig`] as [`Pool2dShape::validate`].
    pub fn new(
        gpu: &Arc<Gpu>,
        kind: PoolKind,
        in_chw: [usize; 3],
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        let layer = Pool2d {
            gpu: gpu.clone(),
            kind,
            in_chw,
            kernel,
            stride,
            ops: HashMap::new(),
            argmax: None,
        };
        layer.shape(1).validate()?;
        Ok(layer)
    }

    fn shape(&self, n: usize) -> Pool2dShape {
        let [c, h, w] = self.in_chw;
        Pool2dShape {
            n,
            c,
            h,
            w,
            kernel: self.kernel,
            stride: self.stride,
        }
    }

    /// Output sample shape `[c, oh, ow]`.
    pub fn out_chw(&self) -> [usize; 3] {
        let (oh, ow) = self.shape(1).out_hw();
        [self.in_chw[0], oh, ow]
    }

    fn prepare(&mut self, n: usize) -> Result<()> {
        if !self.ops.contains_key(&n) {
            let op = Pool2dOp::new(&self.gpu, self.shape(n), self.kind)?;
            self.ops.insert(n, op);
        }
        let need = self.shape(n).out_len();
        let grow = matches!(&self.argmax, Some((_, have)) if *have < need) || self.argmax.is_none();
        if self.kind == PoolKind::Max && grow {
            let b = self
                .gpu
                .create_buffer("pool.argmax", 4 * need as u64, storage_usage())?;
            self.argmax = Some((b, need));
        }
        Ok(())
    }

    /// Records the forward over `n` samples.
    ///
    /// # Errors
    /// As [`Pool2dOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        n: usize,
    ) -> Result<()> {
        self.prepare(n)?;
        let argmax = self.argmax.as_ref().map(|(b, _)| b.into());
        self.ops[&n].record_forward(encoder, x, y, argmax)
    }

    /// Records the backward over `n` samples (of the last forward, for max pooling).
    ///
    /// # Errors
    /// As [`Pool2dOp::record_backward`].
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        dy: BufferRef,
        dx: BufferRef,
        n: usize,
    ) -> Result<()> {
        self.prepare(n)?;
        let argmax = self.argmax.as_ref().map(|(b, _)| b.into());
        self.ops[&n].record_backward(encoder, dy, argmax, dx)
    }
}
