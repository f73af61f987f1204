//! Dropout against the f64 reference, which computes the GPU's own counter-based mask: fresh random seed
//! and inputs (printed on failure), NaN-poisoned outputs, awkward lengths, p in {0, 0.1, 0.5, 0.9, 1}.
//! Tolerances: y and dx to max |gpu − ref| / (1 + |ref|) <= 1e-6 (one f32 product); the mask itself must
//! match exactly (a value is zero on the GPU iff the reference drops it).
//!
//! Statistics (1 048 576 values): the keep rate within 5 standard deviations of 1 − p; two steps' masks
//! independent (joint keep rate within 5σ of (1 − p)²); the mean of the output within 5σ of the input's
//! mean (the 1/(1 − p) scaling keeps it unbiased). The backward must use the forward's mask.

mod common;

use batchnorm::nn::Dropout;
use batchnorm::ops::dropout::{rng_state, DropoutOp};
use batchnorm::reference::dropout as reference;
use batchnorm::Error;
use common::*;
use rand::Rng;

const TOL: f64 = 1e-6;

#[test]
fn dropout_matches_reference_mask() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    for &len in &[1usize, 7, 257, 10_007] {
        for &p in &[0.0f32, 0.1, 0.5, 0.9, 1.0] {
            let stream: u64 = r.random();
            let start: u32 = r.random_range(0..1_000_000);
            let mut state = rng_state(stream);
            state[2] = start;
            // Non-zero inputs, so a zero output means exactly "dropped".
            let x: Vec<f32> = normal(&mut r, len, 0.0, 1.0)
                .into_iter()
                .map(|v| if v == 0.0 { 1.0 } else { v })
                .collect();
            let dy = normal(&mut r, len, 0.0, 1.0);
            let xb = gpu.upload("x", &x).unwrap();
            let dyb = gpu.upload("dy", &dy).unwrap();
            let rngb = gpu.upload("rng", &state).unwrap();
            let yb = gpu.upload("y", &vec![f32::NAN; len]).unwrap();
            let dxb = gpu.upload("dx", &vec![f32::NAN; len]).unwrap();
            let op = DropoutOp::new(&gpu, len, p).unwrap();
            let mut enc = gpu.encoder("test");
            op.record_advance(&mut enc, (&rngb).into()).unwrap();
            op.record_forward(&mut enc, (&xb).into(), (&yb).into(), (&rngb).into())
                .unwrap();
            op.record_backward(&mut enc, (&dyb).into(), (&dxb).into(), (&rngb).into())
                .unwrap();
            gpu.submit_and_wait(enc).unwrap();
            let mask = reference::mask(stream, start + 1, len, p);
            let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
            let dx: Vec<f32> = gpu.download(&dxb, 0, len).unwrap();
            let what = format!(
                "len {len} p {p} stream {stream} step {} (seed {seed})",
                start + 1
            );
            for i in 0..len {
                assert_eq!(y[i] == 0.0, mask[i] == 0.0, "mask at {i}: {what}");
            }
            let ey = max_rel_err(&y, &reference::forward(&f64s(&x), &mask));
            let edx = max_rel_err(&dx, &reference::backward(&f64s(&dy), &mask));
            assert!(ey <= TOL, "y {what}: error {ey:e}");
            assert!(edx <= TOL, "dx {what}: error {edx:e}");
            let step: Vec<u32> = gpu.download(&rngb, 0, 4).unwrap();
            assert_eq!(step[2], start + 1, "the step advanced once: {what}");
        }
    }
}

/// PyTorch multiplies by the mask: a dropped NaN or infinity gives NaN (inf · 0), not 0 (before: 0, which
/// hid a diverged layer from the loss check); kept values are scaled as usual.
#[test]
fn dropout_of_non_finite_values_as_pytorch() {
    let gpu = gpu();
    let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5, -2.0];
    let len = x.len();
    for p in [1.0f32, 0.5] {
        for stream in 0..4u64 {
            let state = rng_state(stream);
            let xb = gpu.upload("x", &x).unwrap();
            let rngb = gpu.upload("rng", &state).unwrap();
            let yb = gpu.upload("y", &vec![7.0f32; len]).unwrap();
            let dxb = gpu.upload("dx", &vec![7.0f32; len]).unwrap();
            let op = DropoutOp::new(&gpu, len, p).unwrap();
            let mut enc = gpu.encoder("test");
            op.record_forward(&mut enc, (&xb).into(), (&yb).into(), (&rngb).into())
                .unwrap();
            // The backward of dy = x: the same rule for the gradient.
            op.record_backward(&mut enc, (&xb).into(), (&dxb).into(), (&rngb).into())
                .unwrap();
            gpu.submit_and_wait(enc).unwrap();
            let mask = reference::mask(stream, state[2], len, p);
            let want: Vec<f64> = reference::forward(&f64s(&x), &mask);
            for (what, b) in [("y", &yb), ("dx", &dxb)] {
                let got: Vec<f32> = gpu.download(b, 0, len).unwrap();
                for i in 0..len {
                    // Bit for bit where finite: a dropped -2 gives -0, as PyTorch's product.
                    let ok = if want[i].is_nan() {
                        got[i].is_nan()
                    } else {
                        got[i].to_bits() == (want[i] as f32).to_bits()
                    };
                    assert!(
                        ok,
                        "{what}[{i}] p {p} stream {stream}: {} vs {}",
                        got[i], want[i]
                    );
                }
            }
            if p == 1.0 {
                assert!(want[..3].iter().all(|v| v.is_nan()) && want[3] == 0.0);
            }
        }
    }
}

#[test]
fn dropout_keep_rate_and_independence() {
    let seed = seed();
    let gpu = gpu();
    let len = 1 << 20;
    for &p in &[0.2f32, 0.5] {
        let stream = seed ^ p.to_bits() as u64;
        let x = vec![1.0f32; len];
        let xb = gpu.upload("x", &x).unwrap();
        let rngb = gpu.upload("rng", &rng_state(stream)).unwrap();
        let y1 = gpu.upload("y1", &vec![f32::NAN; len]).unwrap();
        let y2 = gpu.upload("y2", &vec![f32::NAN; len]).unwrap();
        let op = DropoutOp::new(&gpu, len, p).unwrap();
        // Two steps recorded into one submission: the GPU-side advance keeps them apart.
        let mut enc = gpu.encoder("test");
        op.record_advance(&mut enc, (&rngb).into()).unwrap();
        op.record_forward(&mut enc, (&xb).into(), (&y1).into(), (&rngb).into())
            .unwrap();
        op.record_advance(&mut enc, (&rngb).into()).unwrap();
        op.record_forward(&mut enc, (&xb).into(), (&y2).into(), (&rngb).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let a: Vec<f32> = gpu.download(&y1, 0, len).unwrap();
        let b: Vec<f32> = gpu.download(&y2, 0, len).unwrap();
        let q = 1.0 - p as f64;
        let nf = len as f64;
        let keep = a.iter().filter(|&&v| v != 0.0).count() as f64 / nf;
        let both = a
            .iter()
            .zip(&b)
            .filter(|(&u, &v)| u != 0.0 && v != 0.0)
            .count() as f64
            / nf;
        let sigma = (q * (1.0 - q) / nf).sqrt();
        let sigma2 = (q * q * (1.0 - q * q) / nf).sqrt();
        assert!(
            (keep - q).abs() <= 5.0 * sigma,
            "p {p}: keep rate {keep} vs {q} (σ {sigma:e}, seed {seed})"
        );
        assert!(
            (both - q * q).abs() <= 5.0 * sigma2,
            "p {p}: joint keep rate {both} vs {} (σ {sigma2:e}, seed {seed})",
            q * q
        );
        assert!(a != b, "p {p}: two steps gave the same mask (seed {seed})");
        // Output mean: each value is 1/q with probability q, so its std is sqrt((1-q)/q).
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / nf;
        let sigma_mean = ((1.0 - q) / q / nf).sqrt();
        assert!(
            (mean - 1.0).abs() <= 5.0 * sigma_mean,
            "p {p}: output mean {mean} (σ {sigma_mean:e}, seed {seed})"
        );
    }
}

#[test]
fn dropout_layer_train_and_eval() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    let (n, f, p) = (5, 37, 0.3f32);
    let len = n * f;
    let stream: u64 = r.random();
    let mut layer = Dropout::new(&gpu, &[f], p, stream).unwrap();
    let x = normal(&mut r, len, 0.0, 1.0);
    let dy = normal(&mut r, len, 0.0, 1.0);
    let xb = gpu.upload("x", &x).unwrap();
    let dyb = gpu.upload("dy", &dy).unwrap();
    for step in 1..=2u32 {
        let yb = gpu.upload("y", &vec![f32::NAN; len]).unwrap();
        let dxb = gpu.upload("dx", &vec![f32::NAN; len]).unwrap();
        let mut enc = gpu.encoder("test");
        layer
            .record_forward(&mut enc, (&xb).into(), (&yb).into(), n)
            .unwrap();
        layer
            .record_backward(&mut enc, (&dyb).into(), (&dxb).into(), n)
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let mask = reference::mask(stream, step, len, p);
        let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
        let dx: Vec<f32> = gpu.download(&dxb, 0, len).unwrap();
        assert!(max_rel_err(&y, &reference::forward(&f64s(&x), &mask)) <= TOL);
        assert!(max_rel_err(&dx, &reference::backward(&f64s(&dy), &mask)) <= TOL);
    }
    // Eval: the identity, forward and backward, and the stream does not move.
    layer.train(false);
    let yb = gpu.upload("y", &vec![f32::NAN; len]).unwrap();
    let dxb = gpu.upload("dx", &vec![f32::NAN; len]).unwrap();
    let mut enc = gpu.encoder("test");
    layer
        .record_forward(&mut enc, (&xb).into(), (&yb).into(), n)
        .unwrap();
    layer
        .record_backward(&mut enc, (&dyb).into(), (&dxb).into(), n)
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    assert_eq!(gpu.download::<f32>(&yb, 0, len).unwrap(), x);
    assert_eq!(gpu.download::<f32>(&dxb, 0, len).unwrap(), dy);
    assert_eq!(layer.step().unwrap(), 2);
}

#[test]
fn dropout_rejects_bad_input() {
    let gpu = gpu();
    for p in [-0.1f32, 1.5, f32::NAN] {
        match DropoutOp::new(&gpu, 10, p) {
            Err(Error::BadConfig(m)) => assert!(m.contains("between 0 and 1"), "{m}"),
            other => panic!("p {p}: expected BadConfig, got {other:?}"),
        }
    }
    assert!(DropoutOp::new(&gpu, 0, 0.5).is_err());
    let op = DropoutOp::new(&gpu, 10, 0.5).unwrap();
    let x = gpu.upload("x", &[0.0f32; 10]).unwrap();
    let tiny = gpu.upload("rng", &[0u32; 2]).unwrap();
    let mut enc = gpu.encoder("test");
    let err = op
        .record_forward(&mut enc, (&x).into(), (&x).into(), (&tiny).into())
        .unwrap_err();
    assert!(err.to_string().contains("dropout rng"), "{err}");
}
