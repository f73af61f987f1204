//! Measurements on flat vectors kept on the GPU (parameter and gradient arenas): a step along a direction
//! (`out = a + alpha·b`) and the statistics of a pair (`Σ(a−b)², Σa·b, Σa², Σb²`), so the experiments
//! (`batchnorm experiment ics|landscape`) read back four numbers per probe instead of two whole vectors.
//!
//! # Shapes
//! Any; `len` values, contiguous.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, check_loop_iterations, dispatch, entry, f32_bytes, grid, nonzero};
use crate::record::Record;

const PROBE_WGSL: &str = include_str!("../../shaders/probe.wgsl");

/// Number of f32 [`ProbeOp::record_diff_stats`] writes.
pub const DIFF_STATS_LEN: usize = 4;

/// `[Σ(a−b)², Σa·b, Σa², Σb²]` of two vectors, with what the experiments derive from them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiffStats {
    /// `Σ(a−b)²`.
    pub diff_sq: f64,
    /// `Σa·b`.
    pub dot: f64,
    /// `Σa²`.
    pub a_sq: f64,
    /// `Σb²`.
    pub b_sq: f64,
}

impl DiffStats {
    /// From the four values the kernel writes.
    pub fn from_slice(v: &[f32]) -> Self {
        DiffStats {
            diff_sq: v[0] as f64,
            dot: v[1] as f64,
            a_sq: v[2] as f64,
            b_sq: v[3] as f64,
        }
    }

    /// `‖a − b‖₂`.
    pub fn diff_norm(&self) -> f64 {
        self.diff_sq.max(0.0).sqrt()
    }

    /// `cos(a, b)`; NaN when either vector is zero.
    pub fn cosine(&self) -> f64 {
        let d = (self.a_sq * self.b_sq).sqrt();
        if d > 0.0 {
            self.dot / d
        } else {
            f64::NAN
        }
    }
}

/// The probe kernels over `len` values, with their scalar uniform.
#[derive(Debug)]
pub struct ProbeOp {
    gpu: Arc<Gpu>,
    /// Number of values.
    pub len: usize,
    alpha: wgpu::Buffer,
}

impl ProbeOp {
    /// An op over `len` values.
    ///
    /// # Errors
    /// [`Error::BadConfig`] when `len` is 0; device errors.
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<Self> {
        nonzero("probe length", len)?;
        let alpha = gpu.create_buffer(
            "probe.alpha",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(ProbeOp {
            gpu: gpu.clone(),
            len,
            alpha,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let len = self.len;
        self.gpu
            .pipeline(&format!("probe.{entry_point}.{len}"), entry_point, || {
                format!("const LEN: u32 = {len}u;\n{PROBE_WGSL}")
            })
    }

    /// Records `out = a + alpha·b`. `alpha` is written to the op's uniform with `queue.write_buffer`, so
    /// submit before recording the next `record_axpy` of this op (both would see the last `alpha`).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a non-finite `alpha`; shape errors for too small or misaligned buffers.
    pub fn record_axpy(
        &self,
        encoder: &mut impl Record,
        a: BufferRef,
        alpha: f32,
        b: BufferRef,
        out: BufferRef,
    ) -> Result<()> {
        if !alpha.is_finite() {
            return Err(Error::config(format!(
                "probe step alpha must be finite, got {alpha}"
            )));
        }
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "probe a", &a, bytes)?;
        check(&self.gpu, "probe b", &b, bytes)?;
        check(&self.gpu, "probe out", &out, bytes)?;
        self.gpu.queue.write_buffer(
            &self.alpha,
            0,
            bytemuck::cast_slice(&[alpha, 0.0, 0.0, 0.0]),
        );
        let pipeline = self.pipeline("axpy")?;
        let (x, y) = grid(&self.gpu, self.len.div_ceil(256) as u32);
        let alpha_ref = BufferRef::from(&self.alpha);
        dispatch(
            &self.gpu,
            encoder,
            "probe.axpy",
            &pipeline,
            &[
                entry(0, &a, bytes),
                entry(1, &b, bytes),
                entry(2, &out, bytes),
                entry(3, &alpha_ref, 16),
            ],
            (x, y, 1),
        );
        Ok(())
    }

    /// Records `out[0..4] = [Σ(a−b)², Σa·b, Σa², Σb²]`.
    ///
    /// # Errors
    /// [`crate::Error::LimitExceeded`] on a CPU device past 256 · [`crate::ops::conv2d::LOOP_ITERATIONS_MAX`]
    /// values (one workgroup sums them); shape errors for too small or misaligned buffers.
    pub fn record_diff_stats(
        &self,
        encoder: &mut impl Record,
        a: BufferRef,
        b: BufferRef,
        out: BufferRef,
    ) -> Result<()> {
        // One workgroup of 256: each invocation sums every 256th value, then a tree of 8 levels.
        check_loop_iterations(
            &self.gpu,
            &format!("diff_stats over {} values", self.len),
            self.len.div_ceil(256) + 8,
        )?;
        let bytes = f32_bytes(self.len);
        check(&self.gpu, "probe a", &a, bytes)?;
        check(&self.gpu, "probe b", &b, bytes)?;
        check(&self.gpu, "probe stats", &out, f32_bytes(DIFF_STATS_LEN))?;
        let pipeline = self.pipeline("diff_stats")?;
        dispatch(
            &self.gpu,
            encoder,
            "probe.diff_stats",
            &pipeline,
            &[
                entry(0, &a, bytes),
                entry(1, &b, bytes),
                entry(2, &out, f32_bytes(DIFF_STATS_LEN)),
            ],
            (1, 1, 1),
        );
        Ok(())
    }
}
