//! `batchnorm bench`: BatchNorm throughput against the device's own streaming roofline.
//!
//! What it measures, llm.c style: for each op (forward-train, forward-eval, backward), layout and shape,
//! the median device time of one recorded op, turned into *effective* GB/s by the op's **minimal** memory
//! traffic (forward-train 3 tensor passes: read x for the statistics, read x again and write y;
//! forward-eval 2: read x, write y; backward 5: read x and dy for the two reductions, read them again and
//! write dx). That number is printed next to the device's streaming bandwidth measured in the same run
//! with this module's own best vec4 copy kernel (bytes read + bytes written over time), and their ratio is
//! the efficiency the targets in DESIGN.md are stated in. A plan that reads x once can exceed 1.
//!
//! Why a copy *kernel* and not `copy_buffer_to_buffer`: a BatchNorm kernel can at best stream like a
//! compute shader that only moves data. On a GPU both are close to the memory bandwidth; on a CPU driver
//! (lavapipe) the copy command is a `memcpy` while shaders run through LLVM-compiled SIMD code, so the copy
//! kernel is the compute ceiling, several times below memcpy. Both are printed.
//!
//! Timing: warm-up (pipelines compile on first use; then untimed repetitions for at least
//! [`WARMUP_SECONDS`], since a GPU raises its clocks only under sustained load), then the median of
//! samples, each recorded between two encoder timestamps (`TIMESTAMP_QUERY_INSIDE_ENCODERS`) and
//! submitted on its own; without timestamps, the host clock around submit + device wait. A sample holds
//! the op recorded back to back often enough to cover [`SAMPLE_SECONDS`] (once on a CPU driver, dozens
//! of times for the microsecond ops of a GPU), and the op's time is the sample's over that count.
//! Inputs are rotated over a few copies when a working set is small enough to stay in the CPU's
//! caches, so repetitions do not measure cache bandwidth.
//! The f64 reference (`crate::reference::batchnorm`) is timed once on the same data for scale.
//!
//! The criterion benchmark `benches/batchnorm.rs` uses [`Workload`] and [`BenchOp`] from here.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, F16Path, ForwardBuffers, OpOptions,
    PlanChoice,
};
use crate::reference::batchnorm as reference;
use crate::tensor::{f16_padded, DType, Layout};

/// Below this working set (all tensors one op touches) inputs are rotated over several copies.
const ROTATE_BELOW: u64 = 64 << 20;
/// At most this many copies of the tensors when rotating.
const MAX_COPIES: u64 = 4;
/// The f64 reference is skipped above this many elements (it takes seconds there).
const REFERENCE_MAX_ELEMENTS: usize = 20_000_000;
/// Running-statistics factor for forward-train (PyTorch's default momentum).
const MOMENTUM: f32 = 0.1;

/// Options of `batchnorm bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Fewer repetitions (5 instead of 21) and a 64 MiB roofline copy instead of 256 MiB.
    #[arg(long)]
    pub quick: bool,
    /// Also write the rows as a JSON array of {op, layout, dtype, shape, median_ms, gbps, device_gbps,
    /// efficiency, dispatches, plan, reference_ms} objects to FILE (shape in N,C,H,W order, as given,
    /// whatever the layout; reference_ms is null where the reference was skipped).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Shapes to run instead of the standard set, in N,C,H,W order (also N,C,L and N,C,D,H,W); a 2-D
    /// shape N,C runs in the NC layout. Repeat the flag or give several shapes after it.
    #[arg(long = "shape", value_name = "N,C[,H,W]", num_args = 1..)]
    pub shapes: Vec<String>,
    /// Layouts for shapes of rank 3 and more (rank-2 shapes always run as NC).
    #[arg(long, value_enum, default_value_t = LayoutChoice::All)]
    pub layout: LayoutChoice,
    /// Time with the host clock around submit + device wait even when the device has timestamps.
    #[arg(long)]
    pub wall_clock: bool,
    /// Kernel plans to run (several to compare them side by side); plans that do not apply to a shape
    /// are skipped with a note.
    #[arg(long = "plan", value_enum, num_args = 1.., default_values_t = [PlanArg::Auto])]
    pub plans: Vec<PlanArg>,
    /// Also time the BatchNorm variants through the layer (plain, ghost BN, Batch Renorm, FrozenBN,
    /// per-domain statistics, PreciseBN's merge) on each shape, in the first layout, and inference
    /// folding on Ioffe's MLP (eval forward with BN against the folded network).
    #[arg(long)]
    pub variants: bool,
    /// Storage types to run (several for side-by-side rows): f32, f16 (native where the device has
    /// SHADER_F16), f16-packed (the u32-word fallback, forced). GB/s counts the bytes of the storage type.
    #[arg(long = "dtype", value_enum, num_args = 1.., default_values_t = [DTypeArg::F32])]
    pub dtypes: Vec<DTypeArg>,
    /// Also run BatchNorm with the ReLU fused (mask as bits), and, for f32, a standalone ReLU forward
    /// (y in place) and backward (dy through y > 0) to compare with: BN then ReLU costs the BN rows plus
    /// those.
    #[arg(long)]
    pub relu: bool,
}

/// A storage type to benchmark, as `--dtype` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    /// f32 tensors.
    F32,
    /// f16 tensors, `enable f16` where the device has it.
    F16,
    /// f16 tensors through packed u32 words (the fallback for devices without SHADER_F16).
    F16Packed,
    /// f16 tensors through `enable f16`, forced (CPU devices get packed words under `f16`).
    F16Native,
}

impl DTypeArg {
    /// The op options for this storage type.
    pub fn options(self) -> OpOptions {
        match self {
            DTypeArg::F32 => OpOptions::default(),
            DTypeArg::F16 => OpOptions {
                dtype: DType::F16,
                ..Default::default()
            },
            DTypeArg::F16Packed => OpOptions {
                dtype: DType::F16,
                f16_path: F16Path::Packed,
                ..Default::default()
            },
            DTypeArg::F16Native => OpOptions {
                dtype: DType::F16,
                f16_path: F16Path::Native,
                ..Default::default()
            },
        }
    }
}

/// A kernel plan to benchmark, as `--plan` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanArg {
    /// The planner's choice.
    Auto,
    /// One workgroup per channel, two reads of x.
    Fused,
    /// One workgroup per channel, x kept in registers (NCHW).
    Resident,
    /// Several workgroups per channel, a merge pass, then the elementwise pass.
    Split,
}

impl PlanArg {
    /// The op's plan choice.
    pub fn choice(self) -> PlanChoice {
        match self {
            PlanArg::Auto => PlanChoice::Auto,
            PlanArg::Fused => PlanChoice::Fused,
            PlanArg::Resident => PlanChoice::Resident,
            PlanArg::Split => PlanChoice::Split { parts: None },
        }
    }
}

/// Which layouts `batchnorm bench` runs for shapes of rank 3 and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutChoice {
    /// Channel-major only.
    Nchw,
    /// Channel-last only.
    Nhwc,
    /// Both.
    All,
}

impl LayoutChoice {
    /// The layouts to run for a shape of `rank`.
    pub fn layouts(self, rank: usize) -> Vec<Layout> {
        match (rank, self) {
            (2, _) => vec![Layout::Nc],
            (_, LayoutChoice::Nchw) => vec![Layout::Nchw],
            (_, LayoutChoice::Nhwc) => vec![Layout::Nhwc],
            (_, LayoutChoice::All) => vec![Layout::Nchw, Layout::Nhwc],
        }
    }
}

/// The standard shapes, in N,C,H,W (or N,C) order: ResNet-like activations from early to late layers,
/// a small dispatch-bound one, a wide fully connected layer and a tiny one.
pub fn standard_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![32, 64, 56, 56],
        vec![128, 256, 14, 14],
        vec![8, 32, 112, 112],
        vec![256, 512, 7, 7],
        vec![64, 16, 8, 8],
        vec![1024, 4096],
        vec![60, 100],
    ]
}

/// The tensor's shape in `layout` for a logical shape given in N,C,spatial order: NHWC moves C last.
pub fn layout_shape(logical: &[usize], layout: Layout) -> Vec<usize> {
    match layout {
        Layout::Nhwc if logical.len() > 2 => {
            let mut s = vec![logical[0]];
            s.extend_from_slice(&logical[2..]);
            s.push(logical[1]);
            s
        }
        _ => logical.to_vec(),
    }
}

/// Parses `N,C,H,W` (also `NxCxHxW`; rank 2 to 5).
///
/// # Errors
/// [`Error::BadConfig`] for anything else.
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: std::result::Result<Vec<usize>, _> = s
        .split([',', 'x'])
        .map(|d| d.trim().parse::<usize>())
        .collect();
    match dims {
        Ok(d) if (2..=5).contains(&d.len()) && !d.contains(&0) => Ok(d),
        _ => Err(Error::config(format!(
            "--shape '{s}': expected 2 to 5 positive sizes separated by commas, like 32,64,56,56 or 1024,4096"
        ))),
    }
}

/// The three timed ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchOp {
    /// `record_forward_train` with a running-statistics factor of 0.1.
    ForwardTrain,
    /// `record_forward_eval`.
    ForwardEval,
    /// `record_backward` with batch statistics.
    Backward,
}

impl BenchOp {
    /// All three, in the order the bench prints them.
    pub const ALL: [BenchOp; 3] = [
        BenchOp::ForwardTrain,
        BenchOp::ForwardEval,
        BenchOp::Backward,
    ];

    /// "forward-train", "forward-eval", "backward".
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::ForwardTrain => "forward-train",
            BenchOp::ForwardEval => "forward-eval",
            BenchOp::Backward => "backward",
        }
    }

    /// Whole-tensor reads and writes the op needs at least (see the module header).
    pub fn passes(self) -> u64 {
        match self {
            BenchOp::ForwardTrain => 3,
            BenchOp::ForwardEval => 2,
            BenchOp::Backward => 5,
        }
    }

    /// Minimal traffic in bytes for a tensor of `tensor_bytes`.
    pub fn min_bytes(self, tensor_bytes: u64) -> u64 {
        self.passes() * tensor_bytes
    }

    /// This op's entry in [`BatchNormOp::dispatch_counts`].
    pub fn dispatches(self, op: &BatchNormOp) -> usize {
        let (train, eval, backward) = op.dispatch_counts();
        match self {
            BenchOp::ForwardTrain => train,
            BenchOp::ForwardEval => eval,
            BenchOp::Backward => backward,
        }
    }
}

/// The tensors one recorded op works on; [`Workload`] keeps several to rotate over.
struct TensorSet {
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    dy: wgpu::Buffer,
    dx: wgpu::Buffer,
    /// The ReLU mask, when the op fuses ReLU.
    mask: Option<wgpu::Buffer>,
}

/// A planned op with every buffer its forward and backward need, filled with random data (f32, affine,
/// running statistics tracked): what the bench and the criterion benchmark record.
pub struct Workload {
    op_gpu: Arc<Gpu>,
    op: BatchNormOp,
    shape: Vec<usize>,
    layout: Layout,
    sets: Vec<TensorSet>,
    weight: wgpu::Buffer,
    bias: wgpu::Buffer,
    running_mean: wgpu::Buffer,
    running_var: wgpu::Buffer,
    saved: wgpu::Buffer,
    dweight: wgpu::Buffer,
    dbias: wgpu::Buffer,
    x_host: Vec<f32>,
    dy_host: Vec<f32>,
    weight_host: Vec<f32>,
    bias_host: Vec<f32>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("shape", &self.shape)
            .field("layout", &self.layout)
            .field("copies", &self.sets.len())
            .finish()
    }
}

impl Workload {
    /// Plans BatchNorm (default config, the planner's choice) for `shape` (the tensor's own shape in
    /// `layout`) and uploads random x, dy, weight, bias and running statistics (`seed` makes them
    /// repeatable). `copies: Some(k)` allocates the tensors k times; `None` allocates enough copies (up to
    /// 4) that two tensors' worth of them exceed 64 MiB, or one when one copy already does.
    ///
    /// # Errors
    /// Planning errors of [`BatchNormOp::new`]; buffer creation errors.
    pub fn new(
        gpu: &Arc<Gpu>,
        shape: &[usize],
        layout: Layout,
        plan: PlanChoice,
        copies: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        Self::with_options(gpu, shape, layout, plan, copies, seed, OpOptions::default())
    }

    /// [`Self::new`] for an op with [`OpOptions`] (f16 storage, fused ReLU).
    ///
    /// # Errors
    /// As [`Self::new`], and [`BatchNormOp::with_options`]'s.
    pub fn with_options(
        gpu: &Arc<Gpu>,
        shape: &[usize],
        layout: Layout,
        plan: PlanChoice,
        copies: Option<usize>,
        seed: u64,
        options: OpOptions,
    ) -> Result<Self> {
        let op = BatchNormOp::with_options(
            gpu,
            shape,
            layout,
            BatchNormConfig::default(),
            plan,
            options,
        )?;
        let dims = op.dims();
        let numel = dims.numel();
        let tensor_bytes = op.tensor_bytes();
        let copies = match copies {
            Some(k) => k.max(1),
            // The largest working set of one op is x, dy and dx (backward); forward touches x and y.
            None if 2 * tensor_bytes >= ROTATE_BELOW => 1,
            None => ROTATE_BELOW.div_ceil(2 * tensor_bytes).min(MAX_COPIES) as usize,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x_host: Vec<f32> = (0..numel).map(|_| rng.random_range(-2.0..3.0)).collect();
        let dy_host: Vec<f32> = (0..numel).map(|_| rng.random_range(-1.0..1.0)).collect();
        let c = dims.c;
        let weight_host: Vec<f32> = (0..c).map(|_| rng.random_range(0.5..1.5)).collect();
        let bias_host: Vec<f32> = (0..c).map(|_| rng.random_range(-0.5..0.5)).collect();
        let rmean: Vec<f32> = (0..c).map(|_| rng.random_range(-0.1..0.1)).collect();
        let rvar: Vec<f32> = (0..c).map(|_| rng.random_range(0.5..2.0)).collect();
        let mut sets = Vec::with_capacity(copies);
        let upload = |label: &str, v: &[f32]| match options.dtype {
            DType::F32 => gpu.upload(label, v),
            DType::F16 => gpu.upload(label, &f16_padded(v)),
        };
        for _ in 0..copies {
            sets.push(TensorSet {
                x: upload("bench x", &x_host)?,
                y: gpu.create_buffer("bench y", tensor_bytes, storage_usage())?,
                dy: upload("bench dy", &dy_host)?,
                dx: gpu.create_buffer("bench dx", tensor_bytes, storage_usage())?,
                mask: if options.fuse_relu {
                    Some(gpu.create_buffer("bench mask", op.mask_bytes(), storage_usage())?)
                } else {
                    None
                },
            });
        }
        let channel = |label: &str| gpu.create_buffer(label, 4 * c as u64, storage_usage());
        Ok(Workload {
            op_gpu: gpu.clone(),
            op,
            shape: shape.to_vec(),
            layout,
            sets,
            weight: gpu.upload("bench weight", &weight_host)?,
            bias: gpu.upload("bench bias", &bias_host)?,
            running_mean: gpu.upload("bench running_mean", &rmean)?,
            running_var: gpu.upload("bench running_var", &rvar)?,
            saved: gpu.create_buffer("bench saved", 8 * c as u64, storage_usage())?,
            dweight: channel("bench dweight")?,
            dbias: channel("bench dbias")?,
            x_host,
            dy_host,
            weight_host,
            bias_host,
        })
    }

    /// The planned op.
    pub fn op(&self) -> &BatchNormOp {
        &self.op
    }

    /// Bytes of one tensor (x, y, dy or dx) in the op's storage type.
    pub fn tensor_bytes(&self) -> u64 {
        self.op.tensor_bytes()
    }

    /// The op's minimal traffic: its tensor passes, plus the ReLU mask written (forward) or read
    /// (backward) when fused.
    pub fn min_bytes(&self, op: BenchOp) -> u64 {
        let mask = if self.op.fuse_relu() {
            self.op.mask_bytes()
        } else {
            0
        };
        op.min_bytes(self.tensor_bytes()) + mask
    }

    /// How many copies of the tensors are rotated over.
    pub fn copies(&self) -> usize {
        self.sets.len()
    }

    /// Records `op` once on tensor copy `copy % copies()` into `encoder` (nothing is submitted).
    ///
    /// The backward reads the mean/invstd the last forward left in the saved buffer: record a
    /// forward-train once before timing backwards.
    ///
    /// # Errors
    /// The op's recording errors.
    pub fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        op: BenchOp,
        copy: usize,
    ) -> Result<()> {
        let set = &self.sets[copy % self.sets.len()];
        match op {
            BenchOp::ForwardTrain | BenchOp::ForwardEval => {
                let bufs = ForwardBuffers {
                    x: BufferRef::from(&set.x),
                    y: BufferRef::from(&set.y),
                    weight: Some(BufferRef::from(&self.weight)),
                    bias: Some(BufferRef::from(&self.bias)),
                    running_mean: Some(BufferRef::from(&self.running_mean)),
                    running_var: Some(BufferRef::from(&self.running_var)),
                    saved: BufferRef::from(&self.saved),
                };
                match (op, &set.mask) {
                    (BenchOp::ForwardTrain, None) => {
                        self.op.record_forward_train(encoder, &bufs, Some(MOMENTUM))
                    }
                    (BenchOp::ForwardTrain, Some(m)) => {
                        self.op
                            .record_forward_train_relu(encoder, &bufs, m.into(), Some(MOMENTUM))
                    }
                    (_, None) => self.op.record_forward_eval(encoder, &bufs),
                    (_, Some(m)) => self.op.record_forward_eval_relu(encoder, &bufs, m.into()),
                }
            }
            BenchOp::Backward => {
                let bufs = BackwardBuffers {
                    x: BufferRef::from(&set.x),
                    dy: BufferRef::from(&set.dy),
                    dx: BufferRef::from(&set.dx),
                    weight: Some(BufferRef::from(&self.weight)),
                    saved: BufferRef::from(&self.saved),
                    dweight: Some(BufferRef::from(&self.dweight)),
                    dbias: Some(BufferRef::from(&self.dbias)),
                };
                match &set.mask {
                    None => self.op.record_backward(encoder, &bufs, true),
                    Some(m) => self.op.record_backward_relu(encoder, &bufs, m.into(), true),
                }
            }
        }
    }

    /// Records a standalone ReLU on tensor copy `copy`, the pass a BN-then-ReLU network adds when the
    /// ReLU is not fused: forward `y = max(y, 0)` in place (read and write y), backward
    /// `dy = y > 0 ? dy : 0` in place (read y and dy, write dy). f32 tensors whose size divides by 4.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for f16 or a size not divisible by 4; pipeline errors.
    pub fn record_separate_relu(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        backward: bool,
        copy: usize,
    ) -> Result<()> {
        let numel = self.op.dims().numel();
        if self.op.dtype() != DType::F32 || numel % 4 != 0 {
            return Err(Error::config(
                "the standalone ReLU runs on f32 tensors whose size divides by 4",
            ));
        }
        let gpu = &self.op_gpu;
        let entry = if backward {
            "relu_backward"
        } else {
            "relu_forward"
        };
        let pipeline = gpu.pipeline(&format!("bench {entry}"), entry, || RELU_WGSL.to_string())?;
        let set = &self.sets[copy % self.sets.len()];
        let bytes = self.tensor_bytes();
        let mut entries = vec![crate::ops::kernel::entry(
            0,
            &BufferRef::from(&set.y),
            bytes,
        )];
        if backward {
            entries.push(crate::ops::kernel::entry(
                1,
                &BufferRef::from(&set.dy),
                bytes,
            ));
        }
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let groups = (numel as u64 / 4).div_ceil(RELU_WG * RELU_PER) as u32;
        let (gx, gy) = fold(groups);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(entry),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
        Ok(())
    }

    /// Runs `op` with the f64 reference on the same data once and returns the seconds it took (the
    /// conversion to f64 and, for the backward, the forward it needs are not counted).
    ///
    /// # Errors
    /// The reference's errors.
    pub fn time_reference(&self, op: BenchOp) -> Result<f64> {
        let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let x = wide(&self.x_host);
        let w = wide(&self.weight_host);
        let b = wide(&self.bias_host);
        let c = self.op.dims().c;
        let mut running = reference::RunningStats::new(c);
        let eps = self.op.config().eps as f64;
        let forward = |running: &mut reference::RunningStats, training: bool| {
            reference::forward(
                &x,
                &self.shape,
                self.layout,
                Some(&w),
                Some(&b),
                Some(running),
                training,
                Some(MOMENTUM as f64),
                eps,
            )
        };
        match op {
            BenchOp::ForwardTrain | BenchOp::ForwardEval => {
                let t = Instant::now();
                let out = forward(&mut running, op == BenchOp::ForwardTrain)?;
                let s = t.elapsed().as_secs_f64();
                std::hint::black_box(out);
                Ok(s)
            }
            BenchOp::Backward => {
                let fw = forward(&mut running, true)?;
                let dy = wide(&self.dy_host);
                let t = Instant::now();
                let out = reference::backward(
                    &x,
                    &dy,
                    &self.shape,
                    self.layout,
                    Some(&w),
                    &fw.mean,
                    &fw.invstd,
                    true,
                )?;
                let s = t.elapsed().as_secs_f64();
                std::hint::black_box(out);
                Ok(s)
            }
        }
    }
}

/// Untimed repetitions run at least this long before an op is timed. With two repetitions of warm-up, an
/// H200 left idle between rows (the f64 reference runs on the host there) measured the same rows 3-6x
/// apart within one run ((N,C) 1024x65536 forward-train 1.182 ms, then 0.349).
pub const WARMUP_SECONDS: f64 = 0.05;
/// Device time one timed sample covers at least: the op is recorded that many times into one encoder,
/// so a microsecond op is not timed against an idle GPU between submissions.
pub const SAMPLE_SECONDS: f64 = 0.5e-3;
/// Most repetitions of an op in one sample.
const SAMPLE_MAX_REPS: usize = 64;

/// Times recorded work: device timestamps around it when the device has them, else the host clock around
/// submit + wait.
struct Timer {
    gpu: Arc<Gpu>,
    queries: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    period_ns: f64,
}

impl Timer {
    fn new(gpu: &Arc<Gpu>, wall_clock: bool) -> Result<Self> {
        let queries = if gpu.caps().timestamps && !wall_clock {
            let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = gpu.create_buffer(
                "bench timestamps",
                2 * wgpu::QUERY_SIZE as u64,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            )?;
            Some((set, resolve))
        } else {
            None
        };
        Ok(Timer {
            gpu: gpu.clone(),
            queries,
            period_ns: gpu.queue.get_timestamp_period() as f64,
        })
    }

    fn method(&self) -> String {
        match self.queries {
            Some(_) => format!(
                "device timestamps around each op (period {} ns)",
                self.period_ns
            ),
            None => "host clock around submit + device wait".to_string(),
        }
    }

    /// Seconds the work `record` puts into one encoder takes, submitted alone.
    fn time(&self, record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>) -> Result<f64> {
        let mut encoder = self.gpu.encoder("bench");
        match &self.queries {
            Some((set, resolve)) => {
                encoder.write_timestamp(set, 0);
                record(&mut encoder)?;
                encoder.write_timestamp(set, 1);
                encoder.resolve_query_set(set, 0..2, resolve, 0);
                self.gpu.submit_and_wait(encoder)?;
                let ticks: Vec<u64> = self.gpu.download(resolve, 0, 2)?;
                if ticks[1] <= ticks[0] {
                    return Err(Error::DeviceLost(format!(
                        "timestamps out of order ({} then {}); run with --wall-clock",
                        ticks[0], ticks[1]
                    )));
                }
                Ok((ticks[1] - ticks[0]) as f64 * self.period_ns * 1e-9)
            }
            None => {
                record(&mut encoder)?;
                let t = Instant::now();
                self.gpu.submit_and_wait(encoder)?;
                Ok(t.elapsed().as_secs_f64())
            }
        }
    }

    /// Median seconds of one op over `reps` samples, after at least `warmup` untimed repetitions and
    /// [`WARMUP_SECONDS`]; a sample records the op often enough to cover [`SAMPLE_SECONDS`]. `record`
    /// gets the repetition number (for rotating inputs).
    fn median(
        &self,
        warmup: usize,
        reps: usize,
        mut record: impl FnMut(&mut wgpu::CommandEncoder, usize) -> Result<()>,
    ) -> Result<f64> {
        let start = Instant::now();
        let mut i = 0;
        let mut last = f64::INFINITY;
        while i < warmup || start.elapsed().as_secs_f64() < WARMUP_SECONDS {
            last = self.time(|e| record(e, i))?;
            i += 1;
        }
        let per_sample =
            ((SAMPLE_SECONDS / last.max(1e-9)).ceil() as usize).clamp(1, SAMPLE_MAX_REPS);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let secs = self.time(|e| {
                for _ in 0..per_sample {
                    record(e, i)?;
                    i += 1;
                }
                Ok(())
            })?;
            times.push(secs / per_sample as f64);
        }
        Ok(median(&mut times))
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

const RELU_WG: u64 = 64;
const RELU_PER: u64 = 8;
/// The standalone ReLU the fused one is compared with: 8 consecutive vec4 per invocation, the copy
/// kernel's best pattern on CPU drivers.
const RELU_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> y: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dy: array<vec4<f32>>;

fn first(id: vec3<u32>, n: vec3<u32>, t: u32) -> u32 {
    return ((id.x + id.y * n.x) * 64u + t) * 8u;
}

@compute @workgroup_size(64)
fn relu_forward(@builtin(workgroup_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
                @builtin(local_invocation_index) t: u32) {
    let base = first(id, n, t);
    let end = min(base + 8u, arrayLength(&y));
    for (var i = base; i < end; i++) {
        y[i] = max(y[i], vec4<f32>(0.0));
    }
}

@compute @workgroup_size(64)
fn relu_backward(@builtin(workgroup_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
                 @builtin(local_invocation_index) t: u32) {
    let base = first(id, n, t);
    let end = min(base + 8u, arrayLength(&y));
    for (var i = base; i < end; i++) {
        dy[i] = select(vec4<f32>(0.0), dy[i], y[i] > vec4<f32>(0.0));
    }
}
"#;

/// Copy kernels for the roofline. `dst[i] = src[i]` over vec4<f32>; the variants differ only in which
/// vec4s an invocation moves. The workgroup index is folded over two dispatch dimensions.
const COPY_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

fn group_index(id: vec3<u32>, n: vec3<u32>) -> u32 {
    return id.x + id.y * n.x;
}

// PER consecutive vec4s per invocation, adjacent invocations on adjacent blocks (CPU drivers like this).
@compute @workgroup_size(WG)
fn copy_blocks(@builtin(workgroup_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
               @builtin(local_invocation_index) t: u32) {
    let len = arrayLength(&dst);
    let base = (group_index(id, n) * WG + t) * PER;
    if (base + PER <= len) {
        for (var k = 0u; k < PER; k++) {
            dst[base + k] = src[base + k];
        }
    } else {
        for (var k = base; k < len; k++) {
            dst[k] = src[k];
        }
    }
}

// PER vec4s per invocation, adjacent invocations on adjacent vec4s (coalesced, the GPU pattern).
@compute @workgroup_size(WG)
fn copy_strided(@builtin(workgroup_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
                @builtin(local_invocation_index) t: u32) {
    let len = arrayLength(&dst);
    let base = group_index(id, n) * WG * PER + t;
    for (var k = 0u; k < PER; k++) {
        let i = base + k * WG;
        if (i < len) {
            dst[i] = src[i];
        }
    }
}

// A fixed grid walks the whole window, every invocation stepping by the grid's size.
@compute @workgroup_size(WG)
fn copy_grid_stride(@builtin(workgroup_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
                    @builtin(local_invocation_index) t: u32) {
    let len = arrayLength(&dst);
    let stride = n.x * n.y * WG;
    for (var i = group_index(id, n) * WG + t; i < len; i += stride) {
        dst[i] = src[i];
    }
}
"#;

/// One copy-kernel variant: entry point, workgroup size, vec4s per invocation, and for the grid-stride
/// kernel the fixed number of workgroups.
#[derive(Clone, Copy)]
struct CopyVariant {
    entry: &'static str,
    wg: u32,
    per: u32,
    grid: Option<u32>,
}

impl CopyVariant {
    fn name(&self) -> String {
        match self.grid {
            Some(g) => format!("grid-stride wg{} x{g} groups", self.wg),
            None if self.entry == "copy_blocks" => {
                format!("{} consecutive vec4/inv wg{}", self.per, self.wg)
            }
            None => format!("{} strided vec4/inv wg{}", self.per, self.wg),
        }
    }
}

const COPY_VARIANTS: [CopyVariant; 5] = [
    CopyVariant {
        entry: "copy_blocks",
        wg: 256,
        per: 8,
        grid: None,
    },
    CopyVariant {
        entry: "copy_blocks",
        wg: 64,
        per: 16,
        grid: None,
    },
    CopyVariant {
        entry: "copy_blocks",
        wg: 256,
        per: 1,
        grid: None,
    },
    CopyVariant {
        entry: "copy_strided",
        wg: 256,
        per: 8,
        grid: None,
    },
    CopyVariant {
        entry: "copy_grid_stride",
        wg: 256,
        per: 1,
        grid: Some(64),
    },
];

/// The device's streaming bandwidth as measured by the bench.
#[derive(Clone, Debug)]
struct Roofline {
    /// Bytes copied (the source's size).
    bytes: u64,
    /// GB/s (read + written) of each copy-kernel variant.
    variants: Vec<(String, f64)>,
    /// The best variant's name and GB/s: the roofline.
    best: (String, f64),
    /// `copy_buffer_to_buffer`, for reference.
    copy_command_gbps: f64,
}

fn fold(groups: u32) -> (u32, u32) {
    let x = groups.clamp(1, 65_535);
    (x, groups.div_ceil(x).max(1))
}

/// Measures the copy kernels and the copy command over `bytes` (a multiple of 16).
fn measure_roofline(
    gpu: &Arc<Gpu>,
    timer: &Timer,
    bytes: u64,
    warmup: usize,
    reps: usize,
    kernels: &[CopyVariant],
) -> Result<Roofline> {
    let src = gpu.create_buffer("roofline src", bytes, storage_usage())?;
    let dst = gpu.create_buffer("roofline dst", bytes, storage_usage())?;
    // Touch the source so the driver has really allocated it.
    {
        let mut e = gpu.encoder("roofline fill");
        e.clear_buffer(&src, 0, None);
        gpu.submit_and_wait(e)?;
    }
    let limits = gpu.limits();
    // Buffers beyond one storage binding are copied in windows, all in one compute pass.
    let granule: u64 = 1 << 20;
    let binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let window = (binding / granule * granule).min(bytes);
    if window == 0 {
        return Err(Error::config(
            "the device's storage binding limit is below 1 MiB: no roofline",
        ));
    }
    let gbps = |secs: f64| 2.0 * bytes as f64 / secs / 1e9;
    let mut variants = Vec::new();
    for &v in kernels {
        let key = format!("bench copy {} wg{} per{}", v.entry, v.wg, v.per);
        let pipeline = gpu.pipeline(&key, v.entry, || {
            format!(
                "const WG: u32 = {}u;\nconst PER: u32 = {}u;\n{COPY_WGSL}",
                v.wg, v.per
            )
        })?;
        let layout = pipeline.get_bind_group_layout(0);
        let mut windows = Vec::new();
        let mut at = 0u64;
        while at < bytes {
            let size = window.min(bytes - at);
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("roofline copy"),
                layout: &layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &src,
                            offset: at,
                            size: wgpu::BufferSize::new(size),
                        }),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &dst,
                            offset: at,
                            size: wgpu::BufferSize::new(size),
                        }),
                    },
                ],
            });
            let vec4s = size / 16;
            let groups = match v.grid {
                Some(g) => g as u64,
                None => vec4s.div_ceil(v.wg as u64 * v.per as u64),
            };
            let groups = u32::try_from(groups).map_err(|_| {
                Error::config(format!(
                    "roofline window of {size} bytes needs too many workgroups"
                ))
            })?;
            windows.push((bind_group, fold(groups)));
            at += size;
        }
        let secs = timer.median(warmup, reps, |e, _| {
            let mut pass = e.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("roofline copy"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            for (bind_group, (gx, gy)) in &windows {
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
            Ok(())
        })?;
        variants.push((v.name(), gbps(secs)));
    }
    let copy_secs = timer.median(warmup, reps, |e, _| {
        e.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        Ok(())
    })?;
    let best = variants
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .cloned()
        .ok_or_else(|| Error::config("no copy variant"))?;
    Ok(Roofline {
        bytes,
        variants,
        best,
        copy_command_gbps: gbps(copy_secs),
    })
}

/// The host's 1-minute load average (Linux), or "unknown": lavapipe shares the CPU with everything else,
/// so a busy host shows up as a slow device.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// One row of the table.
struct Row {
    op: String,
    dtype: &'static str,
    layout: Layout,
    shape: Vec<usize>,
    plan: String,
    median_ms: f64,
    gbps: f64,
    efficiency: f64,
    dispatches: usize,
    copies: usize,
    reference_ms: Option<f64>,
}

fn shape_text(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

fn print_header() {
    println!(
        "{:<14} {:<6} {:<16} {:<42} {:>10} {:>8} {:>6} {:>5} {:>4} {:>9}",
        "op", "layout", "shape", "plan", "median ms", "GB/s", "eff", "disp", "rot", "ref ms"
    );
}

fn print_row(r: &Row) {
    let reference = r
        .reference_ms
        .map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"));
    println!(
        "{:<14} {:<6} {:<16} {:<42} {:>10.3} {:>8.2} {:>6.3} {:>5} {:>4} {:>9}",
        r.op,
        r.layout.name(),
        shape_text(&r.shape),
        r.plan,
        r.median_ms,
        r.gbps,
        r.efficiency,
        r.dispatches,
        r.copies,
        reference
    );
}

/// Runs the benchmark and prints the table: the adapter, the roofline, then one row per op, layout and
/// shape.
///
/// # Errors
/// [`Error::BadConfig`] for a bad `--shape`; [`Error::File`] when the JSON file cannot be written; device
/// and planning errors.
pub fn run(args: &BenchArgs) -> Result<()> {
    let shapes = if args.shapes.is_empty() {
        standard_shapes()
    } else {
        args.shapes
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(parse_shape)
            .collect::<Result<Vec<_>>>()?
    };
    // Open the JSON file first: a bad path should fail before minutes of measuring, not after.
    let json_file = match &args.json {
        Some(path) => Some((
            path,
            std::fs::File::create(path).map_err(|e| Error::file(path, e))?,
        )),
        None => None,
    };
    let gpu = Arc::new(Gpu::new()?);
    let info = gpu.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}, driver {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    );
    let (warmup, reps, roof_bytes) = if args.quick {
        (1, 5, 64u64 << 20)
    } else {
        (2, 21, 256u64 << 20)
    };
    let timer = Timer::new(&gpu, args.wall_clock)?;
    println!(
        "timing: {}; warm-up {warmup} and {:.0} ms, median of {reps} samples of {:.1} ms or more \
         (short ops repeated, up to {SAMPLE_MAX_REPS}x)",
        timer.method(),
        WARMUP_SECONDS * 1e3,
        SAMPLE_SECONDS * 1e3
    );

    println!("host load average at start: {}", load_average());
    let roof = measure_roofline(&gpu, &timer, roof_bytes, warmup, reps, &COPY_VARIANTS)?;
    println!(
        "roofline: copy kernel {:.2} GB/s (best of {}; read + write of {} MiB): {}",
        roof.best.1,
        roof.variants.len(),
        roof.bytes >> 20,
        roof.best.0
    );
    for (name, g) in &roof.variants {
        println!("  copy kernel {name:<34} {g:>8.2} GB/s");
    }
    println!(
        "  copy_buffer_to_buffer (reference)          {:>8.2} GB/s",
        roof.copy_command_gbps
    );
    println!(
        "GB/s: minimal traffic / median time (forward-train 3, forward-eval 2, backward 5 tensor passes); \
         eff = GB/s / {:.2}; disp = dispatches per op; rot = input copies rotated; ref = f64 reference, once",
        roof.best.1
    );
    println!();
    print_header();

    let mut rows = Vec::new();
    for logical in &shapes {
        let relus: &[bool] = if args.relu { &[false, true] } else { &[false] };
        for (layout, plan_arg, dtype, relu) in args
            .layout
            .layouts(logical.len())
            .into_iter()
            .flat_map(|l| args.plans.iter().map(move |p| (l, *p)))
            .flat_map(|(l, p)| args.dtypes.iter().map(move |d| (l, p, *d)))
            .flat_map(|(l, p, d)| relus.iter().map(move |r| (l, p, d, *r)))
        {
            let shape = layout_shape(logical, layout);
            let options = OpOptions {
                fuse_relu: relu,
                ..dtype.options()
            };
            let made = Workload::with_options(
                &gpu,
                &shape,
                layout,
                plan_arg.choice(),
                None,
                0x5eed,
                options,
            );
            // A forced plan or storage type that does not apply to a shape on this device (the
            // resident plan's share, a walk past lavapipe's loop limit for the fused plan) is skipped
            // with the planner's reason; the automatic f32 plan must always run.
            let work = match made {
                Ok(w) => w,
                Err(e @ (Error::BadConfig(_) | Error::LimitExceeded { .. }))
                    if plan_arg != PlanArg::Auto || dtype != DTypeArg::F32 =>
                {
                    let why = match e {
                        Error::BadConfig(why) => why,
                        other => other.to_string(),
                    };
                    println!(
                        "  ({plan_arg:?} skipped for {} {shape:?}: {why})",
                        layout.name()
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            let tb = work.tensor_bytes();
            let plan = work.op().plan_name();
            for op in BenchOp::ALL {
                if op == BenchOp::Backward {
                    // The backward reads what a forward-train saved.
                    timer.time(|e| work.record(e, BenchOp::ForwardTrain, 0))?;
                }
                let secs = timer.median(warmup, reps, |e, i| work.record(e, op, i))?;
                let gbps = work.min_bytes(op) as f64 / secs / 1e9;
                let reference_ms = if work.op().dims().numel() <= REFERENCE_MAX_ELEMENTS {
                    Some(work.time_reference(op)? * 1e3)
                } else {
                    None
                };
                let row = Row {
                    op: op.name().to_string(),
                    dtype: work.op().dtype().name(),
                    layout,
                    shape: logical.clone(),
                    plan: plan.clone(),
                    median_ms: secs * 1e3,
                    gbps,
                    efficiency: gbps / roof.best.1,
                    dispatches: op.dispatches(work.op()),
                    copies: work.copies(),
                    reference_ms,
                };
                print_row(&row);
                rows.push(row);
            }
            // The passes a fused ReLU saves: a standalone ReLU after BN (forward: read and write y;
            // backward: read y and dy, write dy), timed on the plain f32 workload.
            if args.relu && !relu && dtype == DTypeArg::F32 && work.op().dims().numel() % 4 == 0 {
                for (backward, name, passes) in
                    [(false, "relu-forward", 2u64), (true, "relu-backward", 3)]
                {
                    let secs = timer.median(warmup, reps, |e, i| {
                        work.record_separate_relu(e, backward, i)
                    })?;
                    let gbps = (passes * tb) as f64 / secs / 1e9;
                    let row = Row {
                        op: name.to_string(),
                        dtype: "f32",
                        layout,
                        shape: logical.clone(),
                        plan: "standalone (8 vec4/inv)".to_string(),
                        median_ms: secs * 1e3,
                        gbps,
                        efficiency: gbps / roof.best.1,
                        dispatches: 1,
                        copies: work.copies(),
                        reference_ms: None,
                    };
                    print_row(&row);
                    rows.push(row);
                }
            }
        }
    }

    let variant_rows = if args.variants {
        run_variants(
            &gpu,
            &timer,
            &shapes,
            args.layout,
            roof.best.1,
            warmup,
            reps,
        )?
    } else {
        Vec::new()
    };

    // The host is shared (lavapipe runs on the CPU): measure the best copy kernel again so a roofline
    // taken under load shows up. Efficiencies above use the start-of-run value.
    let best = COPY_VARIANTS
        .iter()
        .copied()
        .find(|v| v.name() == roof.best.0)
        .unwrap_or(COPY_VARIANTS[0]);
    let end = measure_roofline(&gpu, &timer, roof_bytes, warmup, reps, &[best])?;
    println!();
    println!(
        "roofline again at the end: {:.2} GB/s ({:+.0}% against the start); host load average at end: {}",
        end.best.1,
        100.0 * (end.best.1 / roof.best.1 - 1.0),
        load_average()
    );

    if let Some((path, mut file)) = json_file {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "op": r.op,
                    "layout": r.layout.name(),
                    "dtype": r.dtype,
                    "shape": r.shape,
                    "median_ms": r.median_ms,
                    "gbps": r.gbps,
                    "device_gbps": roof.best.1,
                    "efficiency": r.efficiency,
                    "dispatches": r.dispatches,
                    "plan": r.plan,
                    "reference_ms": r.reference_ms,
                })
            })
            .chain(variant_rows.iter().map(|r| {
                serde_json::json!({
                    "op": r.op,
                    "layout": r.layout.name(),
                    "dtype": "f32",
                    "shape": r.shape,
                    "median_ms": r.median_ms,
                    "gbps": r.gbps,
                    "device_gbps": roof.best.1,
                    "efficiency": r.gbps.map(|g| g / roof.best.1),
                    "plan": r.plan,
                })
            }))
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::Value::Array(items))
            .map_err(|e| Error::file(path, e))?;
        writeln!(file, "{text}").map_err(|e| Error::file(path, e))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One row of the variants table.
struct VariantRow {
    op: String,
    layout: Layout,
    shape: Vec<usize>,
    plan: String,
    median_ms: f64,
    /// None where no BatchNorm traffic is defined (the folding rows time a whole network).
    gbps: Option<f64>,
}

/// Running-statistics sets of the per-domain rows.
const DOMAINS: usize = 3;

/// The settings of `nn::BatchNorm` the variants table times.
#[derive(Debug, Clone, Copy)]
enum BenchVariant {
    Plain,
    /// Ghost batches of this many samples.
    Ghost(usize),
    Renorm(crate::ops::bn_variants::Renorm),
    Frozen,
    /// This many domains, a different one selected before every forward.
    Domains(usize),
}

impl BenchVariant {
    fn name(self) -> String {
        match self {
            Self::Plain => "plain".into(),
            Self::Ghost(v) => format!("ghost V={v}"),
            Self::Renorm(_) => "renorm".into(),
            Self::Frozen => "frozen".into(),
            Self::Domains(d) => format!("{d} domains"),
        }
    }
}

/// Times the BatchNorm variants through [`crate::nn::BatchNorm`] (so the plain rows here include the
/// layer's bookkeeping, like the variants): forward-train and backward plain, with ghost batches of N/4
/// (or the largest divisor of N up to it), with Batch Renormalization (rmax 3, dmax 5), FrozenBN, and
/// three per-domain statistics sets cycled every step; PreciseBN's per-batch merge; then [`run_fold`]. GB/s use plain BatchNorm's minimal traffic (3 and 5 passes; 1 for the merge, which
/// reads x once), so a variant's extra passes and dispatches show as lower GB/s than the plain row.
#[allow(clippy::too_many_arguments)]
fn run_variants(
    gpu: &Arc<Gpu>,
    timer: &Timer,
    shapes: &[Vec<usize>],
    layouts: LayoutChoice,
    roofline: f64,
    warmup: usize,
    reps: usize,
) -> Result<Vec<VariantRow>> {
    use crate::nn::BatchNorm;
    use crate::ops::bn_variants::Renorm;
    println!();
    println!("BatchNorm variants through nn::BatchNorm (eff = GB/s / {roofline:.2}):");
    println!(
        "{:<26} {:<6} {:<16} {:<31} {:>10} {:>8} {:>6}",
        "op", "layout", "shape", "plan", "median ms", "GB/s", "eff"
    );
    let mut rows = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for logical in shapes {
        let first = rows.len();
        let layout = layouts.layouts(logical.len())[0];
        let shape = layout_shape(logical, layout);
        let dims = layout.dims(&shape)?;
        let numel = dims.numel();
        let tb = 4 * numel as u64;
        let x: Vec<f32> = (0..numel).map(|_| rng.random_range(-2.0..2.0)).collect();
        let bx = gpu.upload("bench.variants.x", &x)?;
        let bdy = gpu.upload("bench.variants.dy", &x)?;
        let by = gpu.create_buffer("bench.variants.y", tb, storage_usage())?;
        let bdx = gpu.create_buffer("bench.variants.dx", tb, storage_usage())?;
        let n = dims.n;
        let v = (1..=(n / 4).max(1)).rev().find(|v| n % v == 0).unwrap_or(1);
        let ghost_ok = dims.spatial * v > 1;
        let renorm = Renorm {
            rmax: 3.0,
            dmax: 5.0,
        };
        let configs = [
            BenchVariant::Plain,
            BenchVariant::Ghost(v),
            BenchVariant::Renorm(renorm),
            BenchVariant::Frozen,
            BenchVariant::Domains(DOMAINS),
        ];
        for variant in configs {
            if matches!(variant, BenchVariant::Ghost(_)) && !ghost_ok {
                continue;
            }
            let name = variant.name();
            let mut bn = BatchNorm::new(gpu, dims.c, BatchNormConfig::default())?;
            let vbs = match variant {
                BenchVariant::Ghost(v) => Some(v),
                _ => None,
            };
            bn.set_virtual_batch_size(vbs)?;
            if let BenchVariant::Renorm(r) = variant {
                bn.set_renorm(Some(r))?;
            }
            bn.set_frozen(matches!(variant, BenchVariant::Frozen))?;
            if let BenchVariant::Domains(d) = variant {
                bn.set_num_domains(d)?;
            }
            // Ghost batches run the plan of one ghost batch's shape.
            let mut planned = shape.clone();
            planned[0] = vbs.unwrap_or(n);
            let plan = bn.op(&planned, layout)?.plan_name();
            let fwd = timer.median(warmup, reps, |e, i| {
                if let BenchVariant::Domains(d) = variant {
                    // A new domain every step, as a domain-cycling loader feeds them.
                    bn.set_domain(i % d)?;
                }
                bn.record_forward(e, (&bx).into(), (&by).into(), &shape, layout)
            })?;
            let bwd = timer.median(warmup, reps, |e, _| {
                bn.record_backward(
                    e,
                    (&bx).into(),
                    (&bdy).into(),
                    (&bdx).into(),
                    &shape,
                    layout,
                )
            })?;
            for (op, secs, passes) in [("forward-train", fwd, 3), ("backward", bwd, 5)] {
                rows.push(VariantRow {
                    op: format!("{name} {op}"),
                    layout,
                    shape: logical.clone(),
                    plan: plan.clone(),
                    median_ms: secs * 1e3,
                    gbps: Some((passes * tb) as f64 / secs / 1e9),
                });
            }
        }
        let mut bn = BatchNorm::new(gpu, dims.c, BatchNormConfig::default())?;
        bn.precise_begin()?;
        let secs = timer.median(warmup, reps, |e, _| {
            bn.record_precise_accumulate(e, (&bx).into(), &shape, layout)
        })?;
        rows.push(VariantRow {
            op: "precise merge".into(),
            layout,
            shape: logical.clone(),
            plan: "one workgroup per channel".into(),
            median_ms: secs * 1e3,
            gbps: Some(tb as f64 / secs / 1e9),
        });
        for r in &rows[first..] {
            print_variant_row(r, roofline);
        }
    }
    let first = rows.len();
    rows.extend(run_fold(gpu, timer, warmup, reps)?);
    for r in &rows[first..] {
        print_variant_row(r, roofline);
    }
    Ok(rows)
}

fn print_variant_row(r: &VariantRow, roofline: f64) {
    let (gbps, eff) = match r.gbps {
        Some(g) => (format!("{g:.2}"), format!("{:.3}", g / roofline)),
        None => ("-".into(), "-".into()),
    };
    println!(
        "{:<26} {:<6} {:<16} {:<31} {:>10.3} {:>8} {:>6}",
        r.op,
        r.layout.name(),
        shape_text(&r.shape),
        r.plan,
        r.median_ms,
        gbps,
        eff
    );
}

/// Inference folding: Ioffe's MLP with BatchNorm (784-100-100-100-10) in eval mode, against the same
/// network with each BatchNorm folded into the Linear before it (`nn::fold::fold_mlp`), at batch 60 and
/// 1 000. The folded network skips the BatchNorms' eval passes (2 dispatches each).
fn run_fold(gpu: &Arc<Gpu>, timer: &Timer, warmup: usize, reps: usize) -> Result<Vec<VariantRow>> {
    use crate::nn::{fold::fold_mlp, MlpConfig, Sequential};
    let config = MlpConfig::ioffe(true, 0);
    let sizes = config
        .sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("-");
    let mut rows = Vec::new();
    for batch in [60usize, 1000] {
        let mut model = Sequential::mlp(gpu, &config, batch)?;
        model.train(false);
        let mut folded = fold_mlp(gpu, &model, batch)?;
        folded.train(false);
        for (name, net) in [
            ("MLP eval with BN", &mut model),
            ("MLP eval folded", &mut folded),
        ] {
            let secs = timer.median(warmup, reps, |e, _| net.record_forward(e, batch))?;
            rows.push(VariantRow {
                op: name.into(),
                layout: Layout::Nc,
                shape: vec![batch, config.sizes[0]],
                plan: sizes.clone(),
                median_ms: secs * 1e3,
                gbps: None,
            });
        }
    }
    Ok(rows)
}
