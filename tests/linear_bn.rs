//! The Linear op fused with the BatchNorm after it (`LinearOp::record_forward_bn`,
//! `shaders/linear_dot_bn.wgsl`) against the f64 references, and the layer-level path
//! (`Linear::record_forward_with_bn`) against the same layers recorded apart.
//!
//! Fresh random inputs each run (seed printed on failure; BN_TEST_SEED replays one); every output
//! poisoned with NaN first. Tolerances:
//! - z = x Wᵀ + b against the f64 product: max |gpu − ref| / max(1, max |ref|) <= 1e-5 (as tests/linear.rs).
//! - BatchNorm's outputs against the f64 BatchNorm of the z the GPU stored (so that z's own f32
//!   rounding, which the unfused path has too, is not counted): y, saved mean and running statistics
//!   |gpu − ref| / (1 + |ref|) <= 2e-5, saved invstd relative 2e-5. A case with mean 100 and spread 0.02
//!   makes an unshifted mean fail this (its f32 sum of 100s is off by ~1e-5 of the spread's scale).

mod common;

use batchnorm::nn::{BatchNorm, Linear, ParamSlot};
use batchnorm::ops::batchnorm::BatchNormConfig;
use batchnorm::ops::linear::{
    BnBackwardEpilogue, BnEpilogue, BnEpilogueParams, LinearOp, MatmulKernel,
};
use batchnorm::reference::batchnorm::{self as bn_ref, RunningStats};
use batchnorm::reference::{linear as linear_ref, sigmoid as sigmoid_ref};
use batchnorm::tensor::Layout;
use batchnorm::Error;
use common::*;

const Z_TOL: f64 = 1e-5;
const BN_TOL: f64 = 2e-5;

/// A Linear [i → o] whose weight `w` and bias `b` sit in a parameter arena as a `Sequential` lays them
/// out (the bias at the next 64-value boundary): the arena, and a maker of layers over it.
fn linear_in_arena(
    gpu: &std::sync::Arc<batchnorm::gpu::Gpu>,
    i: usize,
    o: usize,
    w: &[f32],
    b: &[f32],
) -> (wgpu::Buffer, impl Fn() -> Linear) {
    let mut host = w.to_vec();
    host.resize(64 * (o * i).div_ceil(64), 0.0);
    let bias_at = host.len();
    host.extend_from_slice(b);
    let params = gpu.upload("params", &host).unwrap();
    let gpu = gpu.clone();
    let slot = |name: &str, shape: Vec<usize>, offset| ParamSlot {
        name: name.into(),
        shape,
        offset,
    };
    let make = move || {
        Linear::new(
            &gpu,
            i,
            o,
            slot("0.weight", vec![o, i], 0),
            Some(slot("0.bias", vec![o], bias_at)),
        )
    };
    (params, make)
}

/// The f64 reference of a Linear's backward through the `BatchNorm -> Sigmoid` before it: the Linear's
/// (dx, dW, db) from its input s = sigmoid(bn(z)), W and dy, then the BatchNorm's backward of
/// dz = dx * s * (1 - s) with the batch's mean and 1/std.
fn backward_through_sigmoid_bn_ref(
    (s, w, dy): (&[f32], &[f32], &[f32]),
    z: &[f32],
    gamma: &[f32],
    (mean, invstd): (&[f64], &[f64]),
    (n, i, o): (usize, usize, usize),
) -> (linear_ref::LinearGrads, bn_ref::BackwardOut) {
    let s64 = f64s(s);
    let lin = linear_ref::backward(&s64, &f64s(w), &f64s(dy), n, i, o);
    let dz: Vec<f64> = lin
        .dx
        .iter()
        .zip(&s64)
        .map(|(g, s)| g * s * (1.0 - s))
        .collect();
    let bn = bn_ref::backward(
        &f64s(z),
        &dz,
        &[n, i],
        Layout::Nc,
        Some(&f64s(gamma)),
        mean,
        invstd,
        true,
    )
    .unwrap();
    (lin, bn)
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / w.abs())
        .fold(0.0, f64::max)
}

/// The f64 references of a fused Linear + BatchNorm over `n` rows, [i → o]: z's scaled error against
/// x Wᵀ + b, and BatchNorm's output over the `z` the kernel stored (so that z's own f32 rounding is not
/// counted), with the running statistics as the reference leaves them where `running.0` passes them
/// (moved by `running.1`'s momentum).
fn references(
    (x, w, b): (&[f32], &[f32], Option<&[f32]>),
    (n, i, o): (usize, usize, usize),
    z: &[f32],
    (gamma, beta, running_mean, running_var): (&[f32], &[f32], &[f32], &[f32]),
    batch_stats: bool,
    running: (bool, Option<f32>),
    eps: f32,
) -> (f64, bn_ref::ForwardOut, RunningStats) {
    let b64 = b.map(f64s);
    let z_ref = linear_ref::forward(&f64s(x), &f64s(w), b64.as_deref(), n, i, o);
    let mut stats = RunningStats::new(o);
    stats.mean = f64s(running_mean);
    stats.var = f64s(running_var);
    let want = bn_ref::forward(
        &f64s(z),
        &[n, o],
        Layout::Nc,
        Some(&f64s(gamma)),
        Some(&f64s(beta)),
        running.0.then_some(&mut stats),
        batch_stats,
        running.1.map(f64::from),
        eps as f64,
    )
    .unwrap();
    (max_err_scaled(z, &z_ref), want, stats)
}

struct Case {
    n: usize,
    i: usize,
    o: usize,
    bias: bool,
    sigmoid: bool,
    /// None: leave the running statistics.
    factor: Option<f32>,
    /// Inputs' scale, and the bias's mean (a large one puts z's mean far from 0).
    x_std: f32,
    bias_mean: f32,
    /// false: normalize with the running statistics (eval), any number of rows.
    batch_stats: bool,
}

fn run_case(case: &Case, seed: u64) {
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return; // the fused kernels are subgroup kernels (the refusal tests cover this case)
    }
    let Case { n, i, o, .. } = *case;
    let what = format!(
        "[{n},{i}]->[{n},{o}] bias={} sigmoid={} factor={:?} bias_mean={} batch_stats={} (seed {seed})",
        case.bias, case.sigmoid, case.factor, case.bias_mean, case.batch_stats
    );
    let mut r = rng(seed ^ (n * 7919 + i * 31 + o) as u64);
    let x = normal(&mut r, n * i, 0.0, case.x_std);
    let w = normal(&mut r, o * i, 0.0, 0.5);
    let b = normal(&mut r, o, case.bias_mean, 1.0);
    let gamma = normal(&mut r, o, 1.0, 0.5);
    let beta = normal(&mut r, o, 0.0, 1.0);
    let running_mean = normal(&mut r, o, 0.0, 1.0);
    let running_var = uniform(&mut r, o, 0.5, 2.0);
    let eps = 1e-5f32;
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let nan = |len: usize| up(&vec![f32::NAN; len]);
    let (xb, wb, bb) = (up(&x), up(&w), up(&b));
    let (gb, betab, rmb, rvb) = (up(&gamma), up(&beta), up(&running_mean), up(&running_var));
    let (zb, yb, savedb) = (nan(n * o), nan(n * o), nan(2 * o));
    let params = BnEpilogueParams {
        eps,
        factor: case.factor.unwrap_or(0.0),
        pad: [0; 2],
    };
    let pb = gpu.upload("params", &[params]).unwrap();
    let op = LinearOp::new(&gpu, n, i, o).unwrap();
    assert!(
        op.can_fuse_bn(
            &(&xb).into(),
            &(&wb).into(),
            &(&zb).into(),
            &(&yb).into(),
            case.batch_stats
        ),
        "{what}: the fused kernel takes this shape"
    );
    let bn = BnEpilogue {
        y: (&yb).into(),
        weight: (&gb).into(),
        bias: (&betab).into(),
        running_mean: (&rmb).into(),
        running_var: (&rvb).into(),
        saved: (&savedb).into(),
        params: (&pb).into(),
        sigmoid: case.sigmoid,
        batch_stats: case.batch_stats,
        update_running: case.factor.is_some(),
    };
    let mut enc = gpu.encoder("test");
    let bias_ref = case.bias.then(|| (&bb).into());
    op.record_forward_bn(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        bias_ref,
        (&zb).into(),
        &bn,
    )
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let down = |buf: &wgpu::Buffer, len: usize| gpu.download::<f32>(buf, 0, len).unwrap();

    let z = down(&zb, n * o);
    let (err, want, running) = references(
        (&x, &w, case.bias.then_some(&b[..])),
        (n, i, o),
        &z,
        (&gamma, &beta, &running_mean, &running_var),
        case.batch_stats,
        (case.factor.is_some() || !case.batch_stats, case.factor),
        eps,
    );
    assert!(err <= Z_TOL, "{what}: z error {err:e}");
    let y_want = if case.sigmoid {
        sigmoid_ref::forward(&want.y)
    } else {
        want.y.clone()
    };
    let saved = down(&savedb, 2 * o);
    let checks = [
        ("y", max_rel_err(&down(&yb, n * o), &y_want)),
        ("saved mean", max_rel_err(&saved[..o], &want.mean)),
        ("saved invstd", max_rel(&saved[o..], &want.invstd)),
        ("running_mean", max_rel_err(&down(&rmb, o), &running.mean)),
        ("running_var", max_rel_err(&down(&rvb, o), &running.var)),
    ];
    for (name, err) in checks {
        assert!(err <= BN_TOL, "{what}: {name} error {err:e}");
    }
}

#[test]
fn linear_bn_matches_reference() {
    let seed = seed();
    let case = |n, i, o, bias, sigmoid, factor| Case {
        n,
        i,
        o,
        bias,
        sigmoid,
        factor,
        x_std: 1.0,
        bias_mean: 0.0,
        batch_stats: true,
    };
    for c in [
        // The MNIST MLP's layers.
        case(60, 784, 100, true, true, Some(0.1)),
        case(60, 100, 100, true, true, Some(0.1)),
        // Two rows; one block of every row (64); rows short of a lane's 8 (7, 13).
        case(2, 4, 4, true, false, Some(1.0)),
        case(64, 100, 100, false, true, Some(0.25)),
        case(7, 12, 20, true, false, None),
        case(13, 8, 36, false, false, Some(1.0 / 3.0)),
        // Many column blocks, the last one partly past N (260 = 16 * 16 + 4); a prime batch.
        case(37, 4, 260, true, true, Some(-0.25)),
        case(33, 20, 12, true, false, Some(1.5)),
    ] {
        run_case(&c, seed);
    }
    // z's mean 100 against a spread of ~0.02: y and the saved mean keep their precision only with the
    // shift (see the module docs).
    run_case(
        &Case {
            n: 60,
            i: 8,
            o: 16,
            bias: true,
            sigmoid: false,
            factor: Some(0.1),
            x_std: 0.01,
            bias_mean: 100.0,
            batch_stats: true,
        },
        seed,
    );
}

/// Linears that differ only in in_features share one fused pipeline (the kernel reads K from the op's
/// own binding): three of them, K 784, 100 and 12, recorded into one submission on a device of their
/// own (so that the count of pipelines built is this test's alone), each against the f64 references;
/// in training with 24 columns (16-column blocks) and in eval with 36 (32-column blocks on CPU devices).
#[test]
fn linears_differing_only_in_k_share_a_pipeline() {
    let shared = gpu();
    if !MatmulKernel::subgroup_available(&shared) {
        return;
    }
    let gpu = std::sync::Arc::new(batchnorm::gpu::Gpu::new().unwrap().plan_as(
        if shared.caps().cpu_device {
            wgpu::DeviceType::Cpu
        } else {
            wgpu::DeviceType::DiscreteGpu
        },
    ));
    let seed = seed();
    let (n, eps) = (29, 1e-5f32);
    let mut r = rng(seed ^ 0x5eed);
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let params = up(bytemuck::cast_slice(&[BnEpilogueParams {
        eps,
        factor: 0.1,
        pad: [0; 2],
    }]));
    for (o, batch_stats) in [(24, true), (36, false)] {
        let mut enc = gpu.encoder("three Linears");
        let mut checks = Vec::new();
        let built = gpu.pipelines_built();
        for i in [784, 100, 12] {
            let x = normal(&mut r, n * i, 0.0, 1.0);
            let w = normal(&mut r, o * i, 0.0, 0.5);
            let b = normal(&mut r, o, 0.0, 1.0);
            let gamma = normal(&mut r, o, 1.0, 0.5);
            let beta = normal(&mut r, o, 0.0, 1.0);
            let running_mean = normal(&mut r, o, 0.0, 1.0);
            let running_var = uniform(&mut r, o, 0.5, 2.0);
            let (xb, wb, bb, gb, betab) = (up(&x), up(&w), up(&b), up(&gamma), up(&beta));
            let (rmb, rvb) = (up(&running_mean), up(&running_var));
            let nan = |len: usize| up(&vec![f32::NAN; len]);
            let (zb, yb, savedb) = (nan(n * o), nan(n * o), nan(2 * o));
            let op = LinearOp::new(&gpu, n, i, o).unwrap();
            let bn = BnEpilogue {
                y: (&yb).into(),
                weight: (&gb).into(),
                bias: (&betab).into(),
                running_mean: (&rmb).into(),
                running_var: (&rvb).into(),
                saved: (&savedb).into(),
                params: (&params).into(),
                sigmoid: false,
                batch_stats,
                update_running: batch_stats,
            };
            op.record_forward_bn(
                &mut enc,
                (&xb).into(),
                (&wb).into(),
                Some((&bb).into()),
                (&zb).into(),
                &bn,
            )
            .unwrap();
            checks.push((i, x, w, b, gamma, beta, running_mean, running_var, zb, yb));
        }
        assert_eq!(
            gpu.pipelines_built() - built,
            1,
            "one pipeline for the three Linears ({o} columns, batch_stats {batch_stats})"
        );
        gpu.submit_and_wait(enc).unwrap();
        for (i, x, w, b, gamma, beta, running_mean, running_var, zb, yb) in checks {
            let what = format!("[{n},{i}]->[{n},{o}] batch_stats={batch_stats} (seed {seed})");
            let z = gpu.download::<f32>(&zb, 0, n * o).unwrap();
            let (err, want, _) = references(
                (&x, &w, Some(&b[..])),
                (n, i, o),
                &z,
                (&gamma, &beta, &running_mean, &running_var),
                batch_stats,
                (!batch_stats, None),
                eps,
            );
            assert!(err <= Z_TOL, "{what}: z error {err:e}");
            let y = gpu.download::<f32>(&yb, 0, n * o).unwrap();
            let err = max_rel_err(&y, &want.y);
            assert!(err <= BN_TOL, "{what}: y error {err:e}");
        }
    }
}

/// Over a million features: more column blocks (65 537) than one dimension of a dispatch takes, so the
/// host spreads them over a 2-D grid and the kernel must number its block from both dimensions.
#[test]
fn linear_bn_over_a_million_features() {
    let o = 16 * 65_536 + 20;
    for batch_stats in [true, false] {
        let case = Case {
            n: 3,
            i: 4,
            o,
            bias: true,
            sigmoid: true,
            factor: Some(0.1),
            x_std: 1.0,
            bias_mean: 0.0,
            batch_stats,
        };
        run_case(&case, seed());
    }
}

/// With the running statistics (eval): any number of rows, several row blocks, nothing updated.
#[test]
fn linear_bn_eval_matches_reference() {
    let seed = seed();
    for (n, i, o, bias, sigmoid) in [
        (1, 4, 4, true, true),
        (60, 784, 100, true, true),
        (130, 100, 100, false, false),
        (1000, 100, 12, true, true),
        (67, 8, 260, true, false),
    ] {
        let case = Case {
            n,
            i,
            o,
            bias,
            sigmoid,
            factor: None,
            x_std: 1.0,
            bias_mean: 0.0,
            batch_stats: false,
        };
        run_case(&case, seed);
    }
}

#[test]
fn linear_bn_refuses_what_it_cannot_run() {
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        let op = LinearOp::new(&gpu, 4, 4, 4).unwrap();
        let b = gpu.upload("b", &[0.0f32; 64]).unwrap();
        assert!(!op.can_fuse_bn(&(&b).into(), &(&b).into(), &(&b).into(), &(&b).into(), true));
        return;
    }
    // (rows, in_features, out_features, in_features the op was made for, what the refusal names): the
    // last op's in_features was changed after it was made, so its K binding still says the old one.
    for (n, i, o, made, why) in [
        (65, 4, 4, 4, "rows"),
        (1, 4, 4, 4, "rows"),
        (8, 6, 4, 6, "4 must divide"),
        (8, 4, 10, 4, "4 must divide"),
        (8, 8, 4, 4, "make a new op"),
    ] {
        let up = |len: usize| gpu.upload("t", &vec![1.0f32; len.max(4)]).unwrap();
        let (x, w, b, z, y) = (up(n * i), up(o * i), up(o), up(n * o), up(n * o));
        let (g, beta, rm, rv, saved, p) = (up(o), up(o), up(o), up(o), up(2 * o), up(4));
        let mut op = LinearOp::new(&gpu, n, made, o).unwrap();
        op.in_features = i;
        assert!(!op.can_fuse_bn(&(&x).into(), &(&w).into(), &(&z).into(), &(&y).into(), true));
        let bn = BnEpilogue {
            y: (&y).into(),
            weight: (&g).into(),
            bias: (&beta).into(),
            running_mean: (&rm).into(),
            running_var: (&rv).into(),
            saved: (&saved).into(),
            params: (&p).into(),
            sigmoid: false,
            batch_stats: true,
            update_running: true,
        };
        let mut enc = gpu.encoder("test");
        match op.record_forward_bn(
            &mut enc,
            (&x).into(),
            (&w).into(),
            Some((&b).into()),
            (&z).into(),
            &bn,
        ) {
            Err(Error::BadConfig(m)) => assert!(m.contains(why), "({n},{i},{o}): {m}"),
            other => panic!("({n},{i},{o}): expected BadConfig about {why:?}, got {other:?}"),
        }
    }
}

/// The layers: `Linear::record_forward_with_bn` for three training steps with the cumulative average
/// (the running factor 1, 1/2, 1/3 written before each submission), an eval step and a FrozenBN step,
/// each followed by BatchNorm's own backward, against the same layers recorded apart; and where it does
/// not apply (ghost batches in training) it records nothing.
#[test]
fn linear_with_bn_layer_matches_the_layers_apart() {
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    let (n, i, o) = (24, 36, 20);
    let mut r = rng(seed);
    let w = normal(&mut r, o * i, 0.0, 0.5);
    let b = normal(&mut r, o, 0.5, 1.0);
    let (params, new_linear) = linear_in_arena(&gpu, i, o, &w, &b);
    let config = BatchNormConfig {
        momentum: None,
        ..Default::default()
    };
    let make = || {
        let linear = new_linear();
        let bn = BatchNorm::new(&gpu, o, config).unwrap();
        let gamma = normal(&mut rng(seed ^ 1), o, 1.0, 0.3);
        bn.write("weight", bn.weight.as_ref().unwrap(), &gamma)
            .unwrap();
        (linear, bn)
    };
    let (mut fused_linear, mut fused_bn) = make();
    let (mut apart_linear, mut apart_bn) = make();
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let nan = |len: usize| up(&vec![f32::NAN; len]);
    // Three training steps, then eval, then FrozenBN (training with the running statistics).
    let modes = ["train", "train", "train", "eval", "frozen"];
    for (step, mode) in modes.into_iter().enumerate() {
        for bn in [&mut fused_bn, &mut apart_bn] {
            bn.train(mode != "eval");
            bn.set_frozen(mode == "frozen").unwrap();
        }
        let x = up(&normal(&mut r, n * i, 0.0, 1.0));
        let dy = up(&normal(&mut r, n * o, 0.0, 1.0));
        let mut outs = Vec::new();
        for fused in [true, false] {
            let (z, y, dx) = (nan(n * o), nan(n * o), nan(n * o));
            let mut enc = gpu.encoder("test");
            let (linear, bn) = if fused {
                (&mut fused_linear, &mut fused_bn)
            } else {
                (&mut apart_linear, &mut apart_bn)
            };
            let (xr, zr, yr) = ((&x).into(), (&z).into(), (&y).into());
            if fused {
                let ran = linear
                    .record_forward_with_bn(&mut enc, &params, bn, xr, zr, yr, n, true)
                    .unwrap();
                assert!(ran, "step {step}: the fused forward applies");
            } else {
                linear.record_forward(&mut enc, &params, xr, zr, n).unwrap();
                let mut opts = bn.options();
                opts.sigmoid = true;
                bn.set_options(opts).unwrap();
                bn.record_forward(&mut enc, zr, yr, &[n, o], Layout::Nc)
                    .unwrap();
                opts.sigmoid = false;
                bn.set_options(opts).unwrap();
            }
            // The backward takes dL/d(bn output); here dy stands for it.
            bn.record_backward(
                &mut enc,
                zr,
                (&dy).into(),
                (&dx).into(),
                &[n, o],
                Layout::Nc,
            )
            .unwrap();
            gpu.submit_and_wait(enc).unwrap();
            let down = |buf: &wgpu::Buffer| gpu.download::<f32>(buf, 0, n * o).unwrap();
            let (dw, db) = bn.grad_values().unwrap().unwrap();
            let state = bn.state_dict("").unwrap();
            outs.push((down(&y), down(&dx), dw, db, state, bn.num_batches_tracked));
        }
        let (f, a) = (&outs[0], &outs[1]);
        let what = format!("step {step}, {mode} (seed {seed})");
        for (name, got, want) in [
            ("y", &f.0, &a.0),
            ("dx", &f.1, &a.1),
            ("dweight", &f.2, &a.2),
            ("dbias", &f.3, &a.3),
        ] {
            let err = max_rel_err(got, &f64s(want));
            assert!(
                err <= BN_TOL,
                "{what}: {name} fused vs apart: error {err:e}"
            );
        }
        for ((name, got), (_, want)) in f.4.iter().zip(&a.4) {
            let err = max_rel_err(got, &f64s(want));
            assert!(
                err <= BN_TOL,
                "{what}: {name} fused vs apart: error {err:e}"
            );
        }
        assert_eq!(f.5, (step as i64 + 1).min(3), "{what}: num_batches_tracked");
        assert_eq!(f.5, a.5, "{what}: num_batches_tracked");
    }
    // Where it does not apply, it records nothing and says so.
    let (x, z, y) = (nan(n * i), nan(n * o), nan(n * o));
    let mut enc = gpu.encoder("test");
    fused_bn.set_frozen(false).unwrap();
    fused_bn.set_virtual_batch_size(Some(n / 2)).unwrap();
    let ran = fused_linear
        .record_forward_with_bn(
            &mut enc,
            &params,
            &mut fused_bn,
            (&x).into(),
            (&z).into(),
            (&y).into(),
            n,
            false,
        )
        .unwrap();
    assert!(!ran, "ghost batches: not fused");
    assert_eq!(fused_bn.num_batches_tracked, 3, "nothing was counted");
}

/// The backward of `BatchNorm → Sigmoid → Linear` in one dispatch (`record_backward_through_sigmoid_bn`,
/// `shaders/linear_rows_bn.wgsl`) against the f64 references: dz = (dy W) ⊙ s (1 − s), then
/// BatchNorm's backward of dz with the batch statistics of z; the Linear's dW and db. Tolerance: dx,
/// dgamma, dbeta, dW and db max |gpu − ref| / max(1, max |ref|) <= 1e-5 (sums of up to 260 products).
#[test]
fn linear_bn_backward_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    for &(n, i, o, bias, z_mean, z_std) in &[
        // The MNIST MLP's hidden layers (K = 100, dy as vec4s) and its head (K = 10: scalar dy, a
        // short last group of K).
        (60, 100, 100, true, 0.3, 2.0),
        (60, 100, 10, true, 0.3, 2.0),
        // Two rows; every row of a block; odd K; many column blocks, the last partly past N.
        (2, 4, 4, false, 0.3, 2.0),
        (64, 36, 8, true, 0.3, 2.0),
        (13, 8, 7, true, 0.3, 2.0),
        (37, 260, 12, false, 0.3, 2.0),
        // z's mean 1000 against a spread of 0.01: the saved f32 mean is off the batch mean by up to
        // ~3e-3 of the spread, which the sums' exact offset (finalize_backward_channel's delta) takes
        // out (without it, dx error 1.3e-4 to 2.8e-4 in three runs).
        (60, 16, 8, true, 1000.0, 0.01),
    ] {
        let what =
            format!("[{n},{i}]<-[{n},{o}] bias={bias} z ~ N({z_mean}, {z_std}) (seed {seed})");
        let mut r = rng(seed ^ (n * 7919 + i * 31 + o) as u64);
        let dy = normal(&mut r, n * o, 0.0, 1.0);
        let w = normal(&mut r, o * i, 0.0, 0.5);
        let s = uniform(&mut r, n * i, 0.05, 0.95);
        let z = normal(&mut r, n * i, z_mean, z_std);
        let gamma = normal(&mut r, i, 1.0, 0.5);
        let (mean, var) =
            bn_ref::channel_stats(&f64s(&z), Layout::Nc.dims(&[n, i]).unwrap(), Layout::Nc);
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let mut saved: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
        saved.extend(invstd.iter().map(|&v| v as f32));
        let up = |v: &[f32]| gpu.upload("t", v).unwrap();
        let nan = |len: usize| up(&vec![f32::NAN; len]);
        let (dyb, wb, sb, zb, gb, savedb) =
            (up(&dy), up(&w), up(&s), up(&z), up(&gamma), up(&saved));
        let (dxb, dgb, dbetab, dwb, dbb) = (nan(n * i), nan(i), nan(i), nan(o * i), nan(o));
        let op = LinearOp::new(&gpu, n, i, o).unwrap();
        assert!(
            op.can_fuse_bn_backward(&(&wb).into(), &(&sb).into()),
            "{what}"
        );
        let bn = BnBackwardEpilogue {
            z: (&zb).into(),
            saved: (&savedb).into(),
            weight: (&gb).into(),
            dweight: (&dgb).into(),
            dbias: (&dbetab).into(),
            dx: (&dxb).into(),
            values: n * i,
        };
        let mut enc = gpu.encoder("test");
        op.record_backward_through_sigmoid_bn(
            &mut enc,
            (&sb).into(),
            (&wb).into(),
            (&dyb).into(),
            (&dwb).into(),
            bias.then(|| (&dbb).into()),
            &bn,
        )
        .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let (lin, want) =
            backward_through_sigmoid_bn_ref((&s, &w, &dy), &z, &gamma, (&mean, &invstd), (n, i, o));
        let down = |b: &wgpu::Buffer, len: usize| gpu.download::<f32>(b, 0, len).unwrap();
        let mut checks = vec![
            ("dx", max_err_scaled(&down(&dxb, n * i), &want.dx)),
            ("dgamma", max_err_scaled(&down(&dgb, i), &want.dweight)),
            ("dbeta", max_err_scaled(&down(&dbetab, i), &want.dbias)),
            ("dW", max_err_scaled(&down(&dwb, o * i), &lin.dweight)),
        ];
        if bias {
            checks.push(("db", max_err_scaled(&down(&dbb, o), &lin.dbias)));
        }
        for (name, err) in checks {
            assert!(err <= Z_TOL, "{what}: {name} error {err:e}");
        }
        // Statistics of another batch (a forward over other rows) are refused, not used.
        let other = BnBackwardEpilogue {
            values: (n + 1) * i,
            ..bn
        };
        let e = op
            .record_backward_through_sigmoid_bn(
                &mut gpu.encoder("test"),
                (&sb).into(),
                (&wb).into(),
                (&dyb).into(),
                (&dwb).into(),
                None,
                &other,
            )
            .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{what}: {e}");
    }
}

#[test]
fn linear_bn_backward_refuses_what_it_cannot_run() {
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    for (n, i, o, why) in [
        (65, 4, 4, "rows"),
        (1, 4, 4, "rows"),
        (8, 6, 4, "4 must divide"),
    ] {
        let up = |len: usize| gpu.upload("t", &vec![1.0f32; len.max(4)]).unwrap();
        let (s, w, dy, dw, z, dx) = (
            up(n * i),
            up(o * i),
            up(n * o),
            up(o * i),
            up(n * i),
            up(n * i),
        );
        let (saved, g, dg, db) = (up(2 * i), up(i), up(i), up(i));
        let op = LinearOp::new(&gpu, n, i, o).unwrap();
        assert!(!op.can_fuse_bn_backward(&(&w).into(), &(&s).into()));
        let bn = BnBackwardEpilogue {
            z: (&z).into(),
            saved: (&saved).into(),
            weight: (&g).into(),
            dweight: (&dg).into(),
            dbias: (&db).into(),
            dx: (&dx).into(),
            values: n * i,
        };
        let mut enc = gpu.encoder("test");
        let got = op.record_backward_through_sigmoid_bn(
            &mut enc,
            (&s).into(),
            (&w).into(),
            (&dy).into(),
            (&dw).into(),
            None,
            &bn,
        );
        match got {
            Err(Error::BadConfig(m)) => assert!(m.contains(why), "({n},{i},{o}): {m}"),
            other => panic!("({n},{i},{o}): expected BadConfig about {why:?}, got {other:?}"),
        }
    }
}

/// A network's head in one dispatch (`LinearOp::record_head_step`, `shaders/linear_head_step.wgsl`):
/// logits, the loss and dlogits, then the backward through the `BatchNorm → Sigmoid` before the head
/// with dy = dlogits. Against the two ops recorded apart (`record_forward_xent`, then
/// `record_backward_through_sigmoid_bn`): every output bit for bit, since the head step runs their
/// code. Against the f64 references: the logits (max |gpu − ref| / max(1, max |ref|) <= 1e-5); dlogits
/// from the GPU's logits (relative 1e-6, tests/softmax_xent.rs); dW, db, the BatchNorm's dx, dgamma and
/// dbeta from the GPU's dlogits (1e-5 scaled, as `linear_bn_backward_matches_reference`). Every output
/// poisoned with NaN first; the statistics accumulate onto what `stats` held.
#[test]
fn head_step_matches_the_ops_apart_and_the_reference() {
    use batchnorm::ops::softmax_xent::STATS_LEN;
    use batchnorm::reference::softmax_xent as xent_ref;
    use rand::Rng;
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    for &(n, i, o, bias) in &[
        // The MNIST MLP's head; then two rows and classes; every row of a block with 16 classes; a
        // prime batch with K past the loss block's 4 steps; no bias, odd classes.
        (60, 100, 10, true),
        (2, 4, 2, false),
        (64, 36, 16, true),
        (13, 260, 3, true),
        (37, 8, 7, false),
    ] {
        let what = format!("[{n},{i}]->[{n},{o}] bias={bias} (seed {seed})");
        let mut r = rng(seed ^ (n * 7919 + i * 31 + o) as u64 ^ 0x4ead);
        let s = uniform(&mut r, n * i, 0.05, 0.95);
        let w = normal(&mut r, o * i, 0.0, 0.5);
        let b = normal(&mut r, o, 0.0, 1.0);
        let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..o as u32)).collect();
        let z = normal(&mut r, n * i, 0.3, 2.0);
        let gamma = normal(&mut r, i, 1.0, 0.5);
        let (mean, var) =
            bn_ref::channel_stats(&f64s(&z), Layout::Nc.dims(&[n, i]).unwrap(), Layout::Nc);
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let mut saved: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
        saved.extend(invstd.iter().map(|&v| v as f32));
        let up = |v: &[f32]| gpu.upload("t", v).unwrap();
        let (sb, wb, bb, zb, gb, savedb) = (up(&s), up(&w), up(&b), up(&z), up(&gamma), up(&saved));
        let lb = gpu.upload("labels", &labels).unwrap();
        let op = LinearOp::new(&gpu, n, i, o).unwrap();
        assert!(
            op.can_fuse_head_step(&(&sb).into(), &(&wb).into()),
            "{what}"
        );
        // Outputs: logits, dlogits, stats, dW, db, dx, dgamma, dbeta; one set per way of running.
        let outputs = || {
            let nan = |len: usize| up(&vec![f32::NAN; len]);
            [
                nan(n * o),
                nan(n * o),
                up(&[f32::NAN, 1.0, 2.0, 3.0]),
                nan(o * i),
                nan(o),
                nan(n * i),
                nan(i),
                nan(i),
            ]
        };
        let (fused, apart) = (outputs(), outputs());
        fn bn<'a>(
            out: &'a [wgpu::Buffer; 8],
            (z, saved, gamma): (&'a wgpu::Buffer, &'a wgpu::Buffer, &'a wgpu::Buffer),
            values: usize,
        ) -> BnBackwardEpilogue<'a> {
            BnBackwardEpilogue {
                z: z.into(),
                saved: saved.into(),
                weight: gamma.into(),
                dweight: (&out[6]).into(),
                dbias: (&out[7]).into(),
                dx: (&out[5]).into(),
                values,
            }
        }
        let inputs = (&zb, &savedb, &gb);
        let bias_ref = bias.then(|| (&bb).into());
        let mut enc = gpu.encoder("test");
        let f = &fused;
        op.record_head_step(
            &mut enc,
            (&sb).into(),
            (&wb).into(),
            bias_ref,
            (&f[0]).into(),
            (&lb).into(),
            (&f[1]).into(),
            (&f[2]).into(),
            ((&f[3]).into(), bias.then(|| (&f[4]).into())),
            &bn(f, inputs, n * i),
        )
        .unwrap();
        let a = &apart;
        op.record_forward_xent(
            &mut enc,
            (&sb).into(),
            (&wb).into(),
            bias_ref,
            (&a[0]).into(),
            (&lb).into(),
            (&a[1]).into(),
            (&a[2]).into(),
        )
        .unwrap();
        op.record_backward_through_sigmoid_bn(
            &mut enc,
            (&sb).into(),
            (&wb).into(),
            (&a[1]).into(),
            (&a[3]).into(),
            bias.then(|| (&a[4]).into()),
            &bn(a, inputs, n * i),
        )
        .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let lens = [n * o, n * o, STATS_LEN, o * i, o, n * i, i, i];
        let names = [
            "logits", "dlogits", "stats", "dW", "db", "dx", "dgamma", "dbeta",
        ];
        let down = |b: &wgpu::Buffer, len: usize| gpu.download::<f32>(b, 0, len).unwrap();
        let got: Vec<Vec<f32>> = fused.iter().zip(lens).map(|(b, l)| down(b, l)).collect();
        for ((g, b), (name, len)) in got.iter().zip(&apart).zip(names.iter().zip(lens)) {
            if *name == "db" && !bias {
                assert!(
                    g.iter().all(|v| v.is_nan()),
                    "{what}: db written without a bias"
                );
                continue;
            }
            let want = down(b, len);
            let same = g.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{what}: {name} differs from the ops apart: {g:?} vs {want:?}"
            );
        }
        // The references.
        let b64 = f64s(&b);
        let want_z = linear_ref::forward(&f64s(&s), &f64s(&w), bias.then_some(&b64[..]), n, i, o);
        let err = max_err_scaled(&got[0], &want_z);
        assert!(err <= Z_TOL, "{what}: logits error {err:e}");
        let xent = xent_ref::forward_backward(&f64s(&got[0]), &labels, o);
        let err = max_rel_err(&got[1], &xent.dlogits);
        assert!(err <= 1e-6, "{what}: dlogits error {err:e}");
        let stats = &got[2];
        assert_eq!(stats[2], 2.0 + xent.correct as f32, "{what}: correct");
        assert_eq!(stats[3], 3.0 + n as f32, "{what}: rows");
        let rel = |got: f32, want: f64| (got as f64 - want).abs() / want.abs().max(1e-30);
        assert!(
            rel(stats[0], xent.loss) <= 1e-5,
            "{what}: loss {stats:?} vs {}",
            xent.loss
        );
        let (lin, want) = backward_through_sigmoid_bn_ref(
            (&s, &w, &got[1]),
            &z,
            &gamma,
            (&mean, &invstd),
            (n, i, o),
        );
        let mut checks = vec![
            ("dW", max_err_scaled(&got[3], &lin.dweight)),
            ("dx", max_err_scaled(&got[5], &want.dx)),
            ("dgamma", max_err_scaled(&got[6], &want.dweight)),
            ("dbeta", max_err_scaled(&got[7], &want.dbias)),
        ];
        if bias {
            checks.push(("db", max_err_scaled(&got[4], &lin.dbias)));
        }
        for (name, err) in checks {
            assert!(err <= Z_TOL, "{what}: {name} error {err:e}");
        }
    }
    // What it does not take: more than 16 classes (the loss's block), one row (the BatchNorm's
    // statistics), 4 not dividing in_features.
    for (n, i, o, why) in [
        (8, 4, 17, "classes"),
        (1, 4, 4, "rows"),
        (8, 6, 4, "4 must divide"),
    ] {
        let up = |len: usize| gpu.upload("t", &vec![1.0f32; len.max(4)]).unwrap();
        let op = LinearOp::new(&gpu, n, i, o).unwrap();
        let (s, w) = (up(n * i), up(o * i));
        assert!(
            !op.can_fuse_head_step(&(&s).into(), &(&w).into()),
            "({n},{i},{o})"
        );
        let (y, l, dy, st, dw, z, saved, g, dg, db, dx) = (
            up(n * o),
            up(n),
            up(n * o),
            up(STATS_LEN),
            up(o * i),
            up(n * i),
            up(2 * i),
            up(i),
            up(i),
            up(i),
            up(n * i),
        );
        let bn = BnBackwardEpilogue {
            z: (&z).into(),
            saved: (&saved).into(),
            weight: (&g).into(),
            dweight: (&dg).into(),
            dbias: (&db).into(),
            dx: (&dx).into(),
            values: n * i,
        };
        let got = op.record_head_step(
            &mut gpu.encoder("test"),
            (&s).into(),
            (&w).into(),
            None,
            (&y).into(),
            (&l).into(),
            (&dy).into(),
            (&st).into(),
            ((&dw).into(), None),
            &bn,
        );
        match got {
            Err(Error::BadConfig(m)) => assert!(m.contains(why), "({n},{i},{o}): {m}"),
            other => panic!("({n},{i},{o}): expected BadConfig about {why:?}, got {other:?}"),
        }
    }
}

/// A training forward and an eval forward of one layer recorded into one submission: the training one
/// still moves the running statistics (the update is its pipeline's, not a flag in the buffer both
/// dispatches read), to the batch's mean and unbiased variance (cumulative average, first batch).
#[test]
fn train_then_eval_in_one_submission() {
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    let (n, i, o) = (16, 8, 12);
    let mut r = rng(seed);
    let params = gpu
        .upload("params", &normal(&mut r, o * i, 0.0, 0.5))
        .unwrap();
    let slot = ParamSlot {
        name: "0.weight".into(),
        shape: vec![o, i],
        offset: 0,
    };
    let mut linear = Linear::new(&gpu, i, o, slot, None);
    let config = BatchNormConfig {
        momentum: None,
        ..Default::default()
    };
    let mut bn = BatchNorm::new(&gpu, o, config).unwrap();
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let x = up(&normal(&mut r, n * i, 0.0, 1.0));
    let (z, y, z2, y2) = (
        up(&vec![f32::NAN; n * o]),
        up(&vec![f32::NAN; n * o]),
        up(&vec![f32::NAN; n * o]),
        up(&vec![f32::NAN; n * o]),
    );
    let mut enc = gpu.encoder("test");
    for (training, z, y) in [(true, &z, &y), (false, &z2, &y2)] {
        bn.train(training);
        let ran = linear
            .record_forward_with_bn(
                &mut enc,
                &params,
                &mut bn,
                (&x).into(),
                z.into(),
                y.into(),
                n,
                false,
            )
            .unwrap();
        assert!(ran, "training={training}: fused");
    }
    gpu.submit_and_wait(enc).unwrap();
    let z: Vec<f32> = gpu.download(&z, 0, n * o).unwrap();
    let (mean, var) =
        bn_ref::channel_stats(&f64s(&z), Layout::Nc.dims(&[n, o]).unwrap(), Layout::Nc);
    let unbiased: Vec<f64> = var.iter().map(|v| v * n as f64 / (n - 1) as f64).collect();
    let state = bn.state_dict("").unwrap();
    let get = |k: &str| state.iter().find(|(name, _)| name == k).unwrap().1.clone();
    let what = format!("(seed {seed})");
    let err = max_rel_err(&get("running_mean"), &mean);
    assert!(err <= BN_TOL, "{what}: running_mean error {err:e}");
    let err = max_rel_err(&get("running_var"), &unbiased);
    assert!(err <= BN_TOL, "{what}: running_var error {err:e}");
    assert_eq!(bn.num_batches_tracked, 1, "{what}");
}

/// A `Sequential` whose Linear → BatchNorm pairs have other layers around them: Linear → BatchNorm →
/// Noise → Sigmoid (the forward fuses the BatchNorm without the sigmoid; the backward of the next
/// Linear must not reach through the Noise), BatchNorm → Sigmoid → Dropout → Linear (no fused backward
/// across the Dropout), and a plain Linear → BatchNorm → Sigmoid → Linear head where both fusions
/// apply. Three training steps and an eval forward with the Linear+BatchNorm fusions on, against the
/// same model with them off: outputs, every gradient and the state dict agree within 1e-4 relative
/// (both are f32 computations of the same network; the fused statistics are summed in another order).
#[test]
fn sequential_fusions_with_layers_between() {
    use batchnorm::nn::{LayerSpec, Sequential};
    use batchnorm::ops::noise::NoiseConfig;
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    let specs = [
        LayerSpec::Linear { out_features: 20 },
        LayerSpec::BatchNorm,
        LayerSpec::Noise(NoiseConfig::default()),
        LayerSpec::Sigmoid,
        LayerSpec::Linear { out_features: 12 },
        LayerSpec::BatchNorm,
        LayerSpec::Sigmoid,
        LayerSpec::Dropout { p: 0.3 },
        LayerSpec::Linear { out_features: 16 },
        LayerSpec::BatchNorm,
        LayerSpec::Sigmoid,
        LayerSpec::Linear { out_features: 10 },
    ];
    let (n, f) = (29usize, 36usize);
    let make = |fuse: bool| {
        let mut m = Sequential::new(&gpu, &[f], &specs, None, seed, n).unwrap();
        m.set_fuse_linear_bn(fuse);
        m
    };
    let (mut fused, mut apart) = (make(true), make(false));
    let mut r = rng(seed);
    let len = fused.arena_len();
    let tol = 1e-4;
    for step in 0..4 {
        let training = step < 3;
        let x = normal(&mut r, n * f, 0.5, 2.0);
        let dy = normal(&mut r, n * 10, 0.0, 1.0);
        let mut outs = Vec::new();
        for model in [&mut fused, &mut apart] {
            model.train(training);
            gpu.queue
                .write_buffer(model.input(), 0, bytemuck::cast_slice(&x));
            gpu.queue.write_buffer(
                model.output(),
                0,
                bytemuck::cast_slice(&vec![f32::NAN; n * 10]),
            );
            gpu.queue
                .write_buffer(&model.grads, 0, bytemuck::cast_slice(&vec![f32::NAN; len]));
            gpu.queue
                .write_buffer(model.output_grad(), 0, bytemuck::cast_slice(&dy));
            let mut enc = gpu.encoder("test");
            model.record_forward(&mut enc, n).unwrap();
            if training {
                model.record_backward(&mut enc, n).unwrap();
            }
            gpu.submit_and_wait(enc).unwrap();
            let y: Vec<f32> = gpu.download(model.output(), 0, n * 10).unwrap();
            let grads: Vec<f32> = gpu.download(&model.grads, 0, len).unwrap();
            outs.push((y, grads, model.state_dict().unwrap()));
        }
        let (a, b) = (&outs[0], &outs[1]);
        let what = format!("step {step}, training {training} (seed {seed})");
        let e = max_rel_err(&a.0, &f64s(&b.0));
        assert!(e <= tol, "{what}: output fused vs apart: error {e:e}");
        if training {
            for slot in fused.slots() {
                let range = slot.offset..slot.offset + slot.shape.iter().product::<usize>();
                let e = max_rel_err(&a.1[range.clone()], &f64s(&b.1[range]));
                assert!(
                    e <= tol,
                    "{what}: grad of {} fused vs apart: error {e:e}",
                    slot.name
                );
            }
        }
        assert_eq!(a.2.counters, b.2.counters, "{what}: counters");
        assert_eq!(a.2.tensors.len(), b.2.tensors.len(), "{what}");
        for ((name, _, got), (other, _, want)) in a.2.tensors.iter().zip(&b.2.tensors) {
            assert_eq!(name, other, "{what}");
            let e = max_rel_err(got, &f64s(want));
            assert!(e <= tol, "{what}: {name} fused vs apart: error {e:e}");
        }
    }
}

/// A training forward whose z has an infinity in every column's first row (x holds +inf in row 0's
/// first feature, so z[0, c] is +inf or -inf by W[c, 0]'s sign): the fused kernel shifts each column
/// by its first value, and an infinite shift gave NaN where PyTorch's mean (the sum over the rows) is
/// that infinity. Now the batch mean and the running mean are ±inf by W's sign, as the layers apart
/// give them (tests/batchnorm.rs `infinite_values_give_pytorchs_statistics`); the variance is NaN.
#[test]
fn infinite_first_row_gives_pytorchs_mean_fused_and_apart() {
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    let (n, i, o) = (12, 8, 36);
    let mut r = rng(seed);
    let w = normal(&mut r, o * i, 0.0, 0.5);
    let (params, new_linear) = linear_in_arena(&gpu, i, o, &w, &normal(&mut r, o, 0.0, 1.0));
    let mut x = normal(&mut r, n * i, 0.0, 1.0);
    x[0] = f32::INFINITY;
    let x = gpu.upload("x", &x).unwrap();
    let mut states = Vec::new();
    for fused in [true, false] {
        let mut linear = new_linear();
        let mut bn = BatchNorm::new(&gpu, o, BatchNormConfig::default()).unwrap();
        let nan = || gpu.upload("t", &vec![f32::NAN; n * o]).unwrap();
        let (z, y) = (nan(), nan());
        let mut enc = gpu.encoder("test");
        if fused {
            let ran = linear
                .record_forward_with_bn(
                    &mut enc,
                    &params,
                    &mut bn,
                    (&x).into(),
                    (&z).into(),
                    (&y).into(),
                    n,
                    false,
                )
                .unwrap();
            assert!(ran, "the fused forward applies");
        } else {
            linear
                .record_forward(&mut enc, &params, (&x).into(), (&z).into(), n)
                .unwrap();
            bn.record_forward(&mut enc, (&z).into(), (&y).into(), &[n, o], Layout::Nc)
                .unwrap();
        }
        gpu.submit_and_wait(enc).unwrap();
        let state = bn.state_dict("").unwrap();
        let get = |key: &str| {
            state
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let (rm, rv) = (get("running_mean"), get("running_var"));
        for c in 0..o {
            let want = if w[c * i] > 0.0 {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            };
            assert_eq!(
                rm[c],
                want,
                "fused {fused}: running_mean[{c}] (W[{c}, 0] = {}, seed {seed})",
                w[c * i]
            );
            assert!(
                rv[c].is_nan(),
                "fused {fused}: running_var[{c}] = {}",
                rv[c]
            );
        }
        states.push(rm);
    }
    assert_eq!(states[0], states[1], "fused against apart (seed {seed})");
}
