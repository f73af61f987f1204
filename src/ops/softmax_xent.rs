//! Fused, numerically stable softmax cross-entropy with the accuracy count, in one dispatch.
//!
//! Per row: `loss = logsumexp(z) - z[label]`; `dz = (softmax(z) - onehot(label)) / rows` (the gradient of
//! the batch-mean loss, PyTorch's `CrossEntropyLoss(reduction='mean')`); correct when the first index of
//! the largest logit equals the label.
//!
//! `stats` holds 4 f32: `[batch mean loss, Σ loss, Σ correct, Σ rows]`. The three sums accumulate over
//! calls until the caller clears them, so a training loop reads back every k steps, not every step.
//!
//! # Shapes
//! logits and dlogits `[rows, classes]` f32; labels `[rows]` u32, each `< classes`: a label past the classes
//! makes its row's loss and dlogits NaN (and the row not correct), so the batch's loss is NaN. PyTorch
//! raises there; the labels live on the device, where a kernel cannot, and a NaN stops a training run
//! (`batchnorm train`) where clamping the label would train on a wrong class in silence.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{
    check, check_loop_iterations, dispatch, entry, f32_bytes, nonzero, FLOAT_BITS_WGSL,
};
use crate::record::Record;

const SOFTMAX_XENT_WGSL: &str = include_str!("../../shaders/softmax_xent.wgsl");

/// Number of f32 in the stats buffer.
pub const STATS_LEN: usize = 4;

/// The op for one batch size and class count.
#[derive(Clone, Debug)]
pub struct SoftmaxXentOp {
    gpu: Arc<Gpu>,
    /// Rows (batch size).
    pub rows: usize,
    /// Classes.
    pub classes: usize,
}

impl SoftmaxXentOp {
    /// An op over `[rows, classes]` logits.
    ///
    /// # Errors
    /// [`Error::BadConfig`] when a size is 0 or `classes < 2`; [`Error::LimitExceeded`] on a CPU device
    /// when an invocation would loop past lavapipe's limit (one workgroup does the whole batch:
    /// `⌈rows / 64⌉ · 3 · classes` must stay under [`crate::ops::conv2d::LOOP_ITERATIONS_MAX`]; 10
    /// classes allow ~128 000 rows, 1 000 classes ~1 200).
    pub fn new(gpu: &Arc<Gpu>, rows: usize, classes: usize) -> Result<Self> {
        nonzero("rows", rows)?;
        if classes < 2 {
            return Err(Error::config(format!(
                "softmax cross-entropy needs at least 2 classes, got {classes}"
            )));
        }
        // One workgroup of 64: each invocation takes every 64th row and loops over its classes three
        // times (max, sum of exp, dlogits), then the first sums the 64 partial results.
        check_loop_iterations(
            gpu,
            &format!("softmax cross-entropy over {rows} rows of {classes} classes"),
            rows.div_ceil(64) * (3 * classes) + 64,
        )?;
        Ok(SoftmaxXentOp {
            gpu: gpu.clone(),
            rows,
            classes,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let (rows, classes) = (self.rows, self.classes);
        let key = format!("softmax_xent.{entry_point}.{rows}x{classes}");
        self.gpu.pipeline(&key, entry_point, || {
            format!(
                "const ROWS: u32 = {rows}u;\nconst CLASSES: u32 = {classes}u;\n{FLOAT_BITS_WGSL}{SOFTMAX_XENT_WGSL}"
            )
        })
    }

    /// Records the training form: `dlogits`, this batch's mean loss into `stats[0]`, and adds to the sums.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_train(
        &self,
        encoder: &mut impl Record,
        logits: BufferRef,
        labels: BufferRef,
        dlogits: BufferRef,
        stats: BufferRef,
    ) -> Result<()> {
        let zb = f32_bytes(self.rows * self.classes);
        let lb = 4 * self.rows as u64;
        let sb = f32_bytes(STATS_LEN);
        check(&self.gpu, "logits", &logits, zb)?;
        check(&self.gpu, "labels", &labels, lb)?;
        check(&self.gpu, "dlogits", &dlogits, zb)?;
        check(&self.gpu, "stats", &stats, sb)?;
        let pipeline = self.pipeline("train")?;
        dispatch(
            &self.gpu,
            encoder,
            "softmax_xent.train",
            &pipeline,
            &[
                entry(0, &logits, zb),
                entry(1, &labels, lb),
                entry(2, &dlogits, zb),
                entry(3, &stats, sb),
            ],
            (1, 1, 1),
        );
        Ok(())
    }

    /// Records the evaluation form: adds Σ loss, Σ correct and rows to `stats[1..4]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_eval(
        &self,
        encoder: &mut impl Record,
        logits: BufferRef,
        labels: BufferRef,
        stats: BufferRef,
    ) -> Result<()> {
        let zb = f32_bytes(self.rows * self.classes);
        let lb = 4 * self.rows as u64;
        let sb = f32_bytes(STATS_LEN);
        check(&self.gpu, "logits", &logits, zb)?;
        check(&self.gpu, "labels", &labels, lb)?;
        check(&self.gpu, "stats", &stats, sb)?;
        let pipeline = self.pipeline("eval")?;
        dispatch(
            &self.gpu,
            encoder,
            "softmax_xent.eval",
            &pipeline,
            &[
                entry(0, &logits, zb),
                entry(1, &labels, lb),
                entry(3, &stats, sb),
            ],
            (1, 1, 1),
        );
        Ok(())
    }
}
