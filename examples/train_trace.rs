//! A short training run written down for `scripts/pytorch-train-parity.py` to replay in PyTorch: the
//! initial checkpoint (the state dict under PyTorch's names), the batches, each step's loss as the GPU
//! computed it, and the final checkpoint (weights, running statistics, `num_batches_tracked`, the
//! optimizer's state). Random batches from the seed: x uniform on [0, 1), labels uniform over the 10
//! classes. The model is Ioffe's MLP (784-100-100-100-10, sigmoid, BatchNorm1d) or, with `--cnn`, a small
//! CNN of the `--model cnn` kind on 1×28×28 inputs: conv 1→8, pool, conv 8→16, pool, Linear 784→32,
//! Linear 32→10 (each conv and the hidden Linear followed by [BatchNorm] and ReLU), PyTorch's init.
//!
//! `cargo run --release --example train_trace -- DIR [--cnn] [--steps K] [--batch B] [--no-bn] [--seed S]
//!  [--adam] [--lr LR] [--momentum M] [--weight-decay W] [--nesterov] [--states]`
//!
//! DIR gets `init.safetensors` and `final.safetensors` (as `batchnorm train` writes checkpoints),
//! `trace.safetensors` (`x` [K, B, 784] f32, `y` [K, B] i64, `loss` [K] f64; its metadata holds the
//! settings) and, with `--states`, `state-<k>.safetensors` after each step k = 1..K (so that each step
//! can be replayed from the state the engine had, apart from what earlier steps did).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use batchnorm::gpu::Gpu;
use batchnorm::nn::{CnnConfig, MlpConfig, ModelConfig};
use batchnorm::ops::adam::AdamConfig;
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::optim::OptimizerConfig;
use batchnorm::train::{checkpoint, Trainer};
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

struct Args {
    dir: PathBuf,
    cnn: bool,
    steps: usize,
    batch: usize,
    bn: bool,
    seed: u64,
    adam: bool,
    lr: Option<f32>,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
    states: bool,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        dir: PathBuf::new(),
        cnn: false,
        steps: 20,
        batch: 60,
        bn: true,
        seed: 0,
        adam: false,
        lr: None,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: false,
        states: false,
    };
    let mut dir = None;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| -> Result<f64, String> {
            v.parse::<f64>().map_err(|e| format!("{name} {v}: {e}"))
        };
        match arg.as_str() {
            "--steps" => a.steps = number("--steps", value("--steps")?)? as usize,
            "--batch" => a.batch = number("--batch", value("--batch")?)? as usize,
            "--seed" => a.seed = number("--seed", value("--seed")?)? as u64,
            "--lr" => a.lr = Some(number("--lr", value("--lr")?)? as f32),
            "--momentum" => a.momentum = number("--momentum", value("--momentum")?)? as f32,
            "--weight-decay" => {
                a.weight_decay = number("--weight-decay", value("--weight-decay")?)? as f32
            }
            "--no-bn" => a.bn = false,
            "--cnn" => a.cnn = true,
            "--adam" => a.adam = true,
            "--nesterov" => a.nesterov = true,
            "--states" => a.states = true,
            _ if arg.starts_with("--") => return Err(format!("unknown option {arg}")),
            _ => dir = Some(PathBuf::from(arg)),
        }
    }
    a.dir = dir.ok_or("usage: train_trace DIR [options] (see the file's header)")?;
    if a.steps == 0 || a.batch < 2 {
        return Err("--steps must be >= 1 and --batch >= 2".into());
    }
    Ok(a)
}

fn main() {
    let args = parse().unwrap_or_else(|e| {
        eprintln!("train_trace: {e}");
        std::process::exit(2);
    });
    if let Err(e) = run(&args) {
        eprintln!("train_trace: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.dir)?;
    let gpu = Arc::new(Gpu::new()?);
    let (config, arch): (ModelConfig, String) = if a.cnn {
        let config = CnnConfig {
            stages: vec![vec![8], vec![16]],
            hidden: vec![32],
            ..CnnConfig::small(a.bn, a.seed)
        };
        (config.into(), "cnn-8-16-32".into())
    } else {
        (
            MlpConfig::ioffe(a.bn, a.seed).into(),
            "mlp-784-100-100-100-10".into(),
        )
    };
    let optim: OptimizerConfig = if a.adam {
        AdamConfig {
            lr: a.lr.unwrap_or(1e-3),
            weight_decay: a.weight_decay,
            ..AdamConfig::default()
        }
        .into()
    } else {
        SgdConfig {
            lr: a.lr.unwrap_or(0.1),
            momentum: a.momentum,
            weight_decay: a.weight_decay,
            nesterov: a.nesterov,
        }
        .into()
    };
    let mut trainer = Trainer::new(&gpu, &config, optim, a.batch)?;
    let mut meta = HashMap::new();
    meta.insert(
        "model".to_string(),
        format!("{arch}{}", if a.bn { "-bn" } else { "" }),
    );
    checkpoint::save(
        &a.dir.join("init.safetensors"),
        &trainer.checkpoint(a.seed, meta.clone())?,
    )?;

    // The batches get their own stream, apart from the initialization's.
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 0x0074_7261_6365);
    let (mut xs, mut ys, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    for step in 1..=a.steps {
        let x: Vec<f32> = (0..a.batch * 784)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let y: Vec<u32> = (0..a.batch).map(|_| rng.random_range(0..10)).collect();
        trainer.train_step(&x, &y)?;
        losses.push(trainer.take_stats()?.last_loss);
        xs.extend_from_slice(&x);
        ys.extend(y.iter().map(|&l| i64::from(l)));
        if a.states {
            checkpoint::save(
                &a.dir.join(format!("state-{step}.safetensors")),
                &trainer.checkpoint(a.seed, meta.clone())?,
            )?;
        }
    }
    checkpoint::save(
        &a.dir.join("final.safetensors"),
        &trainer.checkpoint(a.seed, meta)?,
    )?;

    let settings = [
        ("arch", arch),
        ("optimizer", if a.adam { "adam" } else { "sgd" }.to_string()),
        (
            "lr",
            a.lr.unwrap_or(if a.adam { 1e-3 } else { 0.1 }).to_string(),
        ),
        ("momentum", a.momentum.to_string()),
        ("weight_decay", a.weight_decay.to_string()),
        ("nesterov", a.nesterov.to_string()),
        ("bn", a.bn.to_string()),
        ("steps", a.steps.to_string()),
        ("batch", a.batch.to_string()),
    ];
    let (xb, yb, lb): (&[u8], &[u8], &[u8]) = (
        bytemuck::cast_slice(&xs),
        bytemuck::cast_slice(&ys),
        bytemuck::cast_slice(&losses),
    );
    let views = vec![
        (
            "x",
            TensorView::new(Dtype::F32, vec![a.steps, a.batch, 784], xb)?,
        ),
        (
            "y",
            TensorView::new(Dtype::I64, vec![a.steps, a.batch], yb)?,
        ),
        ("loss", TensorView::new(Dtype::F64, vec![a.steps], lb)?),
    ];
    let meta = settings
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    std::fs::write(
        a.dir.join("trace.safetensors"),
        safetensors::serialize(views, Some(meta))?,
    )?;
    println!(
        "{} steps written to {} (losses {:.6} .. {:.6})",
        a.steps,
        a.dir.display(),
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}
