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
//! Variants ([`OpOptions`], [`BatchNormOp::with_options`]): f16 storage (native or packed in u32 words)
//! and a fused ReLU whose mask is kept as bits; where a kernel would share a word between invocations
//! (the mask, packed f16 of odd-length planes) the elementwise pass runs in
//! `shaders/batchnorm_words.wgsl`, one 32-element block per invocation.
//!
//! Nothing here submits or reads back: `record_*` only records into the encoder it is given. Parameters
//! that are fixed for a plan live in a read-only storage buffer written once (not a uniform buffer:
//! lavapipe recompiles, and leaks, a shader variant per dispatch for uniforms it can inline; see
//! `shaders/batchnorm_common.wgsl`); the momentum factor is written with
//! `queue.write_buffer` when it changes, so it takes effect at the caller's next submit (record one
//! training forward of a given plan per submit when momentum is `None`).

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::ops::kernel::FLOAT_BITS_WGSL;
use crate::record::Record;
use crate::tensor::{BnDims, DType, Layout};

const COMMON_WGSL: &str = include_str!("../../shaders/batchnorm_common.wgsl");
/// The params declaration in batchnorm_common.wgsl, replaced on devices that take it as a uniform.
const PARAMS_AS_STORAGE: &str = "var<storage, read> params: Params;";
const NCHW_WGSL: &str = include_str!("../../shaders/batchnorm_nchw.wgsl");
const NHWC_WGSL: &str = include_str!("../../shaders/batchnorm_nhwc.wgsl");
const NHWC_WIDE_WGSL: &str = include_str!("../../shaders/batchnorm_nhwc_wide.wgsl");
const FINALIZE_WGSL: &str = include_str!("../../shaders/batchnorm_finalize.wgsl");
const WORDS_WGSL: &str = include_str!("../../shaders/batchnorm_words.wgsl");

/// BatchNorm hyper-parameters, PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root. Default 1e-5; finite and >= 0, and > 0 for a forward
    /// with batch statistics (PyTorch's rule: 0 only in eval, with the running statistics).
    pub eps: f32,
    /// Running-statistics momentum: `running = (1 - m) * running + m * batch`. `None` is the cumulative
    /// average over `num_batches_tracked`. Default `Some(0.1)`. Any finite value, as PyTorch allows: 1 keeps
    /// only the last batch, values outside [0, 1] extrapolate by the same formula.
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
    /// [`Error::BadConfig`] for eps negative or not finite, or a momentum that is not finite. As in PyTorch,
    /// eps = 0 is a valid setting (for the running statistics: see
    /// [`Self::check_eps_for_batch_stats`]) and any finite momentum is.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(Error::config(format!(
                "eps must be >= 0 and finite, got {}",
                self.eps
            )));
        }
        if let Some(m) = self.momentum {
            if !m.is_finite() {
                return Err(Error::config(format!("momentum must be finite, got {m}")));
            }
        }
        Ok(())
    }

    /// PyTorch's rule for a forward with batch statistics (training, or no running statistics): eps must
    /// be > 0 there, since a channel of equal values would divide by zero; eps = 0 only normalizes with
    /// the running statistics (eval).
    ///
    /// # Errors
    /// [`Error::BadConfig`] when eps is not > 0.
    pub fn check_eps_for_batch_stats(&self) -> Result<()> {
        if self.eps > 0.0 {
            Ok(())
        } else {
            Err(Error::config(format!(
                "eps must be > 0 to normalize with batch statistics (training, or \
                 track_running_stats=false), as in PyTorch; got {}",
                self.eps
            )))
        }
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

/// How the split plan's per-channel pass merges the partial statistics of a channel's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Merge {
    /// One invocation per channel walks every part (`finalize_forward` / `finalize_backward`): cheapest
    /// on CPU drivers, where a workgroup barrier is dear.
    Invocation,
    /// One workgroup of 64 per channel: each invocation merges every 64th part, then a tree
    /// (`finalize_forward_wg` / `finalize_backward_wg`). On GPUs a walk over many parts is a chain of
    /// dependent loads: NHWC with 1024 parts took 0.4–3.5 ms on an H200 that way.
    Workgroup,
}

/// How f16 tensors reach the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum F16Path {
    /// `enable f16` on a GPU with SHADER_F16; packed words otherwise, and on CPU devices: lavapipe loads
    /// storage lane by lane, at most 16 bytes per lane and load, so a `vec4<u32>` of packed words carries
    /// 8 halves where a `vec4<f16>` carries 4 (`batchnorm bench --dtype f16-native f16-packed`; packed,
    /// in units of 8 where the contiguous axis allows, is the faster).
    #[default]
    Auto,
    /// `enable f16` (f16 storage types); [`Error::BadConfig`] on a device without SHADER_F16.
    Native,
    /// Two f16 per u32 word, converted by integer operations (`pack_half2`/`unpack_half2`, round to
    /// nearest even): works on every device. Forcing it on a device with SHADER_F16 tests the fallback.
    Packed,
}

/// What an op stores and fuses, beyond the PyTorch configuration. The default is f32 without ReLU, which
/// is what [`BatchNormOp::new`] plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OpOptions {
    /// Element type of x, y, dy and dx. Statistics, parameters and accumulation stay f32. f16 tensors
    /// occupy 2 bytes per element, rounded up to a whole 4-byte word.
    pub dtype: DType,
    /// For `DType::F16`: native f16 or packed words.
    pub f16_path: F16Path,
    /// y = relu(bn(x)) with the ReLU mask kept as bits (`record_*_relu`), and the backward applying the
    /// mask to dy inside its reductions and dx.
    pub fuse_relu: bool,
    /// y = sigmoid(bn(x)): the logistic sigmoid applied as every forward kernel stores y (saves the
    /// sigmoid's own pass). Forward only: the backward is BatchNorm's own and takes the gradient of
    /// bn(x), not of y, which a caller gets from y as dy ⊙ y ⊙ (1 − y) (a `Sequential` does: in the
    /// next Linear's dx product or the Sigmoid's backward). Not with `fuse_relu`.
    pub sigmoid: bool,
}

/// Storage buffers the fused-ReLU backward kernel binds in one dispatch (`backward_fused`: the nine of the
/// plain fused kernels plus the mask). WebGPU's default `max_storage_buffers_per_shader_stage` is 8 and
/// most adapters offer far more; a device opened with fewer than this cannot fuse the ReLU.
pub const FUSED_RELU_STORAGE_BUFFERS: u32 = 10;

/// Storage buffers the plain fused kernels bind (`forward_fused`: params, x, y, weight, bias, the running
/// statistics, saved and the partial statistics). A device that allows fewer (WebGPU's default is 8)
/// gets the plan's parameters as a uniform buffer instead, which leaves 8: see [`params_as_uniform`].
pub const FUSED_STORAGE_BUFFERS: u32 = 9;

/// Whether BatchNorm binds its plan's parameters as a uniform buffer rather than a read-only storage
/// buffer: only where the device allows fewer than [`FUSED_STORAGE_BUFFERS`] storage buffers per stage (a
/// caller's device opened with WebGPU's default limits). Storage is the rule because lavapipe recompiles
/// a shader for the values of the uniforms it branches on (see batchnorm_common.wgsl); on such a device
/// lavapipe is correct but slow.
pub fn params_as_uniform(gpu: &Gpu) -> bool {
    gpu.limits().max_storage_buffers_per_shader_stage < FUSED_STORAGE_BUFFERS
}

impl OpOptions {
    /// Checks that `gpu` can run these options: an f16 path only for f16 tensors, `F16Path::Native` only
    /// with SHADER_F16, and the fused ReLU only with [`FUSED_RELU_STORAGE_BUFFERS`] storage buffers per
    /// shader stage.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for an f16 path on f32 tensors or `Native` without SHADER_F16, and for
    /// `sigmoid` with `fuse_relu`;
    /// [`Error::LimitExceeded`] for `fuse_relu` on a device with too few storage buffers per stage.
    pub fn check(&self, gpu: &Gpu) -> Result<()> {
        self.storage(gpu)?;
        if self.sigmoid && self.fuse_relu {
            return Err(Error::config(
                "an op fuses either a ReLU or a sigmoid into its output, not both",
            ));
        }
        let have = gpu.limits().max_storage_buffers_per_shader_stage;
        if self.fuse_relu && have < FUSED_RELU_STORAGE_BUFFERS {
            return Err(Error::LimitExceeded {
                what: "storage buffers per shader stage for the fused BN+ReLU backward".into(),
                needed: FUSED_RELU_STORAGE_BUFFERS as u64,
                limit: have as u64,
            });
        }
        Ok(())
    }

    fn storage(&self, gpu: &Gpu) -> Result<Storage> {
        Ok(match (self.dtype, self.f16_path) {
            (DType::F32, F16Path::Auto) => Storage::F32,
            (DType::F32, path) => {
                return Err(Error::config(format!(
                    "f16_path {path:?} applies to f16 tensors; this op's dtype is f32"
                )))
            }
            (DType::F16, F16Path::Native) if !gpu.caps().shader_f16 => {
                return Err(Error::config(
                    "f16_path Native needs the SHADER_F16 feature, which this device lacks",
                ))
            }
            (DType::F16, F16Path::Native) => Storage::F16,
            (DType::F16, F16Path::Auto) if gpu.caps().shader_f16 && !gpu.caps().cpu_device => {
                Storage::F16
            }
            (DType::F16, _) => Storage::F16Packed,
        })
    }
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
    /// save_mean `[C]` then save_invstd `[C]`.
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
    /// What the forward saved: mean `[C]` then invstd `[C]`.
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
    win_elem: u32,
    block_base: u32,
    blocks: u32,
    numel: u32,
    words_groups_x: u32,
    columns: u32,
    col_group: u32,
}

/// Most units per invocation for which the planner picks the resident plan by itself. On a GPU the
/// array lives in registers. On lavapipe dynamically indexed arrays become stack memory; measured with
/// `batchnorm bench --plan fused resident` (noisy, shared machine) the resident plan did not beat two reads
/// at k = 98 and 392, so Auto keeps it to small, unrollable shares there too.
const RESIDENT_AUTO_MAX: u64 = 16;
/// Most units per invocation a forced `PlanChoice::Resident` accepts (private array size).
const RESIDENT_LIMIT: u64 = 1024;
/// Units per invocation of the wide channel-last kernels (8 units: 128 contiguous bytes of f32 per row).
const WIDE_UNITS: u32 = 8;
/// Fewest elements for which NCHW with planes 4 does not divide is viewed as rows (three dispatches of the
/// wide kernels instead of one fused plane kernel): measured on lavapipe, 32×64×7×7 (100 K) lost 0.7 ms
/// forward-train that way, 64×128×13×13 (1.4 M) gained 25–30 % on every op.
const ROWS_VIEW_MIN: usize = 1 << 20;
/// Largest plane the rows view takes: each plane position is a column whose partials the per-channel pass
/// merges one after another (in blocks of 32); past a few thousand links the merged statistics lose
/// digits the plane kernels keep (at 1 221 columns × 2 parts, 8e-6 against 3e-7 before the blocks).
const ROWS_VIEW_MAX_PLANE: usize = 1024;
/// Below this many elements an op is dispatch-bound: one dispatch (fused) beats three.
const SMALL: usize = 1 << 16;
/// Units one invocation walks per pass, at most. Lavapipe (Mesa's gallivm) ends every loop of a shader
/// invocation once the invocation has run 65 535 loop iterations in all (`LP_MAX_TGSI_LOOP_ITERATIONS`,
/// one counter shared by every loop), silently: past it a walk stops short and its values are never
/// read or written. A unit costs a walk up to ~2 iterations (a plane run of one value is a loop of one
/// inside a loop), and a kernel walks at most twice, so 8 192 units keep a kernel under half the limit.
/// The automatic plan takes enough parts to stay under it; a forced plan that would not is refused on
/// CPU devices. GPUs have no such limit.
const WALK_MAX: u64 = 8192;
/// Loop iterations of the per-channel pass (`finalize_*`: every part's slots) allowed on a CPU device.
const FINALIZE_ITERATIONS_MAX: u64 = 32_768;
/// Links (part slots) of a channel from which a GPU merges them in a workgroup ([`Merge::Workgroup`]).
const MERGE_WG_MIN_LINKS: u64 = 64;
/// Units one invocation may walk per pass for the automatic plan to pick the fused plan on a GPU: a
/// longer walk is a chain of dependent loads (NHWC 64x16x8x8, fused, walks 256 rows per invocation:
/// 0.59 ms forward-train on an H200, against 0.066 ms for the same tensor in NCHW).
const GPU_FUSED_WALK_MAX: u64 = 16;

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
const B_FORWARD_FUSED: &[u32] = &[0, 1, 2, 5, 6, 7, 8, 9, 11];
const B_BACKWARD_REDUCE: &[u32] = &[0, 1, 3, 9, 10];
const B_BACKWARD_DX: &[u32] = &[0, 1, 3, 4, 11];
const B_BACKWARD_FUSED: &[u32] = &[0, 1, 3, 4, 5, 9, 11, 12, 13];
const B_NORMALIZE_WORDS: &[u32] = &[0, 1, 2, 11];
const B_DX_WORDS: &[u32] = &[0, 1, 3, 4, 11];
/// The ReLU mask's binding, used by the entry points that write it or read dy.
const B_MASK: u32 = 14;
/// Elements per block of the word kernels: one mask word.
const BLOCK: u64 = 32;
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
    storage: Storage,
    /// Bytes per stored element (4 or 2).
    esize: u64,
    relu: bool,
    sigmoid: bool,
    /// Values per unit (4: vec4 loads; 1: shapes not divisible by 4; 2: f16 with an even axis).
    w: u32,
    wg: u32,
    step: u32,
    /// The kernels walk rows of units (channel-last layouts, and NCHW viewed as rows of C·HW values)
    /// rather than NCHW planes.
    rows: bool,
    /// Columns per channel in the partial statistics: HW for NCHW viewed as rows, 1 otherwise.
    col_group: u32,
    /// Channel-last units each invocation owns (`U`): 1, or `WIDE_UNITS` for the wide kernels
    /// (batchnorm_nhwc_wide.wgsl).
    units_per_invocation: u32,
    fused: bool,
    /// Units each invocation keeps in registers (the resident plan), 0 otherwise.
    resident: u32,
    inner: u32,
    tile_cols: u32,
    col_tiles: u32,
    chunks: Vec<Chunk>,
    total_parts: u32,
    merge: Merge,
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
            .field("storage", &self.storage)
            .field("relu", &self.relu)
            .field("sigmoid", &self.sigmoid)
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
        Self::with_options(gpu, shape, layout, config, choice, OpOptions::default())
    }

    /// Plans BatchNorm as [`Self::new`] does, for f16 storage and/or a fused ReLU.
    ///
    /// # Errors
    /// As [`Self::new`]; as [`OpOptions::check`] (`F16Path::Native` without SHADER_F16, an f16 path for
    /// f32 tensors, a fused ReLU on a device with too few storage buffers per stage).
    pub fn with_options(
        gpu: &Arc<Gpu>,
        shape: &[usize],
        layout: Layout,
        config: BatchNormConfig,
        choice: PlanChoice,
        options: OpOptions,
    ) -> Result<Self> {
        Self::plan(gpu, shape, layout, config, choice, options, true)
    }

    /// The planner; `allow_rows_view` false keeps NCHW on the plane kernels (the retry when the rows
    /// view's per-column partial statistics would be too large).
    fn plan(
        gpu: &Arc<Gpu>,
        shape: &[usize],
        layout: Layout,
        config: BatchNormConfig,
        choice: PlanChoice,
        options: OpOptions,
        allow_rows_view: bool,
    ) -> Result<Self> {
        config.validate()?;
        options.check(gpu)?;
        let storage = options.storage(gpu)?;
        let esize = options.dtype.size() as u64;
        let dims = layout.dims(shape)?;
        let nhwc = layout != Layout::Nchw;
        if dims.numel() as u64 >= u32::MAX as u64 {
            return Err(Error::LimitExceeded {
                what: format!("elements in input {shape:?}"),
                needed: dims.numel() as u64,
                limit: u32::MAX as u64 - 1,
            });
        }
        let caps = gpu.caps();
        let limits = gpu.limits();
        // NCHW planes that 4 does not divide (7×7) would be read a scalar at a time. On a CPU device the
        // sample is viewed instead as one row of C·HW values, read in vec4 units by the wide channel-last
        // kernels, a channel being HW consecutive columns whose partial statistics the per-channel pass
        // merges (`col_group`). Split plan only (a channel spans invocations), without a fused
        // activation, and only where one sample fits a binding. f32 takes it where the row is wide
        // enough for the wide kernels; packed f16 where the row divides into units of 8 halves, which
        // the one-unit channel-last kernels read (planes of 49 halves would otherwise go through the word
        // kernels, two halves at a time).
        let sample_bytes = esize * (dims.c * dims.spatial) as u64;
        let row = dims.c * dims.spatial;
        let rows_view_storage = match storage {
            Storage::F32 => row % 4 == 0 && (row / 4) as u64 >= 8 * WIDE_UNITS as u64,
            Storage::F16Packed => row % 8 == 0,
            Storage::F16 => false,
        };
        let rows_view = allow_rows_view
            && !nhwc
            && caps.cpu_device
            && rows_view_storage
            && !options.fuse_relu
            && !options.sigmoid
            && dims.spatial % 4 != 0
            && dims.spatial <= ROWS_VIEW_MAX_PLANE
            && dims.numel() >= ROWS_VIEW_MIN
            && matches!(choice, PlanChoice::Auto | PlanChoice::Split { .. })
            && sample_bytes + limits.min_storage_buffer_offset_alignment as u64 + BLOCK * 4 + 4
                <= limits
                    .max_storage_buffer_binding_size
                    .min(limits.max_buffer_size);
        // The kernels' geometry: rows of units (channel-last, or the rows view) or planes (NCHW).
        let rows = nhwc || rows_view;
        let col_group: u32 = if rows_view { dims.spatial as u32 } else { 1 };
        let vector_axis = if nhwc {
            dims.c
        } else if rows_view {
            dims.c * dims.spatial
        } else {
            dims.spatial
        };
        // f16 uses pairs (one u32 word) when the axis is even but not a multiple of 4: packed storage then
        // needs no word kernels. f32 keeps its measured vec4-or-scalar choice. Packed f16 takes units of 8
        // (a vec4<u32>, computed as a mat2x4<f32>) where the axis allows: lavapipe issues a storage load lane
        // by lane and at most 16 bytes per lane, so 8 halves per load is what makes f16 cheaper than f32
        // there (a plain 8-half copy took 0.41-0.54x the time of the f32 one, examples/f16_patterns.rs).
        // Only in the plain kernels of batchnorm_nchw.wgsl and batchnorm_nhwc.wgsl: the word kernels'
        // ReLU mask and the fused sigmoid work on vectors.
        let w: u32 = if storage == Storage::F16Packed
            && vector_axis % 8 == 0
            && !options.fuse_relu
            && !options.sigmoid
        {
            8
        } else if vector_axis % 4 == 0 {
            4
        } else if vector_axis % 2 == 0 && storage != Storage::F32 {
            2
        } else {
            1
        };
        let wg: u32 = 64;
        // Lavapipe vectorizes across invocations but streams best when each invocation walks consecutive
        // units; GPUs want adjacent invocations on adjacent addresses.
        let step = if caps.cpu_device { 1 } else { wg };
        let target_groups: u64 = if caps.cpu_device { 16 } else { 1024 };
        let bpu = esize * w as u64;
        let align = limits.min_storage_buffer_offset_alignment as u64;
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        // A chunk's window also holds the word kernels' last block (up to BLOCK elements past the chunk)
        // and the rounding to a whole word.
        let max_units = (binding_limit.saturating_sub(align + BLOCK * esize + 4)) / bpu;

        let (inner, outer_total, units_per_outer) = if nhwc {
            let inner = dims.c as u64 / w as u64;
            (inner, (dims.n * dims.spatial) as u64, inner)
        } else if rows_view {
            let inner = (dims.c * dims.spatial) as u64 / w as u64;
            (inner, dims.n as u64, inner)
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
        // Channel-last rows of at least 8 * WIDE_UNITS units on a CPU device: each invocation owns
        // WIDE_UNITS units of every row of its part (batchnorm_nhwc_wide.wgsl says why); a workgroup spans
        // WG invocations side by side (one "lane" of rows each). f32 only, without a fused activation:
        // with f16 conversions, the ReLU mask's loads or the sigmoid in the unrolled loops, lavapipe ran
        // them 4-5x slower than the one-unit kernels (NHWC 128x256x14x14: f16 forward 170 ms against
        // 34, f32 backward with the mask 196 ms against 58).
        let wide_ok = storage == Storage::F32 && !options.fuse_relu && !options.sigmoid;
        let units_per_invocation: u32 =
            if rows && wide_ok && caps.cpu_device && inner >= 8 * WIDE_UNITS as u64 {
                WIDE_UNITS
            } else {
                1
            };
        let (tile_cols, col_tiles) = if units_per_invocation > 1 {
            (
                wg,
                inner.div_ceil(wg as u64 * units_per_invocation as u64) as u32,
            )
        } else if rows {
            let tile = inner.min(wg as u64);
            (tile as u32, inner.div_ceil(tile) as u32)
        } else {
            (1, 1)
        };
        let lanes = (wg / tile_cols) as u64;
        let columns = if rows {
            col_tiles as u64
        } else {
            dims.c as u64
        };
        // Workgroups per channel (column tile) for a chunk of `outer` samples/rows.
        // Invocations that share one column (channel) of a part, and the units each walks per pass.
        let column_invocations = if rows { lanes } else { wg as u64 };
        let walk = |outer: u64, parts: u64| -> u64 {
            let per_channel_units = if rows { outer } else { outer * inner };
            per_channel_units.div_ceil(parts.max(1) * column_invocations)
                * units_per_invocation as u64
        };
        let auto_parts = |outer: u64| -> u64 {
            let per_channel_units = if rows { outer } else { outer * inner };
            let per_group_min = if rows { lanes * 4 } else { wg as u64 * 4 };
            let useful = per_channel_units.div_ceil(per_group_min).max(1);
            // Enough parts that no invocation's walk reaches lavapipe's loop limit (WALK_MAX).
            let walk_parts = (per_channel_units * units_per_invocation as u64)
                .div_ceil(WALK_MAX * column_invocations);
            target_groups
                .div_ceil(columns)
                .clamp(1, useful)
                .max(walk_parts)
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
        let resident_ok = |max: u64| !rows && n_chunks == 1 && resident_k <= max;
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
                !rows_view
                    && n_chunks == 1
                    && (auto_parts(outer_total) == 1
                        || resident_ok(RESIDENT_AUTO_MAX)
                        || dims.numel() <= SMALL)
                    && (caps.cpu_device || walk(outer_total, 1) <= GPU_FUSED_WALK_MAX)
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
                (p as u64).min(if rows { outer } else { outer * inner })
            } else {
                // No more parts than the partial statistics' binding holds (16 bytes per channel
                // column and part, over every chunk): matters on devices with small bindings.
                let slots = binding_limit / (16 * dims.c as u64 * col_group as u64).max(1);
                auto_parts(outer).min((slots / n_chunks.max(1)).max(1))
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
        let merge =
            if !caps.cpu_device && total_parts as u64 * col_group as u64 >= MERGE_WG_MIN_LINKS {
                Merge::Workgroup
            } else {
                Merge::Invocation
            };
        // The rows view keeps (count, mean, M2) per column per part: 16 bytes per value of a row, so P
        // parts cost 4P rows of traffic. Past an eighth of the tensor (few samples, large planes), or
        // past one binding, the plane kernels do better.
        let partial_bytes = 16 * total_parts as u64 * dims.c as u64 * col_group as u64;
        if rows_view
            && (partial_bytes > (esize * dims.numel() as u64) / 8 || partial_bytes > binding_limit)
        {
            return Self::plan(gpu, shape, layout, config, choice, options, false);
        }
        // The partial statistics, the per-channel coefficients and the ReLU mask are each bound whole in
        // every pass (the tensors are bound a chunk at a time): past one binding the device would refuse
        // the bind group. Past it only with enormous C, very many parts, or a masked tensor of billions
        // of values on a 128 MiB device.
        let whole_bindings = [
            (
                "partial statistics (16 bytes per channel and part)",
                partial_bytes,
            ),
            (
                "per-channel coefficients (16 bytes per channel)",
                16 * dims.c as u64,
            ),
            (
                "ReLU mask (one bit per value)",
                if options.fuse_relu {
                    mask_bytes_of(dims.numel())
                } else {
                    0
                },
            ),
        ];
        for (what, bytes) in whole_bindings {
            if bytes > binding_limit {
                return Err(Error::LimitExceeded {
                    what: format!(
                        "bytes of BatchNorm's {what} for {shape:?} ({}) in one storage binding",
                        layout.name()
                    ),
                    needed: bytes,
                    limit: binding_limit,
                });
            }
        }
        if caps.cpu_device && resident == 0 {
            // Lavapipe's loop limit (WALK_MAX): refuse what would silently stop short.
            let longest = chunks
                .iter()
                .map(|ch| walk(ch.outer as u64, ch.parts as u64))
                .max()
                .unwrap_or(0);
            if longest > WALK_MAX {
                return Err(Error::LimitExceeded {
                    what: format!(
                        "units one invocation walks per pass in the {} plan for {shape:?} ({}) on a CPU \
                         device (lavapipe ends a shader's loops after 65 535 iterations; the automatic \
                         plan or more split parts stay under it)",
                        if fused { "fused" } else { "split" },
                        layout.name()
                    ),
                    needed: longest,
                    limit: WALK_MAX,
                });
            }
            // CPU devices merge per invocation (the planner's `merge` there), walking every slot.
            let g = col_group as u64;
            let finalize = total_parts as u64 * (g + g.div_ceil(32) + 2);
            if !fused && finalize > FINALIZE_ITERATIONS_MAX {
                return Err(Error::LimitExceeded {
                    what: format!(
                        "loop iterations of the per-channel merge over {total_parts} parts for \
                         {shape:?} ({}) on a CPU device (lavapipe ends a shader's loops after 65 535 \
                         iterations; fewer split parts stay under it)",
                        layout.name()
                    ),
                    needed: finalize,
                    limit: FINALIZE_ITERATIONS_MAX,
                });
            }
        }

        let params = gpu.create_buffer(
            "batchnorm params",
            SLOT * (MODES * (chunks.len() + 1)) as u64,
            // Storage, not UNIFORM, where the device allows: see the binding's comment in
            // batchnorm_common.wgsl (lavapipe leak) and `params_as_uniform`.
            if params_as_uniform(gpu) {
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST
            } else {
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST
            },
        )?;
        let parts = gpu.create_buffer(
            "batchnorm partial statistics",
            16 * total_parts as u64 * dims.c as u64 * col_group as u64,
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
            storage,
            esize,
            relu: options.fuse_relu,
            sigmoid: options.sigmoid,
            w,
            wg,
            step,
            rows,
            col_group,
            units_per_invocation,
            fused,
            resident,
            inner: inner as u32,
            tile_cols,
            col_tiles,
            chunks,
            total_parts,
            merge,
            params,
            parts,
            coef,
            dummies,
            momentum_written: Mutex::new(None),
        };
        op.write_params(config.momentum.unwrap_or(0.0));
        Ok(op)
    }

    /// "fused" or "split(P parts, K chunks)": what runs, for logs and the bench; f16 and a fused ReLU
    /// are appended (", f16", ", f16 packed", ", relu", ", sigmoid").
    pub fn plan_name(&self) -> String {
        let mut name = self.plan_base_name();
        name.pop();
        match self.storage {
            Storage::F32 => {}
            Storage::F16 => name.push_str(", f16"),
            Storage::F16Packed => name.push_str(", f16 packed"),
        }
        if self.relu {
            name.push_str(", relu");
        }
        if self.sigmoid {
            name.push_str(", sigmoid");
        }
        name.push(')');
        name
    }

    fn plan_base_name(&self) -> String {
        if self.resident > 0 {
            format!("resident (k{}, w{})", self.resident, self.w)
        } else if self.fused {
            format!("fused (w{}{})", self.w, self.wide_name())
        } else {
            format!(
                "split ({} parts, {} chunk{}, w{}{}{})",
                self.chunks[0].parts,
                self.chunks.len(),
                if self.chunks.len() == 1 { "" } else { "s" },
                self.w,
                self.wide_name(),
                match self.merge {
                    Merge::Invocation => "",
                    Merge::Workgroup => ", wg merge",
                }
            )
        }
    }

    fn wide_name(&self) -> String {
        if self.units_per_invocation > 1 && self.col_group > 1 {
            format!(", {} units/inv, NCHW as rows", self.units_per_invocation)
        } else if self.col_group > 1 {
            ", NCHW as rows".to_string()
        } else if self.units_per_invocation > 1 {
            format!(", {} units/inv", self.units_per_invocation)
        } else {
            String::new()
        }
    }

    /// Dispatches recorded by one forward-train, forward-eval and backward.
    pub fn dispatch_counts(&self) -> (usize, usize, usize) {
        let k = self.chunks.len();
        if self.fused {
            (
                1 + self.defer_forward() as usize,
                2,
                1 + self.packed_odd() as usize,
            )
        } else {
            (2 * k + 1, 1 + k, 2 * k + 1)
        }
    }

    /// How the split plan's per-channel pass merges the parts (see [`Merge`]); meaningless for the
    /// fused and resident plans, which have no such pass.
    pub fn merge(&self) -> Merge {
        self.merge
    }

    /// Overrides the planner's [`Merge`] (it takes `Workgroup` on GPUs for channels of 64 part slots or
    /// more, `Invocation` otherwise); the results agree to f32 rounding. Tests run both on every device.
    /// (On a CPU device the planner has already kept the per-invocation walk within lavapipe's loop
    /// limit, and the workgroup merge walks less, so either is safe there.)
    pub fn set_merge(&mut self, merge: Merge) {
        self.merge = merge;
    }

    fn finalize_entry(&self, serial: &'static str) -> &'static str {
        match (self.merge, serial) {
            (Merge::Invocation, _) => serial,
            (Merge::Workgroup, "finalize_forward") => "finalize_forward_wg",
            (Merge::Workgroup, _) => "finalize_backward_wg",
        }
    }

    /// The element type of x, y, dy and dx.
    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32 => DType::F32,
            Storage::F16 | Storage::F16Packed => DType::F16,
        }
    }

    /// Whether f16 goes through packed u32 words (no SHADER_F16, a CPU device, or forced).
    pub fn f16_packed(&self) -> bool {
        self.storage == Storage::F16Packed
    }

    /// Whether y = relu(bn(x)) with a mask (the `record_*_relu` methods).
    pub fn fuse_relu(&self) -> bool {
        self.relu
    }

    /// Bytes x, y, dy and dx each occupy from their offsets: elements times 4 (f32) or 2 (f16), rounded
    /// up to a whole 4-byte word.
    pub fn tensor_bytes(&self) -> u64 {
        (self.esize * self.dims.numel() as u64).div_ceil(4) * 4
    }

    /// Bytes of the ReLU mask: one bit per element in u32 words, bit e % 32 of word e / 32 for flat
    /// element e (1 where relu passed the value, i.e. bn(x) > 0).
    pub fn mask_bytes(&self) -> u64 {
        mask_bytes_of(self.dims.numel())
    }

    /// Packed f16 with an odd contiguous axis: words straddle planes or channels.
    fn packed_odd(&self) -> bool {
        self.storage == Storage::F16Packed && self.w == 1
    }

    /// The forward's elementwise pass runs in the word kernels (the mask, or straddling packed words).
    fn defer_forward(&self) -> bool {
        self.relu || self.packed_odd()
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
                let (win_elem, block_base, blocks) = match self.chunks.get(index) {
                    Some(ch) => {
                        let (start, _) = self.window(ch);
                        let (base, blocks) = Self::blocks(ch, self.w);
                        ((start / self.esize) as u32, base as u32, blocks as u32)
                    }
                    None => (0, 0, 0),
                };
                let (outer, parts, part_base, off, groups) = match self.chunks.get(index) {
                    Some(ch) => {
                        let bpu = self.esize * self.w as u64;
                        let align = self.align();
                        let off = ((ch.unit_begin * bpu) % align) / bpu;
                        let columns = if self.rows {
                            self.col_tiles
                        } else {
                            ch.c_count
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
                    win_elem,
                    block_base,
                    blocks,
                    numel: self.dims.numel() as u32,
                    words_groups_x: Self::fold(blocks.div_ceil(self.wg)).0,
                    columns: c * self.col_group,
                    col_group: self.col_group,
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
    fn clear_uncovered_parts(&self, encoder: &mut impl Record) {
        if !self.fused
            && self
                .chunks
                .iter()
                .any(|ch| ch.c_count as usize != self.dims.c)
        {
            encoder.encoder().clear_buffer(&self.parts, 0, None);
        }
    }

    /// The byte range of a chunk bound for x, y, dy and dx, relative to the caller's offset: from the
    /// chunk's first unit aligned down to the device's alignment (the rest is `off`), to BLOCK elements
    /// past its end (the word kernels' last block) or the tensor's end, rounded up to a whole word.
    fn window(&self, ch: &Chunk) -> (u64, u64) {
        let bpu = self.esize * self.w as u64;
        let start = ch.unit_begin * bpu;
        let window = start - start % self.align();
        let numel = self.dims.numel() as u64;
        let end_elem = ((ch.unit_begin + ch.units) * self.w as u64 + BLOCK).min(numel);
        let end = (end_elem * self.esize).div_ceil(4) * 4;
        (window, end - window)
    }

    /// The word kernels' blocks a chunk owns: those whose first element lies in it.
    fn blocks(ch: &Chunk, w: u32) -> (u64, u64) {
        let begin = (ch.unit_begin * w as u64).div_ceil(BLOCK);
        let end = ((ch.unit_begin + ch.units) * w as u64).div_ceil(BLOCK);
        (begin, end - begin)
    }

    fn align(&self) -> u64 {
        self.gpu.limits().min_storage_buffer_offset_alignment as u64
    }

    fn pipeline(&self, entry: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        let per_channel = matches!(
            entry,
            "finalize_forward"
                | "finalize_backward"
                | "finalize_forward_wg"
                | "finalize_backward_wg"
                | "eval_coef"
        );
        let (family, body) = if per_channel {
            ("finalize", FINALIZE_WGSL)
        } else if entry.ends_with("_words") {
            ("words", WORDS_WGSL)
        } else if self.units_per_invocation > 1 {
            ("nhwc_wide", NHWC_WIDE_WGSL)
        } else if !self.rows {
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
        // Only the fused and resident kernels hand their elementwise pass to the word kernels.
        let defer = self.entry_defers(entry);
        let spec = Spec {
            w: self.w,
            wg: self.wg,
            step: self.step,
            units: self.units_per_invocation,
            k,
            storage: self.storage,
            relu: self.relu,
            sigmoid: self.sigmoid,
            defer,
            channel_last: self.layout != Layout::Nchw,
            uniform_params: params_as_uniform(&self.gpu),
        };
        let key = format!("batchnorm_{family}.{entry} {spec:?}");
        self.gpu.pipeline(&key, entry, || {
            debug_assert!(COMMON_WGSL.contains(PARAMS_AS_STORAGE));
            let common = if spec.uniform_params {
                COMMON_WGSL.replace(PARAMS_AS_STORAGE, "var<uniform> params: Params;")
            } else {
                COMMON_WGSL.to_string()
            };
            format!("{}\n{FLOAT_BITS_WGSL}{common}\n{body}", prelude(&spec))
        })
    }

    fn check_ref(&self, what: &str, r: &BufferRef, bytes: u64) -> Result<()> {
        // Chunk windows start at multiples of the alignment; vec4 units need 16-byte offsets too.
        crate::ops::kernel::check_region(what, r, bytes, self.align().max(16))
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
    /// [`Error::OneValuePerChannel`] when M = 1; [`Error::BadConfig`] for eps = 0
    /// ([`BatchNormConfig::check_eps_for_batch_stats`]); [`Error::BadConfig`] / [`Error::ShapeMismatch`] for
    /// missing, misaligned, too small or overlapping buffers, or an op planned with a fused ReLU (use
    /// [`Self::record_forward_train_relu`]); pipeline errors.
    pub fn record_forward_train(
        &self,
        encoder: &mut impl Record,
        bufs: &ForwardBuffers,
        running_factor: Option<f32>,
    ) -> Result<()> {
        self.forward_train(encoder, bufs, None, running_factor)
    }

    /// [`Self::record_forward_train`] with the fused ReLU: y = relu(bn(x)), and `mask` (at least
    /// [`Self::mask_bytes`]) receives one bit per element, set where bn(x) > 0.
    ///
    /// # Errors
    /// As [`Self::record_forward_train`]; [`Error::BadConfig`] when the op was planned without
    /// `fuse_relu`, or the mask overlaps x or y.
    pub fn record_forward_train_relu(
        &self,
        encoder: &mut impl Record,
        bufs: &ForwardBuffers,
        mask: BufferRef,
        running_factor: Option<f32>,
    ) -> Result<()> {
        self.forward_train(encoder, bufs, Some(mask), running_factor)
    }

    fn forward_train(
        &self,
        encoder: &mut impl Record,
        bufs: &ForwardBuffers,
        mask: Option<BufferRef>,
        running_factor: Option<f32>,
    ) -> Result<()> {
        if self.dims.per_channel() <= 1 {
            return Err(Error::OneValuePerChannel {
                shape: self.shape.clone(),
                count: self.dims.per_channel(),
            });
        }
        self.config.check_eps_for_batch_stats()?;
        let mut set = self.forward_set(bufs, running_factor.is_some(), false)?;
        self.bind_mask(&mut set, mask, &[("y", &bufs.y), ("x", &bufs.x)])?;
        let mode = match running_factor {
            Some(f) => {
                if !f.is_finite() {
                    return Err(Error::config(format!(
                        "running-statistics factor {f} must be finite"
                    )));
                }
                self.set_momentum(f);
                Mode::TrainUpdate
            }
            None => Mode::TrainNoUpdate,
        };
        self.clear_uncovered_parts(encoder);
        encoder.with_pass("batchnorm forward-train", |pass| {
            if self.fused {
                // Known gap (left as found): the resident plan records the fused kernels too; dispatching
                // `forward_resident` makes lavapipe's LLVM compile for minutes at K = 1024 (measured > 8 min).
                let entry = "forward_fused";
                self.dispatch(pass, entry, B_FORWARD_FUSED, mode, Some(0), &set)?;
                if self.defer_forward() {
                    self.dispatch(
                        pass,
                        "normalize_words",
                        B_NORMALIZE_WORDS,
                        mode,
                        Some(0),
                        &set,
                    )?;
                }
            } else {
                for k in 0..self.chunks.len() {
                    self.dispatch(pass, "stats", B_STATS, mode, Some(k), &set)?;
                }
                self.dispatch(
                    pass,
                    self.finalize_entry("finalize_forward"),
                    B_FINALIZE_FORWARD,
                    mode,
                    None,
                    &set,
                )?;
                self.normalize_chunks(pass, mode, &set)?;
            }
            Ok(())
        })
    }

    /// The elementwise forward over every chunk: the channel kernels, or the word kernels where they
    /// must write (the ReLU mask, packed f16 words of odd-length planes).
    fn normalize_chunks(
        &self,
        pass: &mut wgpu::ComputePass,
        mode: Mode,
        set: &BindSet,
    ) -> Result<()> {
        for k in 0..self.chunks.len() {
            if self.defer_forward() {
                self.dispatch(
                    pass,
                    "normalize_words",
                    B_NORMALIZE_WORDS,
                    mode,
                    Some(k),
                    set,
                )?;
            } else {
                self.dispatch(pass, "normalize", B_NORMALIZE, mode, Some(k), set)?;
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
        encoder: &mut impl Record,
        bufs: &ForwardBuffers,
    ) -> Result<()> {
        self.forward_eval(encoder, bufs, None)
    }

    /// [`Self::record_forward_eval`] with the fused ReLU and its mask, as
    /// [`Self::record_forward_train_relu`].
    ///
    /// # Errors
    /// As [`Self::record_forward_train_relu`]; running statistics are required.
    pub fn record_forward_eval_relu(
        &self,
        encoder: &mut impl Record,
        bufs: &ForwardBuffers,
        mask: BufferRef,
    ) -> Result<()> {
        self.forward_eval(encoder, bufs, Some(mask))
    }

    fn forward_eval(
        &self,
        encoder: &mut impl Record,
        bufs: &ForwardBuffers,
        mask: Option<BufferRef>,
    ) -> Result<()> {
        let mut set = self.forward_set(bufs, true, true)?;
        self.bind_mask(&mut set, mask, &[("y", &bufs.y), ("x", &bufs.x)])?;
        encoder.with_pass("batchnorm forward-eval", |pass| {
            self.dispatch(pass, "eval_coef", B_EVAL_COEF, Mode::Eval, None, &set)?;
            self.normalize_chunks(pass, Mode::Eval, &set)
        })
    }

    /// Records the backward: dbias = sum(dy), dweight = sum(dy * xhat) (both reductions in one pass over
    /// x and dy), then dx. `batch_stats` says whether the forward normalized with batch statistics (then dx
    /// carries the terms through the mean and variance) or with running statistics (dx = weight*invstd*dy).
    ///
    /// # Errors
    /// As [`Self::record_forward_train`] (an op with a fused ReLU needs [`Self::record_backward_relu`]).
    pub fn record_backward(
        &self,
        encoder: &mut impl Record,
        bufs: &BackwardBuffers,
        batch_stats: bool,
    ) -> Result<()> {
        self.backward(encoder, bufs, None, batch_stats)
    }

    /// The backward of y = relu(bn(x)): as [`Self::record_backward`] with dy replaced by dy * mask (the
    /// mask the forward wrote) in both reductions and in dx, so ReLU's backward costs no pass of its own.
    ///
    /// # Errors
    /// As [`Self::record_backward`]; [`Error::BadConfig`] when the op was planned without `fuse_relu` or
    /// the mask overlaps dx.
    pub fn record_backward_relu(
        &self,
        encoder: &mut impl Record,
        bufs: &BackwardBuffers,
        mask: BufferRef,
        batch_stats: bool,
    ) -> Result<()> {
        self.backward(encoder, bufs, Some(mask), batch_stats)
    }

    fn backward(
        &self,
        encoder: &mut impl Record,
        bufs: &BackwardBuffers,
        mask: Option<BufferRef>,
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
        self.bind_mask(&mut set, mask, &[("dx", &bufs.dx)])?;
        let mode = if batch_stats {
            Mode::BackwardBatch
        } else {
            Mode::BackwardRunning
        };
        self.clear_uncovered_parts(encoder);
        encoder.with_pass("batchnorm backward", |pass| {
            if self.fused {
                // Known gap (left as found): the resident plan records the fused kernels too; dispatching
                // `backward_resident` makes lavapipe's LLVM compile for minutes at K = 1024 (measured > 8 min).
                let entry = "backward_fused";
                self.dispatch(pass, entry, B_BACKWARD_FUSED, mode, Some(0), &set)?;
                if self.packed_odd() {
                    self.dispatch(pass, "dx_words", B_DX_WORDS, mode, Some(0), &set)?;
                }
            } else {
                for k in 0..self.chunks.len() {
                    self.dispatch(
                        pass,
                        "backward_reduce",
                        B_BACKWARD_REDUCE,
                        mode,
                        Some(k),
                        &set,
                    )?;
                }
                self.dispatch(
                    pass,
                    self.finalize_entry("finalize_backward"),
                    B_FINALIZE_BACKWARD,
                    mode,
                    None,
                    &set,
                )?;
                for k in 0..self.chunks.len() {
                    if self.packed_odd() {
                        self.dispatch(pass, "dx_words", B_DX_WORDS, mode, Some(k), &set)?;
                    } else {
                        self.dispatch(pass, "backward_dx", B_BACKWARD_DX, mode, Some(k), &set)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Checks that a mask is given exactly when the op fuses ReLU, and that it is a valid region apart
    /// from the tensors it must not overlap.
    fn bind_mask<'a>(
        &self,
        set: &mut BindSet<'a>,
        mask: Option<BufferRef<'a>>,
        apart_from: &[(&str, &BufferRef)],
    ) -> Result<()> {
        match (self.relu, mask) {
            (false, None) => Ok(()),
            (true, None) => Err(Error::config(
                "this op fuses ReLU (OpOptions::fuse_relu): record with the *_relu method and a mask buffer",
            )),
            (false, Some(_)) => Err(Error::config(
                "a ReLU mask was given to an op planned without fuse_relu (OpOptions::fuse_relu)",
            )),
            (true, Some(m)) => {
                let mb = self.mask_bytes();
                self.check_ref("mask", &m, mb)?;
                for (what, t) in apart_from {
                    if m.buffer == t.buffer
                        && m.offset < t.offset + self.tensor_bytes()
                        && t.offset < m.offset + mb
                    {
                        return Err(Error::config(format!(
                            "mask and {what} overlap in one buffer"
                        )));
                    }
                }
                set.mask = Some(m);
                Ok(())
            }
        }
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
        // Per-unit stores of packed f16 with W = 1 would share words with a neighbour (another invocation,
        // possibly another channel); the planner sends those writes to the word kernels.
        if self.packed_odd() && matches!(entry, "normalize" | "backward_dx") {
            return Err(Error::config(format!(
                "internal: {entry} would write packed f16 halves per invocation"
            )));
        }
        let pipeline = self.pipeline(entry)?;
        if self.gpu.gathering() {
            return Ok(()); // `pipeline` is a placeholder (`Gpu::gather_pipelines`)
        }
        let index = chunk.unwrap_or(self.chunks.len());
        let slot = self.slot(mode, index);
        let words = entry.ends_with("_words");
        let uses_mask = self.relu
            && (entry == "normalize_words" || bindings.contains(&3))
            && !entry.starts_with("finalize");
        // Packed f16 with W = 1 has no per-unit store, so the deferring fused kernels do not reference
        // the output at all (and the layout deduced from the shader lacks it).
        let unreferenced: &[u32] = if self.packed_odd() && self.entry_defers(entry) {
            &[2, 4]
        } else {
            &[]
        };
        let mut entries = Vec::with_capacity(bindings.len() + 1);
        for &b in bindings
            .iter()
            .filter(|b| !unreferenced.contains(b))
            .chain(uses_mask.then_some(&B_MASK))
        {
            let binding = match b {
                0 => wgpu::BufferBinding {
                    buffer: &self.params,
                    offset: slot * SLOT,
                    // A uniform binding's size rounds up to 16 bytes.
                    size: wgpu::BufferSize::new(
                        (std::mem::size_of::<Params>() as u64).next_multiple_of(16),
                    ),
                },
                1..=4 => {
                    let r = set.tensor[b as usize].ok_or_else(|| {
                        Error::config(format!("internal: tensor binding {b} missing for {entry}"))
                    })?;
                    let (window, size) = self.window(&self.chunks[chunk.unwrap_or(0)]);
                    wgpu::BufferBinding {
                        buffer: r.buffer,
                        offset: r.offset + window,
                        size: wgpu::BufferSize::new(size),
                    }
                }
                10 => self.parts.as_entire_buffer_binding(),
                11 => self.coef.as_entire_buffer_binding(),
                B_MASK => {
                    let m = set.mask.ok_or_else(|| {
                        Error::config(format!("internal: mask binding missing for {entry}"))
                    })?;
                    wgpu::BufferBinding {
                        buffer: m.buffer,
                        offset: m.offset,
                        size: wgpu::BufferSize::new(self.mask_bytes()),
                    }
                }
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
        let bind_group = self.gpu.bind_group(entry, &pipeline, &entries);
        let groups = match chunk {
            Some(k) if words => (Self::blocks(&self.chunks[k], self.w).1 as u32).div_ceil(self.wg),
            Some(k) => {
                let columns = if self.rows {
                    self.col_tiles
                } else {
                    self.chunks[k].c_count
                };
                self.chunks[k].parts * columns
            }
            // The per-channel pass: 64 channels a workgroup, or one (Merge::Workgroup).
            None if entry.ends_with("_wg") => self.dims.c as u32,
            None => (self.dims.c as u32).div_ceil(64),
        };
        let (gx, gy) = Self::fold(groups);
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        self.gpu.profiled(
            pass,
            || format!("batchnorm {entry}"),
            |pass| pass.dispatch_workgroups(gx, gy, 1),
        );
        Ok(())
    }

    fn entry_defers(&self, entry: &str) -> bool {
        match entry {
            "forward_fused" | "forward_resident" => self.defer_forward(),
            "backward_fused" | "backward_resident" => self.packed_odd(),
            _ => false,
        }
    }
}

/// The buffers of one recorded op, by binding number.
struct BindSet<'a> {
    tensor: [Option<BufferRef<'a>>; 5],
    channel: [Option<(BufferRef<'a>, u64)>; 14],
    mask: Option<BufferRef<'a>>,
}

impl<'a> BindSet<'a> {
    fn new(_op: &BatchNormOp) -> Self {
        BindSet {
            tensor: [None; 5],
            channel: [None; 14],
            mask: None,
        }
    }
}

/// How x, y, dy and dx are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    F32,
    /// f16 storage types (`enable f16`).
    F16,
    /// f16 pairs in u32 words.
    F16Packed,
}

/// What one pipeline is specialized for; its Debug form is part of the pipeline-cache key.
#[derive(Clone, Copy, Debug)]
struct Spec {
    w: u32,
    wg: u32,
    step: u32,
    units: u32,
    k: u32,
    storage: Storage,
    relu: bool,
    sigmoid: bool,
    defer: bool,
    channel_last: bool,
    uniform_params: bool,
}

/// f32 <-> f16 for the packed-word path in integer operations (and one float add or multiply), instead of
/// `pack2x16float`/`unpack2x16float`: lavapipe's lowering of those builtins made every f16 store cost more
/// than the halved traffic saved (forward-eval 1.9x the f32 time). `pack_half2` rounds to nearest even:
/// normal values rebias the exponent and round the 13 dropped bits; values below 2^-14 round in hardware
/// by adding 0.5 (whose ulp is 2^-24, the f16 subnormal step); >= 65536 and infinities give infinity,
/// NaN a quiet NaN. `unpack_half2` is exact: subnormals as mantissa * 2^-24, infinities and NaNs kept.
/// Public so that timing code (`examples/f16_patterns.rs`) measures these very functions.
pub const PACK_HALF2_WGSL: &str = "
fn pack_half2(v: vec2<f32>) -> u32 {
    let bits = bitcast<vec2<u32>>(v);
    let sign = (bits >> vec2(16u)) & vec2(0x8000u);
    let f = bits & vec2(0x7fffffffu);
    let big = select(vec2(0x7c00u), vec2(0x7e00u), f > vec2(0x7f800000u));
    let half_ = vec2(0x3f000000u);
    let sub = bitcast<vec2<u32>>(bitcast<vec2<f32>>(f) + bitcast<vec2<f32>>(half_)) - half_;
    let odd = (f >> vec2(13u)) & vec2(1u);
    let nrm = (f + vec2(0xc8000fffu) + odd) >> vec2(13u);
    let h = select(select(nrm, sub, f < vec2(0x38800000u)), big, f >= vec2(0x47800000u)) | sign;
    return h.x | (h.y << 16u);
}

fn unpack_half2(w: u32) -> vec2<f32> {
    let h = vec2(w & 0xffffu, w >> 16u);
    let em = h & vec2(0x7fffu);
    let nrm = (em << vec2(13u)) + select(vec2(0x38000000u), vec2(0x70000000u), em >= vec2(0x7c00u));
    let sub = bitcast<vec2<u32>>(vec2<f32>(em) * 5.9604645e-8);
    let bits = select(nrm, sub, em < vec2(0x400u)) | ((h & vec2(0x8000u)) << vec2(16u));
    return bitcast<vec2<f32>>(bits);
}
";

/// Bytes of the ReLU mask of `numel` values: one bit each, in u32 words.
fn mask_bytes_of(numel: usize) -> u64 {
    4 * (numel as u64).div_ceil(BLOCK)
}

/// The WGSL prelude that specializes the kernels: workgroup size, values per unit, access pattern, and
/// the tensors' storage with their load/store functions (so the kernels compute in f32 whatever is stored).
fn prelude(spec: &Spec) -> String {
    let Spec {
        w,
        wg,
        step,
        units,
        k,
        storage,
        relu,
        sigmoid,
        defer,
        channel_last,
        uniform_params: _,
    } = *spec;
    let mut out = String::new();
    if storage == Storage::F16 {
        out.push_str("enable f16;\n");
    }
    out.push_str(&format!(
        "const WG: u32 = {wg}u;\nconst W: u32 = {w}u;\nconst STEP: u32 = {step}u;\nconst K: u32 = {k}u;\n\
         const U: u32 = {units}u;\n\
         const RELU: bool = {relu};\nconst DEFER: bool = {defer};\nconst CHANNEL_LAST: bool = {channel_last};\n"
    ));
    // Packed f16 in single halves (W = 1): two consecutive units share a word, so the NCHW plane runs
    // read them in pairs (one storage read per word instead of two; each is a loop over the lanes on
    // lavapipe).
    out.push_str(&format!(
        "const HALF_PAIRS: bool = {};\n",
        storage == Storage::F16Packed && w == 1
    ));
    out.push_str(match w {
        8 => {
            "alias V = mat2x4<f32>;\n\
             fn hsum(v: V) -> f32 { return ((v[0].x + v[0].y) + (v[0].z + v[0].w)) + ((v[1].x + v[1].y) + (v[1].z + v[1].w)); }\n\
             fn elem(v: V, i: u32) -> f32 { return v[i >> 2u][i & 3u]; }\n\
             fn set_elem(v: V, i: u32, s: f32) -> V { var r = v; r[i >> 2u][i & 3u] = s; return r; }\n\
             fn splat(s: f32) -> V { return V(vec4<f32>(s), vec4<f32>(s)); }\n\
             fn vmul(a: V, b: V) -> V { return V(a[0] * b[0], a[1] * b[1]); }\n\
             fn keep_infinite(s: V, a: V, b: V) -> V { return V(keep_infinite4(s[0], a[0], b[0]), keep_infinite4(s[1], a[1], b[1])); }\n\
             fn finite_or_zero(v: V) -> V { return V(finite_or_zero4(v[0]), finite_or_zero4(v[1])); }\n"
        }
        4 => {
            "alias V = vec4<f32>;\n\
             fn hsum(v: V) -> f32 { return (v.x + v.y) + (v.z + v.w); }\n\
             fn elem(v: V, i: u32) -> f32 { return v[i]; }\n\
             fn set_elem(v: V, i: u32, s: f32) -> V { var r = v; r[i] = s; return r; }\n\
             fn positive_bits(z: V) -> u32 {\n\
             \x20   let p = vec4<bool>(relu_passes(z.x), relu_passes(z.y), relu_passes(z.z), relu_passes(z.w));\n\
             \x20   let m = select(vec4<u32>(0u), vec4<u32>(1u, 2u, 4u, 8u), p);\n\
             \x20   return (m.x | m.y) | (m.z | m.w);\n}\n\
             fn relu_v(z: V) -> V { return V(relu1(z.x), relu1(z.y), relu1(z.z), relu1(z.w)); }\n\
             fn keep_infinite(s: V, a: V, b: V) -> V { return keep_infinite4(s, a, b); }\n\
             fn finite_or_zero(v: V) -> V { return finite_or_zero4(v); }\n"
        }
        2 => {
            "alias V = vec2<f32>;\n\
             fn hsum(v: V) -> f32 { return v.x + v.y; }\n\
             fn elem(v: V, i: u32) -> f32 { return v[i]; }\n\
             fn set_elem(v: V, i: u32, s: f32) -> V { var r = v; r[i] = s; return r; }\n\
             fn positive_bits(z: V) -> u32 {\n\
             \x20   let m = select(vec2<u32>(0u), vec2<u32>(1u, 2u), vec2<bool>(relu_passes(z.x), relu_passes(z.y)));\n\
             \x20   return m.x | m.y;\n}\n\
             fn relu_v(z: V) -> V { return V(relu1(z.x), relu1(z.y)); }\n\
             fn keep_infinite(s: V, a: V, b: V) -> V { return keep_infinite2(s, a, b); }\n\
             fn finite_or_zero(v: V) -> V { return finite_or_zero4(vec4<f32>(v, 0.0, 0.0)).xy; }\n"
        }
        _ => {
            "alias V = f32;\n\
             fn hsum(v: V) -> f32 { return v; }\n\
             fn elem(v: V, i: u32) -> f32 { return v; }\n\
             fn set_elem(v: V, i: u32, s: f32) -> V { return s; }\n\
             fn positive_bits(z: V) -> u32 { return select(0u, 1u, relu_passes(z)); }\n\
             fn relu_v(z: V) -> V { return relu1(z); }\n\
             fn keep_infinite(s: V, a: V, b: V) -> V { return keep_infinite1(s, a, b); }\n\
             fn finite_or_zero(v: V) -> V { return finite_or_zero1(v); }\n"
        }
    });
    if w != 8 {
        out.push_str(
            "fn splat(s: f32) -> V { return V(s); }\nfn vmul(a: V, b: V) -> V { return a * b; }\n",
        );
    }
    // S: one unit as stored. Packed f16: a unit of 8 is four words, of 4 two, a pair one word; single halves (W = 1)
    // share a word with their neighbour, so only the word kernels store them.
    let s_type = match (storage, w) {
        (Storage::F32, 4) => "vec4<f32>",
        (Storage::F32, 2) => "vec2<f32>",
        (Storage::F32, _) => "f32",
        (Storage::F16, 4) => "vec4<f16>",
        (Storage::F16, 2) => "vec2<f16>",
        (Storage::F16, _) => "f16",
        (_, 8) => "vec4<u32>",
        (_, 4) => "vec2<u32>",
        (_, _) => "u32",
    };
    out.push_str(&format!("alias S = {s_type};\n"));
    if storage == Storage::F16Packed {
        out.push_str(PACK_HALF2_WGSL);
        // Whole units through one load or store each (a function argument, so that the compiler cannot
        // split the vector into per-component loads).
        out.push_str(
            "fn unpack_unit8(w: vec4<u32>) -> mat2x4<f32> {\n\
             \x20   return mat2x4<f32>(vec4<f32>(unpack_half2(w.x), unpack_half2(w.y)), vec4<f32>(unpack_half2(w.z), unpack_half2(w.w)));\n}\n\
             fn unpack_unit4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack_half2(w.x), unpack_half2(w.y)); }\n\
             fn pack_unit8(v: mat2x4<f32>) -> vec4<u32> {\n\
             \x20   return vec4<u32>(pack_half2(v[0].xy), pack_half2(v[0].zw), pack_half2(v[1].xy), pack_half2(v[1].zw));\n}\n\
             fn pack_unit4(v: vec4<f32>) -> vec2<u32> { return vec2<u32>(pack_half2(v.xy), pack_half2(v.zw)); }\n",
        );
    }
    for (binding, name) in [(1, "x"), (2, "y"), (3, "dy"), (4, "dx")] {
        out.push_str(&format!(
            "@group(0) @binding({binding}) var<storage, read_write> {name}: array<S>;\n"
        ));
    }
    if relu {
        out.push_str("@group(0) @binding(14) var<storage, read_write> mask: array<u32>;\n");
    }
    // Unit loads (index i counts units in the bound window) and per-element loads (index l counts
    // elements in the window).
    let (unit_load, elem_load) = match (storage, w) {
        (Storage::F32, 4) => ("T[i]", "T[l >> 2u][l & 3u]"),
        (Storage::F32, 2) => ("T[i]", "T[l >> 1u][l & 1u]"),
        (Storage::F32, _) => ("T[i]", "T[l]"),
        (Storage::F16, 4) => ("V(T[i])", "f32(T[l >> 2u][l & 3u])"),
        (Storage::F16, 2) => ("V(T[i])", "f32(T[l >> 1u][l & 1u])"),
        (Storage::F16, _) => ("f32(T[i])", "f32(T[l])"),
        (_, 8) => (
            "unpack_unit8(T[i])",
            "unpack_half2(T[l >> 3u][(l >> 1u) & 3u])[l & 1u]",
        ),
        (_, 4) => (
            "unpack_unit4(T[i])",
            "unpack_half2(T[l >> 2u][(l >> 1u) & 1u])[l & 1u]",
        ),
        (_, 2) => ("unpack_half2(T[i])", "unpack_half2(T[l >> 1u])[l & 1u]"),
        (_, _) => (
            "unpack_half2(T[i >> 1u])[i & 1u]",
            "unpack_half2(T[l >> 1u])[l & 1u]",
        ),
    };
    // dy passes where the forward's ReLU passed (select, not a product: 0 where masked, even for an
    // infinite dy, as PyTorch's threshold_backward).
    let unit_mask = match w {
        4 => "((vec4<u32>(bits) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) != vec4<u32>(0u)",
        2 => "((vec2<u32>(bits) >> vec2<u32>(0u, 1u)) & vec2<u32>(1u)) != vec2<u32>(0u)",
        _ => "(bits & 1u) != 0u",
    };
    out.push_str(&format!(
        "fn load_x(i: u32) -> V {{ return {}; }}\n",
        unit_load.replace('T', "x")
    ));
    out.push_str(&format!(
        "fn load_elem_x(l: u32) -> f32 {{ return {}; }}\n",
        elem_load.replace('T', "x")
    ));
    // Pairs of elements (l even) for the word kernels: packed f16 reads the pair's one word once (per
    // element it was read twice, and every storage read is a loop over the lanes on lavapipe); `both`
    // false for a tensor's odd last element (the second value is then 0, or the word's padding half).
    let pair_word = match w {
        8 => "T[l >> 3u][(l >> 1u) & 3u]",
        4 => "T[l >> 2u][(l >> 1u) & 1u]",
        _ => "T[l >> 1u]",
    };
    for name in ["x", "dy"] {
        let body = if storage == Storage::F16Packed {
            format!("return unpack_half2({});", pair_word.replace('T', name))
        } else {
            format!(
                "var v = vec2<f32>(elem_raw_{name}(l), 0.0); if (both) {{ v.y = elem_raw_{name}(l + 1u); }} return v;"
            )
        };
        out.push_str(&format!(
            "fn elem_raw_{name}(l: u32) -> f32 {{ return {}; }}\n\
             fn pair_raw_{name}(l: u32, both: bool) -> vec2<f32> {{ {body} }}\n",
            elem_load.replace('T', name)
        ));
    }
    out.push_str(
        "fn load_pair_x(l: u32, both: bool) -> vec2<f32> { return pair_raw_x(l, both); }\n",
    );
    if relu {
        out.push_str(&format!(
            "// The mask's element offset, read from params once by begin_backward (every storage read is a\n\
             // loop over the lanes on lavapipe: once per unit it cost as much as a vec4 of data).\n\
             var<private> mask_win: u32;\n\
             fn begin_backward() {{ mask_win = params.win_elem; }}\n\
             fn load_dy(i: u32) -> V {{\n\
             \x20   let e = i * W + mask_win;\n\
             \x20   let bits = mask[e >> 5u] >> (e & 31u);\n\
             \x20   return select(V(0.0), {}, {unit_mask});\n}}\n\
             fn load_elem_dy(l: u32) -> f32 {{\n\
             \x20   let e = l + mask_win;\n\
             \x20   return select(0.0, {}, ((mask[e >> 5u] >> (e & 31u)) & 1u) != 0u);\n}}\n\
             fn load_pair_dy(l: u32, both: bool) -> vec2<f32> {{\n\
             \x20   let e = l + mask_win;\n\
             \x20   let bits = mask[e >> 5u] >> (e & 31u);\n\
             \x20   let keep = (vec2<u32>(bits, bits >> 1u) & vec2<u32>(1u)) != vec2<u32>(0u);\n\
             \x20   return select(vec2<f32>(0.0), pair_raw_dy(l, both), keep);\n}}\n\
             fn store_mask(b: u32, bits: u32) {{ mask[b] = bits; }}\n",
            unit_load.replace('T', "dy"),
            elem_load.replace('T', "dy"),
        ));
    } else {
        out.push_str(&format!(
            "fn load_dy(i: u32) -> V {{ return {}; }}\n\
             fn load_elem_dy(l: u32) -> f32 {{ return {}; }}\n\
             // Without the fused ReLU there is no mask to keep.\n\
             fn store_mask(b: u32, bits: u32) {{}}\n\
             fn begin_backward() {{}}\n\
             fn load_pair_dy(l: u32, both: bool) -> vec2<f32> {{ return pair_raw_dy(l, both); }}\n",
            unit_load.replace('T', "dy"),
            elem_load.replace('T', "dy"),
        ));
    }
    // Unit stores, and pair stores for the word kernels (l even; `both` false for a tensor's odd last
    // element, whose packed word's other half is padding).
    let (unit_store, pair_store) = match (storage, w) {
        (Storage::F32, 4) => (
            "T[i] = v;",
            "T[l >> 2u][l & 3u] = v.x; if (both) { T[(l + 1u) >> 2u][(l + 1u) & 3u] = v.y; }",
        ),
        (Storage::F32, 2) => ("T[i] = v;", "T[l >> 1u] = v;"),
        (Storage::F32, _) => ("T[i] = v;", "T[l] = v.x; if (both) { T[l + 1u] = v.y; }"),
        (Storage::F16, 4) => (
            "T[i] = S(v);",
            "T[l >> 2u][l & 3u] = f16(v.x); if (both) { T[(l + 1u) >> 2u][(l + 1u) & 3u] = f16(v.y); }",
        ),
        (Storage::F16, 2) => ("T[i] = S(v);", "T[l >> 1u] = vec2<f16>(v);"),
        (Storage::F16, _) => (
            "T[i] = S(v);",
            "T[l] = f16(v.x); if (both) { T[l + 1u] = f16(v.y); }",
        ),
        (_, 8) => (
            "T[i] = pack_unit8(v);",
            "T[l >> 3u][(l >> 1u) & 3u] = pack_half2(v);",
        ),
        (_, 4) => (
            "T[i] = pack_unit4(v);",
            "T[l >> 2u][(l >> 1u) & 1u] = pack_half2(v);",
        ),
        (_, 2) => ("T[i] = pack_half2(v);", "T[l >> 1u] = pack_half2(v);"),
        // Never dispatched (BatchNormOp::dispatch refuses it): the word kernels write these tensors.
        (_, _) => ("", "T[l >> 1u] = pack_half2(v);"),
    };
    // The fused sigmoid's output activation, applied as y is stored: 1 / (1 + exp(-z)) written through
    // exp(-|z|) so that neither side overflows (as shaders/sigmoid.wgsl).
    let (act_unit, act_pair) = if sigmoid {
        (
            "let e = exp(-abs(z)); let s = 1.0 / (1.0 + e); let v = select(e * s, s, z >= V(0.0));",
            "let e = exp(-abs(z)); let s = 1.0 / (1.0 + e); let v = select(e * s, s, z >= vec2(0.0));",
        )
    } else {
        ("let v = z;", "let v = z;")
    };
    for name in ["y", "dx"] {
        let (unit, pair) = if name == "y" {
            (act_unit, act_pair)
        } else {
            ("let v = z;", "let v = z;")
        };
        out.push_str(&format!(
            "fn store_{name}(i: u32, z: V) {{ {unit} {} }}\n\
             fn store_pair_{name}(l: u32, z: vec2<f32>, both: bool) {{ {pair} {} }}\n",
            unit_store.replace('T', name),
            pair_store.replace('T', name),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    //! The packed-word path's own f16 conversions against the `half` crate (IEEE round-to-nearest-even):
    //! every one of the 65 536 f16 bit patterns through `unpack_half2` (NaNs staying NaN), and through
    //! `pack_half2` every f16 value, every midpoint between neighbours (the ties), the values just
    //! either side of each midpoint, the overflow boundary, f32 subnormals, infinities and NaN.

    use super::PACK_HALF2_WGSL;
    use crate::gpu::{storage_usage, Gpu};
    use crate::ops::kernel::{dispatch, entry};
    use half::f16;

    const HARNESS: &str = "
@group(0) @binding(0) var<storage, read_write> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(64)
fn unpack(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x < arrayLength(&src)) {
        let v = unpack_half2(src[g.x]);
        dst[2u * g.x] = bitcast<u32>(v.x);
        dst[2u * g.x + 1u] = bitcast<u32>(v.y);
    }
}
@compute @workgroup_size(64)
fn pack(@builtin(global_invocation_id) g: vec3<u32>) {
    if (2u * g.x < arrayLength(&src)) {
        dst[g.x] = pack_half2(bitcast<vec2<f32>>(vec2<u32>(src[2u * g.x], src[2u * g.x + 1u])));
    }
}
";

    fn run(gpu: &Gpu, entry_point: &str, input: &[u32], out_len: usize) -> Vec<u32> {
        let pipeline = gpu
            .pipeline(&format!("test.half.{entry_point}"), entry_point, || {
                format!("{PACK_HALF2_WGSL}{HARNESS}")
            })
            .unwrap();
        let src = gpu.upload("src", input).unwrap();
        let dst = gpu
            .create_buffer("dst", 4 * out_len as u64, storage_usage())
            .unwrap();
        let mut e = gpu.encoder("half");
        let n = if entry_point == "unpack" {
            input.len()
        } else {
            out_len
        };
        let groups = (n.div_ceil(64) as u32, 1, 1);
        dispatch(
            gpu,
            &mut e,
            "half",
            &pipeline,
            &[
                entry(0, &(&src).into(), 4 * input.len() as u64),
                entry(1, &(&dst).into(), 4 * out_len as u64),
            ],
            groups,
        );
        gpu.submit_and_wait(e).unwrap();
        gpu.download(&dst, 0, out_len).unwrap()
    }

    #[test]
    fn unpack_half2_is_exact_for_every_f16() {
        let gpu = Gpu::new().expect("a GPU adapter (install mesa-vulkan-drivers)");
        let words: Vec<u32> = (0..32768u32)
            .map(|i| (2 * i) | ((2 * i + 1) << 16))
            .collect();
        let got = run(&gpu, "unpack", &words, 65536);
        for (h, bits) in got.iter().enumerate() {
            let want = f16::from_bits(h as u16).to_f32();
            let v = f32::from_bits(*bits);
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "f16 {h:#06x}: got {v:e} ({bits:#010x}), want {want:e}"
            );
        }
    }

    #[test]
    fn pack_half2_rounds_to_nearest_even() {
        let gpu = Gpu::new().expect("a GPU adapter (install mesa-vulkan-drivers)");
        let mut values: Vec<f32> = Vec::new();
        for h in 0..=u16::MAX {
            let v = f16::from_bits(h).to_f32();
            if !v.is_finite() {
                continue;
            }
            let next = f16::from_bits(h.wrapping_add(1)).to_f32();
            values.push(v);
            if next.is_finite() && next.abs() > v.abs() {
                let mid = ((v as f64 + next as f64) / 2.0) as f32; // exact: f16 neighbours
                values.extend([
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ]);
            }
        }
        values.extend([
            65504.0,
            65519.996,
            65520.0,
            65536.0,
            1e10,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(1),
            f32::MIN_POSITIVE,
            -0.0,
            5.9604645e-8,
            2.9802322e-8,
            2.9802326e-8,
        ]);
        if values.len() % 2 == 1 {
            values.push(0.0);
        }
        let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        let got = run(&gpu, "pack", &bits, values.len() / 2);
        for (i, v) in values.iter().enumerate() {
            let h = ((got[i / 2] >> (16 * (i % 2))) & 0xffff) as u16;
            let want = f16::from_f32(*v);
            let ok = h == want.to_bits() || (want.is_nan() && f16::from_bits(h).is_nan());
            assert!(
                ok,
                "{v:e} ({:#010x}): got {h:#06x}, want {:#06x}",
                v.to_bits(),
                want.to_bits()
            );
        }
    }
}
