//! The Adam update kernel against the f64 reference over several steps, and the reference against
//! values worked out by hand from `torch.optim.Adam`'s definition.
//!
//! Fresh random inputs (seed printed on failure); each arena sits at a 256-byte offset inside a larger
//! buffer whose head and tail are poisoned with NaN and must come back untouched, and the moment
//! buffers start from random state (as after a resume) or zeros, so an element the kernel skipped or a
//! write out of range shows. Tolerance: max |gpu − ref| / (1 + |ref|) <= 1e-6 for parameters and both
//! moments after 5 steps (f32 rounding of a few operations per step; a wrong bias correction is off by
//! a factor of 3 or more at t = 1), and exp_avg_sq also relative to itself <= 2e-6 (the betas are the
//! decimals the user wrote, as PyTorch's Python floats).

mod common;

use batchnorm::ops::adam::{decimal_f64, AdamConfig, AdamOp};
use batchnorm::ops::batchnorm::BufferRef;
use batchnorm::reference::adam as reference;
use common::*;

const TOL: f64 = 1e-6;
/// exp_avg_sq relative to itself (a few f32 roundings per step).
const V_REL_TOL: f64 = 2e-6;
/// Poisoned head before each arena: 64 floats = 256 bytes, a multiple of every device's alignment.
const HEAD: usize = 64;
const TAIL: usize = 37;

fn poisoned(gpu: &batchnorm::gpu::Gpu, label: &str, values: &[f32]) -> wgpu::Buffer {
    let mut v = vec![f32::NAN; HEAD];
    v.extend_from_slice(values);
    v.extend(std::iter::repeat_n(f32::NAN, TAIL));
    gpu.upload(label, &v).unwrap()
}

fn at(buffer: &wgpu::Buffer) -> BufferRef<'_> {
    BufferRef {
        buffer,
        offset: 4 * HEAD as u64,
    }
}

/// The arena's values; panics if the poisoned head or tail was written.
fn read(gpu: &batchnorm::gpu::Gpu, b: &wgpu::Buffer, len: usize, what: &str) -> Vec<f32> {
    let all: Vec<f32> = gpu.download(b, 0, HEAD + len + TAIL).unwrap();
    assert!(
        all[..HEAD]
            .iter()
            .chain(&all[HEAD + len..])
            .all(|v| v.is_nan()),
        "{what}: a value outside the arena was written"
    );
    all[HEAD..HEAD + len].to_vec()
}

#[test]
fn adam_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    let configs = [
        AdamConfig::default(),
        AdamConfig {
            lr: 0.1,
            eps: 1e-3,
            weight_decay: 1e-3,
            ..Default::default()
        },
        AdamConfig {
            lr: 0.01,
            beta1: 0.5,
            beta2: 0.9,
            eps: 1e-3,
            weight_decay: 0.05,
        },
        // No weight decay with a tiny eps: where grad + wd·param cancels to |g| ≈ eps, Adam's update is
        // ill-conditioned (d update / dg ≈ lr / 4eps at t = 1), and the f32 rounding of that sum alone
        // moves it by ~1e-5, in PyTorch's f32 kernels as here. The decay cases use eps >= 1e-3.
        AdamConfig {
            lr: 0.03,
            beta1: 0.0,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    ];
    for (k, config) in configs.into_iter().enumerate() {
        for &len in &[1usize, 255, 257, 10_007] {
            // Even cases start fresh at t = 1; odd ones continue from random state at t = 7.
            let resumed = (k + len) % 2 == 1;
            let t0 = if resumed { 7 } else { 1 };
            let p0 = normal(&mut r, len, 0.0, 1.0);
            let (m0, v0) = if resumed {
                (
                    normal(&mut r, len, 0.0, 0.1),
                    uniform(&mut r, len, 1e-4, 0.5),
                )
            } else {
                (vec![0.0; len], vec![0.0; len])
            };
            let pb = poisoned(&gpu, "p", &p0);
            let gb = poisoned(&gpu, "g", &vec![0.0; len]);
            let mb = poisoned(&gpu, "m", &m0);
            let vb = poisoned(&gpu, "v", &v0);
            let op = AdamOp::new(&gpu, len, config).unwrap();
            let (mut p, mut m, mut v) = (f64s(&p0), f64s(&m0), f64s(&v0));
            for t in t0..t0 + 5 {
                // Gradients of mixed scales, so eps and the moment ratios both matter.
                let scale = if t % 2 == 0 { 1.0 } else { 1e-3 };
                let g = normal(&mut r, len, 0.0, scale);
                gpu.queue
                    .write_buffer(&gb, 4 * HEAD as u64, bytemuck::cast_slice(&g));
                op.set_step(config, t).unwrap();
                let mut enc = gpu.encoder("test");
                op.record_step(&mut enc, at(&pb), at(&gb), at(&mb), at(&vb))
                    .unwrap();
                gpu.submit_and_wait(enc).unwrap();
                reference::step(
                    &mut p,
                    &f64s(&g),
                    &mut m,
                    &mut v,
                    t,
                    config.lr as f64,
                    (decimal_f64(config.beta1), decimal_f64(config.beta2)),
                    config.eps as f64,
                    config.weight_decay as f64,
                );
            }
            let ctx = format!("{config:?} len {len} from t={t0} (seed {seed})");
            let ep = max_rel_err(&read(&gpu, &pb, len, "param"), &p);
            let em = max_rel_err(&read(&gpu, &mb, len, "exp_avg"), &m);
            let ev = max_rel_err(&read(&gpu, &vb, len, "exp_avg_sq"), &v);
            assert!(ep <= TOL, "param {ctx}: {ep:e}");
            assert!(em <= TOL, "exp_avg {ctx}: {em:e}");
            assert!(ev <= TOL, "exp_avg_sq {ctx}: {ev:e}");
            // exp_avg_sq is ~g² (1e-6 at the small steps), so also relative to itself: 1 − β2 taken in
            // f32 (1 − f32(0.999)) puts it 1.3e-5 off PyTorch's.
            let v_rel = read(&gpu, &vb, len, "exp_avg_sq")
                .iter()
                .zip(&v)
                .map(|(&got, &want)| (got as f64 - want).abs() / want.abs().max(1e-30))
                .fold(0.0, f64::max);
            assert!(v_rel <= V_REL_TOL, "exp_avg_sq relative {ctx}: {v_rel:e}");
        }
    }
}

/// `torch.optim.Adam` worked by hand: the first step moves each parameter by lr against the sign of its
/// gradient (bias-corrected m̂ = g, v̂ = g², so m̂/√v̂ = ±1); weight decay adds to the gradient first.
#[test]
fn reference_matches_torch_by_hand() {
    let mut p = [1.0, -2.0];
    let (mut m, mut v) = ([0.0; 2], [0.0; 2]);
    reference::step(
        &mut p,
        &[0.5, -3.0],
        &mut m,
        &mut v,
        1,
        0.1,
        (0.9, 0.999),
        0.0,
        0.0,
    );
    assert!(
        (p[0] - 0.9).abs() < 1e-12 && (p[1] + 1.9).abs() < 1e-12,
        "{p:?}"
    );
    assert!((m[0] - 0.05).abs() < 1e-12 && (v[0] - 0.00025).abs() < 1e-12);
    // Step 2 with g = 0.5 again (no decay): m = 0.095, v = 0.00049975; m̂ = 0.5, v̂ = 0.25: moves by lr.
    reference::step(
        &mut p,
        &[0.5, 1.0],
        &mut m,
        &mut v,
        2,
        0.1,
        (0.9, 0.999),
        0.0,
        0.0,
    );
    assert!((p[0] - 0.8).abs() < 1e-12, "{p:?}");
    // L2 decay: grad 0 on param 2 with wd 0.25 is a gradient of 0.5, so the first step moves by lr.
    let mut q = [2.0];
    let (mut m, mut v) = ([0.0], [0.0]);
    reference::step(
        &mut q,
        &[0.0],
        &mut m,
        &mut v,
        1,
        0.1,
        (0.9, 0.999),
        0.0,
        0.25,
    );
    assert!((q[0] - 1.9).abs() < 1e-12, "{q:?}");
}

#[test]
fn adam_rejects_bad_config() {
    let gpu = gpu();
    for (bad, what) in [
        (
            AdamConfig {
                lr: -1.0,
                ..Default::default()
            },
            "lr",
        ),
        (
            AdamConfig {
                beta1: 1.0,
                ..Default::default()
            },
            "beta1",
        ),
        (
            AdamConfig {
                beta2: -0.1,
                ..Default::default()
            },
            "beta2",
        ),
        (
            AdamConfig {
                eps: f32::NAN,
                ..Default::default()
            },
            "eps",
        ),
    ] {
        let e = AdamOp::new(&gpu, 4, bad).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    let op = AdamOp::new(&gpu, 4, AdamConfig::default()).unwrap();
    assert!(op.set_step(AdamConfig::default(), 0).is_err());
    assert!(AdamOp::new(&gpu, 0, AdamConfig::default()).is_err());
    // A buffer too small for the arena is a shape error, not a device fault.
    let small = gpu.upload("small", &[0.0f32; 3]).unwrap();
    let ok = gpu.upload("ok", &[0.0f32; 4]).unwrap();
    let mut enc = gpu.encoder("bad");
    let e = op
        .record_step(
            &mut enc,
            (&ok).into(),
            (&ok).into(),
            (&small).into(),
            (&ok).into(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("exp_avg"), "{e}");
}
