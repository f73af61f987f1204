//! MaxPool2d and AvgPool2d forward and backward against the f64 reference: fresh random inputs (seed
//! printed on failure), NaN-poisoned outputs (argmax poisoned with u32::MAX), awkward shapes (primes,
//! N = C = 1, windows that overlap (s < k), leave gaps (s > k), or cover the whole input), and inputs with
//! many ties (small integers) so PyTorch's first-maximum rule is exercised.
//!
//! Tolerances: max pooling is a selection, so y, the argmax and dx (sums of at most ⌈k/s⌉² dy values, and
//! exact when windows do not overlap) are compared exactly / to 1e-6; average pooling sums k² values in
//! f32: y and dx to max |gpu − ref| / (1 + |ref|) <= 1e-6.

mod common;

use batchnorm::ops::pool::{Pool2dOp, Pool2dShape, PoolKind};
use batchnorm::reference::pool as reference;
use batchnorm::Error;
use common::*;
use rand::Rng;

const TOL: f64 = 1e-6;

fn shape(n: usize, c: usize, h: usize, w: usize, kernel: usize, stride: usize) -> Pool2dShape {
    Pool2dShape {
        n,
        c,
        h,
        w,
        kernel,
        stride,
    }
}

fn check_case(s: Pool2dShape, kind: PoolKind, ties: bool, seed: u64, r: &mut impl Rng) {
    let gpu = gpu();
    let x = if ties {
        (0..s.in_len())
            .map(|_| r.random_range(0..3) as f32)
            .collect()
    } else {
        normal(r, s.in_len(), 0.0, 1.0)
    };
    let dy = normal(r, s.out_len(), 0.0, 1.0);
    let xb = gpu.upload("x", &x).unwrap();
    let dyb = gpu.upload("dy", &dy).unwrap();
    let yb = gpu.upload("y", &vec![f32::NAN; s.out_len()]).unwrap();
    let ab = gpu.upload("argmax", &vec![u32::MAX; s.out_len()]).unwrap();
    let dxb = gpu.upload("dx", &vec![f32::NAN; s.in_len()]).unwrap();
    let op = Pool2dOp::new(&gpu, s, kind).unwrap();
    let mut enc = gpu.encoder("test");
    let argmax = (kind == PoolKind::Max).then(|| (&ab).into());
    op.record_forward(&mut enc, (&xb).into(), (&yb).into(), argmax)
        .unwrap();
    op.record_backward(&mut enc, (&dyb).into(), argmax, (&dxb).into())
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let y: Vec<f32> = gpu.download(&yb, 0, s.out_len()).unwrap();
    let dx: Vec<f32> = gpu.download(&dxb, 0, s.in_len()).unwrap();
    let (y_ref, argmax_ref) = reference::forward(&f64s(&x), &s, kind);
    let dx_ref = reference::backward(&f64s(&dy), &argmax_ref, &s, kind);
    let ey = max_rel_err(&y, &y_ref);
    let edx = max_rel_err(&dx, &dx_ref);
    let what = format!("{kind:?} {s:?} ties={ties} (seed {seed})");
    if kind == PoolKind::Max {
        assert_eq!(ey, 0.0, "y {what}");
        let a: Vec<u32> = gpu.download(&ab, 0, s.out_len()).unwrap();
        let a: Vec<usize> = a.iter().map(|&v| v as usize).collect();
        assert_eq!(a, argmax_ref, "argmax {what}");
    }
    assert!(ey <= TOL, "y {what}: error {ey:e}");
    assert!(edx <= TOL, "dx {what}: error {edx:e}");
}

#[test]
fn pooling_matches_reference() {
    let seed = seed();
    let mut r = rng(seed);
    let cases = [
        shape(2, 3, 8, 8, 2, 2),
        shape(1, 1, 1, 1, 1, 1),
        shape(3, 5, 7, 11, 3, 2),  // overlapping windows, odd sizes
        shape(2, 2, 13, 7, 3, 1),  // stride 1: each value in up to 9 windows
        shape(1, 7, 10, 9, 2, 3),  // gaps: some inputs in no window (dx = 0)
        shape(5, 1, 6, 6, 6, 1),   // one window covering the whole plane
        shape(1, 3, 29, 31, 5, 4), // primes
        shape(16, 32, 28, 28, 2, 2),
    ];
    for s in cases {
        for kind in [PoolKind::Max, PoolKind::Avg] {
            check_case(s, kind, false, seed, &mut r);
        }
        check_case(s, PoolKind::Max, true, seed, &mut r);
    }
}

/// PyTorch's max pooling with NaNs (`val > maxval || isnan(val)`): a window holding a NaN gives NaN and
/// sends its gradient to the window's last NaN. Before: NaN was skipped unless first (y 3 for the first
/// window below). The values are PyTorch 2.15's for this very input.
#[test]
fn max_pooling_propagates_nan_as_pytorch() {
    let gpu = gpu();
    let nan = f32::NAN;
    let s = shape(1, 1, 2, 6, 2, 2);
    #[rustfmt::skip]
    let x = [
        1.0, nan, nan, 2.0, 4.0, f32::NEG_INFINITY,
        0.0, 3.0, 1.0, nan, 5.0, f32::NEG_INFINITY,
    ];
    let dy = [1.0f32, 2.0, 3.0];
    let xb = gpu.upload("x", &x).unwrap();
    let dyb = gpu.upload("dy", &dy).unwrap();
    let yb = gpu.upload("y", &[7.0f32; 3]).unwrap();
    let ab = gpu.upload("argmax", &[u32::MAX; 3]).unwrap();
    let dxb = gpu.upload("dx", &[7.0f32; 12]).unwrap();
    let op = Pool2dOp::new(&gpu, s, PoolKind::Max).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(&mut enc, (&xb).into(), (&yb).into(), Some((&ab).into()))
        .unwrap();
    op.record_backward(&mut enc, (&dyb).into(), Some((&ab).into()), (&dxb).into())
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let y: Vec<f32> = gpu.download(&yb, 0, 3).unwrap();
    assert!(y[0].is_nan() && y[1].is_nan() && y[2] == 5.0, "y {y:?}");
    let a: Vec<u32> = gpu.download(&ab, 0, 3).unwrap();
    assert_eq!(a, [1, 9, 10], "argmax");
    let dx: Vec<f32> = gpu.download(&dxb, 0, 12).unwrap();
    let want_dx = [
        0.0f32, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 3.0, 0.0,
    ];
    assert_eq!(dx, want_dx, "dx");
    let (y_ref, a_ref) = reference::forward(&f64s(&x), &s, PoolKind::Max);
    assert!(y_ref[0].is_nan() && y_ref[1].is_nan() && y_ref[2] == 5.0);
    assert_eq!(a_ref, [1, 9, 10], "reference argmax");
}

#[test]
fn pooling_rejects_bad_input() {
    let gpu = gpu();
    let bad = |s: Pool2dShape| match Pool2dOp::new(&gpu, s, PoolKind::Max) {
        Err(Error::BadConfig(m)) => m,
        other => panic!("expected BadConfig for {s:?}, got {other:?}"),
    };
    assert!(bad(shape(1, 1, 4, 4, 5, 1)).contains("larger than"));
    assert!(bad(shape(1, 1, 4, 4, 2, 0)).contains("stride"));
    assert!(bad(shape(0, 1, 4, 4, 2, 2)).contains("batch"));
    let s = shape(1, 2, 4, 4, 2, 2);
    let op = Pool2dOp::new(&gpu, s, PoolKind::Max).unwrap();
    let x = gpu.upload("x", &[0.0f32; 32]).unwrap();
    let y = gpu.upload("y", &[0.0f32; 8]).unwrap();
    let mut enc = gpu.encoder("test");
    let err = op
        .record_forward(&mut enc, (&x).into(), (&y).into(), None)
        .unwrap_err();
    assert!(err.to_string().contains("argmax"), "{err}");
    let err = op
        .record_forward(&mut enc, (&y).into(), (&y).into(), Some((&y).into()))
        .unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { ref what, .. } if what == "pool x"),
        "{err}"
    );
}
