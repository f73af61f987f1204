//! BatchNorm with f16 storage (x, y, dy, dx in f16; statistics and accumulation in f32) against the f64
//! reference on the same f16 values, through both device paths: `enable f16` (native) and u32 words with
//! `unpack2x16float`/`pack2x16float` (packed, forced here; it is what devices without SHADER_F16 run).
//!
//! Inputs are fresh random values rounded to f16 (seed printed; BN_TEST_SEED replays one); every output is
//! poisoned with NaN before the run.
//!
//! Tolerances:
//! - y, dx (stored as f16): compared with the reference rounded to f16, max |gpu - ref16| / (1 + |ref|)
//!   <= 2^-10 (one f16 ulp at the value's scale: the f32 result and the f64 one may round to neighbouring
//!   halves); dx divided by its formula's terms as in tests/batchnorm.rs.
//! - save_mean, save_invstd, running statistics (f32): max |gpu - ref| / (1 + |ref|) <= 1e-4.
//! - dweight, dbias (f32 sums): max |gpu - ref| / max(1, max |ref|) <= 1e-4.

mod bn_case;
mod common;

use batchnorm::ops::batchnorm::{BatchNormConfig, BatchNormOp, F16Path, OpOptions, PlanChoice};
use batchnorm::tensor::{DType, Layout};
use bn_case::{check, Case};
use common::{gpu, ScratchDir};

/// One f16 ulp at magnitude 1.
const TOL: f64 = 1.0 / 1024.0;

fn paths() -> Vec<F16Path> {
    let mut p = vec![F16Path::Packed];
    if gpu().caps().shader_f16 {
        p.push(F16Path::Native);
    } else {
        eprintln!("device lacks SHADER_F16: only the packed path is tested");
    }
    p
}

/// Odd, prime, even-not-multiple-of-4 and vec4 contiguous axes (scalar halves, pairs, quads), in every
/// layout, through every plan, on both paths.
#[test]
fn f16_awkward_shapes_every_layout_every_plan() {
    let nchw: &[&[usize]] = &[
        &[3, 5, 7, 11], // odd planes: packed words straddle channels
        &[2, 6, 4, 4],  // units of 8 (packed), vec4 (native)
        &[2, 6, 3, 4],  // vec4 (a plane of 12)
        &[3, 5, 2, 3],  // pairs (plane of 6)
        &[1, 3, 17],    // N = 1, odd
        &[13, 1, 5, 5], // C = 1
        &[7, 9],        // spatial 1: every word straddles channels
    ];
    let nhwc: &[&[usize]] = &[
        &[3, 7, 11, 5], // odd C
        &[2, 4, 4, 8],  // units of 8 (packed)
        &[2, 3, 3, 12], // vec4
        &[2, 3, 3, 6],  // pairs
        &[1, 17, 3],
        &[2, 3, 301], // 301 channels: several column tiles, odd
        // Rows wide enough for the wide kernels on CPU devices: vec4 units (66), pairs (131).
        &[2, 3, 264],
        &[2, 3, 262],
    ];
    let nc: &[&[usize]] = &[&[7, 9], &[60, 100], &[3, 257], &[5, 2], &[5, 264]];
    let plans = [
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Split { parts: Some(3) },
    ];
    for path in paths() {
        for s in nchw {
            check(
                Case::new(s, Layout::Nchw)
                    .plan(PlanChoice::Resident)
                    .f16(path),
                TOL,
            );
        }
        for plan in plans {
            for s in nchw {
                check(Case::new(s, Layout::Nchw).plan(plan).f16(path), TOL);
            }
            for s in nhwc {
                check(Case::new(s, Layout::Nhwc).plan(plan).f16(path), TOL);
            }
            for s in nc {
                check(Case::new(s, Layout::Nc).plan(plan).f16(path), TOL);
            }
        }
    }
}

/// Packed f16 walks units of 8 halves (one vec4<u32>) where the contiguous axis allows, and vec4s where
/// only 4 divides it; also in chunks, on a device whose bindings hold 8 KiB (NCHW: whole samples of
/// 2.5 KiB; NHWC and (N,C): rows). The plan names say which unit ran.
#[test]
fn f16_packed_units_of_eight() {
    let cases: &[(&[usize], Layout, &str)] = &[
        (&[2, 6, 4, 4], Layout::Nchw, "w8"),
        (&[3, 5, 16, 24], Layout::Nchw, "w8"),
        (&[2, 6, 3, 4], Layout::Nchw, "w4"),
        (&[2, 4, 4, 8], Layout::Nhwc, "w8"),
        (&[3, 2, 5, 40], Layout::Nhwc, "w8"),
        (&[2, 3, 3, 12], Layout::Nhwc, "w4"),
        (&[5, 264], Layout::Nc, "w8"),
        (&[60, 100], Layout::Nc, "w4"),
    ];
    let plans = [
        PlanChoice::Auto,
        PlanChoice::Fused,
        PlanChoice::Split { parts: Some(3) },
    ];
    for &(shape, layout, unit) in cases {
        for plan in plans {
            let o = check(
                Case::new(shape, layout).plan(plan).f16(F16Path::Packed),
                TOL,
            );
            assert!(
                o.plan.contains(unit),
                "{shape:?} {layout:?}: plan {}",
                o.plan
            );
        }
    }
    check(
        Case::new(&[2, 6, 4, 4], Layout::Nchw)
            .plan(PlanChoice::Resident)
            .f16(F16Path::Packed),
        TOL,
    );
    let chunked: &[(&[usize], Layout)] = &[
        (&[7, 5, 16, 16], Layout::Nchw),
        (&[9, 4, 4, 40], Layout::Nhwc),
        (&[301, 16], Layout::Nc),
    ];
    for &(shape, layout) in chunked {
        for plan in [PlanChoice::Auto, PlanChoice::Split { parts: Some(2) }] {
            let o = check(
                Case::new(shape, layout)
                    .plan(plan)
                    .f16(F16Path::Packed)
                    .binding_limit(8 << 10),
                TOL,
            );
            assert!(
                o.plan.contains("w8") && o.plan.contains("chunks"),
                "{shape:?} {layout:?}: plan {}",
                o.plan
            );
        }
    }
}

/// Packed f16 NCHW with planes 4 does not divide, on a CPU device, is viewed as rows of C·HW halves in units
/// of 8 (the one-unit channel-last kernels, a channel being HW consecutive columns) where 8 divides C·HW:
/// a tail column tile, (N, C, L) with L odd, several column tiles, split plans and every flag mix. Where 8
/// does not divide the row, and with forced fused plans, the plane kernels run. On a GPU nothing changes.
#[test]
fn f16_nchw_as_rows() {
    let cpu = gpu().caps().cpu_device;
    let shapes: &[&[usize]] = &[
        &[412, 56, 7, 7], // 343 units per row: 6 column tiles, the last with 23 live columns
        &[260, 8, 1023],  // (N, C, L), L odd
        &[192, 8, 31, 33], // 1023 units per row; 3 parts just fit (partials <= 1/8 of the tensor)
    ];
    for &shape in shapes {
        for plan in [
            PlanChoice::Auto,
            PlanChoice::Split { parts: None },
            PlanChoice::Split { parts: Some(1) },
            PlanChoice::Split { parts: Some(3) },
        ] {
            let o = check(
                Case::new(shape, Layout::Nchw)
                    .plan(plan)
                    .f16(F16Path::Packed),
                TOL,
            );
            assert_eq!(
                o.plan.contains("NCHW as rows") && o.plan.contains("w8"),
                cpu,
                "{shape:?} {plan:?}: plan {}",
                o.plan
            );
        }
        let o = check(
            Case::new(shape, Layout::Nchw)
                .plan(PlanChoice::Fused)
                .f16(F16Path::Packed),
            TOL,
        );
        assert!(!o.plan.contains("rows"), "{shape:?}: plan {}", o.plan);
        for (affine, track, training) in bn_case::FLAG_MIXES {
            check(
                Case::new(shape, Layout::Nchw)
                    .plan(PlanChoice::Split { parts: Some(2) })
                    .f16(F16Path::Packed)
                    .flags(affine, track, training),
                TOL,
            );
        }
    }
    // In chunks of whole samples (a device whose bindings hold 600 KiB: 4 chunks of ~110 rows), one part
    // each: more parts would put the per-column partials past an eighth of the tensor, and the planner
    // then keeps the plane kernels (checked by Auto, whatever it picks).
    check(
        Case::new(&[412, 56, 7, 7], Layout::Nchw)
            .f16(F16Path::Packed)
            .binding_limit(600 << 10),
        TOL,
    );
    {
        let plan = PlanChoice::Split { parts: Some(1) };
        let o = check(
            Case::new(&[412, 56, 7, 7], Layout::Nchw)
                .plan(plan)
                .f16(F16Path::Packed)
                .binding_limit(600 << 10),
            TOL,
        );
        assert_eq!(
            o.plan.contains("NCHW as rows") && o.plan.contains("chunks"),
            cpu,
            "chunked {plan:?}: plan {}",
            o.plan
        );
    }
    // 52 · 49 = 2548 halves per row: 8 does not divide it, so no rows view.
    let o = check(
        Case::new(&[412, 52, 7, 7], Layout::Nchw).f16(F16Path::Packed),
        TOL,
    );
    assert!(!o.plan.contains("rows"), "plan {}", o.plan);
}

/// Eval mode, no affine, no tracking, on both paths.
#[test]
fn f16_flags() {
    for path in paths() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for plan in [PlanChoice::Fused, PlanChoice::Split { parts: Some(2) }] {
                for (affine, track, training) in [
                    (true, true, false),
                    (false, true, true),
                    (true, false, false),
                    (false, false, true),
                ] {
                    let mut case = Case::new(&[3, 5, 3, 3], layout).plan(plan).f16(path);
                    case.config = BatchNormConfig {
                        eps: 1e-3,
                        momentum: Some(0.3),
                        affine,
                        track_running_stats: track,
                    };
                    case.training = training;
                    check(case, TOL);
                }
            }
        }
    }
}

/// A larger case with a channel slice of 64k values: f32 accumulation of f16 inputs stays within f16
/// precision.
#[test]
fn f16_large_channels() {
    for path in paths() {
        check(Case::new(&[16, 3, 64, 64], Layout::Nchw).f16(path), TOL);
        check(Case::new(&[16, 63, 65, 3], Layout::Nhwc).f16(path), TOL);
        check(
            Case::new(&[16, 3, 63, 65], Layout::Nchw)
                .f16(path)
                .plan(PlanChoice::Split { parts: None }),
            TOL,
        );
    }
}

/// Bad f16 settings are typed errors, not panics.
#[test]
fn f16_bad_options_are_errors() {
    let gpu = gpu();
    let f32_packed = OpOptions {
        dtype: DType::F32,
        f16_path: F16Path::Packed,
        fuse_relu: false,
        sigmoid: false,
    };
    let e = BatchNormOp::with_options(
        &gpu,
        &[2, 3, 4, 4],
        Layout::Nchw,
        BatchNormConfig::default(),
        PlanChoice::Auto,
        f32_packed,
    )
    .unwrap_err();
    assert!(e.to_string().contains("f16"), "{e}");
    // An f16 op needs only 2 bytes per element (rounded up to a word): an f32-sized check would be wrong,
    // a too-small buffer is refused.
    let op = BatchNormOp::with_options(
        &gpu,
        &[3, 5, 7],
        Layout::Nchw,
        BatchNormConfig::default(),
        PlanChoice::Auto,
        OpOptions {
            dtype: DType::F16,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(op.tensor_bytes(), 2 * 105 + 2);
    assert_eq!(op.dtype(), DType::F16);
    let small = gpu.upload("small", &[0u32; 52]).unwrap();
    let saved = gpu.upload("saved", &[0f32; 10]).unwrap();
    let fwd = batchnorm::ops::batchnorm::ForwardBuffers {
        x: (&small).into(),
        y: (&small).into(),
        weight: None,
        bias: None,
        running_mean: None,
        running_var: None,
        saved: (&saved).into(),
    };
    let mut enc = gpu.encoder("t");
    let e = op.record_forward_train(&mut enc, &fwd, None).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
}

/// `batchnorm parity` with F16 `x`/`dy` and `fuse_relu`: writes F16 `y`/`dx` matching the reference
/// (relu(bn(x)) and its backward on the same f16 values) to within f16 precision:
/// max |gpu - ref| / (1 + max |ref|) <= 2^-9 (outputs rounded to f16, dx's sums in f32).
#[test]
fn parity_f16_with_relu() {
    use batchnorm::reference::{batchnorm as reference, batchnorm_fused as fused_ref};
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    use std::collections::HashMap;

    let seed = common::seed();
    let mut rng = common::rng(seed);
    let shape = vec![4usize, 3, 5];
    let n = 60;
    let x = batchnorm::tensor::round_to_f16(&common::normal(&mut rng, n, 0.5, 2.0));
    let dy = batchnorm::tensor::round_to_f16(&common::normal(&mut rng, n, 0.0, 1.0));
    let halves = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&a| half::f16::from_f32(a).to_le_bytes())
            .collect()
    };
    let (xb, dyb) = (halves(&x), halves(&dy));
    let views = vec![
        (
            "x",
            TensorView::new(Dtype::F16, shape.clone(), &xb).unwrap(),
        ),
        (
            "dy",
            TensorView::new(Dtype::F16, shape.clone(), &dyb).unwrap(),
        ),
    ];
    let meta: HashMap<String, String> = [("fuse_relu", "true"), ("momentum", "0.1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dir = ScratchDir::new("f16-parity");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    std::fs::write(&input, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_batchnorm"))
        .args(["parity", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "parity failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let read16 = |name: &str| -> Vec<f64> {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::F16, "{name} must be written as F16");
        assert_eq!(v.shape(), &shape[..]);
        v.data()
            .chunks(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect()
    };
    let (y, dx) = (read16("y"), read16("dx"));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header
            .metadata()
            .as_ref()
            .unwrap()
            .get("fuse_relu")
            .map(String::as_str),
        Some("true")
    );
    let x64 = common::f64s(&x);
    let ones = vec![1.0; 3];
    let zeros = vec![0.0; 3];
    let mut running = reference::RunningStats::new(3);
    let fr = reference::forward(
        &x64,
        &shape,
        Layout::Nchw,
        Some(&ones),
        Some(&zeros),
        Some(&mut running),
        true,
        Some(0.1),
        1e-5,
    )
    .unwrap();
    let (y_ref, mask) = fused_ref::relu_forward(&fr);
    let br = fused_ref::relu_backward(
        &x64,
        &common::f64s(&dy),
        &mask,
        &shape,
        Layout::Nchw,
        Some(&ones),
        &fr.mean,
        &fr.invstd,
        true,
    )
    .unwrap();
    let err = |got: &[f64], want: &[f64]| {
        let scale = 1.0 + want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0, f64::max)
    };
    let (ey, edx) = (err(&y, &y_ref), err(&dx, &br.dx));
    eprintln!("parity f16 relu seed={seed}: y {ey:.2e} dx {edx:.2e}");
    assert!(
        ey <= 1.0 / 512.0 && edx <= 1.0 / 512.0,
        "seed={seed}: y {ey:.2e} dx {edx:.2e}"
    );
}
