//! One BatchNorm case through the GPU op and the f64 reference, for the core kernel tests
//! (tests/batchnorm.rs, whose header states the error measures) and the variant tests (f16 storage, fused
//! ReLU, fused sigmoid): fresh random inputs, every output poisoned before the run (NaN for tensors and
//! statistics, all-ones for the mask words).
#![allow(dead_code)]

use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, F16Path, ForwardBuffers, Merge,
    OpOptions, PlanChoice,
};
use batchnorm::reference::batchnorm as reference;
use batchnorm::reference::batchnorm_fused as fused_ref;
use batchnorm::tensor::{f16_padded, round_to_f16, DType, Layout};

use crate::common::*;

/// |z| below which the GPU's f32 z and the reference's f64 z may disagree on their sign: the mask bit may
/// differ there (z's f32 error is ~1e-6 for these inputs).
pub const MASK_SLACK: f64 = 1e-5;

/// (affine, track_running_stats, training) mixes the variant tests run through [`Case::flags`].
pub const FLAG_MIXES: [(bool, bool, bool); 5] = [
    (true, true, false),
    (false, true, true),
    (true, false, false),
    (false, false, true),
    (true, true, true),
];

#[derive(Clone, Debug)]
pub struct Case {
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub plan: PlanChoice,
    pub config: BatchNormConfig,
    pub options: OpOptions,
    /// true: forward with batch statistics; false: eval with the running statistics.
    pub training: bool,
    pub mean: f32,
    pub std: f32,
    /// Run on a device whose storage bindings hold at most this many bytes, so that small tensors take
    /// the chunked plans (None: the tests' usual device).
    pub binding_limit: Option<u32>,
    /// Run on a caller's device opened with `DeviceDescriptor::default()` (WebGPU's default limits, no
    /// optional features): BatchNorm's parameters then come through a uniform buffer.
    pub webgpu_defaults: bool,
    /// The split plan's per-channel merge, overriding the planner's (None: the planner's choice).
    pub merge: Option<Merge>,
    /// Plan as for a discrete GPU whatever the adapter is (`Gpu::plan_as`): on lavapipe, the GPU plans'
    /// access pattern, workgroup counts and merges run where CI can check them.
    pub gpu_plans: bool,
}

impl Case {
    pub fn new(shape: &[usize], layout: Layout) -> Self {
        Case {
            shape: shape.to_vec(),
            layout,
            plan: PlanChoice::Auto,
            config: BatchNormConfig::default(),
            options: OpOptions::default(),
            training: true,
            mean: 0.5,
            std: 2.0,
            binding_limit: None,
            webgpu_defaults: false,
            merge: None,
            gpu_plans: false,
        }
    }
    /// eps 1e-3, cumulative-average running statistics (momentum None), and the given affine, tracking and
    /// training flags (see [`FLAG_MIXES`]).
    pub fn flags(mut self, affine: bool, track: bool, training: bool) -> Self {
        self.config = BatchNormConfig {
            eps: 1e-3,
            momentum: None,
            affine,
            track_running_stats: track,
        };
        self.training = training;
        self
    }
    pub fn binding_limit(mut self, bytes: u32) -> Self {
        self.binding_limit = Some(bytes);
        self
    }
    pub fn plan(mut self, plan: PlanChoice) -> Self {
        self.plan = plan;
        self
    }
    pub fn f16(mut self, path: F16Path) -> Self {
        self.options.dtype = DType::F16;
        self.options.f16_path = path;
        self
    }
    pub fn relu(mut self) -> Self {
        self.options.fuse_relu = true;
        self
    }
    pub fn gpu_plans(mut self) -> Self {
        self.gpu_plans = true;
        self
    }
    pub fn merge(mut self, merge: Merge) -> Self {
        self.merge = Some(merge);
        self
    }
    pub fn webgpu_defaults(mut self) -> Self {
        self.webgpu_defaults = true;
        self
    }
    /// y = sigmoid(bn(x)); the backward is BatchNorm's own (dy is the gradient of bn(x)).
    pub fn sigmoid(mut self) -> Self {
        self.options.sigmoid = true;
        self
    }
}

#[derive(Debug)]
pub struct Outcome {
    /// y (and dx below) against the reference rounded to the storage type, max |gpu - ref| / (1 + |ref|).
    pub y_err: f64,
    /// dx scaled by the formula's terms (tests/batchnorm.rs's header gives the measure).
    pub dx_err: f64,
    pub stats_err: f64,
    pub grad_err: f64,
    pub running_err: f64,
    /// Mask bits differing from the reference's z > 0 where |z| > MASK_SLACK, plus bits set past the
    /// last element; 0 without ReLU.
    pub mask_wrong: usize,
    /// Mask bits differing anywhere (near-zero z included): informational.
    pub mask_flips: usize,
    pub plan: String,
}

pub fn channel_of(shape: &[usize], layout: Layout, i: usize) -> usize {
    let d = layout.dims(shape).unwrap();
    match layout {
        Layout::Nhwc => i % d.c,
        _ => (i / d.spatial) % d.c,
    }
}

/// A case's random inputs (f16-rounded when the case stores f16: the reference sees exactly what the
/// kernels read).
pub struct Inputs {
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub rmean0: Vec<f32>,
    pub rvar0: Vec<f32>,
}

pub fn inputs(case: &Case, seed: u64) -> Inputs {
    let mut rng = rng(seed);
    let dims = case.layout.dims(&case.shape).unwrap();
    let (c, numel) = (dims.c, dims.numel());
    let mut x = normal(&mut rng, numel, case.mean, case.std);
    let mut dy = normal(&mut rng, numel, 0.0, 1.0);
    if case.options.dtype == DType::F16 {
        x = round_to_f16(&x);
        dy = round_to_f16(&dy);
    }
    Inputs {
        x,
        dy,
        weight: uniform(&mut rng, c, 0.5, 1.5),
        bias: uniform(&mut rng, c, -1.0, 1.0),
        rmean0: uniform(&mut rng, c, -0.5, 0.5),
        rvar0: uniform(&mut rng, c, 0.5, 2.0),
    }
}

/// What a GPU run produced (as f32), for [`compare`]. `dweight`/`dbias` are empty without affine,
/// `mask` is empty without ReLU.
pub struct GpuOut {
    pub y: Vec<f32>,
    pub dx: Vec<f32>,
    pub saved: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub dweight: Vec<f32>,
    pub dbias: Vec<f32>,
    pub mask: Vec<u32>,
    pub plan: String,
}

pub fn upload_tensor(
    gpu: &batchnorm::gpu::Gpu,
    label: &str,
    v: &[f32],
    dtype: DType,
) -> wgpu::Buffer {
    match dtype {
        DType::F32 => gpu.upload(label, v).unwrap(),
        DType::F16 => gpu.upload(label, &f16_padded(v)).unwrap(),
    }
}

pub fn download_tensor(
    gpu: &batchnorm::gpu::Gpu,
    b: &wgpu::Buffer,
    n: usize,
    dtype: DType,
) -> Vec<f32> {
    match dtype {
        DType::F32 => gpu.download(b, 0, n).unwrap(),
        DType::F16 => gpu
            .download::<half::f16>(b, 0, n)
            .unwrap()
            .into_iter()
            .map(half::f16::to_f32)
            .collect(),
    }
}

pub fn run_case(case: &Case, seed: u64) -> Outcome {
    run_inputs(case, &inputs(case, seed))
}

/// Runs a case on given inputs (e.g. [`inputs`] adjusted) and compares with the reference.
pub fn run_inputs(case: &Case, inp: &Inputs) -> Outcome {
    let out = run_op(case, inp);
    compare(case, inp, &out)
}

/// A device (one per limit, kind of plans and test binary) whose storage bindings hold at most `limit`
/// bytes, planning as for a discrete GPU where `gpu_plans` says so.
fn limited_gpu(limit: u32, gpu_plans: bool) -> std::sync::Arc<batchnorm::gpu::Gpu> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    // (binding limit, plans as for a GPU) -> device
    type Devices = Mutex<HashMap<(u32, bool), Arc<batchnorm::gpu::Gpu>>>;
    static DEVICES: OnceLock<Devices> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    devices
        .entry((limit, gpu_plans))
        .or_insert_with(|| {
            let gpu = batchnorm::gpu::Gpu::with_limits(|l| {
                l.max_storage_buffer_binding_size =
                    l.max_storage_buffer_binding_size.min(limit as u64)
            })
            .expect("a GPU adapter (install mesa-vulkan-drivers)");
            Arc::new(if gpu_plans {
                gpu.plan_as(wgpu::DeviceType::DiscreteGpu)
            } else {
                gpu
            })
        })
        .clone()
}

/// The device a case runs on: its binding limit, WebGPU's defaults, plans as for a GPU, or the tests'
/// usual device.
pub fn device_for(case: &Case) -> std::sync::Arc<batchnorm::gpu::Gpu> {
    // BN_TEST_GPU_PLANS=1 (tests/common) makes every device plan as a GPU.
    let gpu_plans = case.gpu_plans || gpu_plans_from_env();
    match case.binding_limit {
        Some(limit) => limited_gpu(limit, gpu_plans),
        None if gpu_plans => limited_gpu(TEST_BINDING_LIMIT as u32, true),
        None if case.webgpu_defaults => {
            static DEFAULTS: std::sync::OnceLock<std::sync::Arc<batchnorm::gpu::Gpu>> =
                std::sync::OnceLock::new();
            DEFAULTS.get_or_init(webgpu_defaults_gpu).clone()
        }
        None => gpu(),
    }
}

/// The plan the case's op gets, by name (as `batchnorm bench` prints it).
pub fn plan_of(case: &Case) -> String {
    let gpu = device_for(case);
    let mut op = BatchNormOp::with_options(
        &gpu,
        &case.shape,
        case.layout,
        case.config,
        case.plan,
        case.options,
    )
    .unwrap();
    if let Some(merge) = case.merge {
        op.set_merge(merge);
    }
    op.plan_name()
}

/// The case through `BatchNormOp` on buffers poisoned before the run: forward (train or eval), then the
/// backward.
pub fn run_op(case: &Case, inp: &Inputs) -> GpuOut {
    let gpu = device_for(case);
    let dims = case.layout.dims(&case.shape).unwrap();
    let c = dims.c;
    let numel = dims.numel();
    let dtype = case.options.dtype;
    let relu = case.options.fuse_relu;
    let Inputs {
        x,
        dy,
        weight,
        bias,
        rmean0,
        rvar0,
    } = inp;
    let cfg = case.config;

    let mut op =
        BatchNormOp::with_options(&gpu, &case.shape, case.layout, cfg, case.plan, case.options)
            .unwrap();
    if let Some(merge) = case.merge {
        op.set_merge(merge);
        assert_eq!(op.merge(), merge);
    }
    let nan_t = vec![f32::NAN; numel];
    let bx = upload_tensor(&gpu, "x", x, dtype);
    let by = upload_tensor(&gpu, "y", &nan_t, dtype);
    let bdy = upload_tensor(&gpu, "dy", dy, dtype);
    let bdx = upload_tensor(&gpu, "dx", &nan_t, dtype);
    let bw = gpu.upload("w", weight).unwrap();
    let bb = gpu.upload("b", bias).unwrap();
    let brm = gpu.upload("rm", rmean0).unwrap();
    let brv = gpu.upload("rv", rvar0).unwrap();
    let bsaved = gpu.upload("saved", &vec![f32::NAN; 2 * c]).unwrap();
    let bdw = gpu.upload("dw", &vec![f32::NAN; c]).unwrap();
    let bdb = gpu.upload("db", &vec![f32::NAN; c]).unwrap();
    let mask_words = (op.mask_bytes() / 4) as usize;
    let bmask = gpu.upload("mask", &vec![u32::MAX; mask_words]).unwrap();

    let track = cfg.track_running_stats;
    let batch_stats = case.training || !track;
    let update = case.training && track;
    let fwd = ForwardBuffers {
        x: (&bx).into(),
        y: (&by).into(),
        weight: cfg.affine.then(|| BufferRef::from(&bw)),
        bias: cfg.affine.then(|| BufferRef::from(&bb)),
        running_mean: track.then(|| BufferRef::from(&brm)),
        running_var: track.then(|| BufferRef::from(&brv)),
        saved: (&bsaved).into(),
    };
    let bwd = BackwardBuffers {
        x: (&bx).into(),
        dy: (&bdy).into(),
        dx: (&bdx).into(),
        weight: cfg.affine.then(|| BufferRef::from(&bw)),
        saved: (&bsaved).into(),
        dweight: cfg.affine.then(|| BufferRef::from(&bdw)),
        dbias: cfg.affine.then(|| BufferRef::from(&bdb)),
    };
    let factor = cfg.momentum.unwrap_or(1.0);
    let mask = BufferRef::from(&bmask);
    let mut enc = gpu.encoder("test");
    match (batch_stats, relu) {
        (true, false) => op
            .record_forward_train(&mut enc, &fwd, update.then_some(factor))
            .unwrap(),
        (true, true) => op
            .record_forward_train_relu(&mut enc, &fwd, mask, update.then_some(factor))
            .unwrap(),
        (false, false) => op.record_forward_eval(&mut enc, &fwd).unwrap(),
        (false, true) => op.record_forward_eval_relu(&mut enc, &fwd, mask).unwrap(),
    }
    if relu {
        op.record_backward_relu(&mut enc, &bwd, mask, batch_stats)
            .unwrap();
    } else {
        op.record_backward(&mut enc, &bwd, batch_stats).unwrap();
    }
    gpu.submit_and_wait(enc).unwrap();

    let (dweight, dbias) = if cfg.affine {
        (
            gpu.download(&bdw, 0, c).unwrap(),
            gpu.download(&bdb, 0, c).unwrap(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    GpuOut {
        y: download_tensor(&gpu, &by, numel, dtype),
        dx: download_tensor(&gpu, &bdx, numel, dtype),
        saved: gpu.download(&bsaved, 0, 2 * c).unwrap(),
        running_mean: gpu.download(&brm, 0, c).unwrap(),
        running_var: gpu.download(&brv, 0, c).unwrap(),
        dweight,
        dbias,
        mask: if relu {
            gpu.download(&bmask, 0, mask_words).unwrap()
        } else {
            Vec::new()
        },
        plan: op.plan_name(),
    }
}

/// Compares a run's outputs with the f64 reference on the same inputs (the running statistics moved by
/// the case's factor: the momentum, or 1 for the cumulative average's first batch).
pub fn compare(case: &Case, inp: &Inputs, out: &GpuOut) -> Outcome {
    let dims = case.layout.dims(&case.shape).unwrap();
    let c = dims.c;
    let numel = dims.numel();
    let dtype = case.options.dtype;
    let relu = case.options.fuse_relu;
    let cfg = case.config;
    let track = cfg.track_running_stats;
    let factor = cfg.momentum.unwrap_or(1.0);
    let Inputs {
        x,
        dy,
        weight,
        bias,
        rmean0,
        rvar0,
    } = inp;
    let (y, dx, saved) = (&out.y, &out.dx, &out.saved);
    let (rm, rv, mask_gpu) = (&out.running_mean, &out.running_var, &out.mask);
    let mask_words = numel.div_ceil(32);

    let (w64, b64) = (f64s(weight), f64s(bias));
    let mut running = reference::RunningStats {
        mean: f64s(rmean0),
        var: f64s(rvar0),
        num_batches_tracked: 0,
    };
    let x64 = f64s(x);
    let fr = reference::forward(
        &x64,
        &case.shape,
        case.layout,
        cfg.affine.then_some(&w64[..]),
        cfg.affine.then_some(&b64[..]),
        track.then_some(&mut running),
        case.training,
        Some(factor as f64),
        cfg.eps as f64,
    )
    .unwrap();
    // The mask: it must match z > 0 except where z is within f32 noise of 0 (there the GPU's own bit is
    // what its dx used, so the reference backward takes the GPU's bits).
    let (y_ref, mask_used, mask_wrong, mask_flips) = if relu {
        let (y_ref, mask_ref) = fused_ref::relu_forward(&fr);
        let bits = fused_ref::unpack_mask(mask_gpu, numel);
        let mut wrong = 0;
        let mut flips = 0;
        for i in 0..numel {
            if bits[i] != mask_ref[i] {
                flips += 1;
                if fr.y[i].abs() > MASK_SLACK {
                    wrong += 1;
                }
            }
        }
        // Bits past the last element must be 0, not the poison.
        let tail = (numel..mask_words * 32)
            .filter(|&e| (mask_gpu[e / 32] >> (e % 32)) & 1 == 1)
            .count();
        (y_ref, bits, wrong + tail, flips)
    } else if case.options.sigmoid {
        (
            batchnorm::reference::sigmoid::forward(&fr.y),
            Vec::new(),
            0,
            0,
        )
    } else {
        (fr.y.clone(), Vec::new(), 0, 0)
    };
    // Without ReLU the mask is empty and every dy passes (no per-element copies: the cases over the
    // binding limit hold ~40M values).
    let passes = |i: usize| !relu || mask_used[i];
    let br = if relu {
        fused_ref::relu_backward(
            &x64,
            &f64s(dy),
            &mask_used,
            &case.shape,
            case.layout,
            cfg.affine.then_some(&w64[..]),
            &fr.mean,
            &fr.invstd,
            fr.batch_stats,
        )
    } else {
        reference::backward(
            &x64,
            &f64s(dy),
            &case.shape,
            case.layout,
            cfg.affine.then_some(&w64[..]),
            &fr.mean,
            &fr.invstd,
            fr.batch_stats,
        )
    }
    .unwrap();
    // Outputs stored as f16 are compared with the reference rounded to f16.
    let to_storage = |v: &[f64]| -> Vec<f64> {
        match dtype {
            DType::F32 => v.to_vec(),
            DType::F16 => v.iter().map(|&r| half::f16::from_f64(r).to_f64()).collect(),
        }
    };
    let y_want = to_storage(&y_ref);
    let dx_want = to_storage(&br.dx);
    let stats_err = max_rel_err(&saved[..c], &fr.mean).max(max_rel_err(&saved[c..], &fr.invstd));
    let running_err = if track {
        max_rel_err(rm, &running.mean).max(max_rel_err(rv, &running.var))
    } else {
        0.0
    };
    let grad_err = if cfg.affine {
        max_err_scaled(&out.dweight, &br.dweight).max(max_err_scaled(&out.dbias, &br.dbias))
    } else {
        0.0
    };
    let m = dims.per_channel() as f64;
    let dy_eff = |i: usize| if passes(i) { dy[i] as f64 } else { 0.0 };
    let mut abs_dy = vec![0.0f64; c];
    let mut abs_dy_xhat = vec![0.0f64; c];
    for (i, &xi) in x.iter().enumerate() {
        let ch = channel_of(&case.shape, case.layout, i);
        let xhat = (xi as f64 - fr.mean[ch]) * fr.invstd[ch];
        abs_dy[ch] += dy_eff(i).abs() / m;
        abs_dy_xhat[ch] += (dy_eff(i) * xhat).abs() / m;
    }
    let dx_err = (0..numel)
        .map(|i| {
            let ch = channel_of(&case.shape, case.layout, i);
            let g = if cfg.affine {
                weight[ch].abs() as f64
            } else {
                1.0
            };
            let xhat = ((x[i] as f64 - fr.mean[ch]) * fr.invstd[ch]).abs();
            let terms = dy_eff(i).abs() + abs_dy[ch] + xhat * abs_dy_xhat[ch];
            let scale = 1.0 + br.dx[i].abs() + g * fr.invstd[ch] * terms;
            if dx[i].is_finite() {
                (dx[i] as f64 - dx_want[i]).abs() / scale
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max);
    Outcome {
        y_err: max_rel_err(y, &y_want),
        dx_err,
        stats_err,
        grad_err,
        running_err,
        mask_wrong,
        mask_flips,
        plan: out.plan.clone(),
    }
}

/// Runs a case on a fresh seed and asserts: y and dx within `tol` (after rounding the reference to the
/// storage type), statistics, running statistics and parameter gradients within 1e-4, no wrong mask bit.
pub fn check(case: Case, tol: f64) -> Outcome {
    let seed = seed();
    let o = run_case(&case, seed);
    assert_within(&case, &o, seed, tol);
    o
}

/// The assertions of [`check`] on an outcome.
pub fn assert_within(case: &Case, o: &Outcome, seed: u64, tol: f64) {
    let msg = format!(
        "{case:?} plan={} seed={seed}: y {:.2e} dx {:.2e} stats {:.2e} grads {:.2e} running {:.2e} \
         mask wrong {} (flips near 0: {})",
        o.plan,
        o.y_err,
        o.dx_err,
        o.stats_err,
        o.grad_err,
        o.running_err,
        o.mask_wrong,
        o.mask_flips
    );
    eprintln!("{msg}");
    assert!(
        o.y_err <= tol
            && o.dx_err <= tol
            && o.stats_err <= 1e-4
            && o.grad_err <= 1e-4
            && o.running_err <= 1e-4
            && o.mask_wrong == 0,
        "tolerance exceeded (y/dx {tol:e}, statistics 1e-4): {msg}"
    );
}
