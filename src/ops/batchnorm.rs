//! BatchNorm on the GPU: plans, pipelines and recording into a caller's command encoder.
//!
//! Kernels: `shaders/batchnorm_{common,nchw,nhwc,finalize}.wgsl`. Reference: `src/reference/batchnorm.rs`.
//! Tests: `tests/batchnorm.rs`. Benchmark: `benches/batchnorm.rs` and `batchnorm bench`.
//!
//! Plans (M = values per channel, one "pass" = one read or write of the whole tensor):
//! - **fused**: one workgroup per channel (NCHW) or per channel tile (NHWC) does the statistics, the
//!   finalization and the normalization in one dispatch; forward-train 1 dispatch, 3 passes; backward 1
//!   dispatch, 5 passes. Picked when the channels alone give the device enough workgroups.
//! - **split**: partial statistics over several workgroups per channel, a per-channel merge, then the
//!   elementwise pass; forward-train and backward 3 dispatches each. Picked when C is small against the
//!   device, and always for tensors larger than one storage binding (they are processed in chunks,
//!   each bound as its own window).
//! - **eval**: coefficients from the running statistics, then `y = (x - mean) * a + b`: 2 dispatches.
//!
//! Nothing here submits or reads back: `record_*` only records into the encoder it is given. Parameters
//! that are fixed for a plan live in a uniform buffer written once; the momentum factor is written with
//! `queue.write_buffer` when it changes, so it takes effect at the caller's next submit (record one
//! training forward of a given plan per submit when momentum is `None`).

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::tensor::{BnDims, Layout};

const COMMON_WGSL: &str = include_str!("../../shaders/batchnorm_common.wgsl");
const NCHW_WGSL: &str = include_str!("../../shaders/batchnorm_nchw.wgsl");
const NHWC_WGSL: &str = include_str!("../../shaders/batchnorm_nhwc.wgsl");
const FINALIZE_WGSL: &str = include_str!("../../shaders/batchnorm_finalize.wgsl");

/// BatchNorm hyper-parameters, PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root. Default 1e-5; must be > 0.
    pub eps: f32,
    /// Running-statistics momentum: `running = (1 - m) * running + m * batch`. `None` is the cumulative
    /// average over `num_batches_tracked`. Default `Some(0.1)`.
    pub momentum: Option<f32>,
    /// Learnable per-channel weight (gamma) and bias (beta). Default true.
    pub affine: bool,
    /// Keep running statistics and use them in eval mode. Default true.
    pub track_running_stats: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

impl BatchNormConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for eps <= 0 or not finite, or momentum outside [0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::config(format!(
                "eps must be > 0 and finite, got {}",
                self.eps
            )));
        }
        if let Some(m) = self.momentum {
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::config(format!(
                    "momentum must be in [0, 1], got {m}"
                )));
            }
        }
        Ok(())
    }
}

/// Which kernel plan to use. `Auto` lets the planner choose by shape and device; the others force a plan
/// (tests run every plan against the reference; the bench compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PlanChoice {
    /// Planner's choice.
    #[default]
    Auto,
    /// One workgroup per channel (or channel tile), one dispatch per op. Fails for tensors larger than one
    /// storage binding.
    Fused,
    /// The fused plan with each invocation keeping its values in registers between the reduction and the
    /// elementwise pass: x is read once (forward-train 2 passes, backward 3). NCHW only; fails when an
    /// invocation's share of a channel exceeds what the device can keep (see [`BatchNormOp::new`]).
    Resident,
    /// Partial reductions over `parts` workgroups per channel (per chunk), then merge, then elementwise.
    Split {
        /// Workgroups per channel (per channel tile for NHWC); `None` lets the planner choose.
        parts: Option<u32>,
    },
}

/// A buffer and a byte offset into it: where a tensor or per-channel vector starts.
#[derive(Clone, Copy, Debug)]
pub struct BufferRef<'a> {
    /// The buffer (needs STORAGE usage).
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset; a multiple of the device's `min_storage_buffer_offset_alignment` (256 on most GPUs,
    /// 32 on lavapipe) and of 16.
    pub offset: u64,
}

impl<'a> From<&'a wgpu::Buffer> for BufferRef<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        BufferRef { buffer, offset: 0 }
    }
}

/// Buffers for a forward pass. Per-channel vectors hold C f32 values; `saved` holds 2C (save_mean, then
/// save_invstd), written by every forward and read by the backward.
#[derive(Clone, Copy, Debug)]
pub struct ForwardBuffers<'a> {
    /// Input, f32, in the plan's layout.
    pub x: BufferRef<'a>,
    /// Output, same shape; must not overlap `x`.
    pub y: BufferRef<'a>,
    /// Gamma (required when the config is affine).
    pub weight: Option<BufferRef<'a>>,
    /// Beta (required when the config is affine).
    pub bias: Option<BufferRef<'a>>,
    /// Running mean (required to update or use running statistics).
    pub running_mean: Option<BufferRef<'a>>,
    /// Running (unbiased) variance.
    pub running_var: Option<BufferRef<'a>>,
    /// save_mean [C] then save_invstd [C].
    pub saved: BufferRef<'a>,
}

/// Buffers for a backward pass.
#[derive(Clone, Copy, Debug)]
pub struct BackwardBuffers<'a> {
    /// The forward's input.
    pub x: BufferRef<'a>,
    /// Gradient of the loss w.r.t. the forward's output.
    pub dy: BufferRef<'a>,
    /// Gradient w.r.t. x (written; must not overlap x or dy).
    pub dx: BufferRef<'a>,
    /// Gamma (required when affine).
    pub weight: Option<BufferRef<'a>>,
    /// What the forward saved: mean [C] then invstd [C].
    pub saved: BufferRef<'a>,
    /// Gradient w.r.t. gamma (written when affine; overwritten, not accumulated).
    pub dweight: Option<BufferRef<'a>>,
    /// Gradient w.r.t. beta.
    pub dbias: Option<BufferRef<'a>>,
}

/// A part of the tensor that fits one storage binding: whole samples (NCHW) or rows (NHWC), or, when one
/// NCHW sample exceeds a binding, channels [c_base, c_base + c_count) of one sample.
#[derive(Clone, Debug)]
struct Chunk {
    unit_begin: u64,
    units: u64,
    outer: u32,
    parts: u32,
    part_base: u32,
    c_base: u32,
    c_count: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    channels: u32,
    inner: u32,
    outer: u32,
    parts: u32,
    part_base: u32,
    total_parts: u32,
    off: u32,
    tile_cols: u32,
    col_tiles: u32,
    groups_x: u32,
    count: u32,
    flags: u32,
    eps: f32,
    momentum: f32,
    c_base: u32,
    c_count: u32,
}

/// Most units per invocation for which the planner picks the resident plan by itself. On a GPU the
/// array lives in registers. On lavapipe dynamically indexed arrays become stack memory; measured with
/// `batchnorm bench --plan fused resident` (noisy, shared machine) the resident plan did not beat two reads
/// at k = 98 and 392, so Auto keeps it to small, unrollable shares there too.
const RESIDENT_AUTO_MAX: u64 = 16;
/// Most units per invocation a forced `PlanChoice::Resident` accepts (private array size).
const RESIDENT_LIMIT: u64 = 1024;
/// Below this many elements an op is dispatch-bound: one dispatch (fused) beats three.
const SMALL: usize = 1 << 16;

const AFFINE: u32 = 1;
const UPDATE_RUNNING: u32 = 2;
const BATCH_STATS: u32 = 4;
const WRITE_GRADS: u32 = 8;

/// Parameter sets, one group of slots (chunks, then the per-channel pass) each.
#[derive(Clone, Copy)]
enum Mode {
    TrainUpdate = 0,
    TrainNoUpdate = 1,
    Eval = 2,
    BackwardBatch = 3,
    BackwardRunning = 4,
}
const MODES: usize = 5;
const SLOT: u64 = 256;
const MOMENTUM_FIELD: u64 = 13 * 4;

// Bindings each entry point uses (pipelines use the layout deduced from the shader, which holds exactly
// these). Numbers as in batchnorm_common.wgsl.
const B_STATS: &[u32] = &[0, 1, 10];
const B_NORMALIZE: &[u32] = &[0, 1, 2, 11];
const B_FORWARD_FUSED: &[u32] = &[0, 1, 2, 5, 6, 7, 8, 9];
const B_BACKWARD_REDUCE: &[u32] = &[0, 1, 3, 9, 10];
const B_BACKWARD_DX: &[u32] = &[0, 1, 3, 4, 11];
const B_BACKWARD_FUSED: &[u32] = &[0, 1, 3, 4, 5, 9, 12, 13];
const B_FINALIZE_FORWARD: &[u32] = &[0, 5, 6, 7, 8, 9, 10, 11];
const B_FINALIZE_BACKWARD: &[u32] = &[0, 5, 9, 10, 11, 12, 13];
const B_EVAL_COEF: &[u32] = &[0, 5, 6, 7, 8, 9, 11];

/// A BatchNorm kernel plan for one input shape, layout and configuration on one device.
///
/// Build it once per shape (cheap after the first: pipelines are cached on the [`Gpu`]) and record as many
/// passes as you like on any buffers of that shape.
pub struct BatchNormOp {
    gpu: Arc<Gpu>,
    shape: Vec<usize>,
    layout: Layout,
    dims: BnDims,
    config: BatchNormConfig,
    /// Values per unit (4: vec4 loads; 1: shapes not divisible by 4).
    w: u32,
    wg: u32,
    step: u32,
    fused: bool,
    /// Units each invocation keeps in registers (the resident plan), 0 otherwise.
    resident: u32,
    inner: u32,
    tile_cols: u32,
    col_tiles: u32,
    chunks: Vec<Chunk>,
    total_parts: u32,
    params: wgpu::Buffer,
    parts: wgpu::Buffer,
    coef: wgpu::Buffer,
    /// One small buffer per binding number, bound where an optional buffer is absent (distinct buffers:
    /// one buffer may not be bound read-only and read-write in one dispatch).
    dummies: Vec<wgpu::Buffer>,
    momentum_written: Mutex<Option<f32>>,
}

impl std::fmt::Debug for BatchNormOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNormOp")
            .field("shape", &self.shape)
            .field("layout", &self.layout)
            .field("plan", &self.plan_name())
            .finish()
    }
}

impl BatchNormOp {
    /// Plans BatchNorm for inputs of `shape` in `layout`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a shape that does not fit the layout; [`Error::BadConfig`] for a bad
    /// config or plan choice; [`Error::LimitExceeded`] when one sample (NCHW) or row (NHWC) exceeds the
    /// device's storage-binding limit or a count exceeds 32 bits.
    pub fn new(
        gpu: &Arc<Gpu>,
        shape: &[usize],
        layout: Layout,
        config: BatchNormConfig,
        choice: PlanChoice,
    ) -> Result<Self> {
        config.validate()?;
        let dims = layout.dims(shape)?;
        let nhwc = layout != Layout::Nchw;
        let limits = gpu.limits();
        if dims.numel() as u64 >= u32::MAX as u64 {
            return Err(Error::LimitExceeded {
                what: format!("elements in input {shape:?}"),
                needed: dims.numel() as u64,
                limit: u32::MAX as u64 - 1,
            });
        }
        let vector_axis = if nhwc { dims.c } else { dims.spatial };
        let w: u32 = if vector_axis % 4 == 0 { 4 } else { 1 };
        let wg: u32 = 64;
        let caps = gpu.caps();
        // Lavapipe vectorizes across invocations but streams best when each invocation walks consecutive
        // units; GPUs want adjacent invocations on adjacent addresses.
        let step = if caps.cpu_device { 1 } else { wg };
        let target_groups: u64 = if caps.cpu_device { 16 } else { 1024 };
        let bpu = 4 * w as u64;
        let align = limits.min_storage_buffer_offset_alignment as u64;
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_units = (binding_limit.saturating_sub(align)) / bpu;

        let (inner, outer_total, units_per_outer) = if nhwc {
            let inner = dims.c as u64 / w as u64;
            (inner, (dims.n * dims.spatial) as u64, inner)
        } else {
            let inner = dims.spatial as u64 / w as u64;
            (inner, dims.n as u64, dims.c as u64 * inner)
        };
        let outer_per_chunk = max_units / units_per_outer;
        // NCHW samples larger than a binding are cut into channel ranges; one plane (NCHW) or one row
        // (NHWC) must fit.
        let channels_per_chunk = if nhwc { 0 } else { max_units / inner.max(1) };
        if outer_per_chunk == 0 && (nhwc || channels_per_chunk == 0) {
            return Err(Error::LimitExceeded {
                what: format!(
                    "one {} of the input ({} bytes) in one storage binding",
                    if nhwc { "row" } else { "channel plane" },
                    if nhwc {
                        units_per_outer * bpu
                    } else {
                        inner * bpu
                    }
                ),
                needed: if nhwc { units_per_outer } else { inner } * bpu + align,
                limit: binding_limit,
            });
        }
        let (tile_cols, col_tiles) = if nhwc {
            let tile = inner.min(wg as u64);
            (tile as u32, inner.div_ceil(tile) as u32)
        } else {
            (1, 1)
        };
        let lanes = (wg / tile_cols) as u64;
        let columns = if nhwc {
            col_tiles as u64
        } else {
            dims.c as u64
        };
        // Workgroups per channel (column tile) for a chunk of `outer` samples/rows.
        let auto_parts = |outer: u64| -> u64 {
            let per_channel_units = if nhwc { outer } else { outer * inner };
            let per_group_min = if nhwc { lanes * 4 } else { wg as u64 * 4 };
            let useful = per_channel_units.div_ceil(per_group_min).max(1);
            target_groups.div_ceil(columns).clamp(1, useful)
        };
        let n_chunks = if outer_per_chunk > 0 {
            outer_total.div_ceil(outer_per_chunk)
        } else {
            outer_total * (dims.c as u64).div_ceil(channels_per_chunk)
        };
        // Units per invocation if one workgroup takes a whole channel; the resident plan keeps them in a
        // private array. Lavapipe spills such arrays to (cached) stack memory, which is still far cheaper
        // than its lane-by-lane buffer loads; GPUs keep a few in registers.
        let resident_k = (outer_total * inner).div_ceil(wg as u64);
        let resident_ok = |max: u64| !nhwc && n_chunks == 1 && resident_k <= max;
        let fused = match choice {
            PlanChoice::Resident => {
                if !resident_ok(RESIDENT_LIMIT) {
                    return Err(Error::config(format!(
                        "the resident plan needs NCHW in one storage binding with at most {RESIDENT_LIMIT} \
                         units per invocation; {shape:?} ({}) needs {resident_k} in {n_chunks} chunk(s)",
                        layout.name()
                    )));
                }
                true
            }
            PlanChoice::Fused => {
                if n_chunks > 1 {
                    return Err(Error::config(format!(
                        "the fused plan needs the input in one storage binding; {shape:?} needs {n_chunks}"
                    )));
                }
                true
            }
            PlanChoice::Split { parts: Some(0) } => {
                return Err(Error::config("split plan with 0 parts"));
            }
            PlanChoice::Split { .. } => false,
            PlanChoice::Auto => {
                n_chunks == 1
                    && (auto_parts(outer_total) == 1
                        || resident_ok(RESIDENT_AUTO_MAX)
                        || dims.numel() <= SMALL)
            }
        };
        let resident = match choice {
            PlanChoice::Resident => resident_k as u32,
            PlanChoice::Auto if fused && resident_ok(RESIDENT_AUTO_MAX) => resident_k as u32,
            _ => 0,
        };
        let parts_for = |outer: u64| -> u64 {
            if fused {
                1
            } else if let PlanChoice::Split { parts: Some(p) } = choice {
                (p as u64).min(if nhwc { outer } else { outer * inner })
            } else {
                auto_parts(outer)
            }
        };
        let mut chunks = Vec::new();
        let mut part_base = 0u64;
        if outer_per_chunk > 0 {
            let mut outer_begin = 0u64;
            while outer_begin < outer_total {
                let outer = outer_per_chunk.min(outer_total - outer_begin);
                let parts = parts_for(outer);
                chunks.push(Chunk {
                    unit_begin: outer_begin * units_per_outer,
                    units: outer * units_per_outer,
                    outer: outer as u32,
                    parts: parts as u32,
                    part_base: part_base as u32,
                    c_base: 0,
                    c_count: dims.c as u32,
                });
                part_base += parts;
                outer_begin += outer;
            }
        } else {
            // Each chunk is a channel range of one sample; its parts take their own slots, and the
            // slots of channels outside the range are cleared before every pass.
            let c = dims.c as u64;
            for n in 0..outer_total {
                let mut c0 = 0u64;
                while c0 < c {
                    let count = channels_per_chunk.min(c - c0);
                    let parts = parts_for(1);
                    chunks.push(Chunk {
                        unit_begin: (n * c + c0) * inner,
                        units: count * inner,
                        outer: 1,
                        parts: parts as u32,
                        part_base: part_base as u32,
                        c_base: c0 as u32,
                        c_count: count as u32,
                    });
                    part_base += parts;
                    c0 += count;
                }
            }
        }
        let total_parts = part_base as u32;

        let params = gpu.create_buffer(
            "batchnorm params",
            SLOT * (MODES * (chunks.len() + 1)) as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let parts = gpu.create_buffer(
            "batchnorm partial statistics",
            16 * total_parts as u64 * dims.c as u64,
            storage_usage(),
        )?;
        let coef = gpu.create_buffer(
            "batchnorm coefficients",
            16 * dims.c as u64,
            storage_usage(),
        )?;
        let dummies = (0..14)
            .map(|_| gpu.create_buffer("batchnorm absent binding", SLOT, storage_usage()))
            .collect::<Result<Vec<_>>>()?;
        let op = BatchNormOp {
            gpu: gpu.clone(),
            shape: shape.to_vec(),
            layout,
            dims,
            config,
            w,
            wg,
            step,
            fused,
            resident,
            inner: inner as u32,
            tile_cols,
            col_tiles,
            chunks,
            total_parts,
            params,
            parts,
            coef,
            dummies,
            momentum_written: Mutex::new(None),
        };
        op.write_params(config.momentum.unwrap_or(0.0));
        Ok(op)
    }

    /// "fused" or "split(P parts, K chunks)": what runs, for logs and the bench.
    pub fn plan_name(&self) -> String {
        if self.resident > 0 {
            format!("resident (k{}, w{})", self.resident, self.w)
        } else if self.fused {
            format!("fused (w{})", self.w)
        } else {
            format!(
                "split ({} parts, {} chunk{}, w{})",
                self.chunks[0].parts,
                self.chunks.len(),
                if self.chunks.len() == 1 { "" } else { "s" },
                self.w
            )
        }
    }

    /// Dispatches recorded by one forward-train, forward-eval and backward.
    pub fn dispatch_counts(&self) -> (usize, usize, usize) {
        let k = self.chunks.len();
        if self.fused {
            (1, 2, 1)
        } else {
            (2 * k + 1, 1 + k, 2 * k + 1)
        }
    }

    /// The input shape this plan was built for.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The layout this plan was built for.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// N, C and the spatial size.
    pub fn dims(&self) -> BnDims {
        self.dims
    }

    /// The configuration this plan was built for.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn slot(&self, mode: Mode, index: usize) -> u64 {
        (mode as usize * (self.chunks.len() + 1) + index) as u64
    }

    fn fold(groups: u32) -> (u32, u32) {
        let x = groups.clamp(1, 65_535);
        (x, groups.div_ceil(x).max(1))
    }

    fn write_params(&self, momentum: f32) {
        let c = self.dims.c as u32;
        let mut bytes = vec![0u8; self.params.size() as usize];
        let modes = [
            (Mode::TrainUpdate, UPDATE_RUNNING),
            (Mode::TrainNoUpdate, 0),
            (Mode::Eval, 0),
            (Mode::BackwardBatch, BATCH_STATS),
            (Mode::BackwardRunning, 0),
        ];
        let affine = if self.config.affine {
            AFFINE | WRITE_GRADS
        } else {
            0
        };
        for (mode, flags) in modes {
            for index in 0..=self.chunks.len() {
                let (c_base, c_count) = self
                    .chunks
                    .get(index)
                    .map_or((0, c), |ch| (ch.c_base, ch.c_count));
                let (outer, parts, part_base, off, groups) = match self.chunks.get(index) {
                    Some(ch) => {
                        let bpu = 4 * self.w as u64;
                        let align = self.align();
                        let off = ((ch.unit_begin * bpu) % align) / bpu;
                        let columns = if self.layout == Layout::Nchw {
                            ch.c_count
                        } else {
                            self.col_tiles
                        };
                        (
                            ch.outer,
                            ch.parts,
                            ch.part_base,
                            off as u32,
                            ch.parts * columns,
                        )
                    }
                    None => (0, 0, 0, 0, c.div_ceil(64)),
                };
                let p = Params {
                    channels: c,
                    inner: self.inner,
                    outer,
                    parts,
                    part_base,
                    total_parts: self.total_parts,
                    off,
                    tile_cols: self.tile_cols,
                    col_tiles: self.col_tiles,
                    groups_x: Self::fold(groups).0,
                    count: self.dims.per_channel() as u32,
                    flags: flags | affine,
                    eps: self.config.eps,
                    momentum,
                    c_base,
                    c_count,
                };
                let at = (self.slot(mode, index) * SLOT) as usize;
                bytes[at..at + std::mem::size_of::<Params>()]
                    .copy_from_slice(bytemuck::bytes_of(&p));
            }
        }
        self.gpu.queue.write_buffer(&self.params, 0, &bytes);
        *self
            .momentum_written
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(momentum);
    }

    fn set_momentum(&self, momentum: f32) {
        let mut last = self
            .momentum_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *last == Some(momentum) {
            return;
        }
        for index in 0..=self.chunks.len() {
            let at = self.slot(Mode::TrainUpdate, index) * SLOT + MOMENTUM_FIELD;
            self.gpu
                .queue
                .write_buffer(&self.params, at, bytemuck::bytes_of(&momentum));
        }
        *last = Some(momentum);
    }

    /// Chunks that are channel ranges of one sample leave other channels' partial slots unwritten: zero
    /// them (count 0 merges as nothing) before the reductions.
    fn clear_uncovered_parts(&self, encoder: &mut wgpu::CommandEncoder) {
        if !self.fused
            && self
                .chunks
                .iter()
                .any(|ch| ch.c_count as usize != self.dims.c)
        {
            encoder.clear_buffer(&self.parts, 0, None);
        }
    }

    fn align(&self) -> u64 {
        self.gpu.limits().min_storage_buffer_offset_alignment as u64
    }

    fn pipeline(&self, entry: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let per_channel = matches!(
            entry,
            "finalize_forward" | "finalize_backward" | "eval_coef"
        );
        let (family, body) = if per_channel {
            ("finalize", FINALIZE_WGSL)
        } else if self.layout == Layout::Nchw {
            ("nchw", NCHW_WGSL)
        } else {
            ("nhwc", NHWC_WGSL)
        };
        // K sizes the resident kernels' private arrays; other entry points do not depend on it.
        let k = if entry.ends_with("_resident") {
            self.resident
        } else {
            1
        };
        let key = format!(
            "batchnorm_{family}.{entry} w{} wg{} step{} k{k}",
            self.w, self.wg, self.step
        );
        let (w, wg, step) = (self.w, self.wg, self.step);
        self.gpu.pipeline(&key, entry, || {
            format!("{}\n{COMMON_WGSL}\n{body}", prelude(w, wg, step, k))
        })
    }

    fn check_ref(&self, what: &str, r: &BufferRef, bytes: u64) -> Result<()> {
        // Chunk windows start at multiples of the alignment; vec4 units need 16-byte offsets too.
        crate::ops::kernel::check_region(what, r, bytes, self.align().max(16))
    }

    fn tensor_bytes(&self) -> u64 {
        4 * self.dims.numel() as u64
    }

    fn channel_bytes(&self) -> u64 {
        4 * self.dims.c as u64
    }

    fn check_disjoint(what: &str, a: &BufferRef, b: &BufferRef, bytes: u64) -> Result<()> {
        if a.buffer == b.buffer && a.offset < b.offset + bytes && b.offset < a.offset + bytes {
            return Err(Error::config(format!(
                "{what} overlap in one buffer; in-place BatchNorm is not supported"
            )));
        }
        Ok(())
    }

    fn require<'a>(
        &self,
        what: &str,
        r: Option<BufferRef<'a>>,
        bytes: u64,
    ) -> Result<BufferRef<'a>> {
        let r =
            r.ok_or_else(|| Error::config(format!("{what} is required by this configuration")))?;
        self.check_ref(what, &r, bytes)?;
        Ok(r)
    }

    /// Records forward with batch statistics: per-channel mean and biased variance, save_mean and
    /// save_invstd into `saved`, y = (x - mean) * invstd * weight + bias. With `running_factor: Some(f)`
    /// the running statistics are updated, `running = (1 - f) * running + f * batch` (unbiased variance);
    /// f is the momentum, or 1/num_batches_tracked for the cumulative average ([`crate::nn::BatchNorm`]
    /// does this bookkeeping).
    ///
    /// # Errors
    /// [`Error::OneValuePerChannel`] when M = 1; [`Error::BadConfig`] / [`Error::ShapeMismatch`] for
    /// missing, misaligned, too small or overlapping buffers; pipeline errors.
    pub fn record_forward_train(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &ForwardBuffers,
        running_factor: Option<f32>,
    ) -> Result<()> {
        if self.dims.per_channel() <= 1 {
            return Err(Error::OneValuePerChannel {
                shape: self.shape.clone(),
                count: self.dims.per_channel(),
            });
        }
        let set = self.forward_set(bufs, running_factor.is_some(), false)?;
        let mode = match running_factor {
            Some(f) => {
                if !(0.0..=1.0).contains(&f) {
                    return Err(Error::config(format!(
                        "running-statistics factor {f} outside [0, 1]"
                    )));
                }
                self.set_momentum(f);
                Mode::TrainUpdate
            }
            None => Mode::TrainNoUpdate,
        };
        self.clear_uncovered_parts(encoder);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("batchnorm forward-train"),
            timestamp_writes: None,
        });
        if self.fused {
            self.dispatch(
                &mut pass,
                "forward_fused",
                B_FORWARD_FUSED,
                mode,
                Some(0),
                &set,
            )?;
        } else {
            for k in 0..self.chunks.len() {
                self.dispatch(&mut pass, "stats", B_STATS, mode, Some(k), &set)?;
            }
            self.dispatch(
                &mut pass,
                "finalize_forward",
                B_FINALIZE_FORWARD,
                mode,
                None,
                &set,
            )?;
            for k in 0..self.chunks.len() {
                self.dispatch(&mut pass, "normalize", B_NORMALIZE, mode, Some(k), &set)?;
            }
        }
        Ok(())
    }

    /// Records forward with the running statistics: y = (x - running_mean) / sqrt(running_var + eps) *
    /// weight + bias; also writes the mean/invstd used into `saved` for a backward in eval mode.
    ///
    /// # Errors
    /// As [`Self::record_forward_train`]; running statistics are required.
    pub fn record_forward_eval(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &ForwardBuffers,
    ) -> Result<()> {
        let set = self.forward_set(bufs, true, true)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("batchnorm forward-eval"),
            timestamp_writes: None,
        });
        self.dispatch(&mut pass, "eval_coef", B_EVAL_COEF, Mode::Eval, None, &set)?;
        for k in 0..self.chunks.len() {
            self.dispatch(
                &mut pass,
                "normalize",
                B_NORMALIZE,
                Mode::Eval,
                Some(k),
                &set,
            )?;
        }
        Ok(())
    }

    /// Records the backward: dbias = sum(dy), dweight = sum(dy * xhat) (both reductions in one pass over
    /// x and dy), then dx. `batch_stats` says whether the forward normalized with batch statistics (then dx
    /// carries the terms through the mean and variance) or with running statistics (dx = weight*invstd*dy).
    ///
    /// # Errors
    /// As [`Self::record_forward_train`].
    pub fn record_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &BackwardBuffers,
        batch_stats: bool,
    ) -> Result<()> {
        let tb = self.tensor_bytes();
        let cb = self.channel_bytes();
        self.check_ref("x", &bufs.x, tb)?;
        self.check_ref("dy", &bufs.dy, tb)?;
        self.check_ref("dx", &bufs.dx, tb)?;
        self.check_ref("saved", &bufs.saved, 2 * cb)?;
        Self::check_disjoint("dx and x", &bufs.dx, &bufs.x, tb)?;
        Self::check_disjoint("dx and dy", &bufs.dx, &bufs.dy, tb)?;
        let mut set = BindSet::new(self);
        set.tensor[1] = Some(bufs.x);
        set.tensor[3] = Some(bufs.dy);
        set.tensor[4] = Some(bufs.dx);
        set.channel[9] = Some((bufs.saved, 2 * cb));
        if self.config.affine {
            set.channel[5] = Some((self.require("weight", bufs.weight, cb)?, cb));
            set.channel[12] = Some((self.require("dweight", bufs.dweight, cb)?, cb));
            set.channel[13] = Some((self.require("dbias", bufs.dbias, cb)?, cb));
        }
        let mode = if batch_stats {
            Mode::BackwardBatch
        } else {
            Mode::BackwardRunning
        };
        self.clear_uncovered_parts(encoder);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("batchnorm backward"),
            timestamp_writes: None,
        });
        if self.fused {
            self.dispatch(
                &mut pass,
                "backward_fused",
                B_BACKWARD_FUSED,
                mode,
                Some(0),
                &set,
            )?;
        } else {
            for k in 0..self.chunks.len() {
                self.dispatch(
                    &mut pass,
                    "backward_reduce",
                    B_BACKWARD_REDUCE,
                    mode,
                    Some(k),
                    &set,
                )?;
            }
            self.dispatch(
                &mut pass,
                "finalize_backward",
                B_FINALIZE_BACKWARD,
                mode,
                None,
                &set,
            )?;
            for k in 0..self.chunks.len() {
                self.dispatch(&mut pass, "backward_dx", B_BACKWARD_DX, mode, Some(k), &set)?;
            }
        }
        Ok(())
    }

    fn forward_set<'a>(
        &'a self,
        bufs: &ForwardBuffers<'a>,
        need_running: bool,
        eval: bool,
    ) -> Result<BindSet<'a>> {
        let tb = self.tensor_bytes();
        let cb = self.channel_bytes();
        self.check_ref("x", &bufs.x, tb)?;
        self.check_ref("y", &bufs.y, tb)?;
        self.check_ref("saved", &bufs.saved, 2 * cb)?;
        Self::check_disjoint("y and x", &bufs.y, &bufs.x, tb)?;
        let mut set = BindSet::new(self);
        set.tensor[1] = Some(bufs.x);
        set.tensor[2] = Some(bufs.y);
        set.channel[9] = Some((bufs.saved, 2 * cb));
        if self.config.affine {
            set.channel[5] = Some((self.require("weight", bufs.weight, cb)?, cb));
            set.channel[6] = Some((self.require("bias", bufs.bias, cb)?, cb));
        }
        if need_running {
            let what = if eval {
                "running statistics for eval"
            } else {
                "running statistics"
            };
            set.channel[7] = Some((
                self.require(&format!("running_mean ({what})"), bufs.running_mean, cb)?,
                cb,
            ));
            set.channel[8] = Some((
                self.require(&format!("running_var ({what})"), bufs.running_var, cb)?,
                cb,
            ));
        }
        Ok(set)
    }

    fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass,
        entry: &str,
        bindings: &[u32],
        mode: Mode,
        chunk: Option<usize>,
        set: &BindSet,
    ) -> Result<()> {
        let pipeline = self.pipeline(entry)?;
        let index = chunk.unwrap_or(self.chunks.len());
        let slot = self.slot(mode, index);
        let mut entries = Vec::with_capacity(bindings.len());
        for &b in bindings {
            let binding = match b {
                0 => wgpu::BufferBinding {
                    buffer: &self.params,
                    offset: slot * SLOT,
                    size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
                },
                1..=4 => {
                    let r = set.tensor[b as usize].ok_or_else(|| {
                        Error::config(format!("internal: tensor binding {b} missing for {entry}"))
                    })?;
                    let ch = &self.chunks[chunk.unwrap_or(0)];
                    let bpu = 4 * self.w as u64;
                    let start = ch.unit_begin * bpu;
                    let window = start - start % self.align();
                    let size = start - window + ch.units * bpu;
                    wgpu::BufferBinding {
                        buffer: r.buffer,
                        offset: r.offset + window,
                        size: wgpu::BufferSize::new(size),
                    }
                }
                10 => self.parts.as_entire_buffer_binding(),
                11 => self.coef.as_entire_buffer_binding(),
                _ => match set.channel[b as usize] {
                    Some((r, bytes)) => wgpu::BufferBinding {
                        buffer: r.buffer,
                        offset: r.offset,
                        size: wgpu::BufferSize::new(bytes),
                    },
                    None => self.dummies[b as usize].as_entire_buffer_binding(),
                },
            };
            entries.push(wgpu::BindGroupEntry {
                binding: b,
                resource: wgpu::BindingResource::Buffer(binding),
            });
        }
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        let groups = match chunk {
            Some(k) => {
                let columns = if self.layout == Layout::Nchw {
                    self.chunks[k].c_count
                } else {
                    self.col_tiles
                };
                self.chunks[k].parts * columns
            }
            None => (self.dims.c as u32).div_ceil(64),
        };
        let (gx, gy) = Self::fold(groups);
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
        Ok(())
    }
}

/// The buffers of one recorded op, by binding number.
struct BindSet<'a> {
    tensor: [Option<BufferRef<'a>>; 5],
    channel: [Option<(BufferRef<'a>, u64)>; 14],
}

impl<'a> BindSet<'a> {
    fn new(_op: &BatchNormOp) -> Self {
        BindSet {
            tensor: [None; 5],
            channel: [None; 14],
        }
    }
}

/// The WGSL prelude that specializes the kernels: workgroup size, values per unit, access pattern.
fn prelude(w: u32, wg: u32, step: u32, k: u32) -> String {
    let vector = if w == 4 {
        "alias V = vec4<f32>;\n\
         fn hsum(v: V) -> f32 { return (v.x + v.y) + (v.z + v.w); }\n\
         fn elem(v: V, i: u32) -> f32 { return v[i]; }\n\
         fn set_elem(v: V, i: u32, s: f32) -> V { var r = v; r[i] = s; return r; }\n"
    } else {
        "alias V = f32;\n\
         fn hsum(v: V) -> f32 { return v; }\n\
         fn elem(v: V, i: u32) -> f32 { return v; }\n\
         fn set_elem(v: V, i: u32, s: f32) -> V { return s; }\n"
    };
    format!(
        "const WG: u32 = {wg}u;\nconst W: u32 = {w}u;\nconst STEP: u32 = {step}u;\nconst K: u32 = {k}u;\n{vector}"
    )
}
