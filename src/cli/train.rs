//! `batchnorm train`: train a network on the GPU end to end, with a progress line, test accuracy at the
//! end and a run folder (metrics.csv, summary.json, checkpoint.safetensors).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use batchnorm::data::{self, Batcher, DatasetKind, Normalization};
use batchnorm::error::{Error, Result};
use batchnorm::gpu::Gpu;
use batchnorm::io::write_atomically;
use batchnorm::nn::{CnnConfig, Init, MlpConfig, ModelConfig};
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::train::{checkpoint, Trainer};

/// Default steps: Ioffe's 50 000 steps of 60 take too long on a CPU Vulkan driver; this many finish in
/// a few minutes on lavapipe and reach about 97% test accuracy with BN.
const DEFAULT_STEPS: u64 = 3000;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Network: `mlp` (Ioffe & Szegedy's 784-100-100-100-10 sigmoid MLP) or `cnn` (a small VGG-style
    /// network: 3x3 conv-[BN]-ReLU blocks, max pooling, a linear head; input [N, 1, 28, 28]).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// BatchNorm before every hidden nonlinearity (the default).
    #[arg(long, overrides_with = "no_bn")]
    bn: bool,
    /// No BatchNorm (the paper's baseline).
    #[arg(long = "no-bn")]
    no_bn: bool,
    /// Dataset: mnist or fashion-mnist.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Folder with the four IDX files (.gz or plain); default data/<dataset>.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Training steps (total, counting resumed ones).
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 60)]
    batch_size: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Weight initializer: gaussian (std 0.1), gaussian:STD, kaiming or xavier; default gaussian for
    /// the MLP (Ioffe's setting), PyTorch's default (U(±1/sqrt(fan_in))) for the CNN.
    #[arg(long)]
    init: Option<String>,
    /// Seed for initialization and batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on the test set and write the checkpoint every this many steps.
    #[arg(long, default_value_t = 500)]
    eval_every: u64,
    /// Read the loss back (progress line and metrics) every this many steps.
    #[arg(long, default_value_t = 50)]
    log_every: u64,
    /// Continue from this checkpoint (its seed and step; the model settings must match).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run folder; default runs/<model>-<bn|nobn>-<dataset>-seed<seed>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use only the first N training examples (quick runs, tests).
    #[arg(long)]
    train_subset: Option<usize>,
}

struct Run {
    kind: DatasetKind,
    bn: bool,
    model: ModelConfig,
    sgd: SgdConfig,
    dir: PathBuf,
}

fn settings(args: &TrainArgs) -> Result<Run> {
    if args.steps == 0 || args.eval_every == 0 || args.log_every == 0 {
        return Err(Error::config(
            "--steps, --eval-every and --log-every must be at least 1",
        ));
    }
    let kind = DatasetKind::parse(&args.dataset)?;
    let bn = !args.no_bn;
    let sgd = SgdConfig {
        lr: args.lr,
        momentum: args.momentum,
        ..Default::default()
    };
    sgd.validate()?;
    let model = model_config(args, bn)?;
    let dir = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-{}-{}-seed{}",
            args.model,
            if bn { "bn" } else { "nobn" },
            kind.name(),
            args.seed
        ))
    });
    Ok(Run {
        kind,
        bn,
        model,
        sgd,
        dir,
    })
}

/// The network `--model` names, with `--bn/--no-bn`, `--init` and `--seed` applied.
fn model_config(args: &TrainArgs, bn: bool) -> Result<ModelConfig> {
    match args.model.as_str() {
        "mlp" => {
            let mut mlp = MlpConfig::ioffe(bn, args.seed);
            mlp.init = Init::parse(args.init.as_deref().unwrap_or("gaussian"))?;
            Ok(ModelConfig::Mlp(mlp))
        }
        "cnn" => {
            let mut cnn = CnnConfig::small(bn, args.seed);
            cnn.init = args.init.as_deref().map(Init::parse).transpose()?;
            Ok(ModelConfig::Cnn(cnn))
        }
        other => Err(Error::config(format!(
            "unknown model '{other}': expected mlp or cnn"
        ))),
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let mut run = settings(args)?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("data").join(run.kind.name()));
    let mut dataset = data::load(run.kind, &data_dir)?;
    if let Some(n) = args.train_subset {
        dataset.train.truncate(n);
    }
    let norm = Normalization::Unit;
    let resume = match &args.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    if let Some(ckpt) = &resume {
        let want = run.model.name();
        match ckpt.meta.get("model") {
            Some(m) if *m == want => {}
            other => {
                return Err(Error::config(format!(
                    "checkpoint {} holds model {other:?}, this run is {want}: pass the same --bn/--no-bn \
                     and --model",
                    args.resume.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
                )))
            }
        }
        // The batch order depends on the seed: a resumed run keeps the checkpoint's.
        run.model.set_seed(ckpt.seed);
    }
    let seed = run.model.seed();
    let gpu = Arc::new(Gpu::new()?);
    // The CNN's activations take ~0.5 MB per sample: evaluate it in training-sized batches.
    let eval_rows = match run.model {
        ModelConfig::Cnn(_) => args.batch_size,
        _ => 1000,
    };
    let eval_batch = eval_rows.min(dataset.test.len().max(1));
    let capacity = args.batch_size.max(eval_batch);
    let mut batcher = Batcher::new(dataset.train.len(), args.batch_size, seed)?;
    let mut trainer = Trainer::new(&gpu, &run.model, run.sgd, capacity)?;
    if let Some(ckpt) = &resume {
        trainer.restore(ckpt)?;
    }
    std::fs::create_dir_all(&run.dir).map_err(|e| Error::file(&run.dir, e))?;
    let adapter = format!(
        "{} ({:?})",
        gpu.adapter_info().name,
        gpu.adapter_info().backend
    );
    let model = run.model.name();
    println!(
        "training {model} ({} parameters) on {} ({} train / {} test) with {}",
        trainer.model.num_params(),
        run.kind.name(),
        dataset.train.len(),
        dataset.test.len(),
        adapter
    );
    println!(
        "SGD lr {} momentum {}, batch {}, {} steps{}, init {}, seed {seed}, eval every {} steps -> {}",
        run.sgd.lr,
        run.sgd.momentum,
        args.batch_size,
        args.steps,
        if args.steps == DEFAULT_STEPS {
            " (default: a few minutes on a CPU Vulkan driver; the paper runs 50 000)"
        } else {
            ""
        },
        run.model.init_name(),
        args.eval_every,
        run.dir.display()
    );
    let ckpt_path = run.dir.join("checkpoint.safetensors");
    let metrics_path = run.dir.join("metrics.csv");
    let mut metrics = open_metrics(&metrics_path, resume.is_some())?;
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), model.clone());
    meta.insert("dataset".to_string(), run.kind.name().to_string());
    meta.insert("lr".to_string(), run.sgd.lr.to_string());
    meta.insert("momentum".to_string(), run.sgd.momentum.to_string());
    meta.insert("batch_size".to_string(), args.batch_size.to_string());

    let start_step = trainer.step;
    let mut train_seconds = 0.0f64;
    let mut window = Instant::now();
    let mut window_steps = 0u64;
    let mut last = None;
    let mut test = (f64::NAN, f64::NAN);
    for step in start_step..args.steps {
        trainer.train_step_on(&dataset.train, batcher.batch(step), norm)?;
        window_steps += 1;
        let done = step + 1;
        let eval_now = done % args.eval_every == 0 || done == args.steps;
        if done % args.log_every == 0 || eval_now {
            let stats = trainer.take_stats()?;
            let secs = window.elapsed().as_secs_f64();
            train_seconds += secs;
            let steps_per_s = window_steps as f64 / secs.max(1e-9);
            if !stats.mean_loss.is_finite() || !stats.last_loss.is_finite() {
                println!();
                return Err(Error::config(format!(
                    "the loss became {} by step {done}: training diverged (lower --lr?). The last good \
                     checkpoint ({}) is left as it was.",
                    stats.mean_loss,
                    if ckpt_path.exists() {
                        ckpt_path.display().to_string()
                    } else {
                        "none written yet".into()
                    }
                )));
            }
            if eval_now {
                test = trainer.evaluate(&dataset.test, norm)?;
            }
            writeln!(
                metrics,
                "{done},{:.6},{:.6},{},{},{:.4}",
                stats.mean_loss,
                stats.accuracy,
                opt(eval_now, test.0),
                opt(eval_now, test.1),
                train_seconds
            )
            .map_err(|e| Error::file(&metrics_path, e))?;
            print!(
                "\rstep {done:>6}/{}  loss {:.4}  train acc {:6.2}%  {:7.1} steps/s  {:8.0} samples/s{}",
                args.steps,
                stats.mean_loss,
                100.0 * stats.accuracy,
                steps_per_s,
                steps_per_s * args.batch_size as f64,
                if eval_now {
                    format!("  test acc {:6.2}%\n", 100.0 * test.1)
                } else {
                    String::new()
                }
            );
            let _ = std::io::stdout().flush();
            if eval_now {
                metrics.flush().map_err(|e| Error::file(&metrics_path, e))?;
                let ckpt = trainer.checkpoint(seed, meta.clone())?;
                checkpoint::save(&ckpt_path, &ckpt)?;
            }
            last = Some(stats);
            window = Instant::now();
            window_steps = 0;
        }
    }
    if last.is_none() {
        test = trainer.evaluate(&dataset.test, norm)?;
    }
    let steps_run = args.steps.saturating_sub(start_step);
    let samples_per_second = if train_seconds > 0.0 {
        (steps_run * args.batch_size as u64) as f64 / train_seconds
    } else {
        0.0
    };
    let summary = serde_json::json!({
        "model": model,
        "dataset": run.kind.name(),
        "bn": run.bn,
        "steps": args.steps,
        "resumed_from_step": start_step,
        "batch_size": args.batch_size,
        "lr": run.sgd.lr,
        "optimizer": format!("sgd(momentum={})", run.sgd.momentum),
        "init": run.model.init_name(),
        "seed": seed,
        "final_test_accuracy": test.1,
        "final_test_loss": test.0,
        "train_seconds": train_seconds,
        "steps_per_second": steps_run as f64 / train_seconds.max(1e-9),
        "samples_per_second": samples_per_second,
        "adapter": adapter,
    });
    let summary_path = run.dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::file(&summary_path, e))?;
    write_atomically(&summary_path, text.as_bytes())?;
    println!(
        "test accuracy {:.2}% (loss {:.4}) after {} steps; {:.1} s training, {:.0} samples/s; wrote {}",
        100.0 * test.1,
        test.0,
        args.steps,
        train_seconds,
        samples_per_second,
        run.dir.display()
    );
    Ok(())
}

fn opt(present: bool, v: f64) -> String {
    if present {
        format!("{v:.6}")
    } else {
        String::new()
    }
}

fn open_metrics(path: &Path, append: bool) -> Result<std::io::BufWriter<std::fs::File>> {
    let exists = path.exists();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(|e| Error::file(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    if !(append && exists) {
        writeln!(
            w,
            "step,train_loss,train_accuracy,test_loss,test_accuracy,train_seconds"
        )
        .map_err(|e| Error::file(path, e))?;
    }
    Ok(w)
}
