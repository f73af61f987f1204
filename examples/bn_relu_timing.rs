//! Times fused against unfused BatchNorm + ReLU in the training engine:
//! `cargo run --release --example bn_relu_timing [rounds] [batch]`.
//!
//! Two measurements, each as the median over `rounds` of host time around submit + wait, the fused and
//! unfused runs interleaved round by round (so a busy shared host slows both alike), after one warm-up
//! each (shader compilation):
//! - one whole training step of the CNN `batchnorm train --model cnn` trains (`CnnConfig::small`:
//!   conv-BN-ReLU twice, pooling, a linear head), SGD with momentum, on random data;
//! - forward + backward of the pair alone, `BatchNorm2d → ReLU` on `[batch, 16, 28, 28]` (the CNN's
//!   first block), where the difference is not diluted by the convolutions.

use std::sync::Arc;
use std::time::Instant;

use batchnorm::gpu::Gpu;
use batchnorm::nn::{CnnConfig, LayerSpec, Sequential};
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::train::Trainer;
use rand::{Rng, SeedableRng};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f(fused)` for both settings, warm-up first, then `rounds` interleaved timed rounds; returns the
/// median milliseconds (fused, unfused).
fn interleaved(rounds: usize, mut f: impl FnMut(bool)) -> (f64, f64) {
    f(true);
    f(false);
    let (mut fused, mut unfused) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (on, times) in [(true, &mut fused), (false, &mut unfused)] {
            let t = Instant::now();
            f(on);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    (median(fused), median(unfused))
}

fn report(what: &str, (fused, unfused): (f64, f64)) {
    println!(
        "{what}: fused {fused:.1} ms, unfused {unfused:.1} ms, fused/unfused {:.3}",
        fused / unfused
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let batch: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(128);
    let gpu = Arc::new(Gpu::new().expect("gpu"));
    println!(
        "adapter: {}; batch {batch}, {rounds} rounds",
        gpu.adapter_info().name
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);

    let config = CnnConfig::small(true, 0);
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let mut t = Trainer::new(&gpu, &config, sgd, batch).expect("trainer");
    let x: Vec<f32> = (0..batch * t.model.in_features())
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10)).collect();
    let step = interleaved(rounds, |on| {
        t.model.set_fuse_bn_relu(on);
        t.train_step(&x, &labels).expect("train step");
        gpu.wait().expect("wait");
    });
    report("CNN training step", step);
    println!(
        "  {:.0} samples/s fused, {:.0} unfused",
        batch as f64 / step.0 * 1e3,
        batch as f64 / step.1 * 1e3
    );

    let mut pair = Sequential::new(
        &gpu,
        &[16, 28, 28],
        &[LayerSpec::BatchNorm, LayerSpec::Relu],
        None,
        0,
        batch,
    )
    .expect("pair");
    let values: Vec<f32> = (0..batch * 16 * 28 * 28)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let bytes = bytemuck::cast_slice(&values);
    gpu.queue.write_buffer(pair.input(), 0, bytes);
    gpu.queue.write_buffer(pair.output_grad(), 0, bytes);
    let fb = interleaved(rounds, |on| {
        pair.set_fuse_bn_relu(on);
        let mut encoder = gpu.encoder("bn relu");
        pair.record_forward(&mut encoder, batch).expect("forward");
        pair.record_backward(&mut encoder, batch).expect("backward");
        gpu.submit_and_wait(encoder).expect("submit");
    });
    report(
        &format!("BatchNorm2d → ReLU forward + backward, [{batch}, 16, 28, 28]"),
        fb,
    );
}
