//! Sigmoid forward and backward against the f64 reference (fresh random inputs, seed printed on failure,
//! NaN-poisoned outputs). Tolerance: max |gpu − ref| / (1 + |ref|) <= 1e-6 (one exp and one division).

mod common;

use batchnorm::ops::sigmoid::SigmoidOp;
use batchnorm::reference::sigmoid as reference;
use common::*;

const TOL: f64 = 1e-6;

#[test]
fn sigmoid_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    for &len in &[1usize, 7, 256, 257, 6000, 100_003] {
        let mut x = normal(&mut r, len, 0.0, 4.0);
        // Saturated tails must stay finite and exact, not NaN from exp overflow.
        x[0] = -120.0;
        if len > 1 {
            x[1] = 120.0;
        }
        let dy = normal(&mut r, len, 0.0, 1.0);
        let xb = gpu.upload("x", &x).unwrap();
        let dyb = gpu.upload("dy", &dy).unwrap();
        let yb = gpu.upload("y", &vec![f32::NAN; len]).unwrap();
        let dxb = gpu.upload("dx", &vec![f32::NAN; len]).unwrap();
        let op = SigmoidOp::new(&gpu, len).unwrap();
        let mut enc = gpu.encoder("test");
        op.record_forward(&mut enc, (&xb).into(), (&yb).into())
            .unwrap();
        op.record_backward(&mut enc, (&yb).into(), (&dyb).into(), (&dxb).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
        let dx: Vec<f32> = gpu.download(&dxb, 0, len).unwrap();
        let y_ref = reference::forward(&f64s(&x));
        // The backward is checked on the GPU's own y: it is a function of y, not of x.
        let dx_ref = reference::backward(&f64s(&y), &f64s(&dy));
        let (ey, edx) = (max_rel_err(&y, &y_ref), max_rel_err(&dx, &dx_ref));
        assert!(ey <= TOL, "y len {len}: error {ey:e} (seed {seed})");
        assert!(edx <= TOL, "dx len {len}: error {edx:e} (seed {seed})");
    }
}
