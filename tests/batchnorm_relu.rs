//! Fused BatchNorm + ReLU against the f64 reference: y = relu(bn(x)) with the mask kept as bits (one per
//! element in u32 words), and the backward with dy * mask applied inside the BatchNorm reductions and dx.
//!
//! Inputs are fresh random values (seed printed; BN_TEST_SEED replays one); y, dx, the statistics and the
//! gradients are poisoned with NaN and the mask words with all ones before the run.
//!
//! Tolerances:
//! - y: max |gpu - ref| / (1 + |ref|) <= 1e-4 (f32 storage), <= 2^-10 against the reference rounded to f16
//!   (f16 storage).
//! - mask: every bit equals ref z > 0 where |z| > 1e-5 (below that f32 and f64 may disagree on the sign;
//!   the reference backward then takes the GPU's bit); bits past the last element are 0.
//! - dx: the measure of tests/batchnorm.rs over dy * mask, <= 1e-4 (f32), <= 2^-10 (f16).
//! - save_mean, save_invstd, running statistics, dweight, dbias: <= 1e-4 as tests/batchnorm.rs.

mod bn_case;
mod common;

use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, F16Path, ForwardBuffers, OpOptions,
    PlanChoice,
};
use batchnorm::tensor::Layout;
use bn_case::{check, Case, FLAG_MIXES};
use common::gpu;

const TOL: f64 = 1e-4;
const TOL_F16: f64 = 1.0 / 1024.0;

/// Every layout and plan, awkward shapes (mask words spanning channels and planes, a last partial word).
#[test]
fn relu_every_layout_every_plan() {
    let nchw: &[&[usize]] = &[
        &[3, 5, 7, 11],
        &[2, 6, 4, 4],
        &[1, 3, 17],
        &[13, 1, 5, 5],
        &[7, 9],
        &[4, 8, 8, 8],
    ];
    // Planes of 3 vec4 units ([3, 5, 3, 4]) and rows of 3 units ([3, 12, 5, 7]): the word kernels' 8-unit
    // blocks straddle planes and rows mid-block.
    let nchw_units: &[&[usize]] = &[&[3, 5, 3, 4]];
    let nhwc: &[&[usize]] = &[
        &[3, 7, 11, 5],
        &[2, 4, 4, 8],
        &[1, 17, 3],
        &[2, 3, 300],
        &[3, 12, 5, 7],
    ];
    let nc: &[&[usize]] = &[&[7, 9], &[60, 100], &[3, 257]];
    for s in nchw {
        check(
            Case::new(s, Layout::Nchw).plan(PlanChoice::Resident).relu(),
            TOL,
        );
    }
    for plan in [
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Split { parts: Some(1) },
        PlanChoice::Split { parts: Some(3) },
    ] {
        for s in nchw.iter().chain(nchw_units) {
            check(Case::new(s, Layout::Nchw).plan(plan).relu(), TOL);
        }
        for s in nhwc {
            check(Case::new(s, Layout::Nhwc).plan(plan).relu(), TOL);
        }
        for s in nc {
            check(Case::new(s, Layout::Nc).plan(plan).relu(), TOL);
        }
    }
}

/// Eval mode (the mask from the running statistics), no affine, no tracking.
#[test]
fn relu_flags() {
    for layout in [Layout::Nchw, Layout::Nhwc, Layout::Nc] {
        let shape: &[usize] = if layout == Layout::Nc {
            &[9, 13]
        } else {
            &[3, 5, 6, 7]
        };
        for plan in [PlanChoice::Fused, PlanChoice::Split { parts: Some(2) }] {
            for (affine, track, training) in FLAG_MIXES {
                let case = Case::new(shape, layout)
                    .plan(plan)
                    .relu()
                    .flags(affine, track, training);
                check(case, TOL);
            }
        }
    }
}

/// ReLU with f16 storage on both paths.
#[test]
fn relu_f16() {
    let mut paths = vec![F16Path::Packed];
    if gpu().caps().shader_f16 {
        paths.push(F16Path::Native);
    }
    for path in paths {
        for plan in [PlanChoice::Fused, PlanChoice::Split { parts: Some(3) }] {
            // Units of 1 (odd axes), 2 (even, not a multiple of 4) and 4 values.
            for (s, layout) in [
                (&[3, 5, 7, 11][..], Layout::Nchw),
                (&[2, 6, 4, 4][..], Layout::Nchw),
                (&[3, 5, 2, 3][..], Layout::Nchw),
                (&[3, 7, 11, 5][..], Layout::Nhwc),
                (&[2, 6, 3, 3][..], Layout::Nhwc),
                (&[3, 12, 5, 7][..], Layout::Nhwc),
                (&[7, 9][..], Layout::Nc),
                (&[5, 10][..], Layout::Nc),
                // Wide rows (the wide kernels on CPU devices): vec4 units, pairs.
                (&[5, 260][..], Layout::Nc),
                (&[2, 3, 262][..], Layout::Nhwc),
            ] {
                check(Case::new(s, layout).plan(plan).f16(path).relu(), TOL_F16);
            }
        }
    }
}

/// A larger case: 64k values per channel, a mask of 6k words.
#[test]
fn relu_large() {
    check(Case::new(&[16, 3, 64, 64], Layout::Nchw).relu(), TOL);
    check(
        Case::new(&[16, 64, 64, 3], Layout::Nhwc)
            .relu()
            .plan(PlanChoice::Split { parts: None }),
        TOL,
    );
}

/// The mask is required exactly when the op fuses ReLU, must be large enough and apart from y / dx.
/// The fused ReLU in chunks, on a device whose bindings hold 8 KiB: each chunk's mask bits sit at its own
/// element offset (`win_elem`, which the backward kernels read once per invocation), so a wrong offset
/// shows only here. f32 and packed f16, NCHW (whole samples per chunk; odd planes: the word kernels),
/// NHWC and (N,C) (rows).
#[test]
fn relu_in_chunks() {
    let cases: &[(&[usize], Layout)] = &[
        (&[7, 5, 16, 16], Layout::Nchw),
        (&[25, 5, 7, 7], Layout::Nchw),
        (&[9, 4, 4, 40], Layout::Nhwc),
        (&[301, 16], Layout::Nc),
    ];
    for &(shape, layout) in cases {
        for plan in [PlanChoice::Auto, PlanChoice::Split { parts: Some(2) }] {
            for f16 in [false, true] {
                let mut case = Case::new(shape, layout)
                    .plan(plan)
                    .relu()
                    .binding_limit(8 << 10);
                let tol = if f16 {
                    case = case.f16(F16Path::Packed);
                    TOL_F16
                } else {
                    TOL
                };
                let o = check(case, tol);
                assert!(
                    o.plan.contains("chunks"),
                    "{shape:?} {layout:?}: plan {}",
                    o.plan
                );
            }
        }
    }
}

#[test]
fn relu_bad_calls_are_errors() {
    let gpu = gpu();
    let shape = [2, 3, 5];
    let cfg = BatchNormConfig {
        affine: false,
        track_running_stats: false,
        ..Default::default()
    };
    let relu = OpOptions {
        fuse_relu: true,
        ..Default::default()
    };
    let op_relu =
        BatchNormOp::with_options(&gpu, &shape, Layout::Nchw, cfg, PlanChoice::Auto, relu).unwrap();
    let op_plain = BatchNormOp::new(&gpu, &shape, Layout::Nchw, cfg, PlanChoice::Auto).unwrap();
    assert_eq!(op_relu.mask_bytes(), 4);
    let t = |label| gpu.upload(label, &[0f32; 32]).unwrap();
    let (x, y, dy, dx, saved) = (t("x"), t("y"), t("dy"), t("dx"), t("saved"));
    let mask = gpu.upload("mask", &[0u32; 8]).unwrap();
    let fwd = ForwardBuffers {
        x: (&x).into(),
        y: (&y).into(),
        weight: None,
        bias: None,
        running_mean: None,
        running_var: None,
        saved: (&saved).into(),
    };
    let bwd = BackwardBuffers {
        x: (&x).into(),
        dy: (&dy).into(),
        dx: (&dx).into(),
        weight: None,
        saved: (&saved).into(),
        dweight: None,
        dbias: None,
    };
    let mut enc = gpu.encoder("t");
    let e = op_relu
        .record_forward_train(&mut enc, &fwd, None)
        .unwrap_err();
    assert!(e.to_string().contains("mask"), "{e}");
    let e = op_relu.record_backward(&mut enc, &bwd, true).unwrap_err();
    assert!(e.to_string().contains("mask"), "{e}");
    let e = op_plain
        .record_forward_train_relu(&mut enc, &fwd, (&mask).into(), None)
        .unwrap_err();
    assert!(e.to_string().contains("fuse_relu"), "{e}");
    // The mask inside y.
    let e = op_relu
        .record_forward_train_relu(&mut enc, &fwd, BufferRef::from(&y), None)
        .unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    // A mask buffer too small for 30 elements' bits... is impossible here (one word); a misaligned one:
    let e = op_relu
        .record_forward_train_relu(
            &mut enc,
            &fwd,
            BufferRef {
                buffer: &mask,
                offset: 4,
            },
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("offset"), "{e}");
    op_relu
        .record_forward_train_relu(&mut enc, &fwd, (&mask).into(), None)
        .unwrap();
    op_relu
        .record_backward_relu(&mut enc, &bwd, (&mask).into(), true)
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
}

/// A channel holding a NaN normalizes to NaN (its statistics are NaN), and the fused ReLU keeps it NaN, as
/// torch.relu(bn(x)) gives, in every layout's word kernels; the other channels are untouched by it. With
/// ReLU as max(z, 0) the NaN channel came out 0, hiding the divergence from the loss check.
#[test]
fn relu_keeps_a_nan_channel_nan() {
    use batchnorm::nn::BatchNorm;
    use batchnorm::tensor::Tensor;
    let gpu = gpu();
    for (shape, layout) in [
        (vec![6usize, 3], Layout::Nc),
        (vec![4, 3, 5, 4], Layout::Nchw),
        (vec![4, 5, 4, 3], Layout::Nhwc),
    ] {
        let d = layout.dims(&shape).unwrap();
        let x: Vec<f32> = (0..d.numel())
            .map(|i| ((i * 37) % 11) as f32 - 5.0)
            .collect();
        let mut poisoned = x.clone();
        let nan_at = (0..d.numel())
            .find(|&i| bn_case::channel_of(&shape, layout, i) == 1)
            .unwrap();
        poisoned[nan_at] = f32::NAN;
        let mut bn = BatchNorm::new(&gpu, d.c, BatchNormConfig::default()).unwrap();
        bn.set_fuse_relu(true).unwrap();
        let y = bn
            .forward(&Tensor::from_f32(&gpu, &shape, &poisoned).unwrap(), layout)
            .unwrap()
            .to_f32()
            .unwrap();
        let mut clean = BatchNorm::new(&gpu, d.c, BatchNormConfig::default()).unwrap();
        clean.set_fuse_relu(true).unwrap();
        let want = clean
            .forward(&Tensor::from_f32(&gpu, &shape, &x).unwrap(), layout)
            .unwrap()
            .to_f32()
            .unwrap();
        for i in 0..d.numel() {
            if bn_case::channel_of(&shape, layout, i) == 1 {
                assert!(
                    y[i].is_nan(),
                    "{layout:?} y[{i}] = {} in the NaN channel",
                    y[i]
                );
            } else {
                assert_eq!(y[i], want[i], "{layout:?} y[{i}]");
            }
        }
    }
}
