//! `Relu`: PyTorch's `nn.ReLU` (no parameters). The backward reads the forward's output.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::relu::ReluOp;
use crate::record::Record;

/// A ReLU over samples of `features` values.
#[derive(Debug)]
pub struct Relu {
    gpu: Arc<Gpu>,
    /// Values per sample.
    pub features: usize,
    ops: HashMap<usize, ReluOp>,
}

impl Relu {
    /// A ReLU over samples of `features` values.
    pub fn new(gpu: &Arc<Gpu>, features: usize) -> Self {
        Relu {
            gpu: gpu.clone(),
            features,
            ops: HashMap::new(),
        }
    }

    fn op(&mut self, n: usize) -> Result<&ReluOp> {
        if !self.ops.contains_key(&n) {
            let op = ReluOp::new(&self.gpu, n * self.features)?;
            self.ops.insert(n, op);
        }
        Ok(&self.ops[&n])
    }

    /// Records `y = max(x, 0)` over `n` samples.
    ///
    /// # Errors
    /// As [`ReluOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        n: usize,
    ) -> Result<()> {
        self.op(n)?.record_forward(encoder, x, y)
    }

    /// Records `dx = dy · [y > 0]` over `n` samples, `y` the forward's output.
    ///
    /// # Errors
    /// As [`ReluOp::record_backward`].
    pub fn record_backward(
        &mut self,
        encoder: &mut impl Record,
        y: BufferRef,
        dy: BufferRef,
        dx: BufferRef,
        n: usize,
    ) -> Result<()> {
        self.op(n)?.record_backward(encoder, y, dy, dx)
    }
}
