//! f16 storage and the fused ReLU through the layer API (`nn::BatchNorm::set_options`): the layer
//! records on caller buffers of its dtype, owns the ReLU mask, moves the running statistics and counts
//! `num_batches_tracked`, in training, eval and FrozenBN, against the f64 reference (`tests/bn_case`).
//!
//! Fresh random inputs per run (seed printed; BN_TEST_SEED replays one). Before the measured forward,
//! y, dx, the layer's saved statistics, dweight, dbias and its mask are poisoned (NaN, all-ones words);
//! the mask exists from a warm-up eval forward that changes no state.
//!
//! Tolerances (measures of tests/bn_case): y and dx <= 1e-4 (f32) and <= 2^-10 against the reference
//! rounded to f16 (f16 storage: one f16 ulp); statistics, running statistics, dweight and dbias <= 1e-4;
//! no wrong mask bit; `num_batches_tracked` exact.

mod bn_case;
mod common;

use batchnorm::nn::BatchNorm;
use batchnorm::ops::batchnorm::{BatchNormConfig, BufferRef, F16Path, OpOptions, PlanChoice};
use batchnorm::ops::bn_variants::Renorm;
use batchnorm::tensor::{DType, Layout, Tensor};
use batchnorm::Error;
use bn_case::{assert_within, compare, download_tensor, inputs, upload_tensor, Case, GpuOut};
use common::*;

const TOL: f64 = 1e-4;
const TOL_F16: f64 = 1.0 / 1024.0;

/// How the layer runs the case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `case.training` decides train or eval.
    AsCase,
    /// Training mode with FrozenBN (the reference runs eval: running statistics, unchanged).
    Frozen,
}

/// Runs `case` through a fresh `nn::BatchNorm` (forward, then backward on caller buffers) starting from
/// `num_batches_tracked = nbt0`; returns the outputs and the counter afterwards.
fn run_layer(case: &Case, inp: &bn_case::Inputs, mode: Mode, nbt0: i64) -> (GpuOut, i64) {
    let gpu = gpu();
    let dims = case.layout.dims(&case.shape).unwrap();
    let (c, numel) = (dims.c, dims.numel());
    let dtype = case.options.dtype;
    let cfg = case.config;
    let mut bn = BatchNorm::new(&gpu, c, cfg).unwrap();
    bn.set_plan(case.plan);
    bn.set_options(case.options).unwrap();
    if cfg.affine {
        bn.write("weight", bn.weight.as_ref().unwrap(), &inp.weight)
            .unwrap();
        bn.write("bias", bn.bias.as_ref().unwrap(), &inp.bias)
            .unwrap();
    }
    if cfg.track_running_stats {
        bn.write(
            "running_mean",
            bn.running_mean.as_ref().unwrap(),
            &inp.rmean0,
        )
        .unwrap();
        bn.write("running_var", bn.running_var.as_ref().unwrap(), &inp.rvar0)
            .unwrap();
    }
    bn.num_batches_tracked = nbt0;
    let bx = upload_tensor(&gpu, "x", &inp.x, dtype);
    let bdy = upload_tensor(&gpu, "dy", &inp.dy, dtype);
    let nan_t = vec![f32::NAN; numel];
    let by = upload_tensor(&gpu, "y", &nan_t, dtype);
    let bdx = upload_tensor(&gpu, "dx", &nan_t, dtype);
    let (x, y, dy, dx) = (
        BufferRef::from(&bx),
        BufferRef::from(&by),
        BufferRef::from(&bdy),
        BufferRef::from(&bdx),
    );
    // Warm-up in eval (no state changes) so the mask exists and can be poisoned.
    bn.train(false);
    let mut enc = gpu.encoder("warm-up");
    bn.record_forward(&mut enc, x, y, &case.shape, case.layout)
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    assert_eq!(
        bn.num_batches_tracked, nbt0,
        "an eval forward counts nothing"
    );
    let poison = |b: &wgpu::Buffer| {
        let words = vec![u32::MAX; (b.size() / 4) as usize];
        gpu.queue.write_buffer(b, 0, bytemuck::cast_slice(&words));
    };
    for b in [&by, &bdx, &bn.saved]
        .into_iter()
        .chain(bn.dweight.as_ref())
        .chain(bn.dbias.as_ref())
        .chain(bn.relu_mask())
    {
        poison(b); // all-ones words: NaN as f32 and as f16 pairs
    }
    match mode {
        Mode::AsCase => bn.train(case.training),
        Mode::Frozen => {
            bn.train(true);
            bn.set_frozen(true).unwrap();
        }
    }
    let mut enc = gpu.encoder("layer");
    bn.record_forward(&mut enc, x, y, &case.shape, case.layout)
        .unwrap();
    bn.record_backward(&mut enc, x, dy, dx, &case.shape, case.layout)
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let read = |b: &Option<wgpu::Buffer>| b.as_ref().map(|b| bn.read(b).unwrap());
    let (saved_mean, saved_invstd) = bn.read_saved().unwrap();
    let mask = if case.options.fuse_relu {
        let words = numel.div_ceil(32);
        gpu.download(bn.relu_mask().expect("a mask"), 0, words)
            .unwrap()
    } else {
        Vec::new()
    };
    let out = GpuOut {
        y: download_tensor(&gpu, &by, numel, dtype),
        dx: download_tensor(&gpu, &bdx, numel, dtype),
        saved: [saved_mean, saved_invstd].concat(),
        running_mean: read(&bn.running_mean).unwrap_or_default(),
        running_var: read(&bn.running_var).unwrap_or_default(),
        dweight: read(&bn.dweight).unwrap_or_default(),
        dbias: read(&bn.dbias).unwrap_or_default(),
        mask,
        plan: bn.op(&case.shape, case.layout).unwrap().plan_name(),
    };
    (out, bn.num_batches_tracked)
}

/// Runs and checks one case through the layer; `nbt0` is the counter before.
fn check_layer(mut case: Case, mode: Mode, nbt0: i64, tol: f64) {
    let seed = seed();
    let inp = inputs(&case, seed);
    let (out, nbt) = run_layer(&case, &inp, mode, nbt0);
    if mode == Mode::Frozen {
        case.training = false; // the reference: running statistics, left unchanged
    }
    let o = compare(&case, &inp, &out);
    assert_within(&case, &o, seed, tol);
    let counted = mode == Mode::AsCase && case.training && case.config.track_running_stats;
    assert_eq!(
        nbt,
        nbt0 + counted as i64,
        "{case:?} {mode:?}: num_batches_tracked (seed {seed})"
    );
}

fn f16_tol(case: &Case) -> f64 {
    if case.options.dtype == DType::F16 {
        TOL_F16
    } else {
        TOL
    }
}

/// Every option set in training, eval and FrozenBN, on awkward shapes of every layout (odd planes for
/// packed f16 words straddling channels, mask words spanning channels, a last partial word).
#[test]
fn options_through_the_layer_match_reference() {
    let relu = OpOptions {
        fuse_relu: true,
        ..Default::default()
    };
    let f16 = OpOptions {
        dtype: DType::F16,
        f16_path: F16Path::Packed,
        fuse_relu: false,
        sigmoid: false,
    };
    let f16_relu = OpOptions {
        fuse_relu: true,
        ..f16
    };
    let mut sets = vec![relu, f16, f16_relu];
    if gpu().caps().shader_f16 {
        sets.push(OpOptions {
            f16_path: F16Path::Native,
            ..f16_relu
        });
    }
    let shapes: &[(&[usize], Layout)] = &[
        (&[3, 5, 7, 11], Layout::Nchw),
        (&[2, 3, 5, 7], Layout::Nchw),
        (&[1, 3, 17], Layout::Nchw),
        (&[3, 7, 11, 5], Layout::Nhwc),
        (&[7, 9], Layout::Nc),
    ];
    for options in sets {
        for &(shape, layout) in shapes {
            let base = Case {
                options,
                ..Case::new(shape, layout)
            };
            let tol = f16_tol(&base);
            check_layer(base.clone(), Mode::AsCase, 5, tol);
            let eval = Case {
                training: false,
                ..base.clone()
            };
            check_layer(eval, Mode::AsCase, 5, tol);
            check_layer(base, Mode::Frozen, 5, tol);
        }
    }
}

/// The split plan, the cumulative average (momentum None: factor 1/(num_batches_tracked + 1)), no
/// affine, and no running statistics (eval then normalizes with batch statistics and counts nothing).
#[test]
fn options_with_other_configs_match_reference() {
    for options in [
        OpOptions {
            fuse_relu: true,
            ..Default::default()
        },
        OpOptions {
            dtype: DType::F16,
            f16_path: F16Path::Auto,
            fuse_relu: true,
            sigmoid: false,
        },
    ] {
        let case = |shape: &[usize], layout| Case {
            options,
            ..Case::new(shape, layout)
        };
        let tol = f16_tol(&case(&[1, 1], Layout::Nc));
        let split = case(&[4, 3, 9, 9], Layout::Nchw).plan(PlanChoice::Split { parts: Some(3) });
        check_layer(split, Mode::AsCase, 0, tol);
        let mut cumulative = case(&[5, 6, 3, 3], Layout::Nhwc);
        cumulative.config.momentum = None;
        check_layer(cumulative, Mode::AsCase, 0, tol);
        let mut plain = case(&[6, 4, 5], Layout::Nchw);
        plain.config.affine = false;
        check_layer(plain, Mode::AsCase, 2, tol);
        let mut untracked = case(&[3, 4, 5, 5], Layout::Nchw);
        untracked.config.track_running_stats = false;
        check_layer(untracked.clone(), Mode::AsCase, 0, tol);
        untracked.training = false;
        check_layer(untracked, Mode::AsCase, 0, tol);
    }
}

/// `forward`/`backward` on the crate's own f16 tensors give what the caller-buffer path gives.
#[test]
fn f16_tensor_api_matches_the_buffer_path() {
    let gpu = gpu();
    let seed = seed();
    let case = Case {
        options: OpOptions {
            dtype: DType::F16,
            f16_path: F16Path::Packed,
            fuse_relu: true,
            sigmoid: false,
        },
        ..Case::new(&[3, 4, 5, 3], Layout::Nchw)
    };
    let inp = inputs(&case, seed);
    let (want, _) = run_layer(&case, &inp, Mode::AsCase, 0);
    let mut bn = BatchNorm::new(&gpu, 4, BatchNormConfig::default()).unwrap();
    bn.set_options(case.options).unwrap();
    bn.write("weight", bn.weight.as_ref().unwrap(), &inp.weight)
        .unwrap();
    bn.write("bias", bn.bias.as_ref().unwrap(), &inp.bias)
        .unwrap();
    bn.write(
        "running_mean",
        bn.running_mean.as_ref().unwrap(),
        &inp.rmean0,
    )
    .unwrap();
    bn.write("running_var", bn.running_var.as_ref().unwrap(), &inp.rvar0)
        .unwrap();
    let x = Tensor::from_f32_as_f16(&gpu, &case.shape, &inp.x).unwrap();
    let dy = Tensor::from_f32_as_f16(&gpu, &case.shape, &inp.dy).unwrap();
    let y = bn.forward(&x, Layout::Nchw).unwrap();
    let dx = bn.backward(&x, &dy, Layout::Nchw).unwrap();
    assert_eq!(
        (y.dtype, dx.dtype),
        (DType::F16, DType::F16),
        "outputs in the layer's dtype"
    );
    assert_eq!(y.to_f32().unwrap(), want.y, "seed {seed}");
    assert_eq!(dx.to_f32().unwrap(), want.dx, "seed {seed}");
    // An f32 tensor for an f16 layer: a typed error naming the dtype.
    let x32 = Tensor::from_f32(&gpu, &case.shape, &inp.x).unwrap();
    let err = bn.forward(&x32, Layout::Nchw).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { expected, .. } if expected.contains("f16")),
        "{err}"
    );
}

/// Combinations the kernels do not support are refused with typed errors, in either order.
#[test]
fn unsupported_combinations_are_typed_errors() {
    let gpu = gpu();
    let f16 = OpOptions {
        dtype: DType::F16,
        ..Default::default()
    };
    let relu = OpOptions {
        fuse_relu: true,
        ..Default::default()
    };
    let renorm = Renorm {
        rmax: 3.0,
        dmax: 5.0,
    };
    let bad = |r: batchnorm::Result<()>, want: &str| match r {
        Err(Error::BadConfig(m)) => assert!(m.contains(want), "{m}"),
        other => panic!("expected BadConfig mentioning {want:?}, got {other:?}"),
    };
    for options in [f16, relu] {
        let mut bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
        bn.set_virtual_batch_size(Some(2)).unwrap();
        bad(bn.set_options(options), "ghost");
        bn.set_virtual_batch_size(None).unwrap();
        bn.set_renorm(Some(renorm)).unwrap();
        bad(bn.set_options(options), "renormalization");
        bn.set_renorm(None).unwrap();
        bn.set_options(options).unwrap();
        bad(
            bn.set_virtual_batch_size(Some(2)),
            "f16 storage or the fused ReLU",
        );
        bad(bn.set_renorm(Some(renorm)), "f16 storage or the fused ReLU");
        // FrozenBN combines with both.
        bn.set_frozen(true).unwrap();
    }
    // An f16 path on f32 tensors.
    let mut bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
    bad(
        bn.set_options(OpOptions {
            f16_path: F16Path::Packed,
            ..Default::default()
        }),
        "f16 tensors",
    );
    if !gpu.caps().shader_f16 {
        bad(bn.set_dtype(DType::F16, F16Path::Native), "SHADER_F16");
    }
    // PreciseBN merges f32.
    bn.set_dtype(DType::F16, F16Path::Packed).unwrap();
    bn.precise_begin().unwrap();
    let x = Tensor::from_f32_as_f16(&gpu, &[4, 3], &[0.5; 12]).unwrap();
    bad(bn.precise_accumulate(&x, Layout::Nc), "PreciseBN");
    // The backward of a fused forward after switching the ReLU off.
    let mut bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
    bn.set_fuse_relu(true).unwrap();
    let x = Tensor::from_f32(&gpu, &[4, 3], &[0.5, 1.0, -2.0].repeat(4)).unwrap();
    bn.forward(&x, Layout::Nc).unwrap();
    bn.set_fuse_relu(false).unwrap();
    bad(bn.backward(&x, &x, Layout::Nc).map(|_| ()), "switched");
}

/// `batchnorm parity` runs through the layer: `fuse_relu` with F16 tensors combines with `frozen`
/// (y = relu of the running-statistics normalization, written as F16, within one f16 ulp of the
/// reference), and with ghost BatchNorm it exits non-zero with the layer's message.
#[test]
fn parity_combines_fused_relu_and_f16_with_frozen() {
    use batchnorm::reference::batchnorm as reference;
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let seed = seed();
    let mut r = rng(seed);
    let shape = vec![4usize, 3, 5];
    let x = batchnorm::tensor::round_to_f16(&normal(&mut r, 60, 0.5, 2.0));
    let halves: Vec<u8> = x
        .iter()
        .flat_map(|&a| half::f16::from_f32(a).to_le_bytes())
        .collect();
    let dir = ScratchDir::new("layer-parity");
    let run = |extra: (&str, &str)| {
        let views = vec![(
            "x",
            TensorView::new(Dtype::F16, shape.clone(), &halves).unwrap(),
        )];
        let meta: std::collections::HashMap<String, String> = [("fuse_relu", "true"), extra]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
        std::fs::write(&input, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_batchnorm"))
            .args(["parity", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        (out, std::fs::read(&output).ok())
    };
    let (out, bytes) = run(("frozen", "true"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = bytes.unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let y = st.tensor("y").unwrap();
    assert_eq!(y.dtype(), Dtype::F16);
    let y: Vec<f32> = y
        .data()
        .chunks(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let mut running = reference::RunningStats::new(3);
    let fr = reference::forward(
        &f64s(&x),
        &shape,
        Layout::Nchw,
        None,
        None,
        Some(&mut running),
        false,
        Some(0.1),
        1e-5,
    )
    .unwrap();
    let want: Vec<f64> =
        fr.y.iter()
            .map(|&v| half::f16::from_f64(v.max(0.0)).to_f64())
            .collect();
    let e = max_rel_err(&y, &want);
    assert!(e <= TOL_F16, "frozen fused f16 y: {e:e} (seed {seed})");
    let nbt = st.tensor("num_batches_tracked").unwrap();
    assert_eq!(nbt.data(), 0i64.to_le_bytes(), "FrozenBN counts nothing");
    let (out, _) = run(("virtual_batch_size", "2"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ghost"), "{err}");
}
