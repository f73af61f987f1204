//! f16 storage, the fused ReLU, the fused sigmoid and NCHW viewed as rows on tensors larger than one storage binding (128 MiB on lavapipe): the
//! planner cuts them into chunks, each bound as its own window (whole samples, or channel ranges of one
//! sample when a sample alone exceeds a binding), and the word kernels' blocks cross chunk ends.
//!
//! Shapes are derived from the device's `max_storage_buffer_binding_size` (about 5% over it, odd planes
//! so packed f16 words and mask words straddle channels and chunk ends); the tests assert the chunked
//! plan ran. The full f64 reference would need several GB, so it runs on sampled channels (BatchNorm
//! treats channels independently): the channels at a chunk boundary and the last. Fresh random inputs
//! (seed printed; BN_TEST_SEED replays one); outputs poisoned (NaN, all-ones mask words).
//!
//! Tolerances as tests/batchnorm_f16.rs and tests/batchnorm_relu.rs (measures of tests/bn_case): y and
//! dx <= 1e-4 (f32) and <= 2^-10 against the reference rounded to f16; statistics and running
//! statistics <= 1e-4; no wrong mask bit. dweight and dbias <= 1e-4 in a measure scaled by the sums'
//! random-walk size too (see `grad_err_against_walk`: one channel's sum over ~17M terms may cancel).

mod bn_case;
mod common;

use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, F16Path, ForwardBuffers, OpOptions,
    PlanChoice,
};
use batchnorm::tensor::{round_to_f16, DType, Layout};
use bn_case::{assert_within, compare, upload_tensor, Case, GpuOut, Inputs};
use common::*;

/// One large case at a time: each holds ~1.5 GB of host memory (lavapipe's buffers live there too).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `len` elements of a tensor of `dtype` from element `start` on, as f32 (copies start at 4-byte
/// offsets, so an f16 run at an odd element reads one half more and drops it).
fn download_run(b: &wgpu::Buffer, start: usize, len: usize, dtype: DType) -> Vec<f32> {
    let gpu = gpu();
    match dtype {
        DType::F32 => gpu.download(b, 4 * start as u64, len).unwrap(),
        DType::F16 => {
            let lead = start % 2;
            let halves: Vec<half::f16> = gpu
                .download(b, 2 * (start - lead) as u64, len + lead)
                .unwrap();
            halves[lead..].iter().map(|h| h.to_f32()).collect()
        }
    }
}

const TOL: f64 = 1e-4;
const TOL_F16: f64 = 1.0 / 1024.0;
/// Above this many bytes per tensor the test is skipped (a device with very large bindings).
const MAX_TENSOR_BYTES: u64 = 600 << 20;

/// dweight and dbias of one channel against f64 sums, scaled by max(1, |sum|, √Σ term²): one channel's
/// sum over ~17M terms can cancel to far below the size of its f32 rounding error (which grows with the
/// terms' random-walk size √Σ term², not with the sum), while a dropped or doubled term still moves it by
/// ~1/√Σ term² ≈ 2.5e-4 of that scale. The ReLU mask applied is the GPU's (as `compare` does).
fn grad_err_against_walk(inp: &Inputs, out: &GpuOut) -> f64 {
    let m = inp.x.len() as f64;
    let mean = inp.x.iter().map(|&v| v as f64).sum::<f64>() / m;
    let var = inp
        .x
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / m;
    let invstd = 1.0 / (var + 1e-5).sqrt();
    let (mut sum_w, mut sum_b, mut walk_w, mut walk_b) = (0.0, 0.0, 0.0, 0.0);
    for (i, (&x, &dy)) in inp.x.iter().zip(&inp.dy).enumerate() {
        let pass = out.mask.is_empty() || (out.mask[i / 32] >> (i % 32)) & 1 == 1;
        let dy = if pass { dy as f64 } else { 0.0 };
        let t = dy * (x as f64 - mean) * invstd;
        (sum_w, sum_b, walk_w, walk_b) = (sum_w + t, sum_b + dy, walk_w + t * t, walk_b + dy * dy);
    }
    let err = |got: f32, want: f64, walk: f64| {
        (got as f64 - want).abs() / want.abs().max(walk.sqrt()).max(1.0)
    };
    err(out.dweight[0], sum_w, walk_w).max(err(out.dbias[0], sum_b, walk_b))
}

/// `[n, c, side, side]` with an odd side, about 5% more bytes than one binding holds.
fn shape_over_binding(n: usize, c: usize, esize: u64) -> Option<Vec<usize>> {
    let limits = gpu().limits().clone();
    let binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let elems = binding / esize * 21 / 20;
    let side = ((elems as f64 / (n * c) as f64).sqrt().ceil() as usize) | 1;
    let shape = vec![n, c, side, side];
    let bytes = (n * c * side * side) as u64 * esize;
    if bytes > MAX_TENSOR_BYTES {
        println!("skipped: bindings of {binding} bytes need {bytes}-byte tensors");
        return None;
    }
    Some(shape)
}

/// Forward-train (running update, momentum 0.1) and backward of `shape` under `options` with the Auto
/// plan, which must be chunked; checks `channels` against the reference.
fn check_chunked(shape: &[usize], options: OpOptions, channels: &[usize], min_chunks: usize) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let gpu = gpu();
    let seed = seed();
    let mut rng = rng(seed);
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    let numel = n * c * hw;
    let dtype = options.dtype;
    let cfg = BatchNormConfig::default();
    let op = BatchNormOp::with_options(&gpu, shape, Layout::Nchw, cfg, PlanChoice::Auto, options)
        .unwrap();
    let plan = op.plan_name();
    let chunks: usize = plan
        .split(" chunks")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(1);
    assert!(
        chunks >= min_chunks,
        "{shape:?}: expected at least {min_chunks} chunks, plan {plan}"
    );
    let t0 = std::time::Instant::now();
    let mut x = normal(&mut rng, numel, 0.5, 2.0);
    let mut dy = normal(&mut rng, numel, 0.0, 1.0);
    if dtype == DType::F16 {
        x = round_to_f16(&x);
        dy = round_to_f16(&dy);
    }
    let weight = uniform(&mut rng, c, 0.5, 1.5);
    let bias = uniform(&mut rng, c, -1.0, 1.0);
    let rmean0 = uniform(&mut rng, c, -0.5, 0.5);
    let rvar0 = uniform(&mut rng, c, 0.5, 2.0);
    let bx = upload_tensor(&gpu, "x", &x, dtype);
    let bdy = upload_tensor(&gpu, "dy", &dy, dtype);
    // Channel ch of an NCHW tensor: n runs of hw values. Only the sampled channels stay on the host.
    let take = |v: &[f32], ch: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|s| v[(s * c + ch) * hw..(s * c + ch + 1) * hw].iter().copied())
            .collect()
    };
    let sampled: Vec<(Vec<f32>, Vec<f32>)> = channels
        .iter()
        .map(|&ch| (take(&x, ch), take(&dy, ch)))
        .collect();
    drop((x, dy));
    let poison_bytes = op.tensor_bytes();
    let poisoned = || {
        let words = vec![u32::MAX; (poison_bytes / 4) as usize];
        gpu.upload("poisoned", &words).unwrap()
    };
    let (by, bdx) = (poisoned(), poisoned());
    let bmask = gpu
        .upload("mask", &vec![u32::MAX; (op.mask_bytes() / 4) as usize])
        .unwrap();
    let bw = gpu.upload("w", &weight).unwrap();
    let bb = gpu.upload("b", &bias).unwrap();
    let brm = gpu.upload("rm", &rmean0).unwrap();
    let brv = gpu.upload("rv", &rvar0).unwrap();
    let bsaved = gpu.upload("saved", &vec![f32::NAN; 2 * c]).unwrap();
    let bdw = gpu.upload("dw", &vec![f32::NAN; c]).unwrap();
    let bdb = gpu.upload("db", &vec![f32::NAN; c]).unwrap();
    let fwd = ForwardBuffers {
        x: (&bx).into(),
        y: (&by).into(),
        weight: Some((&bw).into()),
        bias: Some((&bb).into()),
        running_mean: Some((&brm).into()),
        running_var: Some((&brv).into()),
        saved: (&bsaved).into(),
    };
    let bwd = BackwardBuffers {
        x: (&bx).into(),
        dy: (&bdy).into(),
        dx: (&bdx).into(),
        weight: Some((&bw).into()),
        saved: (&bsaved).into(),
        dweight: Some((&bdw).into()),
        dbias: Some((&bdb).into()),
    };
    let mask = BufferRef::from(&bmask);
    let mut enc = gpu.encoder("chunked");
    if options.fuse_relu {
        op.record_forward_train_relu(&mut enc, &fwd, mask, Some(0.1))
            .unwrap();
        op.record_backward_relu(&mut enc, &bwd, mask, true).unwrap();
    } else {
        op.record_forward_train(&mut enc, &fwd, Some(0.1)).unwrap();
        op.record_backward(&mut enc, &bwd, true).unwrap();
    }
    gpu.submit_and_wait(enc).unwrap();
    let gpu_s = t0.elapsed().as_secs_f64();
    let mask_words: Vec<u32> = if options.fuse_relu {
        gpu.download(&bmask, 0, numel.div_ceil(32)).unwrap()
    } else {
        Vec::new()
    };
    let saved: Vec<f32> = gpu.download(&bsaved, 0, 2 * c).unwrap();
    let per_channel = |b: &wgpu::Buffer| -> Vec<f32> { gpu.download(b, 0, c).unwrap() };
    let (rm, rv, dw, db) = (
        per_channel(&brm),
        per_channel(&brv),
        per_channel(&bdw),
        per_channel(&bdb),
    );
    let download_channel = |b: &wgpu::Buffer, ch: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|s| download_run(b, (s * c + ch) * hw, hw, dtype))
            .collect()
    };
    for (&ch, (x_ch, dy_ch)) in channels.iter().zip(sampled) {
        let sub = Case {
            options,
            ..Case::new(&[n, 1, shape[2], shape[3]], Layout::Nchw)
        };
        let inp = Inputs {
            x: x_ch,
            dy: dy_ch,
            weight: vec![weight[ch]],
            bias: vec![bias[ch]],
            rmean0: vec![rmean0[ch]],
            rvar0: vec![rvar0[ch]],
        };
        let mut sub_mask = vec![
            0u32;
            if options.fuse_relu {
                (n * hw).div_ceil(32)
            } else {
                0
            }
        ];
        if options.fuse_relu {
            for s in 0..n {
                for i in 0..hw {
                    let e = (s * c + ch) * hw + i;
                    let bit = (mask_words[e / 32] >> (e % 32)) & 1;
                    let k = s * hw + i;
                    sub_mask[k / 32] |= bit << (k % 32);
                }
            }
        }
        let out = GpuOut {
            y: download_channel(&by, ch),
            dx: download_channel(&bdx, ch),
            saved: vec![saved[ch], saved[c + ch]],
            running_mean: vec![rm[ch]],
            running_var: vec![rv[ch]],
            dweight: vec![dw[ch]],
            dbias: vec![db[ch]],
            mask: sub_mask,
            plan: format!("{plan}, channel {ch} of {c}"),
        };
        let mut o = compare(&sub, &inp, &out);
        o.grad_err = grad_err_against_walk(&inp, &out);
        let tol = if dtype == DType::F16 { TOL_F16 } else { TOL };
        assert_within(&sub, &o, seed, tol);
    }
    if options.fuse_relu {
        // Bits past the last element stay 0 (the last block straddles the tensor's end).
        let last = mask_words[numel.div_ceil(32) - 1];
        let valid = numel % 32;
        assert!(
            valid == 0 || last >> valid == 0,
            "mask bits past the end: {last:#x} (seed {seed})"
        );
    }
    println!(
        "{shape:?} {plan}: {numel} elements, {} MB per tensor, GPU forward+backward with uploads {gpu_s:.1} s",
        op.tensor_bytes() >> 20
    );
}

/// Packed f16 over 64 Mi elements: whole-sample chunks, odd planes (word kernels), 5% over a binding.
#[test]
fn f16_chunked_over_the_binding_limit() {
    let Some(shape) = shape_over_binding(3, 4, 2) else {
        return;
    };
    let options = OpOptions {
        dtype: DType::F16,
        f16_path: F16Path::Auto,
        fuse_relu: false,
        sigmoid: false,
    };
    // Samples of 4 channels: channel 3 ends the first chunk's last sample, 0 starts the next chunk.
    check_chunked(&shape, options, &[0, 3], 2);
}

/// f32 with the fused ReLU over 32 Mi elements, one sample: channel-range chunks of that sample, mask
/// words crossing channel and chunk ends.
#[test]
fn relu_chunked_over_the_binding_limit() {
    let Some(shape) = shape_over_binding(1, 12, 4) else {
        return;
    };
    let options = OpOptions {
        fuse_relu: true,
        ..Default::default()
    };
    check_chunked(&shape, options, &[10, 11], 2);
}

/// f32 with the fused sigmoid over 32 Mi elements, two samples: whole-sample chunks (and the chunks'
/// stores) writing sigmoid(bn(x)).
#[test]
fn sigmoid_chunked_over_the_binding_limit() {
    let Some(shape) = shape_over_binding(2, 5, 4) else {
        return;
    };
    let options = OpOptions {
        sigmoid: true,
        ..Default::default()
    };
    check_chunked(&shape, options, &[0, 4], 2);
}

/// Plain f32 over 32 Mi elements in samples of 64 channels of 7×7: on a CPU device NCHW viewed as rows of
/// C·HW values (the wide kernels, per-column partials merged per channel) in whole-sample chunks.
#[test]
fn nchw_rows_chunked_over_the_binding_limit() {
    let limits = gpu().limits().clone();
    let binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let n = (binding / 4 * 21 / 20) as usize / (64 * 49) + 1;
    let shape = vec![n, 64, 7, 7];
    if (n * 64 * 49 * 4) as u64 > MAX_TENSOR_BYTES {
        println!("skipped: bindings of {binding} bytes need larger tensors");
        return;
    }
    let gpu = gpu();
    let options = OpOptions::default();
    let op = BatchNormOp::with_options(
        &gpu,
        &shape,
        Layout::Nchw,
        BatchNormConfig::default(),
        PlanChoice::Auto,
        options,
    )
    .unwrap();
    assert_eq!(
        op.plan_name().contains("NCHW as rows"),
        gpu.caps().cpu_device,
        "{shape:?}: plan {}",
        op.plan_name()
    );
    drop(op);
    // Channel 0 starts a sample, 63 ends one (both at the chunk boundary as in every sample).
    check_chunked(&shape, options, &[0, 63], 2);
}
