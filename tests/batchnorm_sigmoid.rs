//! BatchNorm with the sigmoid fused into its output (`OpOptions::sigmoid`: y = sigmoid(bn(x)), applied as
//! every forward kernel stores y) against the f64 reference, every layout and plan, train and eval, f16
//! on both paths (the packed path with odd planes stores y through the word kernels). The backward is
//! BatchNorm's own (dy is the gradient of bn(x)) and is checked as in tests/batchnorm.rs.
//!
//! Fresh random inputs (seed printed; BN_TEST_SEED replays one); y, dx, statistics and gradients poisoned
//! with NaN before the run. Tolerances: y max |gpu − ref| / (1 + |ref|) <= 1e-4 (f32), <= 2^-10 against the
//! reference rounded to f16; dx, statistics, running statistics and γ/β gradients as tests/batchnorm.rs.

mod bn_case;
mod common;

use batchnorm::ops::batchnorm::{BatchNormConfig, BatchNormOp, F16Path, OpOptions, PlanChoice};
use batchnorm::tensor::Layout;
use bn_case::{check, Case, FLAG_MIXES};
use common::gpu;

const TOL: f64 = 1e-4;
const TOL_F16: f64 = 1.0 / 1024.0;

#[test]
fn sigmoid_every_layout_every_plan() {
    let nchw: &[&[usize]] = &[&[3, 5, 7, 11], &[2, 6, 4, 4], &[1, 3, 17], &[13, 1, 5, 5]];
    let nhwc: &[&[usize]] = &[&[3, 7, 11, 5], &[2, 4, 4, 8], &[2, 3, 300]];
    let nc: &[&[usize]] = &[&[7, 9], &[60, 100], &[3, 257], &[2, 5]];
    for s in nchw {
        let case = Case::new(s, Layout::Nchw).plan(PlanChoice::Resident);
        check(case.sigmoid(), TOL);
    }
    for plan in [
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Split { parts: Some(1) },
        PlanChoice::Split { parts: Some(3) },
    ] {
        for s in nchw {
            check(Case::new(s, Layout::Nchw).plan(plan).sigmoid(), TOL);
        }
        for s in nhwc {
            check(Case::new(s, Layout::Nhwc).plan(plan).sigmoid(), TOL);
        }
        for s in nc {
            check(Case::new(s, Layout::Nc).plan(plan).sigmoid(), TOL);
        }
    }
}

/// Eval mode (running statistics), no affine, no tracking; large |bn(x)| (saturated sigmoid on both
/// sides: exp(-|z|) keeps either side from overflowing).
#[test]
fn sigmoid_flags_and_saturation() {
    for layout in [Layout::Nchw, Layout::Nhwc, Layout::Nc] {
        let shape: &[usize] = if layout == Layout::Nc {
            &[9, 13]
        } else {
            &[3, 5, 6, 7]
        };
        for plan in [PlanChoice::Fused, PlanChoice::Split { parts: Some(2) }] {
            for (affine, track, training) in FLAG_MIXES {
                let mut case = Case::new(shape, layout)
                    .plan(plan)
                    .sigmoid()
                    .flags(affine, track, training);
                // Eval with running statistics far from the batch's: bn(x) reaches ±100 and beyond.
                if !training {
                    case.mean = 40.0;
                    case.std = 60.0;
                }
                check(case, TOL);
            }
        }
    }
}

#[test]
fn sigmoid_f16() {
    let mut paths = vec![F16Path::Packed];
    if gpu().caps().shader_f16 {
        paths.push(F16Path::Native);
    }
    for path in paths {
        for plan in [PlanChoice::Fused, PlanChoice::Split { parts: Some(3) }] {
            for (s, layout) in [
                // Odd planes: the packed path writes y through the word kernels.
                (&[3, 5, 7, 11][..], Layout::Nchw),
                (&[2, 6, 4, 4][..], Layout::Nchw),
                (&[3, 7, 11, 5][..], Layout::Nhwc),
                (&[7, 9][..], Layout::Nc),
            ] {
                check(Case::new(s, layout).plan(plan).f16(path).sigmoid(), TOL_F16);
            }
        }
    }
}

#[test]
fn sigmoid_with_relu_is_an_error() {
    let gpu = gpu();
    let options = OpOptions {
        fuse_relu: true,
        sigmoid: true,
        ..OpOptions::default()
    };
    let err = BatchNormOp::with_options(
        &gpu,
        &[4, 3],
        Layout::Nc,
        BatchNormConfig::default(),
        PlanChoice::Auto,
        options,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not both"), "{err}");
    let op = BatchNormOp::with_options(
        &gpu,
        &[4, 3],
        Layout::Nc,
        BatchNormConfig::default(),
        PlanChoice::Auto,
        OpOptions {
            sigmoid: true,
            ..OpOptions::default()
        },
    )
    .unwrap();
    assert!(op.plan_name().ends_with(", sigmoid)"), "{}", op.plan_name());
}
