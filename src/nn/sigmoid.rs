//! `Sigmoid`: the logistic function, elementwise (PyTorch's `nn.Sigmoid`; no parameters).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::sigmoid::SigmoidOp;
use crate::record::Record;

/// A sigmoid over `[n, features]`.
#[derive(Debug)]
pub struct Sigmoid {
    gpu: Arc<Gpu>,
    /// Values per row.
    pub features: usize,
    ops: HashMap<usize, SigmoidOp>,
}

impl Sigmoid {
    /// A sigmoid over rows of `features` values.
    pub fn new(gpu: &Arc<Gpu>, features: usize) -> Self {
        Sigmoid {
            gpu: gpu.clone(),
            features,
            ops: HashMap::new(),
        }
    }

    fn op(&mut self, n: usize) -> Result<&SigmoidOp> {
        if !self.ops.contains_key(&n) {
            let op = SigmoidOp::new(&self.gpu, n * self.features)?;
            self.ops.insert(n, op);
        }
        Ok(&self.ops[&n])
    }

    /// Records `y = sigmoid(x)` over `n` rows.
    ///
    /// # Errors
    /// As [`SigmoidOp::record_forward`].
    pub fn record_forward(
        &mut self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        n: usize,
    ) -> Result<()> {
        self.op(n)?.record_forward(encoder, x, y)
    }

    /// Records `dx = dy · y · (1 − y)` over `n` rows.
    ///
    /// # Errors
    /// As [`SigmoidOp::record_backward`].
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
