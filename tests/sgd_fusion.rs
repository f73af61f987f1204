//! SGD's update inside the first Linear's dW dispatch (`LinearOp::record_dw_with_sgd`,
//! `Trainer::set_fuse_sgd`): the same bits as the backward followed by SGD's own dispatch, for
//! plain, weight-decayed and Nesterov momentum over several steps and a learning-rate schedule; on
//! CPU devices (where the arenas have their texture mirrors) it replaces the SGD dispatch; where it
//! cannot run (a first Linear whose out_features 4 does not divide, or with an input gradient) the
//! step falls back to SGD's own dispatch.
//!
//! Likewise the head's forward, loss and backward in one dispatch (`LinearOp::record_head_step`,
//! `Trainer::set_fuse_head`) against the head's forward with the loss and its backward apart.
//!
//! Fresh random batches each run (seed printed on failure; BN_TEST_SEED replays one).

mod common;

use std::sync::Arc;

use batchnorm::gpu::Gpu;
use batchnorm::nn::{LayerSpec, MlpConfig, ModelConfig};
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::optim::{LrSchedule, OptimizerConfig};
use batchnorm::train::Trainer;
use common::*;
use rand::Rng;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Everything a run leaves: losses, parameters and running statistics, momentum, gradients, and the
/// schedule's clock.
type RunState = (
    batchnorm::train::TrainStats,
    Vec<(String, Vec<u32>)>,
    Vec<(String, Vec<u32>)>,
    Vec<u32>,
    u64,
);

/// `steps` steps of `config` with `optim` on batches of `n` rows from `seed`, SGD fused or not (and the
/// head in one dispatch or not: `head`), and the labels of the last step's dispatches where the device
/// can profile them.
fn run(
    gpu: &Arc<Gpu>,
    config: &ModelConfig,
    optim: OptimizerConfig,
    (n, steps, seed): (usize, usize, u64),
    fuse: bool,
) -> (RunState, Option<Vec<String>>) {
    run_with(gpu, config, optim, (n, steps, seed), (fuse, true))
}

fn run_with(
    gpu: &Arc<Gpu>,
    config: &ModelConfig,
    optim: OptimizerConfig,
    (n, steps, seed): (usize, usize, u64),
    (fuse, head): (bool, bool),
) -> (RunState, Option<Vec<String>>) {
    let mut t = Trainer::new(gpu, config, optim, n).unwrap();
    t.optim
        .set_schedule(LrSchedule::Cosine {
            total: steps as u64,
            warmup: 1,
        })
        .unwrap();
    t.set_fuse_sgd(fuse);
    t.set_fuse_head(head);
    let mut r = rng(seed);
    let classes = t.model.out_features() as u32;
    let mut labels = None;
    for step in 0..steps {
        let x = normal(&mut r, n * t.model.in_features(), 0.0, 1.0);
        let y: Vec<u32> = (0..n).map(|_| r.random_range(0..classes)).collect();
        // The last step under the dispatch profile (its pipelines all built by then).
        let profile = step + 1 == steps && gpu.start_dispatch_profile(64).is_ok();
        t.train_step(&x, &y).unwrap();
        if profile {
            let times = gpu.finish_dispatch_profile().unwrap();
            labels = Some(times.into_iter().map(|d| d.label).collect());
        }
    }
    let stats = t.take_stats().unwrap();
    let sd = t.model.state_dict().unwrap();
    let named = |ts: Vec<(String, Vec<usize>, Vec<f32>)>| {
        ts.into_iter()
            .map(|(k, _, v)| (k, bits(&v)))
            .collect::<Vec<_>>()
    };
    let momentum = named(t.optim.state(&t.model).unwrap());
    let grads = gpu
        .download::<f32>(&t.model.grads, 0, t.model.arena_len())
        .unwrap();
    let state = (
        stats,
        named(sd.tensors),
        momentum,
        bits(&grads),
        t.optim.steps(),
    );
    (state, labels)
}

#[test]
fn sgd_inside_the_first_dw_is_sgd_apart_to_the_bit() {
    let gpu = own_gpu();
    let seed = seed();
    let cpu = gpu.caps().cpu_device;
    let sgd = |momentum: f32, weight_decay: f32, nesterov: bool| -> OptimizerConfig {
        SgdConfig {
            lr: 0.05,
            momentum,
            weight_decay,
            nesterov,
        }
        .into()
    };
    // Prime batch sizes and one of 1 row beside the MNIST MLP's 60; a first Linear whose dW is not
    // read along M (out_features 6, not a multiple of 4) takes SGD's own dispatch.
    let narrow: ModelConfig = MlpConfig {
        sizes: vec![20, 6, 12, 3],
        ..MlpConfig::ioffe(true, 9)
    }
    .into();
    // A first Linear of 240 weights: its bias sits past 16 values of the arena's alignment padding.
    let padded: ModelConfig = MlpConfig {
        sizes: vec![20, 12, 8, 3],
        ..MlpConfig::ioffe(true, 8)
    }
    .into();
    let cases: [(&str, ModelConfig, OptimizerConfig, usize, bool); 6] = [
        (
            "mlp+bn, momentum",
            MlpConfig::ioffe(true, 1).into(),
            sgd(0.9, 0.0, false),
            60,
            cpu,
        ),
        (
            "mlp, decay",
            MlpConfig::ioffe(false, 2).into(),
            sgd(0.9, 1e-3, false),
            13,
            cpu,
        ),
        (
            "mlp+bn, nesterov",
            MlpConfig::ioffe(true, 3).into(),
            sgd(0.8, 1e-4, true),
            7,
            cpu,
        ),
        (
            "mlp+bn, plain",
            MlpConfig::ioffe(true, 4).into(),
            sgd(0.0, 0.0, false),
            31,
            cpu,
        ),
        ("padded bias", padded, sgd(0.9, 1e-3, true), 11, cpu),
        (
            "narrow first layer",
            narrow,
            sgd(0.9, 1e-3, false),
            5,
            false,
        ),
    ];
    for (what, config, optim, n, fuses) in cases {
        let (fused, fused_labels) = run(&gpu, &config, optim, (n, 4, seed), true);
        let (apart, apart_labels) = run(&gpu, &config, optim, (n, 4, seed), false);
        assert_eq!(fused.0, apart.0, "{what}: losses (seed {seed})");
        assert_eq!(fused.1, apart.1, "{what}: parameters (seed {seed})");
        assert_eq!(fused.2, apart.2, "{what}: momentum (seed {seed})");
        assert_eq!(fused.3, apart.3, "{what}: gradients (seed {seed})");
        assert_eq!((fused.4, apart.4), (4, 4), "{what}: the schedule's clock");
        if let (Some(fused), Some(apart)) = (fused_labels, apart_labels) {
            let has = |labels: &[String], l: &str| labels.iter().any(|x| x == l);
            assert!(has(&apart, "sgd.step"), "{what}: {apart:?}");
            assert_eq!(
                has(&fused, "linear.matmul dW + sgd"),
                fuses,
                "{what}: {fused:?}"
            );
            assert_eq!(has(&fused, "sgd.step"), !fuses, "{what}: {fused:?}");
            assert_eq!(
                fused.len() + usize::from(fuses),
                apart.len(),
                "{what}: one dispatch fewer where it fuses"
            );
        }
    }
}

/// A network whose input has a gradient (a BatchNorm first, so the first Linear has a dx and its
/// parameters are not the arena's first) keeps SGD's own dispatch and trains as before.
#[test]
fn a_first_linear_with_an_input_gradient_keeps_sgd_apart() {
    let gpu = own_gpu();
    let seed = seed();
    let config = ModelConfig::Layers {
        input_shape: vec![16],
        specs: vec![
            LayerSpec::BatchNorm,
            LayerSpec::Linear { out_features: 8 },
            LayerSpec::Sigmoid,
            LayerSpec::Linear { out_features: 4 },
        ],
        init: None,
        seed: 5,
    };
    let optim: OptimizerConfig = SgdConfig::default().into();
    let (fused, labels) = run(&gpu, &config, optim, (6, 3, seed), true);
    let (apart, _) = run(&gpu, &config, optim, (6, 3, seed), false);
    assert_eq!(fused.1, apart.1, "parameters (seed {seed})");
    assert_eq!(fused.2, apart.2, "momentum (seed {seed})");
    assert_eq!(fused.3, apart.3, "gradients (seed {seed})");
    if let Some(labels) = labels {
        assert!(labels.iter().any(|l| l == "sgd.step"), "{labels:?}");
        assert!(
            !labels.iter().any(|l| l == "linear.matmul dW + sgd"),
            "{labels:?}"
        );
    }
}

/// The head's forward, the loss and the head's backward in one dispatch (the default on CPU devices
/// for networks ending `BatchNorm → Sigmoid → Linear`): the same bits as the head with the loss and
/// the head's backward in dispatches of their own, over several steps of momentum SGD, for the MNIST
/// MLP at 60 rows and at prime batches (and 2 rows, the fewest the BatchNorm's backward takes), with
/// SGD fused and apart. Without BN (the network ends `Sigmoid → Linear`), and for a head of 17
/// classes (past the loss's block), the step keeps the head apart.
#[test]
fn the_head_in_one_dispatch_is_the_head_apart_to_the_bit() {
    let gpu = own_gpu();
    let seed = seed();
    let cpu = gpu.caps().cpu_device;
    let optim: OptimizerConfig = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: false,
    }
    .into();
    let wide: ModelConfig = MlpConfig {
        sizes: vec![20, 12, 8, 17],
        ..MlpConfig::ioffe(true, 6)
    }
    .into();
    let cases: [(&str, ModelConfig, usize, bool, bool); 6] = [
        ("mlp+bn", MlpConfig::ioffe(true, 1).into(), 60, true, cpu),
        (
            "mlp+bn, sgd apart",
            MlpConfig::ioffe(true, 2).into(),
            37,
            false,
            cpu,
        ),
        (
            "mlp+bn, 2 rows",
            MlpConfig::ioffe(true, 3).into(),
            2,
            true,
            cpu,
        ),
        (
            "mlp+bn, 13 rows",
            MlpConfig::ioffe(true, 4).into(),
            13,
            true,
            cpu,
        ),
        ("mlp", MlpConfig::ioffe(false, 5).into(), 60, true, false),
        ("17 classes", wide, 11, true, false),
    ];
    for (what, config, n, sgd, fuses) in cases {
        let (one, one_labels) = run_with(&gpu, &config, optim, (n, 3, seed), (sgd, true));
        let (apart, apart_labels) = run_with(&gpu, &config, optim, (n, 3, seed), (sgd, false));
        assert_eq!(one.0, apart.0, "{what}: losses (seed {seed})");
        assert_eq!(one.1, apart.1, "{what}: parameters (seed {seed})");
        assert_eq!(one.2, apart.2, "{what}: momentum (seed {seed})");
        assert_eq!(one.3, apart.3, "{what}: gradients (seed {seed})");
        if let (Some(one), Some(apart)) = (one_labels, apart_labels) {
            let head = "linear.matmul + softmax_xent + dx+dW + batchnorm backward";
            let has = |labels: &[String], l: &str| labels.iter().any(|x| x == l);
            assert!(!has(&apart, head), "{what}: {apart:?}");
            assert_eq!(has(&one, head), fuses, "{what}: {one:?}");
            assert_eq!(
                one.len() + usize::from(fuses),
                apart.len(),
                "{what}: one dispatch fewer where the head runs as one"
            );
        }
    }
}
