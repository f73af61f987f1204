//! The SGD update kernel against the f64 reference over several steps (plain, momentum, weight decay,
//! Nesterov), the learning-rate schedules, and the whole-model [`Optimizer`] (SGD and Adam) applying a
//! schedule and restoring its saved state. Fresh random inputs, seed printed on failure, updated values
//! compared with max |gpu − ref| / (1 + |ref|) <= 1e-6 after 3 to 5 steps.

mod common;

use batchnorm::nn::{Init, MlpConfig, Sequential};
use batchnorm::ops::adam::AdamConfig;
use batchnorm::ops::sgd::{SgdConfig, SgdOp, SgdTexels};
use batchnorm::ops::{texel_buffer_bytes, Texels};
use batchnorm::optim::{LrSchedule, Optimizer, OptimizerConfig};
use batchnorm::reference::adam as adam_ref;
use batchnorm::reference::sgd as reference;
use common::*;

#[test]
fn sgd_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    let configs = [
        SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            nesterov: false,
        },
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        },
        SgdConfig {
            lr: 0.01,
            momentum: 0.5,
            weight_decay: 1e-2,
            nesterov: true,
        },
    ];
    for config in configs {
        // Lengths in whole vec4s run the vec4 kernel, the others the scalar one.
        // `texels` picks the operands (param, grad, momentum) read through a texture mirror
        // (`Texels`, as a model's and its optimizer's arenas on a CPU device): the vec4 kernel reads
        // them by textureLoad after a copy; the scalar one ignores them.
        let cases = [1usize, 255, 257, 100_003, 4, 1024, 100_004, 388];
        let mirrored = [
            [false; 3],
            [false, true, false],
            [true, true, true],
            [true, false, true],
        ];
        for (len, texels) in cases.iter().flat_map(|&l| mirrored.map(|m| (l, m))) {
            // Whole texture rows, as a mirrored buffer needs; poisoned with NaN past len (never read).
            let padded = |values: &[f32]| {
                let mut v = values.to_vec();
                v.resize(texel_buffer_bytes(len) as usize / 4, f32::NAN);
                v
            };
            let p0 = normal(&mut r, len, 0.0, 1.0);
            let pb = gpu.upload("p", &padded(&p0)).unwrap();
            let bb = gpu.upload("buf", &padded(&vec![0.0f32; len])).unwrap();
            let gb = gpu.upload("g", &padded(&[])).unwrap();
            let mirrors: Vec<Option<Texels>> = [&pb, &gb, &bb]
                .iter()
                .zip(texels)
                .map(|(b, on)| on.then(|| Texels::new(&gpu, "texels", b, len).unwrap()))
                .collect();
            let op = SgdOp::new(&gpu, len, config).unwrap();
            let mut p = f64s(&p0);
            let mut buf = vec![0.0; len];
            for _ in 0..3 {
                let g = normal(&mut r, len, 0.0, 1.0);
                gpu.queue.write_buffer(&gb, 0, bytemuck::cast_slice(&g));
                let mut enc = gpu.encoder("test");
                let texels = SgdTexels {
                    param: mirrors[0].as_ref(),
                    grad: mirrors[1].as_ref(),
                    buf: mirrors[2].as_ref(),
                };
                op.record_step_via(&mut enc, (&pb).into(), (&gb).into(), (&bb).into(), texels)
                    .unwrap();
                gpu.submit_and_wait(enc).unwrap();
                let c = config;
                reference::step(
                    &mut p,
                    &f64s(&g),
                    &mut buf,
                    c.lr as f64,
                    c.momentum as f64,
                    c.weight_decay as f64,
                    c.nesterov,
                );
            }
            let got: Vec<f32> = gpu.download(&pb, 0, len).unwrap();
            let gbuf: Vec<f32> = gpu.download(&bb, 0, len).unwrap();
            let (ep, eb) = (max_rel_err(&got, &p), max_rel_err(&gbuf, &buf));
            assert!(
                ep <= 1e-6,
                "param {config:?} len {len} texels {texels:?}: {ep:e} (seed {seed})"
            );
            assert!(
                eb <= 1e-6,
                "momentum {config:?} len {len} texels {texels:?}: {eb:e} (seed {seed})"
            );
        }
    }
}

#[test]
fn sgd_rejects_bad_config() {
    let bad = SgdConfig {
        lr: -1.0,
        ..Default::default()
    };
    assert!(SgdOp::new(&gpu(), 4, bad).is_err());
    let nesterov = SgdConfig {
        momentum: 0.0,
        nesterov: true,
        ..Default::default()
    };
    assert!(nesterov.validate().is_err());
}

/// Learning-rate schedules against their definitions (PyTorch's StepLR, and CosineAnnealingLR with
/// eta_min 0 after a linear warmup), and their parameter checks.
#[test]
fn schedules_follow_their_definitions() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(LrSchedule::Constant.lr_at(0.3, 12345), 0.3));
    let step = LrSchedule::Step {
        every: 3,
        gamma: 0.5,
    };
    let got: Vec<f64> = (0..8).map(|s| step.lr_at(1.0, s)).collect();
    assert_eq!(got, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]);
    let cos = LrSchedule::Cosine {
        total: 10,
        warmup: 0,
    };
    assert!(close(cos.lr_at(2.0, 0), 2.0));
    assert!(close(cos.lr_at(2.0, 5), 1.0));
    assert!(close(cos.lr_at(2.0, 10), 0.0) && close(cos.lr_at(2.0, 99), 0.0));
    assert!(close(
        cos.lr_at(2.0, 3),
        1.0 + (0.3 * std::f64::consts::PI).cos()
    ));
    let warm = LrSchedule::Cosine {
        total: 12,
        warmup: 4,
    };
    let got: Vec<f64> = (0..5).map(|s| warm.lr_at(1.0, s)).collect();
    assert_eq!(got, [0.25, 0.5, 0.75, 1.0, 1.0]);
    assert!(close(warm.lr_at(1.0, 8), 0.5));
    for bad in [
        LrSchedule::Step {
            every: 0,
            gamma: 0.5,
        },
        LrSchedule::Step {
            every: 2,
            gamma: f64::NAN,
        },
        LrSchedule::Cosine {
            total: 5,
            warmup: 5,
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// The whole-model optimizer (SGD, then Adam) with a schedule: every step's parameters against the f64
/// references run at the scheduled rate; then its saved state restored into a fresh optimizer continues
/// exactly as the original. Same tolerance as above (1e-6, relative).
#[test]
fn optimizer_applies_its_schedule_and_restores_its_state() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    let mlp = MlpConfig {
        sizes: vec![7, 5, 3],
        bn: false,
        init: Init::Gaussian { std: 0.5 },
        seed,
    };
    let configs: [(OptimizerConfig, LrSchedule); 2] = [
        (
            SgdConfig {
                lr: 0.2,
                momentum: 0.9,
                weight_decay: 1e-3,
                nesterov: true,
            }
            .into(),
            LrSchedule::Step {
                every: 2,
                gamma: 0.5,
            },
        ),
        (
            AdamConfig {
                lr: 0.05,
                ..Default::default()
            }
            .into(),
            LrSchedule::Cosine {
                total: 6,
                warmup: 2,
            },
        ),
    ];
    for (config, schedule) in configs {
        let model = Sequential::mlp(&gpu, &mlp, 4).unwrap();
        let len = model.arena_len();
        let mut opt = Optimizer::new(&gpu, &model, config).unwrap();
        opt.set_schedule(schedule).unwrap();
        let mut p = f64s(&gpu.download::<f32>(&model.params, 0, len).unwrap());
        let (mut s1, mut s2) = (vec![0.0; len], vec![0.0; len]);
        let mut saved = None;
        for step in 0..5u64 {
            if step == 3 {
                saved = Some((
                    opt.state(&model).unwrap(),
                    gpu.download::<f32>(&model.params, 0, len).unwrap(),
                ));
            }
            let g = normal(&mut r, len, 0.0, 1.0);
            gpu.queue
                .write_buffer(&model.grads, 0, bytemuck::cast_slice(&g));
            let lr = schedule.lr_at(config.lr() as f64, step);
            assert_eq!(opt.current_lr(), lr as f32, "{config:?} step {step}");
            let mut enc = gpu.encoder("test");
            opt.record_step(&mut enc, &model).unwrap();
            gpu.submit_and_wait(enc).unwrap();
            match config {
                OptimizerConfig::Sgd(c) => reference::step(
                    &mut p,
                    &f64s(&g),
                    &mut s1,
                    lr,
                    c.momentum as f64,
                    c.weight_decay as f64,
                    c.nesterov,
                ),
                OptimizerConfig::Adam(c) => adam_ref::step(
                    &mut p,
                    &f64s(&g),
                    &mut s1,
                    &mut s2,
                    step + 1,
                    lr,
                    (c.beta1 as f64, c.beta2 as f64),
                    c.eps as f64,
                    c.weight_decay as f64,
                ),
            }
            let got = gpu.download::<f32>(&model.params, 0, len).unwrap();
            let e = max_rel_err(&got, &p);
            assert!(e <= 1e-6, "{config:?} step {step}: {e:e} (seed {seed})");
        }
        // Restore the state saved after 3 steps into a fresh optimizer and redo steps 4 and 5 with the
        // same gradients: the parameters must match the original run's bit for bit.
        let (state, params3) = saved.unwrap();
        let keys: Vec<&str> = state.iter().map(|t| t.0.as_str()).collect();
        let want = match config {
            OptimizerConfig::Sgd(_) => "optimizer.0.weight.momentum_buffer",
            OptimizerConfig::Adam(_) => "optimizer.0.weight.exp_avg_sq",
        };
        assert!(keys.contains(&want), "{keys:?}");
        let first = gpu.download::<f32>(&model.params, 0, len).unwrap();
        let model2 = Sequential::mlp(&gpu, &mlp, 4).unwrap();
        gpu.queue
            .write_buffer(&model2.params, 0, bytemuck::cast_slice(&params3));
        let mut opt2 = Optimizer::new(&gpu, &model2, config).unwrap();
        opt2.set_schedule(schedule).unwrap();
        opt2.load_state(&model2, &state, 3).unwrap();
        assert_eq!(opt2.steps(), 3);
        // Replay: the gradients are not kept, so rerun both from the saved point with new ones.
        let mut opt1 = Optimizer::new(&gpu, &model, config).unwrap();
        opt1.set_schedule(schedule).unwrap();
        opt1.load_state(&model, &state, 3).unwrap();
        gpu.queue
            .write_buffer(&model.params, 0, bytemuck::cast_slice(&params3));
        for _ in 3..5 {
            let g = normal(&mut r, len, 0.0, 1.0);
            for (m, o) in [(&model, &mut opt1), (&model2, &mut opt2)] {
                gpu.queue
                    .write_buffer(&m.grads, 0, bytemuck::cast_slice(&g));
                let mut enc = gpu.encoder("test");
                o.record_step(&mut enc, m).unwrap();
                gpu.submit_and_wait(enc).unwrap();
            }
        }
        let a = gpu.download::<f32>(&model.params, 0, len).unwrap();
        let b = gpu.download::<f32>(&model2.params, 0, len).unwrap();
        assert_eq!(a, b, "{config:?}: restored state diverged (seed {seed})");
        assert_ne!(a, first, "the replay used new gradients");
        // A checkpoint of the other optimizer is refused by name.
        let other = match config {
            OptimizerConfig::Sgd(_) => OptimizerConfig::Adam(AdamConfig::default()),
            OptimizerConfig::Adam(_) => OptimizerConfig::Sgd(SgdConfig::default()),
        };
        let mut wrong = Optimizer::new(&gpu, &model2, other).unwrap();
        let e = wrong
            .load_state(&model2, &state, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is missing"), "{e}");
    }
}

/// `torch.optim.SGD` worked by hand (dampening 0): the first step's buffer is the decayed gradient itself,
/// Nesterov steps along `d + momentum·buf`.
#[test]
fn reference_matches_torch_by_hand() {
    // p = 1, grad 0.5, lr 0.1, momentum 0.9, weight decay 0.1: d = 0.6, buf = 0.6.
    let (mut p, mut buf) = ([1.0], [0.0]);
    reference::step(&mut p, &[0.5], &mut buf, 0.1, 0.9, 0.1, false);
    assert!(
        (p[0] - 0.94).abs() < 1e-12 && (buf[0] - 0.6).abs() < 1e-12,
        "{p:?}"
    );
    let (mut p, mut buf) = ([1.0], [0.0]);
    reference::step(&mut p, &[0.5], &mut buf, 0.1, 0.9, 0.1, true);
    assert!((p[0] - 0.886).abs() < 1e-12, "{p:?}"); // 1 − 0.1·(0.6 + 0.9·0.6)
                                                    // Step 2, grad 0.5: d = 0.5 + 0.1·0.886 = 0.5886, buf = 0.54 + 0.5886 = 1.1286,
                                                    // p = 0.886 − 0.1·(0.5886 + 0.9·1.1286) = 0.725566.
    reference::step(&mut p, &[0.5], &mut buf, 0.1, 0.9, 0.1, true);
    assert!(
        (buf[0] - 1.1286).abs() < 1e-12 && (p[0] - 0.725566).abs() < 1e-12,
        "{p:?}"
    );
}
