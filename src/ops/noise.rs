//! Santurkar et al.'s (2018) "noisy BatchNorm" perturbation: `y = x·s + m` with a fresh scale `s` and shift
//! `m` for every value at every step, drawn around a per-unit centre that itself changes every step — noise
//! of non-zero mean and non-unit variance whose distribution moves during training (their Fig. 2, and
//! [`NoiseConfig`] for the scheme). Like [`crate::ops::dropout`], the draws come from a counter-based hash
//! of (seed, step, index) (`shaders/hash.wgsl`), the step lives on the GPU in a 4-word buffer
//! `[seed_lo, seed_hi, step, 0]` moved by [`NoiseOp::record_advance`], and the backward (`dx = dy·s`)
//! recomputes the forward's draws. [`crate::reference::noise`] computes the same draws on the CPU.
//!
//! # Shapes
//! `len` contiguous values; value i belongs to unit `(i / inner) % units` (`inner = 1` for `[N, F]` rows,
//! `H·W` for NCHW maps with `units = C`).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::dropout::RNG_STATE_BYTES;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, nonzero, HASH_WGSL};
use crate::record::Record;

const NOISE_WGSL: &str = include_str!("../../shaders/noise.wgsl");

/// The noise scheme. At each step, per unit: a scale centre `1 + scale_range·c₁` and a shift centre
/// `shift_range·c₂`; per value: `s = scale centre + scale_jitter·c₃`, `m = shift centre + shift_jitter·c₄`;
/// every `c` independent and uniform on [−1, 1). So within one step a unit's noise has mean shift and
/// scale away from 0 and 1, and across steps those move (uniform with variance range²/3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseConfig {
    /// Half-width of the per-unit shift centre's range.
    pub shift_range: f32,
    /// Half-width of the per-unit scale centre's range around 1.
    pub scale_range: f32,
    /// Half-width of each value's own shift around its unit's centre.
    pub shift_jitter: f32,
    /// Half-width of each value's own scale around its unit's centre.
    pub scale_jitter: f32,
}

impl Default for NoiseConfig {
    /// Shift centre U(−1, 1), scale centre U(0.5, 1.5), per-value jitter ±0.5 (shift) and ±0.25 (scale):
    /// comparable to a BatchNorm output's own spread (unit variance), as Santurkar et al. intend.
    fn default() -> Self {
        NoiseConfig {
            shift_range: 1.0,
            scale_range: 0.5,
            shift_jitter: 0.5,
            scale_jitter: 0.25,
        }
    }
}

impl NoiseConfig {
    /// Rejects negative or non-finite ranges.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the field.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("shift_range", self.shift_range),
            ("scale_range", self.scale_range),
            ("shift_jitter", self.shift_jitter),
            ("scale_jitter", self.scale_jitter),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(format!(
                    "noise {name} has to be finite and at least 0, but got {v}"
                )));
            }
        }
        Ok(())
    }

    /// The scheme in words, for experiment configs.
    pub fn describe(&self) -> String {
        format!(
            "y = x*s + m per value; each step, per unit: scale centre 1 + U(-{sr}, {sr}), shift centre \
             U(-{mr}, {mr}); per value: s = scale centre + U(-{sj}, {sj}), m = shift centre + U(-{mj}, {mj}); \
             all draws independent (hash RNG of seed, step, index); training only (eval: identity)",
            sr = self.scale_range,
            mr = self.shift_range,
            sj = self.scale_jitter,
            mj = self.shift_jitter,
        )
    }
}

/// The noise op over `len` values of `units` units.
#[derive(Clone, Debug)]
pub struct NoiseOp {
    gpu: Arc<Gpu>,
    /// Number of values.
    pub len: usize,
    /// Units (features or channels) the per-unit centres are drawn for.
    pub units: usize,
    /// Consecutive values per unit run (1 for `[N, F]`, H·W for NCHW).
    pub inner: usize,
    /// The scheme.
    pub config: NoiseConfig,
}

impl NoiseOp {
    /// An op over `len` values; value i belongs to unit `(i / inner) % units`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a zero size or a bad [`NoiseConfig`].
    pub fn new(
        gpu: &Arc<Gpu>,
        len: usize,
        units: usize,
        inner: usize,
        config: NoiseConfig,
    ) -> Result<Self> {
        nonzero("noise length", len)?;
        nonzero("noise units", units)?;
        nonzero("noise inner size", inner)?;
        config.check()?;
        if u32::try_from(len).is_err() {
            return Err(Error::config(format!(
                "noise over {len} values: the hash indexes values with 32 bits"
            )));
        }
        Ok(NoiseOp {
            gpu: gpu.clone(),
            len,
            units,
            inner,
            config,
        })
    }

    fn pipeline(&self, entry_point: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let (len, units, inner, c) = (self.len, self.units, self.inner, self.config);
        let bits = [c.shift_range, c.scale_range, c.shift_jitter, c.scale_jitter].map(f32::to_bits);
        self.gpu.pipeline(
            &format!("noise.{entry_point}.{len}.{units}.{inner}.{bits:08x?}"),
            entry_point,
            || {
                // `{:e}` prints the shortest text that parses back to the same f32.
                format!(
                    "const LEN: u32 = {len}u;\nconst UNITS: u32 = {units}u;\nconst INNER: u32 = {inner}u;\n\
                     const SHIFT_RANGE: f32 = {:e};\nconst SCALE_RANGE: f32 = {:e};\n\
                     const SHIFT_JITTER: f32 = {:e};\nconst SCALE_JITTER: f32 = {:e};\n{HASH_WGSL}{NOISE_WGSL}",
                    c.shift_range, c.scale_range, c.shift_jitter, c.scale_jitter
                )
            },
        )
    }

    /// Records the move to the next step's draws (`rng[2] += 1`).
    ///
    /// # Errors
    /// Buffer errors for `rng`.
    pub fn record_advance(&self, encoder: &mut impl Record, rng: BufferRef) -> Result<()> {
        check(&self.gpu, "noise rng", &rng, RNG_STATE_BYTES)?;
        let pipeline = self.pipeline("advance")?;
        let entries = [entry(2, &rng, RNG_STATE_BYTES)];
        dispatch(
            &self.gpu,
            encoder,
            "noise.advance",
            &pipeline,
            &entries,
            (1, 1, 1),
        );
        Ok(())
    }

    /// Records `y = x·s + m` with the draws of `rng`'s current step.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_forward(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        y: BufferRef,
        rng: BufferRef,
    ) -> Result<()> {
        self.record_map(
            encoder,
            "forward",
            [("noise x", 0, x), ("noise y", 1, y)],
            rng,
        )
    }

    /// Records `dx = dy·s` with the draws of `rng`'s current step (the forward's, when no advance was
    /// recorded in between).
    ///
    /// # Errors
    /// As [`Self::record_forward`].
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        dy: BufferRef,
        dx: BufferRef,
        rng: BufferRef,
    ) -> Result<()> {
        self.record_map(
            encoder,
            "backward",
            [("noise dy", 3, dy), ("noise dx", 4, dx)],
            rng,
        )
    }

    /// One elementwise pass `entry_point` from the first buffer into the second.
    fn record_map(
        &self,
        encoder: &mut impl Record,
        entry_point: &str,
        io: [(&str, u32, BufferRef); 2],
        rng: BufferRef,
    ) -> Result<()> {
        let bytes = f32_bytes(self.len);
        for (what, _, r) in &io {
            check(&self.gpu, what, r, bytes)?;
        }
        check(&self.gpu, "noise rng", &rng, RNG_STATE_BYTES)?;
        let pipeline = self.pipeline(entry_point)?;
        let entries = [
            entry(io[0].1, &io[0].2, bytes),
            entry(io[1].1, &io[1].2, bytes),
            entry(2, &rng, RNG_STATE_BYTES),
        ];
        let (gx, gy) = grid(&self.gpu, self.len.div_ceil(256) as u32);
        dispatch(
            &self.gpu,
            encoder,
            &format!("noise.{entry_point}"),
            &pipeline,
            &entries,
            (gx, gy, 1),
        );
        Ok(())
    }
}
