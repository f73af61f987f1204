//! The measurements of `precise-bn` and `batch-size` against a direct f64 reference on a tiny BN MLP
//! (6-5-4-3, fresh random weights, inputs and labels; seed printed in every failure):
//! - PreciseBN evaluation accuracy (`precise_bn_evaluate`): the reference recomputes each BatchNorm's
//!   population statistics (mean, unbiased variance) over the same samples layer by layer, the earlier
//!   layers already using theirs, and classifies the test rows;
//! - mini-batch-statistics evaluation (`Trainer::evaluate_batch_stats`): the reference normalizes each
//!   consecutive run of NBS test rows with its own mean and biased variance.
//!
//! Tolerance: mean cross-entropy losses relative 1e-5 (f32 through three layers against f64); the
//! accuracies agree exactly except on test rows whose two largest reference logits are
//! within 1e-4 (f32 against f64 may rank those differently); each such row may flip the count by one.
//! Both measurements must leave the model's state (parameters, running statistics, counters, ghost and
//! FrozenBN settings) exactly as they found it; and a training run with PreciseBN evaluations must produce
//! exactly the losses and EMA accuracies of one without them.

mod common;

use batchnorm::data::{self, DatasetKind, Normalization, Split};
use batchnorm::experiment::precise_bn::{
    precise_bn_evaluate, run_with_precise_evals, sample_batches,
};
use batchnorm::experiment::{default_sgd, ExperimentModel, Run};
use batchnorm::nn::{Init, Layer, MlpConfig, StateDict};
use batchnorm::train::Trainer;
use common::*;
use rand::Rng;

const SIZES: [usize; 4] = [6, 5, 4, 3];
const EPS: f64 = 1e-5;
const CAPACITY: usize = 20;

fn tiny_trainer(seed: u64) -> Trainer {
    let mlp = MlpConfig {
        sizes: SIZES.to_vec(),
        bn: true,
        init: Init::Gaussian { std: 0.7 },
        seed,
    };
    Trainer::new(&gpu(), &mlp, default_sgd(), CAPACITY).unwrap()
}

fn random_split(r: &mut impl Rng, n: usize) -> Split {
    Split {
        pixels: (0..n * SIZES[0]).map(|_| r.random()).collect(),
        labels: (0..n).map(|_| r.random_range(0..SIZES[3] as u8)).collect(),
        features: SIZES[0],
        classes: SIZES[3],
        shape: [1, 2, 3],
    }
}

/// Per Linear `(weight [out, in], bias, Some((gamma, beta)))` from the state dict.
type RefLayer = (Vec<f64>, Vec<f64>, Option<(Vec<f64>, Vec<f64>)>);

fn reference_layers(sd: &StateDict) -> Vec<RefLayer> {
    let get = |k: String| f64s(sd.get(&k).unwrap());
    // Layer indices of Linear → BatchNorm → Sigmoid blocks: 0, 3, 6 (head).
    (0..SIZES.len() - 1)
        .map(|b| {
            let i = 3 * b;
            let bn = (b + 2 < SIZES.len()).then(|| {
                (
                    get(format!("{}.weight", i + 1)),
                    get(format!("{}.bias", i + 1)),
                )
            });
            (get(format!("{i}.weight")), get(format!("{i}.bias")), bn)
        })
        .collect()
}

fn linear(x: &[f64], w: &[f64], b: &[f64], fan_in: usize) -> Vec<f64> {
    let out = b.len();
    x.chunks(fan_in)
        .flat_map(|row| {
            (0..out)
                .map(move |o| b[o] + (0..fan_in).map(|i| w[o * fan_in + i] * row[i]).sum::<f64>())
        })
        .collect()
}

/// Per-column mean and variance (unbiased or biased) of `rows` of width `c`.
fn column_stats(z: &[f64], c: usize, unbiased: bool) -> (Vec<f64>, Vec<f64>) {
    let n = z.len() / c;
    let mean: Vec<f64> = (0..c)
        .map(|j| z.chunks(c).map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let var = (0..c)
        .map(|j| {
            let ss: f64 = z.chunks(c).map(|r| (r[j] - mean[j]).powi(2)).sum();
            ss / if unbiased { n - 1 } else { n } as f64
        })
        .collect();
    (mean, var)
}

/// Per-channel `(mean, variance)`.
type Stats = (Vec<f64>, Vec<f64>);

fn normalize_sigmoid(z: &mut [f64], c: usize, stats: &Stats, affine: &(Vec<f64>, Vec<f64>)) {
    for row in z.chunks_mut(c) {
        for (j, v) in row.iter_mut().enumerate() {
            let u = (*v - stats.0[j]) / (stats.1[j] + EPS).sqrt() * affine.0[j] + affine.1[j];
            *v = 1.0 / (1.0 + (-u).exp());
        }
    }
}

/// The reference network's logits of `x` with BatchNorm statistics given per hidden layer by `stats`
/// (called with that layer's pre-BN rows).
fn logits(
    layers: &[RefLayer],
    x: &[f64],
    stats: &mut dyn FnMut(usize, &[f64]) -> Stats,
) -> Vec<f64> {
    let mut h = x.to_vec();
    for (b, (w, bias, bn)) in layers.iter().enumerate() {
        let mut z = linear(&h, w, bias, SIZES[b]);
        if let Some(affine) = bn {
            let s = stats(b, &z);
            normalize_sigmoid(&mut z, SIZES[b + 1], &s, affine);
        }
        h = z;
    }
    h
}

/// Mean softmax cross-entropy of `logits` against `labels`.
fn mean_loss(logits: &[f64], labels: &[u32]) -> f64 {
    let c = SIZES[3];
    let total: f64 = logits
        .chunks(c)
        .zip(labels)
        .map(|(row, &l)| {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[l as usize]
        })
        .sum();
    total / labels.len() as f64
}

fn assert_loss(got: f64, want: f64, what: &str) {
    let e = (got - want).abs() / want.abs().max(1e-12);
    println!("{what}: loss gpu {got}, reference {want} (relative error {e:.1e})");
    assert!(e <= 1e-5, "{what}: loss {got} vs reference {want}");
}

/// Accuracy of `logits` against `labels`, and the number of rows whose top two logits are within 1e-4.
fn accuracy(logits: &[f64], labels: &[u32]) -> (f64, usize) {
    let c = SIZES[3];
    let (mut right, mut close) = (0usize, 0usize);
    for (row, &l) in logits.chunks(c).zip(labels) {
        let mut order: Vec<usize> = (0..c).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        right += (order[0] == l as usize) as usize;
        close += (row[order[0]] - row[order[1]] < 1e-4) as usize;
    }
    (right as f64 / labels.len() as f64, close)
}

fn train_a_little(t: &mut Trainer, r: &mut impl Rng) {
    for _ in 0..3 {
        let x = uniform(r, 12 * SIZES[0], 0.0, 1.0);
        let y: Vec<u32> = (0..12)
            .map(|_| r.random_range(0..SIZES[3] as u32))
            .collect();
        t.train_step(&x, &y).unwrap();
    }
}

#[test]
fn precise_bn_evaluate_matches_reference() {
    let seed = seed();
    let mut r = rng(seed);
    let gpu = gpu();
    let mut t = tiny_trainer(r.random_range(0..1 << 40));
    train_a_little(&mut t, &mut r);
    let test = random_split(&mut r, 53);
    let batches: Vec<Vec<f32>> = [16usize, 16, 5]
        .iter()
        .map(|&n| uniform(&mut r, n * SIZES[0], 0.0, 1.0))
        .collect();
    let before = t.snapshot().unwrap();
    let (got_loss, got) = precise_bn_evaluate(&gpu, &mut t, &batches, &test).unwrap();
    assert_eq!(
        t.snapshot().unwrap(),
        before,
        "state restored (seed {seed})"
    );

    let layers = reference_layers(&before);
    let samples: Vec<f64> = batches.iter().flat_map(|b| f64s(b)).collect();
    // Population statistics layer by layer, each over the samples as the earlier (recomputed) layers
    // pass them on.
    let mut population = Vec::new();
    logits(&layers, &samples, &mut |b, z| {
        let s = column_stats(z, SIZES[b + 1], true);
        population.push(s.clone());
        s
    });
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..test.len()).collect();
    test.gather(&all, Normalization::Unit, &mut x, &mut y);
    let out = logits(&layers, &f64s(&x), &mut |b, _| population[b].clone());
    assert_loss(
        got_loss,
        mean_loss(&out, &y),
        &format!("PreciseBN (seed {seed})"),
    );
    let (want, close) = accuracy(&out, &y);
    println!("PreciseBN accuracy: gpu {got}, reference {want} ({close} near-ties)");
    assert!(
        (got - want).abs() <= close as f64 / test.len() as f64 + 1e-9,
        "PreciseBN accuracy {got} vs reference {want} ({close} near-ties; seed {seed})"
    );
}

#[test]
fn minibatch_statistics_accuracy_matches_reference() {
    let seed = seed();
    let mut r = rng(seed);
    let mut t = tiny_trainer(r.random_range(0..1 << 40));
    train_a_little(&mut t, &mut r);
    // A ghost setting in force during training must come back afterwards.
    for l in &mut t.model.layers {
        if let Layer::BatchNorm { bn, .. } = l {
            bn.set_virtual_batch_size(Some(3)).unwrap();
        }
    }
    let test = random_split(&mut r, 47);
    for nbs in [2usize, 5, 16] {
        let before = t.snapshot().unwrap();
        let (got_loss, got) = t
            .evaluate_batch_stats(&test, Normalization::Unit, nbs)
            .unwrap();
        assert_eq!(
            t.snapshot().unwrap(),
            before,
            "state restored (nbs {nbs}, seed {seed})"
        );
        for l in &t.model.layers {
            if let Layer::BatchNorm { bn, .. } = l {
                assert_eq!(bn.virtual_batch_size(), Some(3));
                assert!(bn.updates_running_stats() && bn.is_training());
            }
        }
        let layers = reference_layers(&before);
        let usable = test.len() / nbs * nbs;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let rows: Vec<usize> = (0..usable).collect();
        test.gather(&rows, Normalization::Unit, &mut x, &mut y);
        let xs = f64s(&x);
        let out: Vec<f64> = xs
            .chunks(nbs * SIZES[0])
            .flat_map(|batch| {
                logits(&layers, batch, &mut |b, z| {
                    column_stats(z, SIZES[b + 1], false)
                })
            })
            .collect();
        assert_loss(
            got_loss,
            mean_loss(&out, &y),
            &format!("NBS {nbs} (seed {seed})"),
        );
        let (want, close) = accuracy(&out, &y);
        println!("NBS {nbs}: mini-batch accuracy gpu {got}, reference {want} ({close} near-ties)");
        assert!(
            (got - want).abs() <= close as f64 / usable as f64 + 1e-9,
            "NBS {nbs}: accuracy {got} vs reference {want} ({close} near-ties; seed {seed})"
        );
    }
    assert!(t
        .evaluate_batch_stats(&test, Normalization::Unit, 1)
        .unwrap_err()
        .to_string()
        .contains("2..="));
}

#[test]
fn precise_evals_leave_training_alone() {
    let gpu = gpu();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let mut d = data::load(DatasetKind::Mnist, &dir).unwrap();
    d.train.truncate(2000);
    d.test.truncate(500);
    let run = Run {
        model: ExperimentModel::Mlp,
        bn: true,
        sgd: default_sgd(),
        steps: 24,
        batch_size: 60,
        seed: seed(),
        every: 6,
    };
    let batches = sample_batches(&d.train, 700, 300, run.seed).unwrap();
    let (with, precise) = run_with_precise_evals(&gpu, &d, &run, "with", Some(&batches)).unwrap();
    let (without, none) = run_with_precise_evals(&gpu, &d, &run, "without", None).unwrap();
    assert!(none.is_empty());
    assert_eq!(precise.len(), with.points.len());
    assert!(precise.iter().all(|a| (0.0..=1.0).contains(a)));
    assert_eq!(with.points.len(), 4);
    assert_eq!(
        with.points, without.points,
        "losses and EMA accuracies with and without PreciseBN evals (seed {})",
        run.seed
    );
}
