//! The f64 reference checked on its own: finite-difference gradients, and Ioffe's scale invariance on the
//! GPU against it.

mod common;

use batchnorm::nn::BatchNorm;
use batchnorm::reference::batchnorm as reference;
use batchnorm::tensor::{Layout, Tensor};
use common::*;

/// Loss L = sum(r * y) for a fixed random r, so dL/dy = r.
fn loss(x: &[f64], shape: &[usize], layout: Layout, w: &[f64], b: &[f64], r: &[f64]) -> f64 {
    let y = reference::forward(x, shape, layout, Some(w), Some(b), None, true, None, 1e-5)
        .unwrap()
        .y;
    y.iter().zip(r).map(|(a, b)| a * b).sum()
}

/// The reference backward equals central differences of the reference forward (f64, h = 1e-6), for x,
/// weight and bias, in every layout.
#[test]
fn reference_backward_matches_finite_differences() {
    let seed = seed();
    let mut rng = rng(seed);
    for (shape, layout) in [
        (&[3, 4, 5][..], Layout::Nchw),
        (&[2, 3, 2, 5][..], Layout::Nhwc),
        (&[6, 3][..], Layout::Nc),
    ] {
        let d = layout.dims(shape).unwrap();
        let x = f64s(&normal(&mut rng, d.numel(), 0.3, 1.5));
        let r = f64s(&normal(&mut rng, d.numel(), 0.0, 1.0));
        let w = f64s(&uniform(&mut rng, d.c, 0.5, 1.5));
        let b = f64s(&uniform(&mut rng, d.c, -1.0, 1.0));
        let f = reference::forward(
            &x,
            shape,
            layout,
            Some(&w),
            Some(&b),
            None,
            true,
            None,
            1e-5,
        )
        .unwrap();
        let g =
            reference::backward(&x, &r, shape, layout, Some(&w), &f.mean, &f.invstd, true).unwrap();
        let h = 1e-6;
        let central = |xp: &[f64], xm: &[f64], wp: &[f64], wm: &[f64], bp: &[f64], bm: &[f64]| {
            (loss(xp, shape, layout, wp, bp, &r) - loss(xm, shape, layout, wm, bm, &r)) / (2.0 * h)
        };
        for i in 0..d.numel() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = central(&xp, &xm, &w, &w, &b, &b);
            assert!(
                (fd - g.dx[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "seed={seed} dx[{i}]: {fd} vs {}",
                g.dx[i]
            );
        }
        for c in 0..d.c {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[c] += h;
            wm[c] -= h;
            let fd = central(&x, &x, &wp, &wm, &b, &b);
            assert!(
                (fd - g.dweight[c]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "seed={seed} dweight[{c}]"
            );
            let (mut bp, mut bm) = (b.clone(), b.clone());
            bp[c] += h;
            bm[c] -= h;
            let fd = central(&x, &x, &w, &w, &bp, &bm);
            assert!(
                (fd - g.dbias[c]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "seed={seed} dbias[{c}]"
            );
        }
    }
}

/// Ioffe & Szegedy Sec. 3.3: BN(W u) = BN((a W) u), and the gradient w.r.t. a W is 1/a times the gradient
/// w.r.t. W. Checked on the GPU kernels (with eps small against the variance, as the identity needs).
#[test]
fn scale_invariance_on_the_gpu() {
    let seed = seed();
    let mut rng = rng(seed);
    let gpu = gpu();
    let (batch, fan_in, features) = (64, 20, 12);
    let u = f64s(&normal(&mut rng, batch * fan_in, 0.0, 1.0));
    let w = f64s(&normal(&mut rng, features * fan_in, 0.0, 0.5));
    let r = normal(&mut rng, batch * features, 0.0, 1.0);
    let a = 7.5;
    // z = u W^T, (batch, features); dW = dz^T u.
    let matmul = |w: &[f64], scale: f64| -> Vec<f32> {
        let mut z = vec![0.0f32; batch * features];
        for i in 0..batch {
            for j in 0..features {
                let s: f64 = (0..fan_in)
                    .map(|k| u[i * fan_in + k] * w[j * fan_in + k] * scale)
                    .sum();
                z[i * features + j] = s as f32;
            }
        }
        z
    };
    let run = |z: Vec<f32>| -> (Vec<f32>, Vec<f64>) {
        let config = batchnorm::ops::batchnorm::BatchNormConfig {
            eps: 1e-12,
            ..Default::default()
        };
        let mut bn = BatchNorm::new(&gpu, features, config).unwrap();
        let zt = Tensor::from_f32(&gpu, &[batch, features], &z).unwrap();
        let y = bn.forward(&zt, Layout::Nc).unwrap().to_f32().unwrap();
        let dyt = Tensor::from_f32(&gpu, &[batch, features], &r).unwrap();
        let dz = bn
            .backward(&zt, &dyt, Layout::Nc)
            .unwrap()
            .to_f32()
            .unwrap();
        let mut dw = vec![0.0f64; features * fan_in];
        for i in 0..batch {
            for j in 0..features {
                for k in 0..fan_in {
                    dw[j * fan_in + k] += dz[i * features + j] as f64 * u[i * fan_in + k];
                }
            }
        }
        (y, dw)
    };
    let (y1, dw1) = run(matmul(&w, 1.0));
    let (ya, dwa) = run(matmul(&w, a));
    for (p, q) in y1.iter().zip(&ya) {
        assert!(
            (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
            "seed={seed}: BN(Wu) {p} != BN(aWu) {q}"
        );
    }
    let scale = dw1.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    for (g1, ga) in dw1.iter().zip(&dwa) {
        assert!(
            (ga * a - g1).abs() <= 1e-4 * scale,
            "seed={seed}: a * dL/d(aW) = {} but dL/dW = {g1}",
            ga * a
        );
    }
}

/// `cnn::kink_margin` on hand-made inputs: the smallest |ReLU input| and the smallest max-pooling gap,
/// each over its layer's input RMS; exact ties of a window's maximum (ReLU zeros, a bias alone) are not
/// kinks.
#[test]
fn kink_margin_finds_the_nearest_kink() {
    use batchnorm::ops::pool::PoolKind;
    use batchnorm::reference::cnn::{kink_margin, RefLayer};
    let rms = |v: &[f64]| (v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64).sqrt();
    // One 2×2 sample, one channel: ReLU input nearest 0 is -0.25.
    let x = [1.0, -0.25, 2.0, 3.0];
    let relu = [RefLayer::Relu];
    let m = kink_margin(&relu, &[1, 2, 2], &x, 1).unwrap();
    assert!((m - 0.25 / rms(&x)).abs() < 1e-15, "{m}");
    // Max pooling 2×2 over the whole sample: gap 3 - 2.
    let pool = [RefLayer::Pool {
        kind: PoolKind::Max,
        kernel: 2,
        stride: 2,
    }];
    let m = kink_margin(&pool, &[1, 2, 2], &x, 1).unwrap();
    assert!((m - 1.0 / rms(&x)).abs() < 1e-15, "{m}");
    // ReLU then pooling, two samples: the first's window is all ReLU zeros (skipped), the second's gap is
    // 0.5 - 0.125; the ReLU inputs' nearest is 0.125.
    let x2 = [-1.0, -2.0, -0.5, -3.0, 0.5, 0.125, -1.0, -4.0];
    let both = [
        RefLayer::Relu,
        RefLayer::Pool {
            kind: PoolKind::Max,
            kernel: 2,
            stride: 2,
        },
    ];
    let m = kink_margin(&both, &[1, 2, 2], &x2, 2).unwrap();
    let relu_out = [0.0, 0.0, 0.0, 0.0, 0.5, 0.125, 0.0, 0.0];
    let want = (0.125 / rms(&x2)).min(0.375 / rms(&relu_out));
    assert!((m - want).abs() < 1e-15, "{m} vs {want}");
    // An exact tie of the maximum (2, 2) counts the gap to the next smaller value, 2 - 1.
    let tied = [2.0, 1.0, 2.0, 0.5];
    let m = kink_margin(&pool, &[1, 2, 2], &tied, 1).unwrap();
    assert!((m - 1.0 / rms(&tied)).abs() < 1e-15, "{m}");
    // Average pooling has no kink.
    let avg = [RefLayer::Pool {
        kind: PoolKind::Avg,
        kernel: 2,
        stride: 2,
    }];
    assert_eq!(kink_margin(&avg, &[1, 2, 2], &x, 1).unwrap(), f64::INFINITY);
}
