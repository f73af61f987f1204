//! `batchnorm train`: train a network on the GPU end to end, with a progress bar, test accuracy at the
//! end and a run folder (metrics.csv, training.png, summary.json, checkpoint.safetensors).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchnorm::data::{self, Batcher, DatasetKind, Normalization};
use batchnorm::error::{Error, Result};
use batchnorm::gpu::Gpu;
use batchnorm::io::write_atomically;
use batchnorm::nn::{CnnConfig, Init, MlpConfig, ModelConfig};
use batchnorm::ops::adam::AdamConfig;
use batchnorm::ops::sgd::SgdConfig;
use batchnorm::optim::{LrSchedule, OptimizerConfig};
use batchnorm::plot::{line_charts, Chart};
use batchnorm::train::{checkpoint, TrainStats, Trainer};

/// Default steps: Ioffe's 50 000 steps of 60 take too long on a CPU Vulkan driver; this many finish in
/// a few minutes on lavapipe and reach about 97% test accuracy with BN.
const DEFAULT_STEPS: u64 = 3000;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Network: `mlp` (Ioffe & Szegedy's 784-100-100-100-10 sigmoid MLP; the input width follows the
    /// dataset) or `cnn` (a small VGG-style network: 3x3 conv-[BN]-ReLU blocks, max pooling, hidden
    /// Linear-[BN]-ReLU layers (--cnn-hidden), a linear head; input [N, C, H, W] from the dataset).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Widths of the CNN's hidden Linear-[BN]-ReLU layers before its head, comma-separated; 0 for none
    /// (the head alone, as `batchnorm experiment --model cnn` uses).
    #[arg(long, default_value = "128", value_name = "W[,W...]")]
    cnn_hidden: String,
    /// BatchNorm before every hidden nonlinearity (the default).
    #[arg(long, overrides_with = "no_bn")]
    bn: bool,
    /// No BatchNorm (the paper's baseline).
    #[arg(long = "no-bn")]
    no_bn: bool,
    /// Dataset: mnist, fashion-mnist or cifar10.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Folder with the dataset's files: the four IDX files (.gz or plain) for mnist and fashion-mnist
    /// (default data/<dataset>), the binary version's .bin files for cifar10 (required).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Training steps (total, counting resumed ones).
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 60)]
    batch_size: usize,
    /// Optimizer: sgd or adam (PyTorch's torch.optim.SGD and torch.optim.Adam).
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// Learning rate, the schedule's base rate [default: 0.1 for sgd, 0.001 for adam].
    #[arg(long)]
    lr: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    nesterov: bool,
    /// L2 weight decay added to the gradient (sgd and adam, as PyTorch's weight_decay).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Adam's betas, as BETA1,BETA2.
    #[arg(long, default_value = "0.9,0.999")]
    betas: String,
    /// Adam's eps.
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f32,
    /// Learning-rate schedule: constant; step (times --lr-gamma every --lr-step-every steps); cosine
    /// (half a cosine to 0 over --steps, after --warmup-steps of linear warmup).
    #[arg(long, default_value = "constant")]
    lr_schedule: String,
    /// Steps between decays of the step schedule.
    #[arg(long, default_value_t = 1000)]
    lr_step_every: u64,
    /// Decay factor of the step schedule.
    #[arg(long, default_value_t = 0.1)]
    lr_gamma: f64,
    /// Linear warmup steps of the cosine schedule.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
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
    /// Read the loss back (progress bar and metrics) every this many steps.
    #[arg(long, default_value_t = 50)]
    log_every: u64,
    /// Continue from this checkpoint (its seed, step and optimizer state; the model and optimizer must
    /// match).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run folder; default runs/<model>-<bn|nobn>-<dataset>-seed<seed>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use only the first N training examples (quick runs, tests).
    #[arg(long)]
    train_subset: Option<usize>,
    /// Run each BatchNorm and the ReLU after it as two layers (by default they run as one fused
    /// BN+ReLU, the mask kept as bits; results agree to f32 rounding).
    #[arg(long)]
    no_fuse_bn_relu: bool,
    /// Run each BatchNorm and the Sigmoid after it as two layers (by default the BatchNorm writes
    /// sigmoid(bn(x)) itself; results agree to f32 rounding).
    #[arg(long)]
    no_fuse_bn_sigmoid: bool,
    /// Record each Linear and the BatchNorm beside it apart (by default one kernel computes a Linear's
    /// product and normalizes it, and the backward of BatchNorm → Sigmoid → Linear runs in the
    /// Linear's dx product; results agree to f32 rounding).
    #[arg(long)]
    no_fuse_linear_bn: bool,
}

struct Run {
    kind: DatasetKind,
    bn: bool,
    model: ModelConfig,
    optim: OptimizerConfig,
    schedule: LrSchedule,
    dir: PathBuf,
}

fn optimizer_config(args: &TrainArgs) -> Result<OptimizerConfig> {
    let config = match args.optimizer.to_ascii_lowercase().as_str() {
        "sgd" => OptimizerConfig::Sgd(SgdConfig {
            lr: args.lr.unwrap_or(0.1),
            momentum: args.momentum,
            weight_decay: args.weight_decay,
            nesterov: args.nesterov,
        }),
        "adam" => {
            let betas: Vec<f32> = args
                .betas
                .split(',')
                .map(|b| b.trim().parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::config(format!("--betas '{}': {e}", args.betas)))?;
            let [beta1, beta2] = betas[..] else {
                return Err(Error::config(format!(
                    "--betas '{}': expected two numbers, BETA1,BETA2",
                    args.betas
                )));
            };
            OptimizerConfig::Adam(AdamConfig {
                lr: args.lr.unwrap_or(1e-3),
                beta1,
                beta2,
                eps: args.adam_eps,
                weight_decay: args.weight_decay,
            })
        }
        other => {
            return Err(Error::config(format!(
                "unknown optimizer '{other}': expected sgd or adam"
            )))
        }
    };
    config.validate()?;
    Ok(config)
}

fn lr_schedule(args: &TrainArgs) -> Result<LrSchedule> {
    let schedule = match args.lr_schedule.to_ascii_lowercase().as_str() {
        "constant" => LrSchedule::Constant,
        "step" => LrSchedule::Step {
            every: args.lr_step_every,
            gamma: args.lr_gamma,
        },
        "cosine" => LrSchedule::Cosine {
            total: args.steps,
            warmup: args.warmup_steps,
        },
        other => {
            return Err(Error::config(format!(
                "unknown learning-rate schedule '{other}': expected constant, step or cosine"
            )))
        }
    };
    if args.warmup_steps > 0 && !matches!(schedule, LrSchedule::Cosine { .. }) {
        return Err(Error::config(
            "--warmup-steps applies to --lr-schedule cosine only",
        ));
    }
    schedule.validate()?;
    Ok(schedule)
}

/// Sizes the model's input to examples of `shape`: the MLP flattens each (784 values, or 3072 for
/// CIFAR-10); the CNN takes its channels and size.
fn fit_input(model: &mut ModelConfig, shape: [usize; 3]) {
    match model {
        ModelConfig::Mlp(mlp) => mlp.sizes[0] = shape.iter().product(),
        ModelConfig::Cnn(cnn) => {
            let [c, h, w] = shape;
            cnn.in_channels = c;
            cnn.in_hw = (h, w);
        }
        ModelConfig::Layers { .. } => {}
    }
}

/// Rows the trainer holds: a training batch, or an evaluation batch over a test split of
/// `test_examples` (the CNN's activations take ~0.5 MB per sample: it evaluates in training-sized
/// batches, the others 1000 rows at a time).
fn capacity(model: &ModelConfig, batch_size: usize, test_examples: usize) -> usize {
    let eval_rows = match model {
        ModelConfig::Cnn(_) => batch_size,
        _ => 1000,
    };
    batch_size.max(eval_rows.min(test_examples.max(1)))
}

/// The fusions `args` turns off.
fn set_fusions(trainer: &mut Trainer, args: &TrainArgs) {
    trainer.model.set_fuse_bn_relu(!args.no_fuse_bn_relu);
    trainer.model.set_fuse_bn_sigmoid(!args.no_fuse_bn_sigmoid);
    trainer.model.set_fuse_linear_bn(!args.no_fuse_linear_bn);
}

/// Brings the GPU up on another thread and builds there, on every core, the pipelines of the run's
/// training steps and evaluations, for examples of the dataset's published shape, while the caller
/// loads the data: lavapipe compiles each pipeline in 35-160 ms, for which the first step would
/// otherwise wait (0.28 s for the MNIST MLP on two cores), and decompressing MNIST takes 0.19 s on
/// one. The run's trainer, made once the data is in, finds them in the GPU's cache; where the files
/// hold another shape it builds what it lacks in its first step. Only a head start: the warm-up's own
/// errors are left for the run's trainer to meet; the GPU's come back through the handle.
fn start_gpu(run: &Run, args: &TrainArgs) -> std::thread::JoinHandle<Result<Arc<Gpu>>> {
    let mut model = run.model.clone();
    fit_input(&mut model, run.kind.example_shape());
    let (optim, args, test_examples) = (run.optim, args.clone(), run.kind.test_examples());
    std::thread::spawn(move || {
        let gpu = Arc::new(Gpu::new()?);
        let capacity = capacity(&model, args.batch_size, test_examples);
        if let Ok(mut trainer) = Trainer::new(&gpu, &model, optim, capacity) {
            set_fusions(&mut trainer, &args);
            let _ = trainer.prebuild_pipelines(args.batch_size);
            let _ = trainer.prebuild_evaluation(test_examples);
        }
        Ok(gpu)
    })
}

fn settings(args: &TrainArgs) -> Result<Run> {
    if args.steps == 0 || args.eval_every == 0 || args.log_every == 0 {
        return Err(Error::config(
            "--steps, --eval-every and --log-every must be at least 1",
        ));
    }
    let kind = DatasetKind::parse(&args.dataset)?;
    let bn = !args.no_bn;
    let optim = optimizer_config(args)?;
    let schedule = lr_schedule(args)?;
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
        optim,
        schedule,
        dir,
    })
}

/// The dataset folder: --data-dir, or data/<dataset> with a hint on how to get Fashion-MNIST.
fn data_dir(args: &TrainArgs, kind: DatasetKind) -> Result<PathBuf> {
    if let Some(d) = &args.data_dir {
        return Ok(d.clone());
    }
    let dir = PathBuf::from("data").join(kind.name());
    match kind {
        DatasetKind::Cifar10 => Err(Error::config(
            "--dataset cifar10 needs --data-dir: the folder of CIFAR-10's binary version \
             (data_batch_1.bin … data_batch_5.bin, test_batch.bin)",
        )),
        DatasetKind::FashionMnist if !dir.is_dir() => Err(Error::config(format!(
            "Fashion-MNIST is not in {}: fetch it with `scripts/fetch-fashion-mnist {}` (from Debian's \
             dataset-fashion-mnist package), or pass --data-dir",
            dir.display(),
            dir.display()
        ))),
        _ => Ok(dir),
    }
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
            cnn.hidden = parse_widths(&args.cnn_hidden)?;
            Ok(ModelConfig::Cnn(cnn))
        }
        other => Err(Error::config(format!(
            "unknown model '{other}': expected mlp or cnn"
        ))),
    }
}

/// `--cnn-hidden`: comma-separated positive widths, or `0` (or nothing) for none.
fn parse_widths(text: &str) -> Result<Vec<usize>> {
    let text = text.trim();
    if text.is_empty() || text == "0" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|w| match w.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(Error::config(format!(
                "--cnn-hidden '{text}': expected positive widths separated by commas (or 0 for none), \
                 got '{w}'"
            ))),
        })
        .collect()
}

/// Peak resident set size of this process (VmHWM in /proc/self/status); `None` where there is no
/// procfs (off Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One line of metrics.csv.
#[derive(Clone, Copy, Debug)]
struct Row {
    step: u64,
    train_loss: f64,
    train_accuracy: f64,
    test: Option<(f64, f64)>,
    lr: f64,
    train_seconds: f64,
}

const METRICS_HEADER: &str =
    "step,train_loss,train_accuracy,test_loss,test_accuracy,lr,train_seconds";

impl Row {
    fn csv(&self) -> String {
        let (tl, ta) = match self.test {
            Some((l, a)) => (format!("{l:.6}"), format!("{a:.6}")),
            None => (String::new(), String::new()),
        };
        format!(
            "{},{:.6},{:.6},{tl},{ta},{:e},{:.4}",
            self.step, self.train_loss, self.train_accuracy, self.lr, self.train_seconds
        )
    }
}

/// The rows of an earlier run's metrics.csv up to `upto` (a resumed run drops the steps after its
/// checkpoint, which it is about to redo), matched by column name.
fn read_metrics(path: &Path, upto: u64) -> Result<Vec<Row>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::file(path, e)),
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let step_col =
        col("step").ok_or_else(|| Error::file(path, "not a metrics file: no 'step' column"))?;
    let num = |fields: &[&str], c: Option<usize>| -> Option<f64> {
        c.and_then(|c| fields.get(c))
            .and_then(|f| f.parse::<f64>().ok())
    };
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        let step = fields
            .get(step_col)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| Error::file(path, format!("line {}: no step number", i + 2)))?;
        if step > upto {
            continue;
        }
        let test = num(&fields, col("test_loss")).zip(num(&fields, col("test_accuracy")));
        rows.push(Row {
            step,
            train_loss: num(&fields, col("train_loss")).unwrap_or(f64::NAN),
            train_accuracy: num(&fields, col("train_accuracy")).unwrap_or(f64::NAN),
            test,
            lr: num(&fields, col("lr")).unwrap_or(f64::NAN),
            train_seconds: num(&fields, col("train_seconds")).unwrap_or(f64::NAN),
        });
    }
    Ok(rows)
}

/// metrics.csv: rewritten with the kept rows, then appended to row by row (flushed at each evaluation,
/// so a killed run leaves its metrics up to its last checkpoint).
fn open_metrics(path: &Path, kept: &[Row]) -> Result<std::io::BufWriter<std::fs::File>> {
    let mut text = format!("{METRICS_HEADER}\n");
    for r in kept {
        text.push_str(&r.csv());
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, e))?;
    Ok(std::io::BufWriter::new(file))
}

/// Progress: an indicatif bar on a terminal; plain lines on stderr otherwise (CI logs), at every
/// evaluation and at most every few seconds in between.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
}

const PLAIN_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    fn new(total: u64, start: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:28.cyan/blue} {pos:>6}/{len} {msg} [{elapsed_precise} < {eta}]",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(start);
            bar
        });
        Progress {
            bar,
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, done: u64, total: u64, stats: &TrainStats, steps_per_s: f64, row: &Row) {
        let test = row
            .test
            .map(|(_, a)| format!("  test acc {:6.2}%", 100.0 * a))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}  acc {:6.2}%  {:6.1} steps/s{test}",
            stats.mean_loss,
            100.0 * stats.accuracy,
            steps_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(msg.clone());
                if row.test.is_some() {
                    bar.println(format!("step {done:>6}/{total}  {msg}"));
                }
            }
            None => {
                if row.test.is_some() || self.last_line.elapsed() >= PLAIN_EVERY {
                    eprintln!("step {done:>6}/{total}  {msg}");
                    self.last_line = Instant::now();
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let started = Instant::now();
    let mut run = settings(args)?;
    let data_dir = data_dir(args, run.kind)?;
    let warm_up = start_gpu(&run, args);
    let mut dataset = data::load(run.kind, &data_dir)?;
    if let Some(n) = args.train_subset {
        dataset.train.truncate(n);
    }
    fit_input(&mut run.model, dataset.train.shape);
    let norm = Normalization::Unit;
    let resume = match &args.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    let resume_path = || {
        args.resume
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    if let Some(ckpt) = &resume {
        let want = run.model.name();
        match ckpt.meta.get("model") {
            Some(m) if *m == want => {}
            other => {
                return Err(Error::config(format!(
                    "checkpoint {} holds model {other:?}, this run is {want}: pass the same --bn/--no-bn \
                     and --model",
                    resume_path()
                )))
            }
        }
        // Checkpoints from before the optimizer choice are SGD's.
        let theirs = ckpt.meta.get("optimizer").map_or("sgd", String::as_str);
        if theirs != run.optim.name() {
            return Err(Error::config(format!(
                "checkpoint {} was trained with --optimizer {theirs}, this run uses {}: pass \
                 --optimizer {theirs} to resume it",
                resume_path(),
                run.optim.name()
            )));
        }
        // The model name does not say which data it learned, and the batch order depends on the
        // batch size: both must be the checkpoint's (checkpoints from before these keys pass).
        let this_run = [
            ("dataset", run.kind.name().to_string(), "--dataset"),
            ("batch_size", args.batch_size.to_string(), "--batch-size"),
        ];
        for (key, ours, flag) in this_run {
            if let Some(theirs) = ckpt.meta.get(key).filter(|t| **t != ours) {
                return Err(Error::config(format!(
                    "checkpoint {} was trained with {flag} {theirs}, this run uses {ours}: pass \
                     {flag} {theirs} to resume it",
                    resume_path()
                )));
            }
        }
        // The batch order depends on the seed: a resumed run keeps the checkpoint's.
        run.model.set_seed(ckpt.seed);
    }
    let seed = run.model.seed();
    let gpu = warm_up
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    let capacity = capacity(&run.model, args.batch_size, dataset.test.len());
    let mut batcher = Batcher::new(dataset.train.len(), args.batch_size, seed)?;
    let mut trainer = Trainer::new(&gpu, &run.model, run.optim, capacity)?;
    set_fusions(&mut trainer, args);
    if let (true, Some(why)) = (
        trainer.model.fuse_bn_relu(),
        trainer.model.fusion_unavailable(),
    ) {
        println!("note: {why}");
    }
    let fused_layers = trainer.model.fused_bn_relu_layers();
    trainer.optim.set_schedule(run.schedule)?;
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
        "{} lr {} {}, batch {}, {} steps{}, init {}, seed {seed}, eval every {} steps -> {}",
        run.optim.describe(),
        run.optim.lr(),
        run.schedule.describe(),
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
    let start_step = trainer.step;
    let ckpt_path = run.dir.join("checkpoint.safetensors");
    let metrics_path = run.dir.join("metrics.csv");
    let plot_path = run.dir.join("training.png");
    let mut rows = if resume.is_some() {
        read_metrics(&metrics_path, start_step)?
    } else {
        Vec::new()
    };
    let mut metrics = open_metrics(&metrics_path, &rows)?;
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), model.clone());
    meta.insert("dataset".to_string(), run.kind.name().to_string());
    meta.insert("lr".to_string(), run.optim.lr().to_string());
    meta.insert("optimizer".to_string(), run.optim.name().to_string());
    meta.insert("optimizer_config".to_string(), run.optim.describe());
    meta.insert("lr_schedule".to_string(), run.schedule.describe());
    meta.insert("batch_size".to_string(), args.batch_size.to_string());

    // Training time accumulates over resumed runs: the checkpoint carries the time up to its step.
    let mut train_seconds = resume
        .as_ref()
        .and_then(|c| c.meta.get("train_seconds"))
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0);
    let resumed_seconds = train_seconds;
    // Loading the data, the GPU and the pipelines (`start_gpu`) before the first step.
    let setup_seconds = started.elapsed().as_secs_f64();
    let pipelines_in_setup = gpu.pipelines_built();
    // The first step of a run records the most (a twin for `Trainer::prebuild_pipelines`, and the
    // pipelines the warm-up did not build): timed apart, so that the summary also gives the steady
    // throughput.
    let mut first_step_seconds = None;
    let mut last_ckpt_step = resume.as_ref().map(|c| c.step);
    let mut progress = Progress::new(args.steps, start_step);
    let mut window = Instant::now();
    let mut window_steps = 0u64;
    let mut window_lr = trainer.optim.current_lr() as f64;
    // Samples per second of each window between loss read-backs, but the first (it holds the first
    // step): their median is the statistic PyTorch's anchor reports (`scripts/pytorch-mlp-anchor.py`,
    // the median of rounds), which a busy moment of the host moves less than the run's mean.
    let mut window_rates = Vec::new();
    let mut test = None;
    for step in start_step..args.steps {
        trainer.train_step_on(&dataset.train, batcher.batch(step), norm)?;
        if step == start_step {
            gpu.wait()?;
            first_step_seconds = Some(window.elapsed().as_secs_f64());
        }
        window_steps += 1;
        let done = step + 1;
        let eval_now = done % args.eval_every == 0 || done == args.steps;
        if done % args.log_every == 0 || eval_now {
            let stats = trainer.take_stats()?;
            let secs = window.elapsed().as_secs_f64();
            train_seconds += secs;
            let steps_per_s = window_steps as f64 / secs.max(1e-9);
            if done - window_steps > start_step {
                window_rates.push(steps_per_s * args.batch_size as f64);
            }
            if !stats.mean_loss.is_finite() || !stats.last_loss.is_finite() {
                progress.finish();
                let _ = metrics.flush();
                let when = if window_steps <= 1 {
                    format!("at step {done}")
                } else {
                    format!(
                        "between steps {} and {done} (the loss is read every --log-every steps)",
                        done + 1 - window_steps
                    )
                };
                return Err(diverged(
                    &format!("the loss became {} {when}", stats.mean_loss),
                    &ckpt_path,
                    last_ckpt_step,
                ));
            }
            test = if eval_now {
                Some(trainer.evaluate(&dataset.test, norm)?)
            } else {
                None
            };
            let row = Row {
                step: done,
                train_loss: stats.mean_loss,
                train_accuracy: stats.accuracy,
                test,
                lr: window_lr,
                train_seconds,
            };
            writeln!(metrics, "{}", row.csv()).map_err(|e| Error::file(&metrics_path, e))?;
            rows.push(row);
            progress.update(done, args.steps, &stats, steps_per_s, &row);
            if eval_now {
                metrics.flush().map_err(|e| Error::file(&metrics_path, e))?;
                meta.insert("train_seconds".to_string(), train_seconds.to_string());
                let ckpt = trainer.checkpoint(seed, meta.clone())?;
                // A finite loss can hide an overflowed state (BatchNorm's running variance, say):
                // that is divergence too, and the last good checkpoint stays.
                let bad = ckpt
                    .model
                    .tensors
                    .iter()
                    .chain(&ckpt.optimizer)
                    .find_map(|t| {
                        t.2.iter()
                            .find(|v| !v.is_finite())
                            .map(|v| (t.0.clone(), *v))
                    });
                if let Some((key, v)) = bad {
                    progress.finish();
                    return Err(diverged(
                        &format!(
                            "'{key}' became {v} by step {done} (the loss read {:e})",
                            stats.mean_loss
                        ),
                        &ckpt_path,
                        last_ckpt_step,
                    ));
                }
                checkpoint::save(&ckpt_path, &ckpt)?;
                last_ckpt_step = Some(done);
                write_plot(&plot_path, &rows)?;
            }
            window = Instant::now();
            window_steps = 0;
            window_lr = trainer.optim.current_lr() as f64;
        }
    }
    progress.finish();
    drop(metrics);
    let (test_loss, test_accuracy) = match test {
        Some(t) => t,
        // A resumed run that had nothing left to do.
        None => trainer.evaluate(&dataset.test, norm)?,
    };
    let samples_per_second = if train_seconds > 0.0 {
        (args.steps * args.batch_size as u64) as f64 / train_seconds
    } else {
        0.0
    };
    // Samples per second of this run's steps after its first.
    let steady_samples_per_second = first_step_seconds.and_then(|first| {
        let steps = args.steps.saturating_sub(start_step + 1);
        let secs = train_seconds - resumed_seconds - first;
        (steps > 0 && secs > 0.0).then(|| (steps * args.batch_size as u64) as f64 / secs)
    });
    let median_window_samples_per_second = (!window_rates.is_empty()).then(|| {
        window_rates.sort_by(f64::total_cmp);
        window_rates[window_rates.len() / 2]
    });
    let peak_rss = peak_rss_bytes();
    let summary = serde_json::json!({
        "model": model,
        "dataset": run.kind.name(),
        "bn": run.bn,
        "steps": args.steps,
        "resumed_from_step": start_step,
        "batch_size": args.batch_size,
        "lr": run.optim.lr(),
        "optimizer": run.optim.describe(),
        "lr_schedule": run.schedule.describe(),
        "init": run.model.init_name(),
        "seed": seed,
        "final_test_accuracy": test_accuracy,
        "final_test_loss": test_loss,
        "train_seconds": train_seconds,
        "steps_per_second": args.steps as f64 / train_seconds.max(1e-9),
        "samples_per_second": samples_per_second,
        "setup_seconds": setup_seconds,
        "pipelines_built_in_setup": pipelines_in_setup,
        "pipelines_built_after_setup": gpu.pipelines_built() - pipelines_in_setup,
        "first_step_seconds": first_step_seconds,
        "steady_samples_per_second": steady_samples_per_second,
        "median_window_samples_per_second": median_window_samples_per_second,
        "log_every": args.log_every,
        "adapter": adapter,
        "peak_rss_bytes": peak_rss,
        "fused_bn_relu_layers": fused_layers,
    });
    let summary_path = run.dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::file(&summary_path, e))?;
    write_atomically(&summary_path, text.as_bytes())?;
    println!(
        "test accuracy {:.2}% (loss {:.4}) after {} steps; {:.1} s training, {:.0} samples/s{}, after \
         {setup_seconds:.2} s loading the data and building the pipelines; peak RSS {}; wrote {}",
        100.0 * test_accuracy,
        test_loss,
        args.steps,
        train_seconds,
        samples_per_second,
        match (first_step_seconds, steady_samples_per_second) {
            // A resumed run's time and rate count the steps before it too; its steady rate does not.
            (Some(first), Some(steady)) if start_step > 0 => format!(
                " over all {} steps ({steady:.0} in this run's steps after its first, which took \
                 {first:.2} s; resumed from step {start_step})",
                args.steps
            ),
            (Some(first), Some(steady)) => format!(
                " ({steady:.0} after the first step, which took {first:.2} s)"
            ),
            _ => String::new(),
        },
        peak_rss.map_or("unknown (no /proc)".to_string(), |b| format!(
            "{:.1} MiB",
            b as f64 / (1024.0 * 1024.0)
        )),
        run.dir.display()
    );
    Ok(())
}

/// The error for a run that diverged (`what` says how and at which step), naming the checkpoint kept.
fn diverged(what: &str, ckpt_path: &Path, last_ckpt_step: Option<u64>) -> Error {
    let kept = match last_ckpt_step {
        Some(s) => format!(
            "the last good checkpoint, step {s}, is left as it was: {}",
            ckpt_path.display()
        ),
        None => "no checkpoint had been written yet".to_string(),
    };
    Error::Diverged(format!("{what}; lower --lr? {kept}"))
}

/// training.png: two panels against the step, the loss (log scale) and the accuracy, each with the
/// training batches' running values (averaged over --log-every steps) and the test set's.
fn write_plot(path: &Path, rows: &[Row]) -> Result<()> {
    let train = |f: fn(&Row) -> f64| rows.iter().map(|r| (r.step as f64, f(r))).collect();
    let test = |f: fn((f64, f64)) -> f64| {
        rows.iter()
            .filter_map(|r| r.test.map(|t| (r.step as f64, f(t))))
            .collect()
    };
    let loss = Chart::new("Loss", "step", "cross-entropy")
        .with("train (batches)", train(|r| r.train_loss))
        .with("test", test(|t| t.0))
        .log_y();
    let accuracy = Chart::new("Accuracy", "step", "fraction correct")
        .with("train (batches)", train(|r| r.train_accuracy))
        .with("test", test(|t| t.1));
    line_charts(path, &[loss, accuracy], 2)
}
