//! The noisy-BatchNorm perturbation (`ops::noise`, `nn::Noise`, `LayerSpec::Noise`) against the f64
//! reference, which computes the GPU's own draws: fresh random seed, streams, steps, configs and inputs
//! (seed printed in every failure), NaN-poisoned outputs, awkward shapes (1, primes, NCHW units).
//! Tolerances: y = x·s + m and dx = dy·s to max |gpu − ref| / (1 + |ref|) <= 1e-6 (a few f32 roundings).
//!
//! Statistics (4 steps of 4096 rows × 256 units, default config): per value, the shift and scale around
//! their unit's centre have mean 0 within 5σ and variance jitter²/3 within 5σ (σ of a sample variance of
//! a uniform: √(4/45)·h²/√N); the per-unit centres estimated from the GPU's output have mean 0 / 1 and
//! variance range²/3 within 5σ over units × steps; consecutive steps' centres are uncorrelated (|ρ| <=
//! 5/√units): the distribution changes every step.

mod common;

use batchnorm::nn::{Layer, LayerSpec, Noise, Sequential};
use batchnorm::ops::dropout::rng_state;
use batchnorm::ops::noise::{NoiseConfig, NoiseOp};
use batchnorm::reference::noise as reference;
use batchnorm::Error;
use common::*;
use rand::Rng;

const TOL: f64 = 1e-6;

fn random_config(r: &mut impl Rng) -> NoiseConfig {
    NoiseConfig {
        shift_range: r.random_range(0.0..2.0),
        scale_range: r.random_range(0.0..1.0),
        shift_jitter: r.random_range(0.0..1.0),
        scale_jitter: r.random_range(0.0..0.5),
    }
}

#[test]
fn noise_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    // (rows, units, inner): features of [N, F] rows (inner 1) and channels of NCHW maps (inner H·W).
    for &(rows, units, inner) in &[
        (1usize, 1usize, 1usize),
        (7, 13, 1),
        (61, 100, 1),
        (1, 257, 1),
        (3, 5, 49),
        (2, 1, 7),
    ] {
        let len = rows * units * inner;
        let config = random_config(&mut r);
        let stream: u64 = r.random();
        let start: u32 = r.random_range(0..1_000_000);
        let mut state = rng_state(stream);
        state[2] = start;
        let x = normal(&mut r, len, 0.3, 1.5);
        let dy = normal(&mut r, len, 0.0, 1.0);
        let xb = gpu.upload("x", &x).unwrap();
        let dyb = gpu.upload("dy", &dy).unwrap();
        let rngb = gpu.upload("rng", &state).unwrap();
        let yb = gpu.upload("y", &vec![f32::NAN; len]).unwrap();
        let dxb = gpu.upload("dx", &vec![f32::NAN; len]).unwrap();
        let op = NoiseOp::new(&gpu, len, units, inner, config).unwrap();
        let mut enc = gpu.encoder("test");
        op.record_advance(&mut enc, (&rngb).into()).unwrap();
        op.record_forward(&mut enc, (&xb).into(), (&yb).into(), (&rngb).into())
            .unwrap();
        op.record_backward(&mut enc, (&dyb).into(), (&dxb).into(), (&rngb).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let (s, m) = reference::draws(stream, start + 1, len, units, inner, &config);
        let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
        let dx: Vec<f32> = gpu.download(&dxb, 0, len).unwrap();
        let what = format!(
            "rows {rows} units {units} inner {inner} {config:?} stream {stream} step {} (seed {seed})",
            start + 1
        );
        let ey = max_rel_err(&y, &reference::forward(&f64s(&x), &s, &m));
        let edx = max_rel_err(&dx, &reference::backward(&f64s(&dy), &s));
        println!("{what}: y error {ey:.1e}, dx error {edx:.1e}");
        assert!(ey <= TOL, "y {what}: error {ey:e}");
        assert!(edx <= TOL, "dx {what}: error {edx:e}");
        let step: Vec<u32> = gpu.download(&rngb, 0, 4).unwrap();
        assert_eq!(step[2], start + 1, "the step advanced once: {what}");
    }
}

/// Mean and (population) variance.
fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n)
}

/// Checks that `v` looks uniform on (centre ± half) at 5σ: its mean and its variance.
fn assert_uniform(v: &[f64], centre: f64, half: f64, what: &str) {
    let n = v.len() as f64;
    let (mean, var) = moments(v);
    let want_var = half * half / 3.0;
    let sigma_mean = (want_var / n).sqrt();
    let sigma_var = (4.0 / 45.0f64).sqrt() * half * half / n.sqrt();
    println!("{what}: mean {mean:.5} (want {centre}), variance {var:.5} (want {want_var:.5})");
    assert!(
        (mean - centre).abs() <= 5.0 * sigma_mean,
        "{what}: mean {mean} vs {centre} (σ {sigma_mean:e})"
    );
    assert!(
        (var - want_var).abs() <= 5.0 * sigma_var,
        "{what}: variance {var} vs {want_var} (σ {sigma_var:e})"
    );
}

#[test]
fn noise_moments_and_changing_distribution() {
    let seed = seed();
    let gpu = gpu();
    let (rows, units, steps) = (4096usize, 256usize, 4u32);
    let len = rows * units;
    let config = NoiseConfig::default();
    let stream = seed;
    let zeros = gpu.upload("zeros", &vec![0.0f32; len]).unwrap();
    let ones = gpu.upload("ones", &vec![1.0f32; len]).unwrap();
    let rngb = gpu.upload("rng", &rng_state(stream)).unwrap();
    let op = NoiseOp::new(&gpu, len, units, 1, config).unwrap();
    let (mut shift_res, mut scale_res) = (Vec::new(), Vec::new());
    let (mut shift_centres, mut scale_centres) = (Vec::new(), Vec::new());
    for step in 1..=steps {
        // Same step, two inputs: x = 0 gives m, x = 1 gives s + m.
        let y0 = gpu.upload("y0", &vec![f32::NAN; len]).unwrap();
        let y1 = gpu.upload("y1", &vec![f32::NAN; len]).unwrap();
        let mut enc = gpu.encoder("test");
        op.record_advance(&mut enc, (&rngb).into()).unwrap();
        op.record_forward(&mut enc, (&zeros).into(), (&y0).into(), (&rngb).into())
            .unwrap();
        op.record_forward(&mut enc, (&ones).into(), (&y1).into(), (&rngb).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let m: Vec<f32> = gpu.download(&y0, 0, len).unwrap();
        let sm: Vec<f32> = gpu.download(&y1, 0, len).unwrap();
        let mut col_shift = vec![0.0f64; units];
        let mut col_scale = vec![0.0f64; units];
        for i in 0..len {
            let j = i % units;
            let (scale_c, shift_c) = reference::unit_params(stream, step, j as u32, &config);
            let (mi, si) = (m[i] as f64, (sm[i] - m[i]) as f64);
            shift_res.push(mi - shift_c);
            scale_res.push(si - scale_c);
            col_shift[j] += mi / rows as f64;
            col_scale[j] += si / rows as f64;
        }
        shift_centres.push(col_shift);
        scale_centres.push(col_scale);
    }
    let tag = |w: &str| format!("{w} (seed {seed})");
    assert_uniform(
        &shift_res,
        0.0,
        config.shift_jitter as f64,
        &tag("value shift"),
    );
    assert_uniform(
        &scale_res,
        0.0,
        config.scale_jitter as f64,
        &tag("value scale"),
    );
    let all = |c: &[Vec<f64>]| c.concat();
    assert_uniform(
        &all(&shift_centres),
        0.0,
        config.shift_range as f64,
        &tag("unit shift centres"),
    );
    assert_uniform(
        &all(&scale_centres),
        1.0,
        config.scale_range as f64,
        &tag("unit scale centres"),
    );
    for k in 1..steps as usize {
        for (name, c) in [("shift", &shift_centres), ("scale", &scale_centres)] {
            let (ma, va) = moments(&c[k - 1]);
            let (mb, vb) = moments(&c[k]);
            let cov = c[k - 1]
                .iter()
                .zip(&c[k])
                .map(|(a, b)| (a - ma) * (b - mb))
                .sum::<f64>()
                / units as f64;
            let rho = cov / (va * vb).sqrt();
            assert!(
                rho.abs() <= 5.0 / (units as f64).sqrt(),
                "{name} centres of steps {k} and {}: correlation {rho} (seed {seed})",
                k + 1
            );
        }
    }
}

#[test]
fn noise_layer_train_and_eval() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    // [F] samples (units = features) and [C, H, W] samples (units = channels).
    for shape in [vec![37usize], vec![3, 4, 5]] {
        let n = 5;
        let per: usize = shape.iter().product();
        let (units, inner) = (shape[0], per / shape[0]);
        let len = n * per;
        let config = random_config(&mut r);
        let stream: u64 = r.random();
        let mut layer = Noise::new(&gpu, &shape, config, stream).unwrap();
        let x = normal(&mut r, len, 0.0, 1.0);
        let dy = normal(&mut r, len, 0.0, 1.0);
        let xb = gpu.upload("x", &x).unwrap();
        let dyb = gpu.upload("dy", &dy).unwrap();
        let what = format!("shape {shape:?} {config:?} stream {stream} (seed {seed})");
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
            let (s, m) = reference::draws(stream, step, len, units, inner, &config);
            let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
            let dx: Vec<f32> = gpu.download(&dxb, 0, len).unwrap();
            let ey = max_rel_err(&y, &reference::forward(&f64s(&x), &s, &m));
            let edx = max_rel_err(&dx, &reference::backward(&f64s(&dy), &s));
            assert!(ey <= TOL, "y step {step} {what}: {ey:e}");
            assert!(edx <= TOL, "dx step {step} {what}: {edx:e}");
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
        assert_eq!(gpu.download::<f32>(&yb, 0, len).unwrap(), x, "{what}");
        assert_eq!(gpu.download::<f32>(&dxb, 0, len).unwrap(), dy, "{what}");
        assert_eq!(layer.step().unwrap(), 2, "{what}");
    }
}

/// In a `Sequential` (Linear → BatchNorm → Noise → Sigmoid → Linear), a training forward's Noise output
/// is the reference noise (stream seed + layer index, step 1) of its input; in eval it is its input.
#[test]
fn noise_in_sequential() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    let config = random_config(&mut r);
    let specs = [
        LayerSpec::Linear { out_features: 11 },
        LayerSpec::BatchNorm,
        LayerSpec::Noise(config),
        LayerSpec::Sigmoid,
        LayerSpec::Linear { out_features: 3 },
    ];
    let model_seed: u64 = r.random_range(0..1 << 40);
    let (n, f) = (13usize, 7usize);
    let mut model = Sequential::new(&gpu, &[f], &specs, None, model_seed, n).unwrap();
    assert!(matches!(model.layers[2], Layer::Noise(_)));
    let x = normal(&mut r, n * f, 0.0, 1.0);
    for (training, step) in [(true, 1u32), (false, 1)] {
        model.train(training);
        gpu.queue
            .write_buffer(model.input(), 0, bytemuck::cast_slice(&x));
        let mut enc = gpu.encoder("test");
        model.record_forward(&mut enc, n).unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let before: Vec<f32> = gpu
            .download(model.activation(2).unwrap(), 0, n * 11)
            .unwrap();
        let after: Vec<f32> = gpu
            .download(model.activation(3).unwrap(), 0, n * 11)
            .unwrap();
        let want = if training {
            let (s, m) = reference::draws(model_seed + 2, step, n * 11, 11, 1, &config);
            reference::forward(&f64s(&before), &s, &m)
        } else {
            f64s(&before)
        };
        let e = max_rel_err(&after, &want);
        assert!(e <= TOL, "training {training}: {e:e} (seed {seed})");
    }
}

#[test]
fn noise_rejects_bad_input() {
    let gpu = gpu();
    for (field, bad) in [
        (
            "shift_range",
            NoiseConfig {
                shift_range: -1.0,
                ..Default::default()
            },
        ),
        (
            "scale_jitter",
            NoiseConfig {
                scale_jitter: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "scale_range",
            NoiseConfig {
                scale_range: f32::INFINITY,
                ..Default::default()
            },
        ),
    ] {
        match NoiseOp::new(&gpu, 10, 2, 1, bad) {
            Err(Error::BadConfig(m)) => assert!(m.contains(field), "{m}"),
            other => panic!("{field}: expected BadConfig, got {other:?}"),
        }
    }
    assert!(NoiseOp::new(&gpu, 0, 1, 1, NoiseConfig::default()).is_err());
    assert!(NoiseOp::new(&gpu, 10, 0, 1, NoiseConfig::default()).is_err());
    match Noise::new(&gpu, &[2, 3], NoiseConfig::default(), 0) {
        Err(Error::BadConfig(m)) => assert!(m.contains("[2, 3]"), "{m}"),
        other => panic!("expected BadConfig, got {other:?}"),
    }
    let op = NoiseOp::new(&gpu, 10, 2, 1, NoiseConfig::default()).unwrap();
    let x = gpu.upload("x", &[0.0f32; 10]).unwrap();
    let short = gpu.upload("short", &[0.0f32; 4]).unwrap();
    let tiny = gpu.upload("rng", &[0u32; 2]).unwrap();
    let mut enc = gpu.encoder("test");
    let err = op
        .record_forward(&mut enc, (&x).into(), (&x).into(), (&tiny).into())
        .unwrap_err();
    assert!(err.to_string().contains("noise rng"), "{err}");
    let rng = gpu.upload("rng", &rng_state(1)).unwrap();
    let err = op
        .record_backward(&mut enc, (&x).into(), (&short).into(), (&rng).into())
        .unwrap_err();
    assert!(err.to_string().contains("noise dx"), "{err}");
}
