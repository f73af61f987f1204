//! Where a training step of Ioffe's MNIST MLP (784-100-100-100-10, BN, batch 60) spends its time:
//! `cargo run --release --example step_profile [steps]`. Prints, per step, the host time to record the
//! step's encoder (no submit), then the device-synchronised time of: the forward alone, the optimizer
//! update alone, and the whole step (`Trainer::train_step`, steps submitted back to back, one wait at
//! the end, as `batchnorm train` runs them), each dispatch's device time (a dispatch profile: the step
//! then records a compute pass per op, so that each timestamp pair brackets one dispatch; its median
//! and fastest over `PROFILE_STEPS` steps, 40 by default), and an A/B
//! in one run of the step against itself with the textures (the first Linear's input, SGD's gradients,
//! the forwards' weights), the Linear+BatchNorm and head+loss fusions, the head's forward and backward
//! in one dispatch, SGD inside the first Linear's dW dispatch and the single compute pass turned off
//! (`AB_ONLY=0,1` runs the listed variants only; `HEAD_APART=1` profiles the step with the head's
//! forward and backward apart). Random inputs; the numbers are what matters, not the loss.

use std::sync::Arc;
use std::time::Instant;

use batchnorm::gpu::Gpu;
use batchnorm::nn::MlpConfig;
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::train::Trainer;
use rand::{Rng, SeedableRng};

const BATCH: usize = 60;

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let gpu = Arc::new(Gpu::new().expect("gpu"));
    let config = MlpConfig::ioffe(true, 0);
    let mut t = Trainer::new(&gpu, &config, SgdConfig::default(), BATCH).expect("trainer");
    t.set_fuse_head(std::env::var("HEAD_APART").is_err());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let x: Vec<f32> = (0..BATCH * 784)
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let y: Vec<u32> = (0..BATCH).map(|_| rng.random_range(0..10)).collect();
    // Warm-up: pipelines compile on first use.
    for _ in 0..20 {
        t.train_step(&x, &y).expect("step");
    }
    t.take_stats().expect("stats");

    let per_step = |secs: f64| secs / steps as f64 * 1e3;
    let mut t0 = Instant::now();
    // Once untimed: the ops recorded apart use pipelines a training step does not (the head's
    // forward and its backward run as one dispatch there), built on first use.
    for round in 0..=steps {
        if round == 1 {
            t0 = Instant::now();
        }
        let mut e = gpu.encoder("record only");
        t.model.record_forward(&mut e, BATCH).expect("forward");
        t.model.record_backward(&mut e, BATCH).expect("backward");
        t.optim.record_step(&mut e, &t.model).expect("optimizer");
        drop(e.finish());
    }
    let record = per_step(t0.elapsed().as_secs_f64());

    let time = |t: &mut Trainer, what: &dyn Fn(&mut Trainer, &mut wgpu::CommandEncoder)| {
        // Once untimed, for the pipelines it builds on first use.
        let mut e = gpu.encoder("warm-up");
        what(t, &mut e);
        gpu.queue.submit([e.finish()]);
        gpu.wait().expect("wait");
        let t0 = Instant::now();
        for _ in 0..steps {
            let mut e = gpu.encoder("profile");
            what(t, &mut e);
            gpu.queue.submit([e.finish()]);
        }
        gpu.wait().expect("wait");
        per_step(t0.elapsed().as_secs_f64())
    };
    let forward = time(&mut t, &|t, e| {
        t.model.record_forward(e, BATCH).expect("fwd")
    });
    let update = time(&mut t, &|t, e| {
        t.optim.record_step(e, &t.model).expect("opt")
    });
    let t0 = Instant::now();
    for _ in 0..steps {
        t.train_step(&x, &y).expect("step");
    }
    t.take_stats().expect("stats");
    let whole = per_step(t0.elapsed().as_secs_f64());
    println!("adapter: {}", gpu.adapter_info().name);
    println!("per step of batch {BATCH}, mean over {steps}:");
    println!("  record forward + backward + update (host, no submit) {record:8.3} ms");
    println!("  forward only (submitted)                             {forward:8.3} ms");
    println!("  optimizer update only (submitted)                    {update:8.3} ms");
    println!(
        "  whole train_step                                     {whole:8.3} ms ({:.0} samples/s)",
        BATCH as f64 / whole * 1e3
    );

    // Per dispatch: device timestamps around each one, over `profiled` steps submitted back to back.
    let in_passes = wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
    if gpu.features().contains(in_passes) && steps > 0 {
        // PROFILE_STEPS overrides the 40 profiled steps (the profile holds 2 048 dispatches); the
        // fastest of many is the figure a noisy host moves least.
        let profiled = std::env::var("PROFILE_STEPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(40usize)
            .min(steps);
        gpu.start_dispatch_profile(2048).expect("profile");
        for _ in 0..profiled {
            t.train_step(&x, &y).expect("step");
        }
        t.take_stats().expect("stats");
        let times = gpu.finish_dispatch_profile().expect("profile");
        let per_step = times.len() / profiled;
        if per_step == 0 {
            return;
        }
        println!(
            "dispatches per step: {per_step}; median (and fastest) device time of each over {profiled} steps:"
        );
        let mut total = 0.0;
        for i in 0..per_step {
            let mut ms: Vec<f64> = (0..times.len() / per_step)
                .map(|s| times[s * per_step + i].ms)
                .collect();
            ms.sort_by(f64::total_cmp);
            let median = ms[ms.len() / 2];
            total += median;
            println!(
                "  {i:3} {:<40} {median:8.3} ms ({:.3})",
                times[i].label, ms[0]
            );
        }
        println!(
            "  sum of the dispatches' medians {total:.3} ms of the step's {whole:.3} ms (the rest: \
             between dispatches)"
        );
    }
    ab(&mut t, &x, &y);
}

/// The step as built against it with its input texture, its fusions and its single pass turned off in
/// turn, alternated in rounds of 50 steps in this one process (the host's load drifts; alternation
/// shares it between them).
fn ab(t: &mut Trainer, x: &[f32], y: &[u32]) {
    // AB_ROUNDS / AB_STEPS override the rounds and their steps (a noisy host wants more, shorter ones).
    let env = |key: &str, default: usize| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, steps) = (env("AB_ROUNDS", 8), env("AB_STEPS", 50));
    // (name, one pass, fusions, through textures: the first Linear's input, SGD's gradients, the
    // weights (forwards and SGD), the Linears' dy (backwards))
    let variants = [
        (
            "one pass, Linear+BatchNorm and the head fused (as built)",
            true,
            true,
            (true, true, true, true),
        ),
        (
            "the same, SGD in a dispatch of its own",
            true,
            true,
            (true, true, true, true),
        ),
        (
            "the same, the head's forward and backward apart",
            true,
            true,
            (true, true, true, true),
        ),
        (
            "the same, dy from the buffers",
            true,
            true,
            (true, true, true, false),
        ),
        (
            "the same, weights from the arena",
            true,
            true,
            (true, true, false, true),
        ),
        (
            "the same, gradients from the buffer",
            true,
            true,
            (true, false, true, true),
        ),
        (
            "the same, all four from buffers",
            true,
            true,
            (false, false, false, false),
        ),
        (
            "one pass, each apart",
            true,
            false,
            (false, false, false, false),
        ),
        (
            "a pass per op, each apart",
            false,
            false,
            (false, false, false, false),
        ),
    ];
    // AB_ONLY picks variants by index, in its order, repeats allowed ("1,0,1,0": two against the
    // build, each order once, to see the first slot's handicap).
    let variants: Vec<_> = match std::env::var("AB_ONLY") {
        Ok(only) => only
            .split(',')
            .filter_map(|i| i.trim().parse::<usize>().ok())
            .filter_map(|i| variants.get(i).copied())
            .collect(),
        Err(_) => variants.to_vec(),
    };
    let mut ms = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (v, &(name, one_pass, fused, (input, grads, weights, dy))) in
            variants.iter().enumerate()
        {
            t.set_fuse_sgd(!name.contains("SGD in a dispatch"));
            t.set_fuse_head(!name.contains("head's forward and backward apart"));
            t.set_one_pass(one_pass);
            t.model.set_fuse_linear_bn(fused);
            t.set_fuse_loss(fused);
            t.model.set_x_texels(input);
            t.model.set_grads_texels(grads);
            t.model.set_params_texels(weights);
            t.model.set_dy_texels(dy);
            let t0 = Instant::now();
            for _ in 0..steps {
                t.train_step(x, y).expect("step");
            }
            t.take_stats().expect("stats");
            ms[v].push(t0.elapsed().as_secs_f64() / steps as f64 * 1e3);
        }
    }
    t.set_fuse_sgd(true);
    t.set_fuse_head(std::env::var("HEAD_APART").is_err());
    t.set_one_pass(true);
    t.model.set_fuse_linear_bn(true);
    t.set_fuse_loss(true);
    t.model.set_x_texels(true);
    t.model.set_grads_texels(true);
    t.model.set_params_texels(true);
    t.model.set_dy_texels(true);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("A/B, {rounds} alternated rounds of {steps} steps: median ms per step, and the median per-round ratio to the first");
    for (v, (name, ..)) in variants.iter().enumerate() {
        let ratio = median(ms[v].iter().zip(&ms[0]).map(|(a, b)| a / b).collect());
        let step = median(ms[v].clone());
        println!(
            "  {name:<58} {step:8.3} ms ({:.0} samples/s)  x{ratio:.3}",
            BATCH as f64 / step * 1e3
        );
    }
}
