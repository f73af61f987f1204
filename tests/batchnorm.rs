//! BatchNorm kernels against the f64 reference: every layout, every plan, awkward shapes, every flag.
//!
//! Inputs are fresh random values each run (seed printed on failure; BN_TEST_SEED replays one); every
//! output buffer is poisoned with NaN before the run, so an element a kernel fails to write fails the test.
//!
//! Tolerances (f32 storage and accumulation against f64):
//! - y: max |gpu - ref| / (1 + |ref|) <= 1e-4
//! - dx: max |gpu - ref| / (1 + |ref| + |weight| * invstd * (|dy| + mean|dy| + |xhat| * mean|dy * xhat|))
//!   <= 1e-4 (dx cancels to ~0 for small M; its f32 error scales with the terms, not the result)
//! - save_mean, save_invstd, running_mean, running_var: same measure <= 1e-4
//! - dweight, dbias (sums over M values): max |gpu - ref| / max(1, max |ref|) <= 1e-4

mod bn_case;
mod common;

use batchnorm::error::Error;
use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, ForwardBuffers, Merge, PlanChoice,
};
use batchnorm::reference::batchnorm as reference;
use batchnorm::tensor::Layout;
use bn_case::{channel_of, run_case, Case};
use common::*;

const TOL: f64 = 1e-4;

/// A case on a fresh seed (the case runner and its error measures are tests/bn_case's, shared with the
/// variant tests), asserted within [`TOL`].
fn check(case: Case) {
    bn_case::check(case, TOL);
}

/// Asserts an outcome of `run_case` within [`TOL`].
fn check_outcome(case: &Case, seed: u64, o: &bn_case::Outcome) {
    bn_case::assert_within(case, o, seed, TOL);
}

/// Four mixes of affine, tracking and training (eps 1e-3, cumulative momentum) for one shape and plan.
fn check_flag_mixes(shape: &[usize], layout: Layout, plan: PlanChoice) {
    for (affine, track, training) in [
        (false, true, true),
        (true, false, true),
        (true, true, false),
        (false, false, false),
    ] {
        let mut case = Case::new(shape, layout).plan(plan);
        case.config = BatchNormConfig {
            eps: 1e-3,
            momentum: None,
            affine,
            track_running_stats: track,
        };
        case.training = training;
        check(case);
    }
}

/// The split plan's two per-channel merges (one invocation walking every part, or a workgroup and a
/// tree) against the reference, whichever the device would pick: many parts (the links a workgroup's
/// invocations share unevenly, fewer than 64 and more), channel-range chunks (the first parts of most
/// channels hold nothing, so the shift comes from a later part), the rows view's column groups, and the
/// flag mixes.
#[test]
fn both_merges_against_the_reference() {
    let many = |p| PlanChoice::Split { parts: Some(p) };
    let cases = [
        (&[3, 5, 7, 11][..], Layout::Nchw, many(200)),
        (&[3, 5, 7, 11], Layout::Nchw, many(3)),
        (&[2, 6, 4, 4], Layout::Nchw, many(31)),
        (&[3, 7, 11, 5], Layout::Nhwc, many(231)),
        (&[13, 5, 5, 1], Layout::Nhwc, many(65)),
        (&[2, 3, 300], Layout::Nhwc, many(6)),
        (&[60, 100], Layout::Nc, many(60)),
        (&[257, 3], Layout::Nc, many(129)),
        (&[3, 257], Layout::Nc, many(3)),
    ];
    for (shape, layout, plan) in cases {
        for merge in [Merge::Invocation, Merge::Workgroup] {
            check(Case::new(shape, layout).plan(plan).merge(merge));
        }
    }
    for merge in [Merge::Invocation, Merge::Workgroup] {
        // NCHW samples larger than a 2 KiB binding: channel ranges of one sample per chunk.
        check(
            Case::new(&[3, 8, 9, 9], Layout::Nchw)
                .binding_limit(2 << 10)
                .merge(merge),
        );
        check(
            Case::new(&[40, 4, 4, 24], Layout::Nhwc)
                .binding_limit(8 << 10)
                .merge(merge),
        );
        // The rows view on CPU devices (column groups of 49), the plane kernels elsewhere.
        check(Case::new(&[384, 64, 7, 7], Layout::Nchw).merge(merge));
        // A caller's device with WebGPU's default limits: the plan's parameters come as a uniform.
        check(
            Case::new(&[3, 7, 11, 5], Layout::Nhwc)
                .plan(many(40))
                .merge(merge)
                .webgpu_defaults(),
        );
        for (affine, track, training) in bn_case::FLAG_MIXES {
            check(
                Case::new(&[5, 6, 9, 7], Layout::Nhwc)
                    .plan(many(40))
                    .flags(affine, track, training)
                    .merge(merge),
            );
        }
    }
}

/// The GPU plans (coalesced access: adjacent invocations on adjacent addresses, 1 024 workgroups as
/// the target, the workgroup merge, the GPU's rule for the fused plan) on this device, whatever it is:
/// CI has only lavapipe, whose own plans are the CPU ones. Every plan on awkward shapes in every layout,
/// a channel-last shape whose planner takes the workgroup merge by itself, channel-range chunks, f16, the
/// fused ReLU and the flag mixes. They passed on an NVIDIA H200 too (2026-12-04).
#[test]
fn gpu_plans_against_the_reference() {
    use batchnorm::ops::batchnorm::F16Path;
    let shapes: &[(&[usize], Layout)] = &[
        (&[3, 5, 7, 11], Layout::Nchw),
        (&[2, 6, 4, 4], Layout::Nchw),
        (&[13, 1, 5, 5], Layout::Nchw),
        (&[3, 7, 11, 5], Layout::Nhwc),
        (&[4, 8, 8, 68], Layout::Nhwc),
        (&[2, 3, 300], Layout::Nhwc),
        (&[60, 100], Layout::Nc),
        (&[3, 257], Layout::Nc),
    ];
    for &(shape, layout) in shapes {
        let mut plans = PLANS.to_vec();
        if layout == Layout::Nchw {
            plans.push(PlanChoice::Resident);
        }
        for plan in plans {
            check(Case::new(shape, layout).plan(plan).gpu_plans());
        }
        // f16 storage: y and dx are rounded to f16, so they are held to f16's 2^-10 as in
        // tests/batchnorm_f16.rs.
        bn_case::check(
            Case::new(shape, layout).f16(F16Path::Auto).gpu_plans(),
            1.0 / 1024.0,
        );
        check(Case::new(shape, layout).relu().gpu_plans());
    }
    // 1 568 rows of 16 units: the GPU planner takes 98 parts and merges them in a workgroup.
    let case = Case::new(&[8, 14, 14, 64], Layout::Nhwc).gpu_plans();
    let plan = bn_case::plan_of(&case);
    assert!(plan.contains("wg merge"), "{plan}");
    check(case);
    for (affine, track, training) in bn_case::FLAG_MIXES {
        check(
            Case::new(&[8, 14, 14, 64], Layout::Nhwc)
                .flags(affine, track, training)
                .gpu_plans(),
        );
    }
    // NCHW samples larger than a 2 KiB binding, and channel-last rows in 8 KiB chunks.
    check(
        Case::new(&[3, 8, 9, 9], Layout::Nchw)
            .binding_limit(2 << 10)
            .gpu_plans(),
    );
    check(
        Case::new(&[40, 4, 4, 24], Layout::Nhwc)
            .binding_limit(8 << 10)
            .gpu_plans(),
    );
}

const PLANS: [PlanChoice; 4] = [
    PlanChoice::Auto,
    PlanChoice::Fused,
    PlanChoice::Split { parts: Some(1) },
    PlanChoice::Split { parts: Some(3) },
];

/// Odd and prime shapes in every layout and rank, through every plan.
#[test]
fn awkward_shapes_every_layout_every_plan() {
    let nchw: &[&[usize]] = &[
        &[3, 5, 7, 11],   // primes: scalar path
        &[2, 6, 4, 4],    // vec4 path
        &[1, 3, 17],      // N = 1 with spatial > 1 (N,C,L)
        &[13, 1, 5, 5],   // C = 1
        &[2, 3, 2, 3, 4], // (N,C,D,H,W)
        &[7, 9],          // (N,C) read as NCHW
        &[5, 4, 1],       // spatial 1
        &[4, 8, 8, 8],
    ];
    let nhwc: &[&[usize]] = &[
        &[3, 7, 11, 5],
        &[2, 4, 4, 8],
        &[1, 17, 3],
        &[13, 5, 5, 1],
        &[2, 2, 3, 4, 3],
        &[4, 8, 8, 68], // more columns than one tile of 64 units? (68/4 = 17 units, one tile)
        &[2, 3, 300],   // 75 units: two column tiles
    ];
    let nc: &[&[usize]] = &[&[7, 9], &[60, 100], &[2, 1], &[3, 257]];
    for s in nchw {
        check(Case::new(s, Layout::Nchw).plan(PlanChoice::Resident));
    }
    for plan in PLANS {
        for s in nchw {
            check(Case::new(s, Layout::Nchw).plan(plan));
        }
        for s in nhwc {
            check(Case::new(s, Layout::Nhwc).plan(plan));
        }
        for s in nc {
            check(Case::new(s, Layout::Nc).plan(plan));
        }
    }
}

/// A caller's device opened with `DeviceDescriptor::default()`: 8 storage buffers per stage (the fused
/// kernels bind 9 with the plan's parameters as storage, so the parameters come as a uniform there), no
/// subgroups, no SHADER_F16. Every kernel family on it: plane, resident, fused and split, the rows view
/// (NCHW 64x16x7x7), the wide channel-last kernels (NHWC 64 channels), packed f16 with its word kernels,
/// the fused sigmoid, and every flag mix. Before the uniform: "Too many bindings of type
/// StorageBuffers ... limit is 8, count was 9" at the first dispatch.
#[test]
fn every_plan_on_a_webgpu_default_device() {
    use batchnorm::ops::batchnorm::F16Path;
    let shapes: &[(&[usize], Layout)] = &[
        (&[3, 5, 7, 11], Layout::Nchw),
        (&[4, 8, 8, 8], Layout::Nchw),
        (&[64, 16, 7, 7], Layout::Nchw),
        (&[3, 7, 11, 5], Layout::Nhwc),
        (&[6, 5, 5, 64], Layout::Nhwc),
        (&[60, 100], Layout::Nc),
        (&[7, 9], Layout::Nc),
    ];
    for &(shape, layout) in shapes {
        let mut plans = PLANS.to_vec();
        if layout == Layout::Nchw {
            plans.push(PlanChoice::Resident);
        }
        for plan in plans {
            check(Case::new(shape, layout).plan(plan).webgpu_defaults());
        }
        for (affine, track, training) in bn_case::FLAG_MIXES {
            check(
                Case::new(shape, layout)
                    .flags(affine, track, training)
                    .webgpu_defaults(),
            );
        }
        bn_case::check(
            Case::new(shape, layout)
                .f16(F16Path::Auto)
                .webgpu_defaults(),
            1.0 / 1024.0,
        );
        check(Case::new(shape, layout).sigmoid().webgpu_defaults());
    }
    // The fused ReLU needs 10 storage buffers (9 with the uniform): refused with a typed error.
    let gpu = webgpu_defaults_gpu();
    let e = batchnorm::ops::batchnorm::BatchNormOp::with_options(
        &gpu,
        &[4, 8],
        Layout::Nc,
        BatchNormConfig::default(),
        PlanChoice::Auto,
        batchnorm::ops::batchnorm::OpOptions {
            fuse_relu: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            batchnorm::Error::LimitExceeded {
                needed: 10,
                limit: 8,
                ..
            }
        ),
        "{e}"
    );
}

/// Every flag: affine off, tracking off (batch statistics in eval too), eval mode, momentum values.
#[test]
fn every_flag_every_layout() {
    for layout in [Layout::Nchw, Layout::Nhwc, Layout::Nc] {
        let shape: &[usize] = if layout == Layout::Nc {
            &[9, 13]
        } else {
            &[3, 5, 6, 7]
        };
        let resident = if layout == Layout::Nchw {
            Some(PlanChoice::Resident)
        } else {
            None
        };
        let plans = [
            Some(PlanChoice::Fused),
            Some(PlanChoice::Split { parts: Some(2) }),
            resident,
        ];
        for plan in plans.into_iter().flatten() {
            for affine in [true, false] {
                for track in [true, false] {
                    for training in [true, false] {
                        for momentum in [Some(0.1), Some(1.0), None] {
                            let mut case = Case::new(shape, layout).plan(plan);
                            case.config = BatchNormConfig {
                                eps: 1e-3,
                                momentum,
                                affine,
                                track_running_stats: track,
                            };
                            case.training = training;
                            check(case);
                        }
                    }
                }
            }
        }
    }
}

/// PyTorch's edge settings, which it takes and so do we: momentum 1.5 and -0.25 (running = (1 - m)
/// running + m batch, extrapolating) in training, and eps = 0 in eval (y = (x - mean) / sqrt(var) with the
/// running statistics); every layout and plan, against the reference at the same settings. eps = 0 with
/// batch statistics is PyTorch's "eps must be positive during training": a typed error here.
#[test]
fn eps_zero_and_momentum_outside_the_unit_interval() {
    for (shape, layout) in [
        (&[3, 5, 6, 7][..], Layout::Nchw),
        (&[3, 5, 6, 7][..], Layout::Nhwc),
        (&[9, 13][..], Layout::Nc),
    ] {
        let resident = (layout == Layout::Nchw).then_some(PlanChoice::Resident);
        let plans = [
            Some(PlanChoice::Fused),
            Some(PlanChoice::Split { parts: Some(2) }),
            resident,
        ];
        for plan in plans.into_iter().flatten() {
            for (eps, momentum, training) in [
                (1e-5, Some(1.5), true),
                (1e-3, Some(-0.25), true),
                (0.0, Some(0.1), false),
            ] {
                let mut case = Case::new(shape, layout).plan(plan);
                case.config = BatchNormConfig {
                    eps,
                    momentum,
                    ..Default::default()
                };
                case.training = training;
                if eps > 0.0 {
                    check(case);
                    continue;
                }
                // eps = 0 in eval: running variances of 1e-6 to 2e-6 and x of spread 1e-3, so that an
                // eps of 1e-5 slipped in would move y by ~3x.
                case.std = 1e-3;
                let seed = seed();
                let mut inp = bn_case::inputs(&case, seed);
                inp.rvar0.iter_mut().for_each(|v| *v *= 1e-6);
                inp.rmean0
                    .iter_mut()
                    .for_each(|v| *v = case.mean + *v * 1e-3);
                let o = bn_case::run_inputs(&case, &inp);
                check_outcome(&case, seed, &o);
            }
            // Batch statistics with eps = 0: refused before anything is recorded.
            let gpu = gpu();
            let config = BatchNormConfig {
                eps: 0.0,
                ..Default::default()
            };
            let op = BatchNormOp::new(&gpu, shape, layout, config, plan).unwrap();
            let dims = layout.dims(shape).unwrap();
            let buf = |n: usize| gpu.upload("t", &vec![1.0f32; n]).unwrap();
            let (bx, by, bs) = (buf(dims.numel()), buf(dims.numel()), buf(2 * dims.c));
            let fwd = ForwardBuffers {
                x: (&bx).into(),
                y: (&by).into(),
                weight: None,
                bias: None,
                running_mean: None,
                running_var: None,
                saved: (&bs).into(),
            };
            let e = op
                .record_forward_train(&mut gpu.encoder("t"), &fwd, None)
                .unwrap_err();
            assert!(
                matches!(e, Error::BadConfig(_)) && e.to_string().contains("eps must be > 0"),
                "{e}"
            );
        }
    }
}

/// Channel-last rows wide enough for the wide kernels on a CPU device (each invocation owns 8 units of
/// every row): a tail invocation with fewer live units, several column tiles, scalar units (odd C), every
/// plan and flag. On a GPU the same shapes run the one-unit kernels, and the test checks that instead.
#[test]
fn wide_channel_last_rows() {
    let gpu = gpu();
    let shapes: &[(&[usize], Layout)] = &[
        (&[3, 5, 7, 268], Layout::Nhwc), // 67 units: 8 invocations of 8, the last with 3
        (&[2, 3, 1030], Layout::Nhwc),   // C = 1030: scalar units, 3 invocations' worth of tail
        (&[5, 4100], Layout::Nc),        // 1025 units: 3 column tiles of 512, the last with 1
        (&[4, 9, 3, 64 * 8 * 4 + 4], Layout::Nhwc), // one unit past a whole tile
    ];
    for &(shape, layout) in shapes {
        for plan in PLANS {
            let o = run_case(&Case::new(shape, layout).plan(plan), seed());
            assert_eq!(
                o.plan.contains("units/inv"),
                gpu.caps().cpu_device,
                "{shape:?} {plan:?}: plan {}",
                o.plan
            );
            check(Case::new(shape, layout).plan(plan));
        }
        for plan in [PlanChoice::Fused, PlanChoice::Split { parts: Some(2) }] {
            check_flag_mixes(shape, layout, plan);
        }
    }
}

/// NCHW whose planes 4 does not divide, viewed on a CPU device as rows of C·HW values by the wide kernels
/// (a channel is HW consecutive columns, merged per channel): odd planes, a tail invocation, (N, C, L),
/// every split plan and flag. Forced fused plans keep the plane kernels. On a GPU nothing changes.
#[test]
fn nchw_as_rows() {
    let gpu = gpu();
    let shapes: &[&[usize]] = &[
        &[412, 52, 7, 7],  // 637 units: 80 invocations, the last with 5
        &[260, 4, 1023],   // (N, C, L), L odd
        &[96, 20, 31, 33], // 5115 units, 10 column tiles
    ];
    for &shape in shapes {
        for plan in [
            PlanChoice::Auto,
            PlanChoice::Split { parts: None },
            PlanChoice::Split { parts: Some(1) },
            PlanChoice::Split { parts: Some(3) },
        ] {
            let o = run_case(&Case::new(shape, Layout::Nchw).plan(plan), seed());
            assert_eq!(
                o.plan.contains("NCHW as rows"),
                gpu.caps().cpu_device,
                "{shape:?} {plan:?}: plan {}",
                o.plan
            );
            check(Case::new(shape, Layout::Nchw).plan(plan));
        }
        let o = run_case(
            &Case::new(shape, Layout::Nchw).plan(PlanChoice::Fused),
            seed(),
        );
        assert!(!o.plan.contains("rows"), "{shape:?}: plan {}", o.plan);
        check_flag_mixes(shape, Layout::Nchw, PlanChoice::Split { parts: Some(2) });
    }
}

/// Few samples with large odd planes: the rows view's per-column partials would outweigh an eighth of the
/// tensor, so the planner keeps the plane kernels (and the result is right either way).
#[test]
fn nchw_rows_view_declined_for_few_samples() {
    let case = Case::new(&[8, 4, 181, 181], Layout::Nchw);
    let seed = seed();
    let o = run_case(&case, seed);
    assert!(!o.plan.contains("rows"), "plan {}", o.plan);
    check_outcome(&case, seed, &o);
}

/// C = 70 001 features in (N, C): more channels than one dispatch dimension holds.
#[test]
fn huge_channel_count() {
    check(Case::new(&[3, 70_001], Layout::Nc));
    check(Case::new(&[2, 70_001], Layout::Nc).plan(PlanChoice::Split { parts: Some(2) }));
    check(Case::new(&[2, 70_001, 2], Layout::Nchw));
}

/// A channel slice of over a million values (M = 4 * 512 * 520 = 1 064 960).
#[test]
fn channel_slice_over_a_million() {
    check(Case::new(&[4, 2, 512, 520], Layout::Nchw));
    check(Case::new(&[4, 2, 512, 520], Layout::Nchw).plan(PlanChoice::Fused));
    // The largest per-invocation share a forced resident plan takes: 1024 vec4 per invocation.
    check(Case::new(&[2, 3, 256, 512], Layout::Nchw).plan(PlanChoice::Resident));
    check(Case::new(&[4, 512, 520, 2], Layout::Nhwc));
}

/// Channels of over a million values in short runs: lavapipe ends a shader invocation's loops after
/// 65 535 iterations in all, so the automatic plan must give each invocation a walk under WALK_MAX units
/// (NCHW with 1x1 planes, 1.1M values a channel, took the fused plan, whose 17 188 units an invocation
/// walked twice, and left y and dx unwritten: error inf). A forced plan that would pass the limit is
/// refused with LimitExceeded on a CPU device; on a GPU it runs.
#[test]
fn walks_past_lavapipes_loop_limit() {
    let gpu = gpu();
    for case in [
        Case::new(&[1_100_000, 16, 1, 1], Layout::Nchw),
        Case::new(&[1_100_003, 5], Layout::Nc),
        Case::new(&[41, 181, 157, 5], Layout::Nhwc),
    ] {
        check(case);
    }
    let refused = [
        (
            vec![1_100_000usize, 16, 1, 1],
            Layout::Nchw,
            PlanChoice::Fused,
        ),
        (
            vec![20_000, 4],
            Layout::Nc,
            PlanChoice::Split {
                parts: Some(20_000),
            },
        ),
    ];
    for (shape, layout, plan) in refused {
        let got = BatchNormOp::new(&gpu, &shape, layout, BatchNormConfig::default(), plan);
        match (gpu.caps().cpu_device, got) {
            (true, Err(Error::LimitExceeded { what, .. })) => {
                assert!(what.contains("65 535"), "{shape:?} {plan:?}: {what}")
            }
            (true, other) => panic!("{shape:?} {plan:?}: expected LimitExceeded, got {other:?}"),
            (false, got) => assert!(got.is_ok(), "{shape:?} {plan:?}: {got:?}"),
        }
    }
}

/// A tensor larger than the device's storage-binding limit (128 MiB on lavapipe) runs in chunks.
#[test]
fn tensor_over_the_binding_limit() {
    let gpu = gpu();
    let limit = gpu.limits().max_storage_buffer_binding_size as usize;
    let max_buffer = gpu.limits().max_buffer_size as usize;
    // Enough samples of 3 x 65 536 values to pass the binding limit by ~10%.
    let per_sample = 3 * 65_536 * 4;
    let n = limit / per_sample + limit / per_sample / 10 + 1;
    if n * per_sample > max_buffer {
        eprintln!("skipped: the device's max buffer size {max_buffer} is its binding limit");
        return;
    }
    let case = Case::new(&[n, 3, 256, 256], Layout::Nchw);
    let o = run_case(&case, seed());
    assert!(
        o.plan.contains("chunks"),
        "expected a chunked plan, got {}",
        o.plan
    );
    check(case);
    check(Case::new(&[n, 256, 256, 3], Layout::Nhwc));
    // (N, C) with C = 4100 (1025 vec4 units, a tail invocation): on a CPU device the wide kernels, in
    // row chunks; once, checking plan and errors from the same run.
    let rows = limit / (4100 * 4) * 21 / 20 + 1;
    if rows * 4100 * 4 <= max_buffer {
        let case = Case::new(&[rows, 4100], Layout::Nc);
        let seed = seed();
        let o = run_case(&case, seed);
        assert!(o.plan.contains("chunks"), "expected chunks, got {}", o.plan);
        assert_eq!(
            o.plan.contains("units/inv"),
            gpu.caps().cpu_device,
            "plan {}",
            o.plan
        );
        check_outcome(&case, seed, &o);
    }
    // One sample larger than a binding: chunks are channel ranges of a sample (here 3 + 2 channels of
    // 8.4M values, for each of 2 samples).
    let spatial = limit / 4 / 5 + limit / 4 / 20;
    let case = Case::new(&[2, 5, spatial], Layout::Nchw);
    let o = run_case(&case, seed());
    assert!(
        o.plan.contains("4 chunks"),
        "expected 4 channel-range chunks, got {}",
        o.plan
    );
    check(case);
}

/// Mean 1e4 with std 1: the variance must still be right to 1e-4 relative (no E[x^2] - E[x]^2), the
/// backward's dweight and dx to 1e-4 against the f64 backward at the exact statistics, and y
/// to 1e-4.
#[test]
fn large_mean_small_spread() {
    for (shape, layout) in [
        (&[16, 3, 64, 64][..], Layout::Nchw),
        (&[16, 64, 64, 4][..], Layout::Nhwc),
        (&[4096, 5][..], Layout::Nc),
        // The wide channel-last kernels on a CPU device, and NCHW viewed as rows by them.
        (&[64, 2048][..], Layout::Nc),
        (&[412, 52, 7, 7][..], Layout::Nchw),
    ] {
        let resident = (layout == Layout::Nchw).then_some(PlanChoice::Resident);
        let plans = [
            Some(PlanChoice::Fused),
            Some(PlanChoice::Split { parts: Some(7) }),
            resident,
        ];
        for plan in plans.into_iter().flatten() {
            let seed = seed();
            let gpu = gpu();
            let mut rng = rng(seed);
            let dims = layout.dims(shape).unwrap();
            let x = normal(&mut rng, dims.numel(), 1e4, 1.0);
            let config = BatchNormConfig {
                momentum: Some(1.0),
                ..Default::default()
            };
            let op = BatchNormOp::new(&gpu, shape, layout, config, plan).unwrap();
            let bx = gpu.upload("x", &x).unwrap();
            let by = gpu.upload("y", &vec![f32::NAN; x.len()]).unwrap();
            let bw = gpu.upload("w", &vec![1.0f32; dims.c]).unwrap();
            let bb = gpu.upload("b", &vec![0.0f32; dims.c]).unwrap();
            let brm = gpu.upload("rm", &vec![0.0f32; dims.c]).unwrap();
            let brv = gpu.upload("rv", &vec![0.0f32; dims.c]).unwrap();
            let bs = gpu.upload("s", &vec![f32::NAN; 2 * dims.c]).unwrap();
            let mut enc = gpu.encoder("t");
            let fwd = ForwardBuffers {
                x: (&bx).into(),
                y: (&by).into(),
                weight: Some((&bw).into()),
                bias: Some((&bb).into()),
                running_mean: Some((&brm).into()),
                running_var: Some((&brv).into()),
                saved: (&bs).into(),
            };
            op.record_forward_train(&mut enc, &fwd, Some(1.0)).unwrap();
            // The backward too: its sums run over x - mean with the saved mean, rounded to f32.
            let dy = normal(&mut rng, dims.numel(), 0.0, 1.0);
            let bdy = gpu.upload("dy", &dy).unwrap();
            let bdx = gpu.upload("dx", &vec![f32::NAN; x.len()]).unwrap();
            let bdw = gpu.upload("dw", &vec![f32::NAN; dims.c]).unwrap();
            let bdb = gpu.upload("db", &vec![f32::NAN; dims.c]).unwrap();
            let bwd = BackwardBuffers {
                x: (&bx).into(),
                dy: (&bdy).into(),
                dx: (&bdx).into(),
                weight: Some((&bw).into()),
                saved: (&bs).into(),
                dweight: Some((&bdw).into()),
                dbias: Some((&bdb).into()),
            };
            op.record_backward(&mut enc, &bwd, true).unwrap();
            gpu.submit_and_wait(enc).unwrap();
            let rv: Vec<f32> = gpu.download(&brv, 0, dims.c).unwrap();
            let (mean, var) = reference::channel_stats(&f64s(&x), dims, layout);
            let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let ones = vec![1.0; dims.c];
            let want = reference::backward(
                &f64s(&x),
                &f64s(&dy),
                shape,
                layout,
                Some(&ones),
                &mean,
                &invstd,
                true,
            )
            .unwrap();
            // dweight = sum(dy * xhat) over M values: scaled by its size, as elsewhere in this file.
            // Without the exact mean offset (the saved mean is off by up to 5e-4 here) it was ~5e-4.
            let dw: Vec<f32> = gpu.download(&bdw, 0, dims.c).unwrap();
            let scale = want.dweight.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let dw_err = dw
                .iter()
                .zip(&want.dweight)
                .map(|(g, w)| (*g as f64 - w).abs() / scale)
                .fold(0.0, f64::max);
            let dx: Vec<f32> = gpu.download(&bdx, 0, x.len()).unwrap();
            let dx_err = max_rel_err(&dx, &want.dx);
            println!(
                "large mean {layout:?} {shape:?} {plan:?}: dweight {dw_err:.1e}, dx {dx_err:.1e}"
            );
            assert!(
                dw_err <= 1e-4 && dx_err <= 1e-4,
                "{layout:?} {shape:?} {plan:?} seed={seed}: dweight error {dw_err:.2e}, dx {dx_err:.2e}"
            );
            // y too: the mean reaches the normalization as shift + rest, so its f32 rounding (1e-3 at 1e4)
            // does not show in y.
            let y: Vec<f32> = gpu.download(&by, 0, x.len()).unwrap();
            let want: Vec<f64> = (0..x.len())
                .map(|i| {
                    let c = channel_of(shape, layout, i);
                    (x[i] as f64 - mean[c]) / (var[c] + 1e-5).sqrt()
                })
                .collect();
            let y_err = max_rel_err(&y, &want);
            assert!(
                y_err <= 1e-4,
                "{layout:?} {shape:?} {plan:?} seed={seed}: y error {y_err:.2e}"
            );
            let m = dims.per_channel() as f64;
            for c in 0..dims.c {
                let want = var[c] * m / (m - 1.0);
                let rel = (rv[c] as f64 - want).abs() / want;
                assert!(
                    rel <= 1e-4,
                    "{layout:?} {shape:?} {plan:?} seed={seed}: channel {c} var {} vs {want} (rel {rel:.2e})",
                    rv[c]
                );
            }
        }
    }
}

/// A second run of a plan reuses it: no pipeline is compiled twice.
#[test]
fn pipelines_are_cached() {
    let case = Case::new(&[2, 3, 5, 5], Layout::Nchw).plan(PlanChoice::Split { parts: Some(2) });
    run_case(&case, 1);
    let built = gpu().pipelines_built();
    run_case(&case, 2);
    assert_eq!(gpu().pipelines_built(), built);
}

/// Channels holding infinities get PyTorch's statistics. PyTorch's batch mean is the channel's sum over
/// its count, so with a +inf among finite values the mean and the running mean are +inf, with a -inf
/// -inf, and with both (or a NaN) NaN; the variance is NaN in each, and so are y, dx and dweight, while
/// dbias (the sum of dy) stays finite (torch 2.15 on the CPU, BatchNorm1d and 2d). The Welford and Chan
/// steps gave NaN for all of these (inf - inf inside a step), and a channel whose first value (the
/// kernels' shift) was infinite. Every plan family, packed f16 and a chunked plan; the other channels
/// must come out bit for bit as in a run without the infinities.
#[test]
fn infinite_values_give_pytorchs_statistics() {
    use batchnorm::ops::batchnorm::F16Path;
    use bn_case::{inputs, run_op, Inputs};
    let inf = f32::INFINITY;
    let shapes: &[(&[usize], Layout)] = &[
        (&[3, 5, 7, 11], Layout::Nchw),
        (&[2, 6, 4, 4], Layout::Nchw),
        (&[64, 16, 7, 7], Layout::Nchw),
        (&[3, 7, 11, 5], Layout::Nhwc),
        (&[6, 5, 5, 64], Layout::Nhwc),
        // The wide channel-last kernels (256 channels and more).
        (&[3, 3, 5, 264], Layout::Nhwc),
        (&[9, 1028], Layout::Nc),
        (&[60, 100], Layout::Nc),
        (&[7, 9], Layout::Nc),
    ];
    let seed = seed();
    for &(shape, layout) in shapes {
        let mut cases: Vec<Case> = PLANS
            .iter()
            .map(|&p| Case::new(shape, layout).plan(p))
            .collect();
        if layout == Layout::Nchw {
            cases.push(Case::new(shape, layout).plan(PlanChoice::Resident));
        }
        cases.push(Case::new(shape, layout).f16(F16Path::Auto));
        cases.push(
            Case::new(shape, layout)
                .plan(PlanChoice::Split { parts: Some(5) })
                .merge(Merge::Workgroup),
        );
        // Chunks where the tensor exceeds 16 KiB (and 4 parts of partial statistics fit a binding).
        let c = layout.dims(shape).unwrap().c;
        cases.push(Case::new(shape, layout).binding_limit((16 << 10).max(64 * c as u32)));
        for case in cases {
            let clean = inputs(&case, seed);
            let dims = layout.dims(shape).unwrap();
            let at = |c: usize| -> Vec<usize> {
                (0..dims.numel())
                    .filter(|&i| channel_of(shape, layout, i) == c)
                    .collect()
            };
            let mut x = clean.x.clone();
            // (channel, its values set to infinities, the mean PyTorch gives)
            let specials = [
                (1, vec![(2, inf)], inf),
                // The channel's first value: the kernels' shift.
                (2, vec![(0, inf), (usize::MAX, inf)], inf),
                (3, vec![(1, -inf)], -inf),
                (4, vec![(0, inf), (usize::MAX, -inf)], f32::NAN),
            ];
            for (c, values, _) in &specials {
                let idx = at(*c);
                for &(k, v) in values {
                    x[idx[k.min(idx.len() - 1)]] = v;
                }
            }
            let special = Inputs {
                x,
                dy: clean.dy.clone(),
                weight: clean.weight.clone(),
                bias: clean.bias.clone(),
                rmean0: clean.rmean0.clone(),
                rvar0: clean.rvar0.clone(),
            };
            let got = run_op(&case, &special);
            let base = run_op(&case, &clean);
            let what = format!("{shape:?} {layout:?} {} ({})", got.plan, seed);
            let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            for c in 0..dims.c {
                let special = specials.iter().find(|s| s.0 == c);
                let Some((_, _, mean)) = special else {
                    for i in at(c) {
                        assert!(same(got.y[i], base.y[i]), "{what}: y[{i}] channel {c}");
                        assert!(same(got.dx[i], base.dx[i]), "{what}: dx[{i}] channel {c}");
                    }
                    for (name, g, b) in [
                        ("save_mean", got.saved[c], base.saved[c]),
                        ("save_invstd", got.saved[dims.c + c], base.saved[dims.c + c]),
                        ("running_mean", got.running_mean[c], base.running_mean[c]),
                        ("running_var", got.running_var[c], base.running_var[c]),
                        ("dweight", got.dweight[c], base.dweight[c]),
                        ("dbias", got.dbias[c], base.dbias[c]),
                    ] {
                        assert!(same(g, b), "{what}: {name} of channel {c}: {g} against {b}");
                    }
                    continue;
                };
                for (name, v) in [
                    ("save_mean", got.saved[c]),
                    ("running_mean", got.running_mean[c]),
                ] {
                    assert!(
                        same(v, *mean),
                        "{what}: {name} of channel {c} is {v}, PyTorch's {mean}"
                    );
                }
                for (name, v) in [
                    ("running_var", got.running_var[c]),
                    ("dweight", got.dweight[c]),
                ] {
                    assert!(v.is_nan(), "{what}: {name} of channel {c} is {v}, not NaN");
                }
                for i in at(c) {
                    assert!(got.y[i].is_nan(), "{what}: y[{i}] = {}", got.y[i]);
                    assert!(got.dx[i].is_nan(), "{what}: dx[{i}] = {}", got.dx[i]);
                }
                // dbias is the sum of dy whatever x holds.
                assert!(
                    same(got.dbias[c], base.dbias[c]),
                    "{what}: dbias of channel {c}: {} against {}",
                    got.dbias[c],
                    base.dbias[c]
                );
            }
        }
    }
}
