//! The experiments' measurements: the probe kernels against f64 on fresh random vectors (outputs
//! poisoned), and the ICS and landscape metrics on a tiny MLP against the f64 reference network.
//!
//! Tolerances: axpy, max |gpu − ref| / (1 + |ref|) <= 1e-6; diff_stats (f32 sums of up to 1e5 terms),
//! relative 1e-4 of each sum (Σ(a−b)² relative to Σa² + Σb²). Metrics on the tiny MLP (f32 against f64
//! through two forward/backward passes): gradient norms and l2 differences within 1e-4 of ‖G‖, cosines
//! within 1e-5, losses relative 1e-5.

mod common;

use batchnorm::nn::{Init, Layer, MlpConfig};
use batchnorm::ops::probe::{DiffStats, ProbeOp, DIFF_STATS_LEN};
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::reference::batchnorm::RunningStats;
use batchnorm::reference::mlp::{self, Block};
use batchnorm::reference::probe as reference;
use batchnorm::train::Trainer;
use common::*;
use rand::Rng;

#[test]
fn axpy_and_diff_stats_match_reference() {
    let gpu = gpu();
    let mut rng = rng(seed());
    for len in [1usize, 7, 256, 1031, 100_003] {
        let a = normal(&mut rng, len, 0.5, 2.0);
        let b = normal(&mut rng, len, -0.1, 1.0);
        let alpha: f32 = rng.random_range(-3.0..3.0);
        let op = ProbeOp::new(&gpu, len).unwrap();
        let (ba, bb) = (gpu.upload("a", &a).unwrap(), gpu.upload("b", &b).unwrap());
        let out = gpu.upload("out", &vec![f32::NAN; len]).unwrap();
        let stats = gpu.upload("stats", &[f32::NAN; DIFF_STATS_LEN]).unwrap();
        let mut enc = gpu.encoder("t");
        op.record_axpy(&mut enc, (&ba).into(), alpha, (&bb).into(), (&out).into())
            .unwrap();
        op.record_diff_stats(&mut enc, (&ba).into(), (&bb).into(), (&stats).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let got = gpu.download::<f32>(&out, 0, len).unwrap();
        let want = reference::axpy(&f64s(&a), alpha as f64, &f64s(&b));
        let e = max_rel_err(&got, &want);
        assert!(e <= 1e-6, "axpy len {len}: {e}");
        let s = gpu.download::<f32>(&stats, 0, DIFF_STATS_LEN).unwrap();
        let r = reference::diff_stats(&f64s(&a), &f64s(&b));
        let scale = [r[2] + r[3], r[2].sqrt() * r[3].sqrt(), r[2], r[3]];
        for k in 0..4 {
            let e = (s[k] as f64 - r[k]).abs() / scale[k];
            assert!(
                e <= 1e-4,
                "diff_stats[{k}] len {len}: got {} want {} ({e})",
                s[k],
                r[k]
            );
        }
        let d = DiffStats::from_slice(&s);
        assert!((d.cosine() - r[1] / (r[2] * r[3]).sqrt()).abs() < 1e-4);
    }
}

#[test]
fn probe_errors_are_typed() {
    let gpu = gpu();
    assert!(ProbeOp::new(&gpu, 0)
        .unwrap_err()
        .to_string()
        .contains("at least 1"));
    let op = ProbeOp::new(&gpu, 100).unwrap();
    let small = gpu.upload("small", &[0.0f32; 10]).unwrap();
    let ok = gpu.upload("ok", &[0.0f32; 100]).unwrap();
    let mut enc = gpu.encoder("t");
    let e = op
        .record_axpy(&mut enc, (&small).into(), 1.0, (&ok).into(), (&ok).into())
        .unwrap_err();
    assert!(e.to_string().contains("probe a"), "{e}");
    let e = op
        .record_axpy(&mut enc, (&ok).into(), f32::NAN, (&ok).into(), (&ok).into())
        .unwrap_err();
    assert!(e.to_string().contains("finite"), "{e}");
    // diff_stats sums in one workgroup: past 256 · 60 000 values it would loop past lavapipe's limit
    // and stop short (wrong sums past ~16.8M values); refused on a CPU device.
    if gpu.caps().cpu_device {
        let big = ProbeOp::new(&gpu, 256 * 60_000 + 1).unwrap();
        let e = big
            .record_diff_stats(&mut enc, (&ok).into(), (&ok).into(), (&ok).into())
            .unwrap_err();
        assert!(
            matches!(e, batchnorm::Error::LimitExceeded { .. })
                && e.to_string().contains("diff_stats"),
            "{e}"
        );
    }
}

#[test]
fn percentile_is_numpy_linear() {
    let v = [4.0, 1.0, 3.0, 2.0];
    assert_eq!(reference::percentile(&v, 0.0), 1.0);
    assert_eq!(reference::percentile(&v, 100.0), 4.0);
    assert!((reference::percentile(&v, 15.0) - 1.45).abs() < 1e-12);
    assert!((reference::percentile(&v, 50.0) - 2.5).abs() < 1e-12);
    assert!(reference::percentile(&[], 50.0).is_nan());
}

/// The reference network with the trainer's current parameters.
fn reference_blocks(t: &Trainer) -> Vec<Block> {
    let sd = t.model.state_dict().unwrap();
    let get = |k: String| f64s(sd.get(&k).unwrap());
    let layers = &t.model.layers;
    let mut blocks = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if let Layer::Linear(l) = layer {
            let bn = match layers.get(i + 1) {
                Some(Layer::BatchNorm { .. }) => Some((
                    get(format!("{}.weight", i + 1)),
                    get(format!("{}.bias", i + 1)),
                    RunningStats::new(l.out_features),
                )),
                _ => None,
            };
            blocks.push(Block {
                weight: get(format!("{i}.weight")),
                bias: get(format!("{i}.bias")),
                bn,
            });
        }
    }
    blocks
}

/// Loss and gradient (per parameter, slot order) of the reference network: one plain SGD step with lr 1
/// on a copy moves each parameter by exactly minus its gradient.
fn reference_gradient(blocks: &[Block], x: &[f64], y: &[u32]) -> (f64, Vec<Vec<f64>>) {
    let mut after = blocks.to_vec();
    let params = |b: &[Block]| -> Vec<Vec<f64>> {
        b.iter()
            .flat_map(|k| {
                let mut v = vec![k.weight.clone(), k.bias.clone()];
                if let Some((w, bb, _)) = &k.bn {
                    v.push(w.clone());
                    v.push(bb.clone());
                }
                v
            })
            .collect()
    };
    let before = params(blocks);
    let mut momentum: Vec<Vec<f64>> = before.iter().map(|p| vec![0.0; p.len()]).collect();
    let sgd = mlp::Sgd {
        lr: 1.0,
        momentum: 0.0,
        weight_decay: 0.0,
        nesterov: false,
    };
    let loss = mlp::train_step(&mut after, &mut momentum, x, y, sgd).unwrap();
    let grads = before
        .iter()
        .zip(params(&after))
        .map(|(p, q)| p.iter().zip(&q).map(|(a, b)| a - b).collect())
        .collect();
    (loss, grads)
}

fn set_params(blocks: &mut [Block], values: &[Vec<f64>]) {
    let mut k = 0;
    for b in blocks.iter_mut() {
        b.weight = values[k].clone();
        b.bias = values[k + 1].clone();
        k += 2;
        if let Some((w, bb, _)) = &mut b.bn {
            *w = values[k].clone();
            *bb = values[k + 1].clone();
            k += 2;
        }
    }
}

fn tiny(bn: bool, seed: u64) -> (Trainer, Vec<f32>, Vec<u32>) {
    let gpu = gpu();
    let n = 13;
    let config = MlpConfig {
        sizes: vec![11, 7, 5, 3],
        bn,
        init: Init::Gaussian { std: 0.5 },
        seed,
    };
    let t = Trainer::new(&gpu, &config, SgdConfig::default(), n).unwrap();
    let mut r = rng(seed ^ 0x5eed);
    let x = normal(&mut r, n * 11, 0.0, 1.0);
    let y: Vec<u32> = (0..n).map(|_| r.random_range(0..3)).collect();
    (t, x, y)
}

fn l2(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (l2(a, &vec![0.0; a.len()]) * l2(b, &vec![0.0; b.len()]))
}

/// `ics`: G' of each Linear weight after the earlier layers' step, against the reference network.
fn ics_metric_matches_reference(bn: bool) {
    let seed = seed();
    let (mut t, x, y) = tiny(bn, seed);
    let blocks = reference_blocks(&t);
    let (xs, lr) = (f64s(&x), 0.3f32);
    let before = t.snapshot().unwrap();
    let prober = t.prober().unwrap();
    t.probe_gradient(&x, &y).unwrap();
    t.probe_set_base(&prober).unwrap();
    let (_, g) = reference_gradient(&blocks, &xs, &y);
    let params: Vec<Vec<f64>> = t
        .model
        .slots()
        .iter()
        .map(|s| f64s(before.get(&s.name).unwrap()))
        .collect();
    let slots = t.model.slots().to_vec();
    let layer_of: Vec<usize> = slots
        .iter()
        .map(|s| s.name.split('.').next().unwrap().parse().unwrap())
        .collect();
    let mut checked = 0;
    for (j, s) in slots.iter().enumerate() {
        if !s.name.ends_with(".weight") || !matches!(t.model.layers[layer_of[j]], Layer::Linear(_))
        {
            continue;
        }
        let layer = layer_of[j];
        t.probe_step(&prober, -lr, |k| layer_of[k] < layer).unwrap();
        t.probe_gradient(&x, &y).unwrap();
        let d = t.probe_grad_diff(&prober, Some(j)).unwrap();
        // Reference: earlier slots stepped by -lr*G, the rest as they were.
        let stepped: Vec<Vec<f64>> = params
            .iter()
            .zip(&g)
            .enumerate()
            .map(|(k, (p, gk))| {
                if layer_of[k] < layer {
                    p.iter().zip(gk).map(|(a, b)| a - lr as f64 * b).collect()
                } else {
                    p.clone()
                }
            })
            .collect();
        let mut moved = blocks.clone();
        set_params(&mut moved, &stepped);
        let (_, g2) = reference_gradient(&moved, &xs, &y);
        let norm = l2(&g[j], &vec![0.0; g[j].len()]);
        let (want_l2, want_cos) = (l2(&g[j], &g2[j]), cos(&g2[j], &g[j]));
        assert!(
            (d.diff_norm() - want_l2).abs() <= 1e-4 * norm,
            "{} l2 {} vs {want_l2}",
            s.name,
            d.diff_norm()
        );
        assert!(
            (d.cosine() - want_cos).abs() <= 1e-5,
            "{} cos {} vs {want_cos}",
            s.name,
            d.cosine()
        );
        assert!(
            (d.b_sq.sqrt() - norm).abs() <= 1e-4 * norm,
            "{} |G|",
            s.name
        );
        if layer > 0 {
            assert!(
                want_l2 > 1e-3 * norm,
                "the earlier layers' step must change G ({want_l2})"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 3);
    t.restore_snapshot(&before).unwrap();
    assert_eq!(
        t.snapshot().unwrap(),
        before,
        "probes leave the model as it was"
    );
}

#[test]
fn ics_metric_with_bn() {
    ics_metric_matches_reference(true);
}

#[test]
fn ics_metric_without_bn() {
    ics_metric_matches_reference(false);
}

/// `landscape`: loss and gradient change at w − η·g against the reference network.
#[test]
fn landscape_metrics_match_reference() {
    for bn in [true, false] {
        let seed = seed();
        let (mut t, x, y) = tiny(bn, seed);
        let blocks = reference_blocks(&t);
        let xs = f64s(&x);
        let before = t.snapshot().unwrap();
        let prober = t.prober().unwrap();
        let loss0 = t.probe_gradient(&x, &y).unwrap();
        t.probe_set_base(&prober).unwrap();
        let (want0, g) = reference_gradient(&blocks, &xs, &y);
        assert!(
            (loss0 - want0).abs() <= 1e-5 * want0.abs().max(1.0),
            "loss {loss0} vs {want0}"
        );
        let params: Vec<Vec<f64>> = t
            .model
            .slots()
            .iter()
            .map(|s| f64s(before.get(&s.name).unwrap()))
            .collect();
        let gnorm = g.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
        for eta in [0.05f32, 0.4] {
            t.probe_step(&prober, -eta, |_| true).unwrap();
            let loss = t.probe_gradient(&x, &y).unwrap();
            let d = t.probe_grad_diff(&prober, None).unwrap();
            let stepped: Vec<Vec<f64>> = params
                .iter()
                .zip(&g)
                .map(|(p, gk)| p.iter().zip(gk).map(|(a, b)| a - eta as f64 * b).collect())
                .collect();
            let mut moved = blocks.clone();
            set_params(&mut moved, &stepped);
            let (want_loss, g2) = reference_gradient(&moved, &xs, &y);
            let want_diff = g
                .iter()
                .flatten()
                .zip(g2.iter().flatten())
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "bn {bn} eta {eta}: loss {loss} vs {want_loss}"
            );
            assert!(
                (d.diff_norm() - want_diff).abs() <= 1e-4 * gnorm,
                "bn {bn} eta {eta}: {} vs {want_diff}",
                d.diff_norm()
            );
            assert!(want_loss != want0, "the step moves the loss");
        }
        t.restore_snapshot(&before).unwrap();
        assert_eq!(t.snapshot().unwrap(), before);
    }
}
