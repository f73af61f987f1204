//! The SGD update kernel against the f64 reference over several steps (plain, momentum, weight decay,
//! Nesterov). Fresh random inputs, seed printed on failure, updated values compared with
//! max |gpu − ref| / (1 + |ref|) <= 1e-6 after 3 steps.

mod common;

use batchnorm::ops::sgd::{SgdConfig, SgdOp};
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
        for &len in &[1usize, 255, 257, 100_003] {
            let p0 = normal(&mut r, len, 0.0, 1.0);
            let pb = gpu.upload("p", &p0).unwrap();
            let bb = gpu.upload("buf", &vec![0.0f32; len]).unwrap();
            let gb = gpu.upload("g", &vec![0.0f32; len]).unwrap();
            let op = SgdOp::new(&gpu, len, config).unwrap();
            let mut p = f64s(&p0);
            let mut buf = vec![0.0; len];
            for _ in 0..3 {
                let g = normal(&mut r, len, 0.0, 1.0);
                gpu.queue.write_buffer(&gb, 0, bytemuck::cast_slice(&g));
                let mut enc = gpu.encoder("test");
                op.record_step(&mut enc, (&pb).into(), (&gb).into(), (&bb).into())
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
                "param {config:?} len {len}: {ep:e} (seed {seed})"
            );
            assert!(
                eb <= 1e-6,
                "momentum {config:?} len {len}: {eb:e} (seed {seed})"
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
