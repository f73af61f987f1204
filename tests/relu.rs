//! ReLU forward and backward against the f64 reference (fresh random inputs, seed printed on failure,
//! NaN-poisoned outputs, exact zeros in the input). Tolerance: 0 — max(x, 0) and the masked copy are exact
//! in f32, so every value must equal the reference's.

mod common;

use batchnorm::ops::relu::ReluOp;
use batchnorm::reference::relu as reference;
use common::*;

#[test]
fn relu_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    for &len in &[1usize, 7, 256, 257, 6007, 100_003] {
        let mut x = normal(&mut r, len, 0.0, 2.0);
        // Exact zeros: the gradient there is 0, as in PyTorch.
        for v in x.iter_mut().step_by(5) {
            *v = 0.0;
        }
        let dy = normal(&mut r, len, 0.0, 1.0);
        let xb = gpu.upload("x", &x).unwrap();
        let dyb = gpu.upload("dy", &dy).unwrap();
        let yb = gpu.upload("y", &vec![f32::NAN; len]).unwrap();
        let dx_from_y = gpu.upload("dx", &vec![f32::NAN; len]).unwrap();
        let dx_from_x = gpu.upload("dx2", &vec![f32::NAN; len]).unwrap();
        let op = ReluOp::new(&gpu, len).unwrap();
        let mut enc = gpu.encoder("test");
        op.record_forward(&mut enc, (&xb).into(), (&yb).into())
            .unwrap();
        op.record_backward(&mut enc, (&yb).into(), (&dyb).into(), (&dx_from_y).into())
            .unwrap();
        op.record_backward(&mut enc, (&xb).into(), (&dyb).into(), (&dx_from_x).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
        let y_ref = reference::forward(&f64s(&x));
        let dx_ref = reference::backward(&f64s(&x), &f64s(&dy));
        assert_eq!(max_rel_err(&y, &y_ref), 0.0, "y len {len} (seed {seed})");
        for (what, b) in [("from y", &dx_from_y), ("from x", &dx_from_x)] {
            let dx: Vec<f32> = gpu.download(b, 0, len).unwrap();
            let e = max_rel_err(&dx, &dx_ref);
            assert_eq!(e, 0.0, "dx {what} len {len}: error {e:e} (seed {seed})");
        }
    }
}

/// PyTorch's values at the special points: relu(NaN) = NaN and relu(-0) = -0 (WGSL's max(x, 0) gave 0 for
/// NaN, hiding a diverged layer from the loss check), and the gradient passes at NaN and +inf but not at
/// ±0 or below (threshold_backward: 0 where act <= 0). Compared bit for bit, from x and from y.
#[test]
fn relu_special_values_as_pytorch() {
    let gpu = gpu();
    let x = [
        f32::NAN,
        -0.0,
        0.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
        -1.5,
        2.5,
    ];
    let len = x.len();
    let dy = vec![5.0f32; len];
    let xb = gpu.upload("x", &x).unwrap();
    let dyb = gpu.upload("dy", &dy).unwrap();
    let yb = gpu.upload("y", &vec![7.0f32; len]).unwrap();
    let dx_from_y = gpu.upload("dx", &vec![7.0f32; len]).unwrap();
    let dx_from_x = gpu.upload("dx2", &vec![7.0f32; len]).unwrap();
    let op = ReluOp::new(&gpu, len).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(&mut enc, (&xb).into(), (&yb).into())
        .unwrap();
    op.record_backward(&mut enc, (&yb).into(), (&dyb).into(), (&dx_from_y).into())
        .unwrap();
    op.record_backward(&mut enc, (&xb).into(), (&dyb).into(), (&dx_from_x).into())
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let want_y = [f32::NAN, -0.0, 0.0, 0.0, f32::INFINITY, 0.0, 2.5];
    let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
    assert_eq!(bits(&y), bits(&want_y), "y {y:?}");
    let y_ref: Vec<f32> = reference::forward(&f64s(&x))
        .iter()
        .map(|&v| v as f32)
        .collect();
    assert_eq!(bits(&y_ref), bits(&want_y), "reference y {y_ref:?}");
    let want_dx = [5.0f32, 0.0, 0.0, 0.0, 5.0, 0.0, 5.0];
    for (what, b) in [("from y", &dx_from_y), ("from x", &dx_from_x)] {
        let dx: Vec<f32> = gpu.download(b, 0, len).unwrap();
        assert_eq!(dx, want_dx, "dx {what}");
    }
    let dx_ref = reference::backward(&f64s(&x), &f64s(&dy));
    assert_eq!(dx_ref, want_dx.map(f64::from), "reference dx");
}

#[test]
fn relu_rejects_bad_input() {
    let gpu = gpu();
    assert!(matches!(
        ReluOp::new(&gpu, 0),
        Err(batchnorm::Error::BadConfig(_))
    ));
    let op = ReluOp::new(&gpu, 100).unwrap();
    let small = gpu.upload("small", &[0.0f32; 99]).unwrap();
    let ok = gpu.upload("ok", &[0.0f32; 100]).unwrap();
    let mut enc = gpu.encoder("test");
    let err = op
        .record_forward(&mut enc, (&ok).into(), (&small).into())
        .unwrap_err();
    assert!(
        matches!(err, batchnorm::Error::ShapeMismatch { ref what, .. } if what == "relu y"),
        "{err}"
    );
}
