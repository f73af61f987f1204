//! Conv2d op (forward, dx, dweight, dbias) against the f64 reference on awkward shapes; the reference
//! itself against finite differences; typed errors for bad shapes and buffers.
//!
//! Fresh random inputs each run (seed printed on failure; BN_TEST_SEED replays one); every output is
//! poisoned with NaN first, so an unwritten value fails. Tolerances:
//! - y, dx, dweight, dbias: max |gpu − ref| / max(1, max |ref|) <= 1e-5 per output (f32 sums of up to
//!   Cin·KH·KW products for y, Cout·KH·KW for dx, N·Ho·Wo for dweight/dbias, against f64).
//! - finite differences of the reference (f64, central, h = 1e-6): |fd − analytic| <= 1e-6 · (1 + |analytic|)
//!   (the conv is linear in each argument, so only rounding separates them).

mod common;

use batchnorm::ops::batchnorm::BufferRef;
use batchnorm::ops::conv2d::{Conv2dOp, Conv2dShape};
use batchnorm::reference::conv2d as reference;
use batchnorm::Error;
use common::*;

const TOL: f64 = 1e-5;
const FD_TOL: f64 = 1e-6;

#[allow(clippy::too_many_arguments)]
fn shape(
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
    bias: bool,
) -> Conv2dShape {
    Conv2dShape {
        n,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        stride,
        padding,
        bias,
    }
}

/// Runs forward and backward (with dx) of `s` on random inputs and compares all outputs; returns the
/// errors (y, dx, dweight, dbias).
fn check(s: Conv2dShape, seed: u64) -> [f64; 4] {
    let gpu = gpu();
    let mut r = rng(seed);
    let y_len = s.y_len();
    let x = normal(&mut r, s.x_len(), 0.0, 1.0);
    let w = normal(&mut r, s.weight_len(), 0.0, 0.5);
    let b = normal(&mut r, s.cout, 0.0, 1.0);
    let dy = normal(&mut r, y_len, 0.0, 1.0);
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let (xb, wb, bb, dyb) = (up(&x), up(&w), up(&b), up(&dy));
    let (yb, dxb, dwb, dbb) = (
        up(&vec![f32::NAN; y_len]),
        up(&vec![f32::NAN; s.x_len()]),
        up(&vec![f32::NAN; s.weight_len()]),
        up(&vec![f32::NAN; s.cout]),
    );
    let op = Conv2dOp::new(&gpu, s).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        s.bias.then(|| (&bb).into()),
        (&yb).into(),
    )
    .unwrap();
    op.record_backward(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        (&dyb).into(),
        Some((&dxb).into()),
        (&dwb).into(),
        s.bias.then(|| (&dbb).into()),
    )
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let (x64, w64, b64, dy64) = (f64s(&x), f64s(&w), f64s(&b), f64s(&dy));
    let y_ref = reference::forward(&x64, &w64, s.bias.then_some(&b64[..]), &s).unwrap();
    let g = reference::backward(&x64, &w64, &dy64, &s).unwrap();
    let mut errs = [0.0; 4];
    let outputs = [
        ("y", &yb, &y_ref),
        ("dx", &dxb, &g.dx),
        ("dweight", &dwb, &g.dweight),
        ("dbias", &dbb, &g.dbias),
    ];
    for (i, (name, buf, want)) in outputs.into_iter().enumerate() {
        if name == "dbias" && !s.bias {
            continue;
        }
        let got: Vec<f32> = gpu.download(buf, 0, want.len()).unwrap();
        let err = max_err_scaled(&got, want);
        assert!(
            err <= TOL,
            "{name} of {s:?} (splits {}): error {err:e} > {TOL:e} (seed {seed})",
            op.dweight_splits()
        );
        errs[i] = err;
    }
    errs
}

fn check_all(cases: &[Conv2dShape]) {
    let seed = seed();
    let mut worst = [0.0f64; 4];
    for &s in cases {
        let e = check(s, seed);
        for (w, e) in worst.iter_mut().zip(e) {
            *w = w.max(e);
        }
    }
    println!(
        "worst errors (seed {seed}): y {:.1e} dx {:.1e} dweight {:.1e} dbias {:.1e}",
        worst[0], worst[1], worst[2], worst[3]
    );
}

#[test]
fn conv2d_3x3_pad1_stride1() {
    check_all(&[
        shape(2, 4, 9, 9, 6, (3, 3), 1, 1, true),
        shape(1, 3, 13, 13, 5, (3, 3), 1, 1, true),
        shape(3, 3, 13, 13, 7, (3, 3), 1, 1, false),
        shape(2, 20, 6, 6, 33, (3, 3), 1, 1, true),
    ]);
}

#[test]
fn conv2d_stride2() {
    check_all(&[
        shape(2, 3, 11, 11, 5, (3, 3), 2, 1, true),
        shape(3, 2, 10, 10, 4, (3, 3), 2, 0, true),
        shape(1, 5, 8, 8, 7, (3, 3), 2, 1, false),
    ]);
}

#[test]
fn conv2d_1x1() {
    check_all(&[
        shape(3, 8, 7, 7, 17, (1, 1), 1, 0, true),
        shape(2, 5, 9, 9, 3, (1, 1), 2, 0, false),
        shape(1, 1, 1, 1, 1, (1, 1), 1, 0, true),
    ]);
}

#[test]
fn conv2d_5x5_pad2() {
    check_all(&[
        shape(2, 3, 12, 12, 4, (5, 5), 1, 2, true),
        shape(1, 2, 7, 5, 3, (5, 5), 1, 2, true),
    ]);
}

#[test]
fn conv2d_non_square_and_odd() {
    check_all(&[
        shape(2, 3, 9, 14, 5, (3, 5), 1, 1, true),
        shape(1, 2, 17, 11, 3, (2, 4), 3, 1, true),
        // The kernel covers the whole input: a 1x1 output.
        shape(2, 3, 5, 5, 4, (5, 5), 1, 0, true),
        // Padding wider than the kernel: border outputs see only zeros (and the bias).
        shape(1, 2, 4, 4, 3, (3, 3), 1, 3, true),
    ]);
}

#[test]
fn conv2d_first_layer_of_an_mnist_cnn() {
    // Cin = 1, 28x28, 32 channels; and the next layers' shapes at a small batch.
    check_all(&[
        shape(4, 1, 28, 28, 32, (3, 3), 1, 1, true),
        shape(2, 32, 14, 14, 64, (3, 3), 1, 1, true),
    ]);
}

/// Weight and bias at offsets in one parameter arena, their gradients at the same offsets of a gradient
/// arena (how the training engine binds them); no dx (a first layer); the regions around them untouched.
#[test]
fn conv2d_on_arena_offsets_without_dx() {
    let seed = seed();
    let gpu = gpu();
    let s = shape(2, 3, 7, 6, 5, (3, 3), 1, 1, true);
    let mut r = rng(seed);
    let x = normal(&mut r, s.x_len(), 0.0, 1.0);
    let w = normal(&mut r, s.weight_len(), 0.0, 0.5);
    let b = normal(&mut r, s.cout, 0.0, 1.0);
    let dy = normal(&mut r, s.y_len(), 0.0, 1.0);
    // Offsets in f32: multiples of 64 (256 bytes, the strictest alignment a device may ask for).
    let (w_off, b_off, len) = (64, 64 * 4, 64 * 6);
    let mut params = vec![7.0f32; len];
    params[w_off..w_off + w.len()].copy_from_slice(&w);
    params[b_off..b_off + b.len()].copy_from_slice(&b);
    let pb = gpu.upload("params", &params).unwrap();
    let gb = gpu.upload("grads", &vec![f32::NAN; len]).unwrap();
    let (xb, dyb) = (gpu.upload("x", &x).unwrap(), gpu.upload("dy", &dy).unwrap());
    let yb = gpu.upload("y", &vec![f32::NAN; s.y_len()]).unwrap();
    let at = |buffer, off: usize| BufferRef {
        buffer,
        offset: 4 * off as u64,
    };
    let op = Conv2dOp::new(&gpu, s).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(
        &mut enc,
        (&xb).into(),
        at(&pb, w_off),
        Some(at(&pb, b_off)),
        (&yb).into(),
    )
    .unwrap();
    op.record_backward(
        &mut enc,
        (&xb).into(),
        at(&pb, w_off),
        (&dyb).into(),
        None,
        at(&gb, w_off),
        Some(at(&gb, b_off)),
    )
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let (x64, w64) = (f64s(&x), f64s(&w));
    let y_ref = reference::forward(&x64, &w64, Some(&f64s(&b)), &s).unwrap();
    let g = reference::backward(&x64, &w64, &f64s(&dy), &s).unwrap();
    let y: Vec<f32> = gpu.download(&yb, 0, s.y_len()).unwrap();
    let grads: Vec<f32> = gpu.download(&gb, 0, len).unwrap();
    assert!(max_err_scaled(&y, &y_ref) <= TOL, "y (seed {seed})");
    let dw = &grads[w_off..w_off + w.len()];
    let db = &grads[b_off..b_off + s.cout];
    assert!(
        max_err_scaled(dw, &g.dweight) <= TOL,
        "dweight (seed {seed})"
    );
    assert!(max_err_scaled(db, &g.dbias) <= TOL, "dbias (seed {seed})");
    // Nothing outside the two gradient slots was written.
    let outside = grads
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            !(w_off..w_off + w.len()).contains(i) && !(b_off..b_off + s.cout).contains(i)
        })
        .all(|(_, v)| v.is_nan());
    assert!(outside, "a gradient was written outside its slot");
}

/// A scalar loss `L = Σ y · g` for a fixed random `g`: its gradients are `backward(dy = g)`.
fn loss(x: &[f64], w: &[f64], b: &[f64], g: &[f64], s: &Conv2dShape) -> f64 {
    let y = reference::forward(x, w, Some(b), s).unwrap();
    y.iter().zip(g).map(|(y, g)| y * g).sum()
}

#[test]
fn conv2d_reference_matches_finite_differences() {
    let seed = seed();
    let mut r = rng(seed);
    for s in [
        shape(2, 3, 6, 5, 4, (3, 3), 1, 1, true),
        shape(1, 2, 7, 7, 3, (3, 2), 2, 1, true),
        shape(2, 2, 5, 5, 2, (1, 1), 2, 0, true),
    ] {
        let x = f64s(&normal(&mut r, s.x_len(), 0.0, 1.0));
        let w = f64s(&normal(&mut r, s.weight_len(), 0.0, 1.0));
        let b = f64s(&normal(&mut r, s.cout, 0.0, 1.0));
        let g = f64s(&normal(&mut r, s.y_len(), 0.0, 1.0));
        let grads = reference::backward(&x, &w, &g, &s).unwrap();
        let h = 1e-6;
        let fd = |which: usize, i: usize| {
            let mut args = [x.clone(), w.clone(), b.clone()];
            args[which][i] += h;
            let plus = loss(&args[0], &args[1], &args[2], &g, &s);
            args[which][i] -= 2.0 * h;
            let minus = loss(&args[0], &args[1], &args[2], &g, &s);
            (plus - minus) / (2.0 * h)
        };
        for (which, name, analytic) in [
            (0, "dx", &grads.dx),
            (1, "dweight", &grads.dweight),
            (2, "dbias", &grads.dbias),
        ] {
            for (i, &a) in analytic.iter().enumerate() {
                let f = fd(which, i);
                assert!(
                    (f - a).abs() <= FD_TOL * (1.0 + a.abs()),
                    "{name}[{i}] of {s:?}: finite difference {f} vs {a} (seed {seed})"
                );
            }
        }
    }
}

#[test]
fn conv2d_rejects_bad_shapes() {
    let gpu = gpu();
    let ok = shape(2, 3, 8, 8, 4, (3, 3), 1, 1, true);
    // Empty output: kernel larger than the padded input, along either axis.
    for bad in [
        Conv2dShape {
            h: 2,
            padding: 0,
            ..ok
        },
        Conv2dShape { kw: 11, ..ok },
    ] {
        let err = Conv2dOp::new(&gpu, bad).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("kernel"), "{err}");
    }
    // Zero sizes and stride.
    for bad in [
        Conv2dShape { n: 0, ..ok },
        Conv2dShape { cin: 0, ..ok },
        Conv2dShape { cout: 0, ..ok },
        Conv2dShape { kh: 0, ..ok },
        Conv2dShape { stride: 0, ..ok },
    ] {
        let err = Conv2dOp::new(&gpu, bad).unwrap_err();
        assert!(matches!(err, Error::BadConfig(_)), "{err}");
    }
    assert_eq!(Conv2dOp::new(&gpu, ok).unwrap().out_hw(), (8, 8));
    assert_eq!(
        Conv2dShape { stride: 2, ..ok }.out_hw().unwrap(),
        (4, 4),
        "floor((8 + 2 - 3) / 2) + 1"
    );
}

#[test]
fn conv2d_rejects_bad_buffers() {
    let gpu = gpu();
    let s = shape(2, 3, 8, 8, 4, (3, 3), 1, 1, true);
    let op = Conv2dOp::new(&gpu, s).unwrap();
    let big = gpu.upload("big", &vec![0.0f32; 4096]).unwrap();
    let big2 = gpu.upload("big2", &vec![0.0f32; 4096]).unwrap();
    let small = gpu.upload("small", &[0.0f32; 8]).unwrap();
    let mut enc = gpu.encoder("test");
    let x_small = op
        .record_forward(
            &mut enc,
            (&small).into(),
            (&big).into(),
            Some((&big).into()),
            (&big2).into(),
        )
        .unwrap_err();
    assert!(matches!(x_small, Error::ShapeMismatch { .. }), "{x_small}");
    assert!(x_small.to_string().contains("conv2d x"), "{x_small}");
    let no_bias = op
        .record_forward(&mut enc, (&big).into(), (&big).into(), None, (&big2).into())
        .unwrap_err();
    assert!(matches!(no_bias, Error::BadConfig(_)), "{no_bias}");
    let in_place = op
        .record_forward(
            &mut enc,
            (&big).into(),
            (&big2).into(),
            Some((&big2).into()),
            (&big).into(),
        )
        .unwrap_err();
    assert!(in_place.to_string().contains("overlaps"), "{in_place}");
    let dw_small = op
        .record_backward(
            &mut enc,
            (&big).into(),
            (&big).into(),
            (&big).into(),
            None,
            (&small).into(),
            Some((&big2).into()),
        )
        .unwrap_err();
    assert!(
        dw_small.to_string().contains("conv2d dweight"),
        "{dw_small}"
    );
}

/// The layer: slots in the arenas, PyTorch-default init, forward and backward through `nn::Conv2d`
/// against the reference; slot shapes that do not match the config are refused.
#[test]
fn conv2d_layer_on_arenas() {
    use batchnorm::nn::{Conv2d, Conv2dConfig, ParamSlot};
    let seed = seed();
    let gpu = gpu();
    let config = Conv2dConfig::new(3, 5, 3).padding(1).stride(2);
    let slot = |name: &str, shape: Vec<usize>, offset| ParamSlot {
        name: name.into(),
        shape,
        offset,
    };
    let wslot = slot("0.weight", config.weight_shape(), 64);
    // weight [5, 3, 3, 3] = 135 values at 64..199; bias at 256.
    let bslot = slot("0.bias", vec![5], 64 * 4);
    let mut r = rng(seed);
    let (w, b) = config.initial_values(None, &mut r);
    let b = b.expect("a bias");
    let bound = 1.0 / (config.fan_in() as f32).sqrt();
    assert!(
        w.iter().chain(&b).all(|v| v.abs() <= bound),
        "PyTorch's default init bound"
    );
    let mut params = vec![0.0f32; 64 * 5];
    params[64..64 + w.len()].copy_from_slice(&w);
    params[256..256 + 5].copy_from_slice(&b);
    let (n, hw) = (2, (9, 8));
    let s = config.shape(n, hw);
    let x = normal(&mut r, s.x_len(), 0.0, 1.0);
    let dy = normal(&mut r, s.y_len(), 0.0, 1.0);
    let pb = gpu.upload("params", &params).unwrap();
    let gb = gpu.upload("grads", &vec![f32::NAN; params.len()]).unwrap();
    let (xb, dyb) = (gpu.upload("x", &x).unwrap(), gpu.upload("dy", &dy).unwrap());
    let yb = gpu.upload("y", &vec![f32::NAN; s.y_len()]).unwrap();
    let dxb = gpu.upload("dx", &vec![f32::NAN; s.x_len()]).unwrap();
    let mut layer = Conv2d::new(&gpu, config, wslot.clone(), Some(bslot.clone())).unwrap();
    assert_eq!(config.out_hw(hw).unwrap(), (5, 4));
    let mut enc = gpu.encoder("test");
    layer
        .record_forward(&mut enc, &pb, (&xb).into(), (&yb).into(), n, hw)
        .unwrap();
    layer
        .record_backward(
            &mut enc,
            &pb,
            &gb,
            (&xb).into(),
            (&dyb).into(),
            Some((&dxb).into()),
            n,
            hw,
        )
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let (x64, w64) = (f64s(&x), f64s(&w));
    let y_ref = reference::forward(&x64, &w64, Some(&f64s(&b)), &s).unwrap();
    let g = reference::backward(&x64, &w64, &f64s(&dy), &s).unwrap();
    let y: Vec<f32> = gpu.download(&yb, 0, s.y_len()).unwrap();
    let dx: Vec<f32> = gpu.download(&dxb, 0, s.x_len()).unwrap();
    let grads: Vec<f32> = gpu.download(&gb, 0, params.len()).unwrap();
    assert!(max_err_scaled(&y, &y_ref) <= TOL, "y (seed {seed})");
    assert!(max_err_scaled(&dx, &g.dx) <= TOL, "dx (seed {seed})");
    assert!(
        max_err_scaled(wslot.values(&grads), &g.dweight) <= TOL,
        "dweight (seed {seed})"
    );
    assert!(
        max_err_scaled(bslot.values(&grads), &g.dbias) <= TOL,
        "dbias (seed {seed})"
    );
    // Slots that do not match the config.
    let wrong = slot("0.weight", vec![5, 3, 3], 64);
    let err = Conv2d::new(&gpu, config, wrong, Some(bslot.clone())).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let err = Conv2d::new(&gpu, config.bias(false), wslot.clone(), Some(bslot)).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let err = Conv2d::new(&gpu, config, wslot, None).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

/// Lavapipe ends an invocation's loops after 65 535 iterations in all (ARCHITECTURE.md, "Known limits").
/// A large layer over a large output (256 → 256 channels, 3×3, batch 128 at 28×28) had one dweight split
/// walking all 3 584 output rows of 29 iterations (104 000) and came out short; now the splits keep each
/// walk under the limit on a CPU device. Loops that cannot be split are refused.
#[test]
fn conv2d_loops_stay_under_lavapipes_limit() {
    use batchnorm::ops::conv2d::LOOP_ITERATIONS_MAX;
    let gpu = gpu();
    if !gpu.caps().cpu_device {
        return; // GPUs have no such limit.
    }
    let big = shape(128, 256, 28, 28, 256, (3, 3), 1, 1, true);
    let op = Conv2dOp::new(&gpu, big).unwrap();
    let (ho, wo) = op.out_hw();
    let rows_per_split = (big.n * ho).div_ceil(op.dweight_splits());
    assert!(
        rows_per_split * (wo + 1) <= LOOP_ITERATIONS_MAX,
        "{} splits: {rows_per_split} rows of {} iterations",
        op.dweight_splits(),
        wo + 1
    );
    for (bad, what) in [
        // One output row of 70 001 iterations: a split cannot cut a row.
        (shape(1, 1, 1, 70_000, 1, (1, 1), 1, 0, false), "dweight"),
        // The forward sums over cin · kh · (kw + 1) = 80 000 iterations.
        (shape(1, 40_000, 1, 1, 1, (1, 1), 1, 0, false), "forward"),
        // dx sums over cout · kh · (kw + 1).
        (shape(1, 1, 1, 1, 40_000, (1, 1), 1, 0, false), "dx"),
    ] {
        let e = Conv2dOp::new(&gpu, bad).unwrap_err();
        assert!(
            matches!(e, Error::LimitExceeded { .. }) && e.to_string().contains(what),
            "{what}: {e}"
        );
    }
}
