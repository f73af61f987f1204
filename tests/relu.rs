//! ReLU forward and backward against the f64 reference (fresh random inputs, seed printed on failure,
//! NaN-poisoned outputs, exact zeros in the input). Tolerance: 0 — max(x, 0) and the masked copy are exact
//! in f32, so every value must equal the reference's.

mod common;

use batchnorm::ops::relu::ReluOp;
use batchnorm::reference::relu as reference;
use common::*;

/// y = relu(x), then dx from y and from x, on outputs poisoned with `poison`: (y, dx from y, dx from x).
fn run(x: &[f32], dy: &[f32], poison: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    let len = x.len();
    let xb = gpu.upload("x", x).unwrap();
    let dyb = gpu.upload("dy", dy).unwrap();
    let yb = gpu.upload("y", &vec![poison; len]).unwrap();
    let dx_from_y = gpu.upload("dx", &vec![poison; len]).unwrap();
    let dx_from_x = gpu.upload("dx2", &vec![poison; len]).unwrap();
    let op = ReluOp::new(&gpu, len).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(&mut enc, (&xb).into(), (&yb).into())
        .unwrap();
    op.record_backward(&mut enc, (&yb).into(), (&dyb).into(), (&dx_from_y).into())
        .unwrap();
    op.record_backward(&mut enc, (&xb).into(), (&dyb).into(), (&dx_from_x).into())
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let down = |b: &wgpu::Buffer| gpu.download::<f32>(b, 0, len).unwrap();
    (down(&yb), down(&dx_from_y), down(&dx_from_x))
}

#[test]
fn relu_matches_reference() {
    let seed = seed();
    let mut r = rng(seed);
    for &len in &[1usize, 7, 256, 257, 6007, 100_003] {
        let mut x = normal(&mut r, len, 0.0, 2.0);
        // Exact zeros: the gradient there is 0, as in PyTorch.
        for v in x.iter_mut().step_by(5) {
            *v = 0.0;
        }
        let dy = normal(&mut r, len, 0.0, 1.0);
        let (y, dx_from_y, dx_from_x) = run(&x, &dy, f32::NAN);
        let y_ref = reference::forward(&f64s(&x));
        let dx_ref = reference::backward(&f64s(&x), &f64s(&dy));
        assert_eq!(max_rel_err(&y, &y_ref), 0.0, "y len {len} (seed {seed})");
        for (what, dx) in [("from y", &dx_from_y), ("from x", &dx_from_x)] {
            let e = max_rel_err(dx, &dx_ref);
            assert_eq!(e, 0.0, "dx {what} len {len}: error {e:e} (seed {seed})");
        }
    }
}

/// PyTorch's values at the special points: relu(NaN) = NaN and relu(-0) = -0 (WGSL's max(x, 0) gave 0 for
/// NaN, hiding a diverged layer from the loss check), and the gradient passes at NaN and +inf but not at
/// ±0 or below (threshold_backward: 0 where act <= 0). Compared bit for bit, from x and from y.
#[test]
fn relu_special_values_as_pytorch() {
    let x = [
        f32::NAN,
        -0.0,
        0.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
        -1.5,
        2.5,
    ];
    let dy = vec![5.0f32; x.len()];
    // Poisoned with 7, not NaN: the NaN outputs must be written.
    let (y, dx_from_y, dx_from_x) = run(&x, &dy, 7.0);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let want_y = [f32::NAN, -0.0, 0.0, 0.0, f32::INFINITY, 0.0, 2.5];
    assert_eq!(bits(&y), bits(&want_y), "y {y:?}");
    let y_ref: Vec<f32> = reference::forward(&f64s(&x))
        .iter()
        .map(|&v| v as f32)
        .collect();
    assert_eq!(bits(&y_ref), bits(&want_y), "reference y {y_ref:?}");
    let want_dx = [5.0f32, 0.0, 0.0, 0.0, 5.0, 0.0, 5.0];
    for (what, dx) in [("from y", &dx_from_y), ("from x", &dx_from_x)] {
        assert_eq!(dx[..], want_dx, "dx {what}");
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
