//! Host memory stays flat over many recorded BatchNorm steps.
//!
//! Regression: with `Params` in a uniform buffer, lavapipe (Mesa 22.x) inlined the uniform values into a
//! shader variant recompiled on every dispatch of the fused forward-train and never released it, about
//! 0.4 MB of host memory per dispatch (`batchnorm train` grew ~1 MB per step). One test in its own binary
//! so that the process RSS measures nothing else.

mod common;

use batchnorm::gpu::storage_usage;
use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, ForwardBuffers, PlanChoice,
};
use batchnorm::tensor::Layout;
use common::*;

/// Resident set size in KiB (Linux), `None` elsewhere.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn batchnorm_training_steps_do_not_grow_host_memory() {
    let gpu = gpu();
    // The MNIST MLP's BatchNorm: NC [60, 100], the fused plan.
    let (n, c) = (60usize, 100usize);
    let op = BatchNormOp::new(
        &gpu,
        &[n, c],
        Layout::Nc,
        BatchNormConfig::default(),
        PlanChoice::Auto,
    )
    .unwrap();
    let tb = (4 * n * c) as u64;
    let cb = 4 * c as u64;
    let mk = |label: &str, bytes: u64| gpu.create_buffer(label, bytes, storage_usage()).unwrap();
    let x = gpu
        .upload("x", &normal(&mut rng(7), n * c, 0.0, 1.0))
        .unwrap();
    let dy = gpu
        .upload("dy", &normal(&mut rng(8), n * c, 0.0, 1.0))
        .unwrap();
    let (y, dx) = (mk("y", tb), mk("dx", tb));
    let weight = gpu.upload("weight", &vec![1.0f32; c]).unwrap();
    let bias = mk("bias", cb);
    let running_mean = mk("running_mean", cb);
    let running_var = gpu.upload("running_var", &vec![1.0f32; c]).unwrap();
    let (saved, dweight, dbias) = (mk("saved", 2 * cb), mk("dweight", cb), mk("dbias", cb));
    let at = |buffer, offset| BufferRef { buffer, offset };
    let fwd = ForwardBuffers {
        x: at(&x, 0),
        y: at(&y, 0),
        weight: Some(at(&weight, 0)),
        bias: Some(at(&bias, 0)),
        running_mean: Some(at(&running_mean, 0)),
        running_var: Some(at(&running_var, 0)),
        saved: at(&saved, 0),
    };
    let bwd = BackwardBuffers {
        x: at(&x, 0),
        dy: at(&dy, 0),
        dx: at(&dx, 0),
        weight: Some(at(&weight, 0)),
        saved: at(&saved, 0),
        dweight: Some(at(&dweight, 0)),
        dbias: Some(at(&dbias, 0)),
    };
    let built = gpu.pipelines_built();
    let step = |i: usize| {
        // One submission per step, waited on every 50 as `batchnorm train` does.
        let mut encoder = gpu.encoder("step");
        op.record_forward_train(&mut encoder, &fwd, Some(0.1))
            .unwrap();
        op.record_backward(&mut encoder, &bwd, true).unwrap();
        gpu.queue.submit([encoder.finish()]);
        if i % 50 == 49 {
            gpu.wait().unwrap();
        }
    };
    for i in 0..50 {
        step(i);
    }
    gpu.wait().unwrap();
    let built_warm = gpu.pipelines_built();
    let Some(before) = rss_kib() else {
        eprintln!("no /proc/self/status: RSS check skipped");
        return;
    };
    let steps = 300;
    for i in 0..steps {
        step(i);
    }
    gpu.wait().unwrap();
    let after = rss_kib().unwrap();
    assert_eq!(
        gpu.pipelines_built(),
        built_warm,
        "pipelines recompiled per step"
    );
    assert!(built_warm >= built);
    // The leak was ~115 MiB over these 300 steps; allow allocator noise.
    let grown = after.saturating_sub(before);
    assert!(
        grown < 24 * 1024,
        "host RSS grew {grown} KiB over {steps} BatchNorm training steps ({before} -> {after} KiB)"
    );
}
