//! The small kernels behind the BatchNorm variants (`shaders/bn_variants.wgsl`), and the variants'
//! settings. The heavy passes stay in [`crate::ops::batchnorm::BatchNormOp`]; what is here is per channel
//! or one elementwise pass:
//!
//! - Batch Renormalization: `renorm_coef` (r, d, the output correction and the backward's weight
//!   gamma*r from the saved batch statistics and a snapshot of the running ones), `channel_affine` /
//!   `channel_scale` (apply a per-channel scale and shift in place), `renorm_dweight`.
//! - Ghost BatchNorm: `ghost_running` (one running update from the ghost batches' statistics),
//!   `sum_grad_slots` (the parameter gradients summed over ghost batches).
//! - PreciseBN: `precise_merge` (a batch's per-channel (count, mean, M2), merged into an accumulator with
//!   Chan's formula), `precise_finish` (write the running statistics).
//!
//! Reference: `src/reference/bn_variants.rs`. Tests: `tests/bn_variants.rs`. Like every op here, nothing
//! is submitted or read back; scalar arguments travel in a small buffer made per call, so several calls
//! with different values may share one submit.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::ops::kernel::{check, dispatch, entry, f32_bytes, grid, FLOAT_BITS_WGSL};
use crate::record::Record;
use crate::tensor::Layout;

const VARIANTS_WGSL: &str = include_str!("../../shaders/bn_variants.wgsl");

/// Values one invocation of `precise_merge` walks, at most, on a CPU device (lavapipe's loop limit).
const PRECISE_WALK_MAX: usize = 60_000;

/// Batch Renormalization's clipping bounds (Ioffe 2017): r in [1/rmax, rmax], d in [-dmax, dmax].
/// `rmax = 1, dmax = 0` is ordinary BatchNorm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Renorm {
    /// Bound on r = sigma_B / sigma_run; at least 1.
    pub rmax: f32,
    /// Bound on |d| = |mu_B - mu_run| / sigma_run; at least 0.
    pub dmax: f32,
}

impl Renorm {
    /// Checks the bounds.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for rmax < 1, dmax < 0 or either not finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.rmax >= 1.0 && self.rmax.is_finite()) {
            return Err(Error::config(format!(
                "renorm rmax must be finite and >= 1, got {}",
                self.rmax
            )));
        }
        if !(self.dmax >= 0.0 && self.dmax.is_finite()) {
            return Err(Error::config(format!(
                "renorm dmax must be finite and >= 0, got {}",
                self.dmax
            )));
        }
        Ok(())
    }
}

/// Batch Renormalization's schedule (Ioffe 2017, Sec. 4): plain BatchNorm (rmax 1, dmax 0) for `warmup`
/// steps, then rmax grows linearly to `rmax_final` at step `rmax_end` and dmax to `dmax_final` at step
/// `dmax_end`, staying there after. [`RenormSchedule::paper`] is the paper's ImageNet setting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenormSchedule {
    /// Steps of plain BatchNorm.
    pub warmup: u64,
    /// Step at which rmax reaches `rmax_final`.
    pub rmax_end: u64,
    /// Final rmax.
    pub rmax_final: f32,
    /// Step at which dmax reaches `dmax_final`.
    pub dmax_end: u64,
    /// Final dmax.
    pub dmax_final: f32,
}

impl RenormSchedule {
    /// The paper's: rmax 1 -> 3 and dmax 0 -> 5 after 5 000 warm-up steps, reaching them at 40 000 and
    /// 25 000 steps.
    pub fn paper() -> Self {
        RenormSchedule {
            warmup: 5_000,
            rmax_end: 40_000,
            rmax_final: 3.0,
            dmax_end: 25_000,
            dmax_final: 5.0,
        }
    }

    /// The bounds for training step `step` (counted from 0).
    pub fn at(&self, step: u64) -> Renorm {
        let ramp = |end: u64| {
            if step <= self.warmup {
                0.0
            } else if end <= self.warmup || step >= end {
                1.0
            } else {
                (step - self.warmup) as f64 / (end - self.warmup) as f64
            }
        };
        Renorm {
            rmax: (1.0 + (self.rmax_final as f64 - 1.0) * ramp(self.rmax_end)) as f32,
            dmax: (self.dmax_final as f64 * ramp(self.dmax_end)) as f32,
        }
    }
}

/// The variant kernels for one tensor shape and layout (the per-channel kernels only use C).
#[derive(Clone, Debug)]
pub struct BnVariantOp {
    gpu: Arc<Gpu>,
    c: usize,
    numel: usize,
    spatial: usize,
    per_channel: usize,
    channel_major: bool,
}

impl BnVariantOp {
    /// Kernels for inputs of `shape` in `layout`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a shape that does not fit the layout; [`Error::LimitExceeded`] for
    /// more values than 32-bit indices reach.
    pub fn new(gpu: &Arc<Gpu>, shape: &[usize], layout: Layout) -> Result<Self> {
        let dims = layout.dims(shape)?;
        if dims.numel() as u64 >= u32::MAX as u64 {
            return Err(Error::LimitExceeded {
                what: format!("elements in input {shape:?}"),
                needed: dims.numel() as u64,
                limit: u32::MAX as u64 - 1,
            });
        }
        Ok(BnVariantOp {
            gpu: gpu.clone(),
            c: dims.c,
            numel: dims.numel(),
            spatial: dims.spatial,
            per_channel: dims.per_channel(),
            channel_major: layout == Layout::Nchw,
        })
    }

    fn pipeline(
        &self,
        entry_point: &str,
        ghosts: usize,
        slot: u64,
        gslot: u64,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let prelude = format!(
            "const C: u32 = {}u;\nconst LEN: u32 = {}u;\nconst S: u32 = {}u;\nconst M: u32 = {}u;\n\
             const CHANNEL_MAJOR: bool = {};\nconst G: u32 = {ghosts}u;\nconst SLOT: u32 = {slot}u;\n\
             const GSLOT: u32 = {gslot}u;\n",
            self.c, self.numel, self.spatial, self.per_channel, self.channel_major
        );
        self.gpu.pipeline(
            &format!("bn_variants.{entry_point}.{}", prelude.replace('\n', " ")),
            entry_point,
            || format!("{prelude}{FLOAT_BITS_WGSL}{VARIANTS_WGSL}"),
        )
    }

    fn channel_groups(&self) -> (u32, u32, u32) {
        let (x, y) = grid(&self.gpu, self.c.div_ceil(64) as u32);
        (x, y, 1)
    }

    fn params(&self, values: &[f32]) -> Result<wgpu::Buffer> {
        self.gpu.upload("bn_variants.params", values)
    }

    fn chk(&self, what: &str, r: &BufferRef, values: usize) -> Result<u64> {
        let bytes = f32_bytes(values);
        check(&self.gpu, what, r, bytes)?;
        Ok(bytes)
    }

    /// Records `t = t * coef[c] + coef[C + c]` in place over the tensor (`coef`: 2C values).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] / [`Error::BadConfig`] for too small or misaligned buffers.
    pub fn record_channel_affine(
        &self,
        encoder: &mut impl Record,
        t: BufferRef,
        coef: BufferRef,
    ) -> Result<()> {
        self.elementwise(encoder, "channel_affine", t, coef, 2 * self.c)
    }

    /// Records `t = t * scale[c]` in place over the tensor (`scale`: C values).
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`].
    pub fn record_channel_scale(
        &self,
        encoder: &mut impl Record,
        t: BufferRef,
        scale: BufferRef,
    ) -> Result<()> {
        self.elementwise(encoder, "channel_scale", t, scale, self.c)
    }

    fn elementwise(
        &self,
        encoder: &mut impl Record,
        name: &str,
        t: BufferRef,
        coef: BufferRef,
        coef_len: usize,
    ) -> Result<()> {
        let tb = self.chk("tensor", &t, self.numel)?;
        let cb = self.chk("per-channel coefficients", &coef, coef_len)?;
        let pipeline = self.pipeline(name, 0, 0, 0)?;
        let (x, y) = grid(&self.gpu, self.numel.div_ceil(256) as u32);
        dispatch(
            &self.gpu,
            encoder,
            &format!("bn_variants.{name}"),
            &pipeline,
            &[entry(0, &t, tb), entry(1, &coef, cb)],
            (x, y, 1),
        );
        Ok(())
    }

    /// Records Batch Renorm's per-channel coefficients from `saved` (the forward's batch mean `[C]` then
    /// invstd `[C]`) and `snapshot` (running mean `[C]` then running var `[C]` from before the forward's
    /// update): `rd` gets r `[C]` then d `[C]`; `coef` the output correction (scale r `[C]`, shift
    /// beta*(1-r)+gamma*d `[C]`) for [`Self::record_channel_affine`]; `weff` gets gamma*r `[C]`.
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`]; [`Error::BadConfig`] for bad bounds.
    #[allow(clippy::too_many_arguments)]
    pub fn record_renorm_coef(
        &self,
        encoder: &mut impl Record,
        saved: BufferRef,
        snapshot: BufferRef,
        weight: BufferRef,
        bias: BufferRef,
        rd: BufferRef,
        coef: BufferRef,
        weff: BufferRef,
        renorm: Renorm,
        eps: f32,
    ) -> Result<()> {
        renorm.validate()?;
        let c = self.c;
        let b2 = self.chk("saved", &saved, 2 * c)?;
        self.chk("running-statistics snapshot", &snapshot, 2 * c)?;
        let b1 = self.chk("weight", &weight, c)?;
        self.chk("bias", &bias, c)?;
        self.chk("rd", &rd, 2 * c)?;
        self.chk("coef", &coef, 2 * c)?;
        self.chk("weff", &weff, c)?;
        let params = self.params(&[renorm.rmax, renorm.dmax, eps])?;
        let p = BufferRef::from(&params);
        let pipeline = self.pipeline("renorm_coef", 0, 0, 0)?;
        dispatch(
            &self.gpu,
            encoder,
            "bn_variants.renorm_coef",
            &pipeline,
            &[
                entry(1, &coef, b2),
                entry(2, &saved, b2),
                entry(3, &snapshot, b2),
                entry(4, &weight, b1),
                entry(5, &bias, b1),
                entry(6, &rd, b2),
                entry(7, &weff, b1),
                entry(12, &p, 12),
            ],
            self.channel_groups(),
        );
        Ok(())
    }

    /// Records `dweight = r * dweight + d * dbias` (Renorm's dgamma from the standard backward's sums).
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`].
    pub fn record_renorm_dweight(
        &self,
        encoder: &mut impl Record,
        rd: BufferRef,
        dweight: BufferRef,
        dbias: BufferRef,
    ) -> Result<()> {
        let b2 = self.chk("rd", &rd, 2 * self.c)?;
        let b1 = self.chk("dweight", &dweight, self.c)?;
        self.chk("dbias", &dbias, self.c)?;
        let pipeline = self.pipeline("renorm_dweight", 0, 0, 0)?;
        dispatch(
            &self.gpu,
            encoder,
            "bn_variants.renorm_dweight",
            &pipeline,
            &[
                entry(6, &rd, b2),
                entry(8, &dweight, b1),
                entry(9, &dbias, b1),
            ],
            self.channel_groups(),
        );
        Ok(())
    }

    /// Records ghost BN's running update from `ghosts` saved slots in `slots` (slot g at f32 offset
    /// `g * slot_stride`: mean `[C]` then invstd `[C]`, each over `ghost_count` values per channel):
    /// `running = (1 - factor) * running + factor * average over ghosts`, the variance unbiased.
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`]; [`Error::BadConfig`] for a factor that is not finite or fewer than
    /// two values per channel in a ghost batch.
    #[allow(clippy::too_many_arguments)]
    pub fn record_ghost_running(
        &self,
        encoder: &mut impl Record,
        slots: BufferRef,
        slot_stride: usize,
        ghosts: usize,
        ghost_count: usize,
        running_mean: BufferRef,
        running_var: BufferRef,
        factor: f32,
        eps: f32,
    ) -> Result<()> {
        if !factor.is_finite() {
            return Err(Error::config(format!(
                "running-statistics factor {factor} must be finite"
            )));
        }
        if ghost_count < 2 || ghosts == 0 || slot_stride < 2 * self.c {
            return Err(Error::config(format!(
                "ghost running update needs at least one ghost batch of two values per channel and \
                 slots of 2C values; got {ghosts} ghosts of {ghost_count}, stride {slot_stride}"
            )));
        }
        let sb = self.chk(
            "ghost saved slots",
            &slots,
            (ghosts - 1) * slot_stride + 2 * self.c,
        )?;
        let b1 = self.chk("running_mean", &running_mean, self.c)?;
        self.chk("running_var", &running_var, self.c)?;
        let m = ghost_count as f64;
        let params = self.params(&[factor, eps, (m / (m - 1.0)) as f32])?;
        let p = BufferRef::from(&params);
        let pipeline = self.pipeline("ghost_running", ghosts, slot_stride as u64, 0)?;
        dispatch(
            &self.gpu,
            encoder,
            "bn_variants.ghost_running",
            &pipeline,
            &[
                entry(2, &slots, sb),
                entry(10, &running_mean, b1),
                entry(11, &running_var, b1),
                entry(12, &p, 12),
            ],
            self.channel_groups(),
        );
        Ok(())
    }

    /// Records `dweight[c] = sum_g gw[g * stride + c]` and the same for `dbias` from `gb`.
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`].
    #[allow(clippy::too_many_arguments)]
    pub fn record_sum_grad_slots(
        &self,
        encoder: &mut impl Record,
        gw: BufferRef,
        gb: BufferRef,
        stride: usize,
        ghosts: usize,
        dweight: BufferRef,
        dbias: BufferRef,
    ) -> Result<()> {
        if ghosts == 0 || stride < self.c {
            return Err(Error::config(format!(
                "gradient slots: {ghosts} ghosts of stride {stride} for {} channels",
                self.c
            )));
        }
        let sb = self.chk("ghost dweight slots", &gw, (ghosts - 1) * stride + self.c)?;
        self.chk("ghost dbias slots", &gb, (ghosts - 1) * stride + self.c)?;
        let b1 = self.chk("dweight", &dweight, self.c)?;
        self.chk("dbias", &dbias, self.c)?;
        let pipeline = self.pipeline("sum_grad_slots", ghosts, 0, stride as u64)?;
        dispatch(
            &self.gpu,
            encoder,
            "bn_variants.sum_grad_slots",
            &pipeline,
            &[
                entry(8, &dweight, b1),
                entry(9, &dbias, b1),
                entry(14, &gw, sb),
                entry(15, &gb, sb),
            ],
            self.channel_groups(),
        );
        Ok(())
    }

    /// Records PreciseBN's merge of batch `x` into `acc` (population mean `[C]` then M2 `[C]`) that already
    /// holds `count_before` values per channel (0: `acc` is overwritten). Returns the count after. The
    /// counts stay exact on the host; the kernel gets them as f32 (exact to 2^24 values per channel,
    /// past that only the merge weights round, by ~1e-7).
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`].
    pub fn record_precise_merge(
        &self,
        encoder: &mut impl Record,
        x: BufferRef,
        acc: BufferRef,
        count_before: u64,
    ) -> Result<u64> {
        let tb = self.chk("x", &x, self.numel)?;
        let ab = self.chk("PreciseBN accumulator", &acc, 2 * self.c)?;
        // Each of the 64 invocations of a channel walks a 64th of its values: lavapipe stops an
        // invocation's loops after 65 535 iterations (ARCHITECTURE.md, "Known limits").
        let walk_max = 64 * PRECISE_WALK_MAX;
        if self.gpu.caps().cpu_device && self.per_channel > walk_max {
            return Err(Error::LimitExceeded {
                what: "values per channel in one PreciseBN batch on a CPU device (lavapipe ends a \
                       shader's loops after 65 535 iterations; merge smaller batches)"
                    .into(),
                needed: self.per_channel as u64,
                limit: walk_max as u64,
            });
        }
        let params = self.params(&[count_before as f32])?;
        let p = BufferRef::from(&params);
        let pipeline = self.pipeline("precise_merge", 0, 0, 0)?;
        let (gx, gy) = grid(&self.gpu, self.c as u32);
        dispatch(
            &self.gpu,
            encoder,
            "bn_variants.precise_merge",
            &pipeline,
            &[entry(0, &x, tb), entry(12, &p, 4), entry(13, &acc, ab)],
            (gx, gy, 1),
        );
        Ok(count_before + self.per_channel as u64)
    }

    /// Records PreciseBN's result: `running_mean = acc mean`, `running_var = acc M2 / (count - 1)`.
    ///
    /// # Errors
    /// As [`Self::record_channel_affine`]; [`Error::BadConfig`] for `count < 2`.
    pub fn record_precise_finish(
        &self,
        encoder: &mut impl Record,
        acc: BufferRef,
        count: u64,
        running_mean: BufferRef,
        running_var: BufferRef,
    ) -> Result<()> {
        if count < 2 {
            return Err(Error::config(format!(
                "PreciseBN needs at least two values per channel for an unbiased variance, got {count}"
            )));
        }
        let ab = self.chk("PreciseBN accumulator", &acc, 2 * self.c)?;
        let b1 = self.chk("running_mean", &running_mean, self.c)?;
        self.chk("running_var", &running_var, self.c)?;
        let params = self.params(&[(1.0 / (count as f64 - 1.0)) as f32])?;
        let p = BufferRef::from(&params);
        let pipeline = self.pipeline("precise_finish", 0, 0, 0)?;
        dispatch(
            &self.gpu,
            encoder,
            "bn_variants.precise_finish",
            &pipeline,
            &[
                entry(10, &running_mean, b1),
                entry(11, &running_var, b1),
                entry(12, &p, 4),
                entry(13, &acc, ab),
            ],
            self.channel_groups(),
        );
        Ok(())
    }
}
