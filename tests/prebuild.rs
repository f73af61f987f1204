//! The first training step's pipelines built up front on every core (`Trainer::prebuild_pipelines`,
//! `Gpu::gather_pipelines`, `Gpu::build_pipelines`): what it builds is exactly what a step then asks
//! for (none built during the step), and it leaves the trainer as it was (a run with it and one
//! without end in the same bits, BatchNorm's `num_batches_tracked` and Adam's step included).
//!
//! Fresh random batches each run (seed printed on failure; BN_TEST_SEED replays one). The counts need
//! a device of their own: the tests of a binary share `gpu()`, and its pipeline count moves with them.

mod common;

use batchnorm::nn::{CnnConfig, Layer, MlpConfig, ModelConfig};
use batchnorm::ops::adam::AdamConfig;
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::optim::OptimizerConfig;
use batchnorm::train::Trainer;
use common::*;
use rand::Rng;

fn sgd() -> OptimizerConfig {
    SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: false,
    }
    .into()
}

fn adam() -> OptimizerConfig {
    AdamConfig::default().into()
}

/// `steps` random batches of `n` rows for `t`'s model: inputs and labels.
fn batches(t: &Trainer, n: usize, steps: usize, seed: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut r = rng(seed);
    let classes = t.model.out_features() as u32;
    (0..steps)
        .map(|_| {
            let x = normal(&mut r, n * t.model.in_features(), 0.0, 1.0);
            let y = (0..n).map(|_| r.random_range(0..classes)).collect();
            (x, y)
        })
        .collect()
}

#[test]
fn prebuild_builds_every_pipeline_a_step_uses() {
    let gpu = own_gpu();
    let seed = seed();
    let cases: [(&str, ModelConfig, OptimizerConfig, usize); 4] = [
        ("mlp+bn sgd", MlpConfig::ioffe(true, 1).into(), sgd(), 60),
        ("mlp sgd", MlpConfig::ioffe(false, 2).into(), sgd(), 13),
        ("mlp+bn adam", MlpConfig::ioffe(true, 3).into(), adam(), 7),
        ("cnn+bn sgd", CnnConfig::small(true, 4).into(), sgd(), 5),
    ];
    for (i, (what, config, optim, n)) in cases.into_iter().enumerate() {
        // A capacity past the batch, as a trainer that evaluates in larger batches has.
        let mut t = Trainer::new(&gpu, &config, optim, 2 * n + 3).unwrap();
        let before = gpu.pipelines_built();
        let count = t.prebuild_pipelines(n).unwrap();
        assert_eq!(
            gpu.pipelines_built() - before,
            count,
            "{what}: built what it gathered"
        );
        if i == 0 {
            assert!(count > 0, "{what}: a fresh device has pipelines to build");
        }
        assert_eq!(t.prebuild_pipelines(n).unwrap(), 0, "{what}: nothing left");
        let built = gpu.pipelines_built();
        for (x, y) in batches(&t, n, 2, seed ^ i as u64) {
            t.train_step(&x, &y).unwrap();
        }
        assert_eq!(
            gpu.pipelines_built(),
            built,
            "{what}: the steps built no pipeline of their own (seed {seed})"
        );
        let stats = t.take_stats().unwrap();
        assert!(
            stats.mean_loss.is_finite(),
            "{what}: the steps ran (seed {seed})"
        );
    }
}

/// Three steps with the prebuild (the default) and three without, on fresh trainers of the same seed:
/// the same bits everywhere a run leaves state.
#[test]
fn prebuild_leaves_the_trainer_as_it_was() {
    let gpu = gpu();
    let seed = seed();
    let cases: [(&str, ModelConfig, OptimizerConfig, usize); 2] = [
        ("mlp+bn adam", MlpConfig::ioffe(true, 5).into(), adam(), 24),
        ("cnn+bn sgd", CnnConfig::small(true, 6).into(), sgd(), 6),
    ];
    for (what, config, optim, n) in cases {
        let run = |prebuild: bool| {
            let mut t = Trainer::new(&gpu, &config, optim, n).unwrap();
            t.set_prebuild(prebuild);
            for (x, y) in batches(&t, n, 3, seed) {
                t.train_step(&x, &y).unwrap();
            }
            let stats = t.take_stats().unwrap();
            let sd = t.model.state_dict().unwrap();
            let optim = t.optim.state(&t.model).unwrap();
            (stats, sd, optim, t.step)
        };
        let (with, without) = (run(true), run(false));
        assert_eq!(with.0, without.0, "{what}: losses (seed {seed})");
        assert_eq!(with.3, without.3, "{what}: steps");
        assert_eq!(
            with.1.counters, without.1.counters,
            "{what}: num_batches_tracked"
        );
        assert!(
            with.1.counters.iter().all(|(_, c)| *c == 3),
            "{what}: three batches tracked: {:?}",
            with.1.counters
        );
        let bits = |ts: &[(String, Vec<usize>, Vec<f32>)]| {
            ts.iter()
                .map(|(k, _, v)| (k.clone(), v.iter().map(|f| f.to_bits()).collect()))
                .collect::<Vec<(String, Vec<u32>)>>()
        };
        assert_eq!(
            bits(&with.1.tensors),
            bits(&without.1.tensors),
            "{what}: parameters and running statistics (seed {seed})"
        );
        assert_eq!(
            bits(&with.2),
            bits(&without.2),
            "{what}: optimizer state (seed {seed})"
        );
    }
}

/// A BatchNorm set apart from a fresh one (ghost batches here) records other kernels than the twin
/// would: the prebuild then builds nothing, and the step still trains.
#[test]
fn prebuild_stands_aside_for_changed_batchnorms() {
    let gpu = own_gpu(); // where a prebuild that ran would build something
    let n = 16;
    let mut t = Trainer::new(&gpu, &MlpConfig::ioffe(true, 7), sgd(), n).unwrap();
    let bn_layer = (0..t.model.layers.len())
        .find(|&i| matches!(t.model.layers[i], Layer::BatchNorm { .. }))
        .unwrap();
    if let Layer::BatchNorm { bn, .. } = &mut t.model.layers[bn_layer] {
        bn.set_virtual_batch_size(Some(4)).unwrap();
    }
    assert_eq!(t.prebuild_pipelines(n).unwrap(), 0);
    for (x, y) in batches(&t, n, 1, seed()) {
        t.train_step(&x, &y).unwrap();
    }
    assert!(t.take_stats().unwrap().mean_loss.is_finite());

    // A capacity past what one texture holds leaves the trainer's input without a mirror, where the
    // twin (capacity n) has one: the two would record other kernels (CPU devices: only they mirror).
    let gpu = own_gpu();
    if gpu.caps().cpu_device {
        let rows = gpu.limits().max_texture_dimension_2d as usize;
        let capacity = rows * 64 * 4 / 784 + 64;
        let mut t = Trainer::new(&gpu, &MlpConfig::ioffe(true, 7), sgd(), capacity).unwrap();
        let reads = t.model.linear_texel_reads(n).unwrap();
        assert!(
            !reads[0].1[0],
            "the first Linear's input has no mirror: {reads:?}"
        );
        assert_eq!(t.prebuild_pipelines(n).unwrap(), 0);
    }
}

/// What the twin's size guard counts: both arenas, and per row at least the input, the output and its
/// gradient, growing linearly with the rows.
#[test]
fn buffer_bytes_counts_arenas_and_rows() {
    let t = Trainer::new(&gpu(), &MlpConfig::ioffe(true, 8), sgd(), 50).unwrap();
    let m = &t.model;
    let arenas = m.params.size() + m.grads.size();
    assert_eq!(m.buffer_bytes(0), arenas);
    assert!(arenas >= 2 * 4 * m.num_params() as u64);
    let per_row = m.buffer_bytes(1) - arenas;
    assert!(
        per_row >= 4 * (784 + 2 * 10),
        "{per_row} bytes a row: less than the input, output and its gradient"
    );
    assert_eq!(m.buffer_bytes(60), arenas + 60 * per_row);
}

/// The first evaluation's pipelines likewise: after `prebuild_evaluation` for the split's length (its
/// batch sizes: a whole batch of the capacity and the remainder), an evaluation builds none, and gives
/// what one without the prebuild gives.
#[test]
fn prebuild_builds_every_pipeline_an_evaluation_uses() {
    let gpu = own_gpu();
    let seed = seed();
    let mut r = rng(seed);
    let (cap, len) = (40, 107);
    let split = batchnorm::data::Split {
        pixels: (0..len * 784).map(|_| r.random_range(0..=255u8)).collect(),
        labels: (0..len).map(|_| r.random_range(0..10u8)).collect(),
        features: 784,
        classes: 10,
        shape: [1, 28, 28],
    };
    let norm = batchnorm::data::Normalization::Unit;
    let evaluate = |prebuild: bool| {
        let mut t = Trainer::new(&gpu, &MlpConfig::ioffe(true, 9), sgd(), cap).unwrap();
        t.set_prebuild(prebuild);
        let before = gpu.pipelines_built();
        let count = t.prebuild_evaluation(len).unwrap();
        assert_eq!(gpu.pipelines_built() - before, count);
        let built = gpu.pipelines_built();
        let result = t.evaluate(&split, norm).unwrap();
        assert_eq!(
            gpu.pipelines_built(),
            built,
            "the evaluation built no pipeline of its own (seed {seed})"
        );
        (count, result)
    };
    let (count, with) = evaluate(true);
    assert!(count > 0, "a fresh device has pipelines to build");
    let (again, without) = evaluate(false);
    assert_eq!(again, 0, "built already");
    assert_eq!(with, without, "loss and accuracy (seed {seed})");
    assert!(with.0.is_finite());
}
