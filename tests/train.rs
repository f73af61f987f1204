//! Whole training steps of Ioffe's MLP on the GPU against the f64 reference step, a short training run
//! whose loss falls, and checkpoint round trips that resume exactly (with Dropout's and Noise's random streams too).
//!
//! Tolerances (f32 on the GPU against f64): the loss, relative 1e-5; every parameter and running
//! statistic after the updates, max |gpu − ref| / (1 + |ref|) <= 2e-5.

mod common;

use batchnorm::data::{self, Batcher, DatasetKind, Normalization};
use batchnorm::nn::{Layer, LayerSpec, MlpConfig, ModelConfig};
use batchnorm::ops::noise::NoiseConfig;
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::reference::batchnorm::RunningStats;
use batchnorm::reference::mlp::{self, Block};
use batchnorm::train::{checkpoint, Trainer, RNG_STEPS_KEY};
use common::*;
use rand::Rng;

fn reference_blocks(t: &Trainer) -> Vec<Block> {
    let sd = t.model.state_dict().unwrap();
    let get = |k: String| f64s(sd.get(&k).unwrap());
    let mut blocks = Vec::new();
    let layers = &t.model.layers;
    for (i, layer) in layers.iter().enumerate() {
        if let Layer::Linear(l) = layer {
            let bn = match layers.get(i + 1) {
                Some(Layer::BatchNorm { .. }) => {
                    let mut rs = RunningStats::new(l.out_features);
                    rs.mean = get(format!("{}.running_mean", i + 1));
                    rs.var = get(format!("{}.running_var", i + 1));
                    Some((
                        get(format!("{}.weight", i + 1)),
                        get(format!("{}.bias", i + 1)),
                        rs,
                    ))
                }
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

fn whole_steps_match_reference(bn: bool, fuse_linear_bn: bool) {
    whole_steps_match_reference_on(&gpu(), bn, fuse_linear_bn);
}

fn whole_steps_match_reference_on(
    gpu: &std::sync::Arc<batchnorm::gpu::Gpu>,
    bn: bool,
    fuse_linear_bn: bool,
) {
    let seed = seed();
    let (n, steps) = (60, 2);
    let sgd = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: false,
    };
    let mut t = Trainer::new(gpu, &MlpConfig::ioffe(bn, seed), sgd, n).unwrap();
    t.model.set_fuse_linear_bn(fuse_linear_bn);
    t.set_fuse_loss(fuse_linear_bn);
    let mut blocks = reference_blocks(&t);
    let mut momentum: Vec<Vec<f64>> = t.model.slots().iter().map(|s| vec![0.0; s.len()]).collect();
    let mut r = rng(seed);
    for step in 0..steps {
        let x = uniform(&mut r, n * 784, 0.0, 1.0);
        let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..10)).collect();
        t.train_step(&x, &labels).unwrap();
        let got = t.take_stats().unwrap().last_loss;
        let opt = mlp::Sgd {
            lr: sgd.lr as f64,
            momentum: sgd.momentum as f64,
            weight_decay: sgd.weight_decay as f64,
            nesterov: sgd.nesterov,
        };
        let want = mlp::train_step(&mut blocks, &mut momentum, &f64s(&x), &labels, opt).unwrap();
        let rel = (got - want).abs() / want.abs();
        assert!(
            rel <= 1e-5,
            "bn={bn} fused={fuse_linear_bn} step {step}: loss {got} vs {want} (seed {seed})"
        );
    }
    let sd = t.model.state_dict().unwrap();
    let layers = &t.model.layers;
    let mut b = 0;
    for (i, layer) in layers.iter().enumerate() {
        if let Layer::Linear(_) = layer {
            let block = &blocks[b];
            let mut pairs = vec![
                (format!("{i}.weight"), &block.weight),
                (format!("{i}.bias"), &block.bias),
            ];
            if let Some((w, bb, rs)) = &block.bn {
                let j = i + 1;
                pairs.push((format!("{j}.weight"), w));
                pairs.push((format!("{j}.bias"), bb));
                pairs.push((format!("{j}.running_mean"), &rs.mean));
                pairs.push((format!("{j}.running_var"), &rs.var));
            }
            for (key, want) in pairs {
                let err = max_rel_err(sd.get(&key).unwrap(), want);
                assert!(
                    err <= 2e-5,
                    "bn={bn} fused={fuse_linear_bn} {key} after {steps} steps: error {err:e} (seed {seed})"
                );
            }
            b += 1;
        }
    }
    if bn {
        assert_eq!(sd.counters[0].1, steps as i64, "num_batches_tracked");
    }
    // The fused run did run fused (where the adapter has the subgroup kernels): the head took the loss.
    let subgroups = batchnorm::ops::linear::MatmulKernel::subgroup_available(gpu);
    if fuse_linear_bn && subgroups {
        let mut enc = gpu.encoder("check");
        let stats = gpu.upload("stats", &[0.0f32; 4]).unwrap();
        let labels = gpu.upload("labels", &vec![0u32; n]).unwrap();
        let fused = t
            .model
            .record_forward_with_loss(&mut enc, n, (&labels).into(), (&stats).into())
            .unwrap();
        assert!(fused, "bn={bn}: the head and the loss ran as one dispatch");
    }
}

/// Each Linear and its BatchNorm, and the head and the loss, in one dispatch (the default)...
#[test]
fn mlp_with_bn_steps_match_reference() {
    whole_steps_match_reference(true, true);
}

/// ... and apart.
#[test]
fn mlp_with_bn_apart_steps_match_reference() {
    whole_steps_match_reference(true, false);
}

/// The MLP on a caller's device opened with `DeviceDescriptor::default()` (8 storage buffers per stage,
/// no subgroups: BatchNorm's parameters as a uniform, the products without subgroups). Before: "Too many
/// bindings of type StorageBuffers" at the first BatchNorm.
#[test]
fn mlp_steps_on_a_webgpu_default_device() {
    let gpu = webgpu_defaults_gpu();
    whole_steps_match_reference_on(&gpu, true, true);
    whole_steps_match_reference_on(&gpu, true, false);
}

#[test]
fn mlp_without_bn_steps_match_reference() {
    whole_steps_match_reference(false, true);
}

fn mnist_subset(n: usize) -> data::Dataset {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let mut d = data::load(DatasetKind::Mnist, &dir).unwrap();
    d.train.truncate(n);
    d.test.truncate(1000);
    d
}

#[test]
fn short_run_loss_decreases_and_resume_is_exact() {
    let gpu = gpu();
    let d = mnist_subset(3000);
    let norm = Normalization::Unit;
    let seed = 7;
    let mut batcher = Batcher::new(d.train.len(), 60, seed).unwrap();
    let mut t = Trainer::new(
        &gpu,
        &MlpConfig::ioffe(true, seed),
        SgdConfig::default(),
        1000,
    )
    .unwrap();
    let mut windows = Vec::new();
    for step in 0..200 {
        t.train_step_on(&d.train, batcher.batch(step), norm)
            .unwrap();
        if (step + 1) % 25 == 0 {
            windows.push(t.take_stats().unwrap().mean_loss);
        }
    }
    let (first, last) = (windows[0], *windows.last().unwrap());
    assert!(
        last < 0.5 * first && last.is_finite(),
        "loss did not fall: windows {windows:?}"
    );
    let (_, acc) = t.evaluate(&d.test, norm).unwrap();
    assert!(acc > 0.8, "test accuracy {acc} after 200 steps");

    // Checkpoint, continue 5 steps, and compare with a fresh trainer resumed from the file.
    let dir = ScratchDir::new("train");
    let path = dir.join("ckpt.safetensors");
    checkpoint::save(&path, &t.checkpoint(seed, Default::default()).unwrap()).unwrap();
    let ckpt = checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.step, 200);
    assert!(ckpt.model.get("0.weight").is_some() && ckpt.model.get("1.running_var").is_some());
    let mut resumed = Trainer::new(
        &gpu,
        &MlpConfig::ioffe(true, 999),
        SgdConfig::default(),
        1000,
    )
    .unwrap();
    resumed.restore(&ckpt).unwrap();
    let mut b2 = Batcher::new(d.train.len(), 60, ckpt.seed).unwrap();
    for step in 200..205 {
        t.train_step_on(&d.train, batcher.batch(step), norm)
            .unwrap();
        resumed
            .train_step_on(&d.train, b2.batch(step), norm)
            .unwrap();
    }
    let (a, b) = (t.take_stats().unwrap(), resumed.take_stats().unwrap());
    assert_eq!(a, b, "a resumed run must continue with the same losses");
    assert_eq!(
        t.model.state_dict().unwrap(),
        resumed.model.state_dict().unwrap()
    );
}

#[test]
fn nan_never_overwrites_a_checkpoint() {
    let gpu = gpu();
    let mut t = Trainer::new(&gpu, &MlpConfig::ioffe(false, 1), SgdConfig::default(), 60).unwrap();
    let x = vec![f32::NAN; 60 * 784];
    t.train_step(&x, &[0; 60]).unwrap();
    assert!(t.take_stats().unwrap().last_loss.is_nan());
    let dir = ScratchDir::new("nan");
    let path = dir.join("ckpt.safetensors");
    std::fs::write(&path, b"good").unwrap();
    let err = checkpoint::save(&path, &t.checkpoint(1, Default::default()).unwrap()).unwrap_err();
    assert!(err.to_string().contains("refusing"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"good");
}

/// A model with Dropout and Noise resumes with the draws an uninterrupted run makes: the random streams'
/// positions travel in the checkpoint's metadata (`rng_steps`), so the losses after the resume are equal.
#[test]
fn dropout_and_noise_resume_is_exact() {
    let gpu = gpu();
    let seed = seed();
    let model = ModelConfig::Layers {
        input_shape: vec![20],
        specs: vec![
            LayerSpec::Linear { out_features: 16 },
            LayerSpec::Relu,
            LayerSpec::Dropout { p: 0.5 },
            LayerSpec::Linear { out_features: 4 },
            LayerSpec::Noise(NoiseConfig::default()),
        ],
        init: None,
        seed,
    };
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    let mut r = rng(seed);
    let batches: Vec<(Vec<f32>, Vec<u32>)> = (0..6)
        .map(|_| {
            let x = normal(&mut r, 8 * 20, 0.0, 1.0);
            let y = (0..8).map(|_| r.random_range(0..4)).collect();
            (x, y)
        })
        .collect();
    let mut t = Trainer::new(&gpu, &model, sgd, 8).unwrap();
    for (x, y) in &batches[..3] {
        t.train_step(x, y).unwrap();
    }
    t.take_stats().unwrap();
    let ckpt = t.checkpoint(seed, Default::default()).unwrap();
    assert_eq!(
        ckpt.meta.get(RNG_STEPS_KEY).map(String::as_str),
        Some("2:3,4:3"),
        "layers 2 (Dropout) and 4 (Noise) drew 3 times"
    );
    let mut resumed = Trainer::new(&gpu, &model, sgd, 8).unwrap();
    resumed.restore(&ckpt).unwrap();
    for (x, y) in &batches[3..] {
        t.train_step(x, y).unwrap();
        resumed.train_step(x, y).unwrap();
        let (a, b) = (t.take_stats().unwrap(), resumed.take_stats().unwrap());
        assert_eq!(a, b, "losses after the resume (seed {seed})");
    }
    assert_eq!(
        t.model.state_dict().unwrap(),
        resumed.model.state_dict().unwrap()
    );

    // Metadata naming a layer without a random stream is refused with the reason.
    let mut bad = ckpt.clone();
    bad.meta.insert(RNG_STEPS_KEY.into(), "1:3".into());
    let err = resumed.restore(&bad).unwrap_err().to_string();
    assert!(
        err.contains("layer 1") && err.contains("neither Dropout nor Noise"),
        "{err}"
    );
}

/// After the first steps, a training step makes no bind groups (nor buffers): every dispatch finds the
/// bind group of its pipeline and buffer ranges in the device's cache. Its own device: the counter is
/// per device, and the other tests of this file dispatch on the shared one in parallel.
#[test]
fn steady_steps_make_no_bind_groups() {
    let gpu = std::sync::Arc::new(batchnorm::gpu::Gpu::new().unwrap());
    let n = 60;
    let mut t = Trainer::new(&gpu, &MlpConfig::ioffe(true, 3), SgdConfig::default(), n).unwrap();
    let mut r = rng(seed());
    let x = uniform(&mut r, n * 784, 0.0, 1.0);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    for _ in 0..3 {
        t.train_step(&x, &labels).unwrap();
    }
    t.take_stats().unwrap();
    let made = gpu.bind_groups_made();
    assert!(made > 0, "the steps dispatched through the cache");
    for _ in 0..20 {
        t.train_step(&x, &labels).unwrap();
    }
    t.take_stats().unwrap();
    assert_eq!(
        gpu.bind_groups_made(),
        made,
        "20 more steps made bind groups"
    );
}

/// On CPU devices the first Linear reads its input, the Linears' forwards their weights, their
/// backwards the gradients of their outputs, and SGD its parameters and gradients through
/// textures (`Sequential::set_x_texels`, `set_params_texels`, `set_dy_texels`,
/// `set_grads_texels`): training steps and an evaluation forward of another batch size give the same
/// bits with them and without them, on fresh random inputs, for Ioffe's MLP with and without BN at a
/// batch whose input ends inside a texture row (37 × 784 values), for a small MLP whose whole batch is
/// less than one row (7 × 12), and for one whose hidden widths 4 does not divide (dy read a value at a
/// time).
#[test]
fn texel_mirrors_give_the_buffers_bits() {
    let gpu = gpu();
    let seed = seed();
    let configs = [
        (MlpConfig::ioffe(true, seed), 37, 784),
        (MlpConfig::ioffe(false, seed), 37, 784),
        (
            MlpConfig {
                sizes: vec![12, 8, 4],
                ..MlpConfig::ioffe(true, seed)
            },
            7,
            12,
        ),
        (
            MlpConfig {
                sizes: vec![12, 10, 6, 3],
                ..MlpConfig::ioffe(true, seed)
            },
            13,
            12,
        ),
    ];
    let sgd = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: true,
    };
    for (config, n, inputs) in configs {
        let classes = *config.sizes.last().unwrap() as u32;
        let mut runs = Vec::new();
        for texture in [true, false] {
            let mut t = Trainer::new(&gpu, &config, sgd, n).unwrap();
            if texture {
                // Where they apply: a CPU device planning as one (not under BN_TEST_GPU_PLANS).
                let cpu = gpu.caps().cpu_device;
                assert_eq!(
                    (
                        t.model.x_texels(),
                        t.model.grads_texels().is_some(),
                        t.model.params_texels().is_some(),
                        t.model.dy_texels()
                    ),
                    (cpu, cpu, cpu, cpu),
                    "sizes {:?}: the textures are on by default on CPU devices",
                    config.sizes
                );
                // And every Linear's mirrors cover their operands (a mirror that does not is passed
                // over for storage, which this comparison alone would not notice): x where 4 divides
                // its width.
                for (i, reads) in t.model.linear_texel_reads(n).unwrap() {
                    let Layer::Linear(l) = &t.model.layers[i] else {
                        panic!("layer {i} is a Linear")
                    };
                    let x = l.in_features % 4 == 0;
                    assert_eq!(
                        reads,
                        [cpu && x, cpu && x, cpu],
                        "sizes {:?}: layer {i} reads x, W, dy through textures",
                        config.sizes
                    );
                }
            } else {
                t.model.set_x_texels(false);
                t.model.set_grads_texels(false);
                t.model.set_params_texels(false);
                t.model.set_dy_texels(false);
                assert!(!t.model.x_texels() && t.model.grads_texels().is_none());
                assert!(t.model.params_texels().is_none() && !t.model.dy_texels());
            }
            let mut r = rng(seed);
            let mut losses = Vec::new();
            for _ in 0..3 {
                let x = uniform(&mut r, n * inputs, -1.0, 2.0);
                let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..classes)).collect();
                t.train_step(&x, &labels).unwrap();
                losses.push(t.take_stats().unwrap().last_loss.to_bits());
            }
            // An evaluation forward of fewer rows, over an output poisoned first.
            let m = n - 2;
            let x = uniform(&mut r, m * inputs, -1.0, 2.0);
            gpu.queue
                .write_buffer(t.model.input(), 0, bytemuck::cast_slice(&x));
            let poison = vec![f32::NAN; m * classes as usize];
            gpu.queue
                .write_buffer(t.model.output(), 0, bytemuck::cast_slice(&poison));
            t.model.train(false);
            let mut enc = gpu.encoder("eval");
            t.model.record_forward(&mut enc, m).unwrap();
            gpu.queue.submit([enc.finish()]);
            let out: Vec<f32> = gpu
                .download(t.model.output(), 0, m * classes as usize)
                .unwrap();
            assert!(
                out.iter().all(|v| v.is_finite()),
                "the eval forward wrote its output"
            );
            let sd = t.model.state_dict().unwrap();
            let params: Vec<(String, Vec<u32>)> = sd
                .tensors
                .iter()
                .map(|(k, _, v)| (k.clone(), v.iter().map(|f| f.to_bits()).collect()))
                .collect();
            let out: Vec<u32> = out.iter().map(|f| f.to_bits()).collect();
            runs.push((losses, params, out));
        }
        let (with, without) = (&runs[0], &runs[1]);
        assert_eq!(
            with.0, without.0,
            "sizes {:?}: losses (seed {seed})",
            config.sizes
        );
        for ((key, a), (_, b)) in with.1.iter().zip(&without.1) {
            assert_eq!(a, b, "sizes {:?}: {key} (seed {seed})", config.sizes);
        }
        assert_eq!(
            with.2, without.2,
            "sizes {:?}: eval output (seed {seed})",
            config.sizes
        );
    }
}
