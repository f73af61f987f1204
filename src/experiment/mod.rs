//! `batchnorm experiment NAME`: the papers' experiments (../shared/PAPERS.md), each writing a folder with
//! `config.json` (every setting, the seed, the adapter), one CSV per curve, PNG plots and `summary.md`.
//!
//! Every experiment has a full version (what the README reports) and a `--quick` one (minutes on a CPU
//! Vulkan driver, for tests and CI) that runs the same code with fewer steps and probes.

pub mod batch_size;
pub mod ics;
pub mod ioffe;
pub mod landscape;
pub mod lr_sweep;
pub mod noisy_bn;
pub mod precise_bn;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::data::{self, Batcher, Dataset, DatasetKind, Normalization};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::nn::{CnnConfig, Init, MlpConfig, ModelConfig};
use crate::ops::sgd::SgdConfig;
use crate::train::Trainer;

/// The experiments, by command-line name.
pub const NAMES: &[&str] = &[
    "ioffe-mnist",
    "lr-sweep",
    "ics",
    "landscape",
    "noisy-bn",
    "precise-bn",
    "batch-size",
];

/// Settings shared by every experiment.
#[derive(Clone, Debug)]
pub struct Options {
    /// Shortened version for tests and CI.
    pub quick: bool,
    /// Output folder (created).
    pub out: PathBuf,
    /// Where the dataset's IDX files are (default `data/<dataset>`).
    pub data_dir: Option<PathBuf>,
    /// Seed of initialization and batch order.
    pub seed: u64,
    /// Overrides the number of training steps of each run.
    pub steps: Option<u64>,
    /// The network (and with it the default dataset); the experiments that reproduce an MLP result
    /// accept only [`ExperimentModel::Mlp`].
    pub model: ExperimentModel,
    /// Another dataset for the CNN (Fashion-MNIST by default; CIFAR-10 from `data_dir`).
    pub dataset: Option<DatasetKind>,
}

/// The network an experiment trains, with the dataset and optimizer settings that go with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExperimentModel {
    /// Ioffe & Szegedy's MLP on MNIST: 784-100-100-100-10 sigmoid, N(0, 0.1²) init, SGD lr 0.1
    /// momentum 0.9, batch 60.
    #[default]
    Mlp,
    /// The small VGG-style CNN of `batchnorm train --model cnn` on Fashion-MNIST (conv 1→16, \[BN,\]
    /// ReLU, pool, conv 16→32, \[BN,\] ReLU, pool, Linear), PyTorch's default init, SGD lr 0.05 momentum
    /// 0.9, batch 128 (the settings of issue 5's PyTorch anchor). Its curves are evaluated on the first
    /// [`CNN_EVAL_IMAGES`] test images: the full test set takes ~45 s per evaluation on lavapipe.
    Cnn,
}

/// Test images a CNN experiment evaluates at each measurement.
pub const CNN_EVAL_IMAGES: usize = 2000;

impl ExperimentModel {
    /// `mlp` or `cnn`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the choices.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mlp" => Ok(ExperimentModel::Mlp),
            "cnn" => Ok(ExperimentModel::Cnn),
            _ => Err(Error::config(format!(
                "unknown experiment model '{s}': choose mlp or cnn"
            ))),
        }
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            ExperimentModel::Mlp => "mlp",
            ExperimentModel::Cnn => "cnn",
        }
    }

    /// The dataset the network trains on: its default, or `requested` where the network takes it (the
    /// CNN takes any of the three; the MLP experiments reproduce MNIST results).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for another dataset than MNIST with the MLP.
    pub fn dataset(self, requested: Option<DatasetKind>) -> Result<DatasetKind> {
        match (self, requested) {
            (ExperimentModel::Mlp, None | Some(DatasetKind::Mnist)) => Ok(DatasetKind::Mnist),
            (ExperimentModel::Mlp, Some(other)) => Err(Error::config(format!(
                "the MLP experiments run on MNIST; --dataset {} needs --model cnn",
                other.name()
            ))),
            (ExperimentModel::Cnn, None) => Ok(DatasetKind::FashionMnist),
            (ExperimentModel::Cnn, Some(kind)) => Ok(kind),
        }
    }

    /// The optimizer settings of the network's reference runs.
    pub fn sgd(self) -> SgdConfig {
        match self {
            ExperimentModel::Mlp => default_sgd(),
            ExperimentModel::Cnn => SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                ..Default::default()
            },
        }
    }

    /// The batch size of the network's reference runs.
    pub fn batch_size(self) -> usize {
        match self {
            ExperimentModel::Mlp => 60,
            ExperimentModel::Cnn => 128,
        }
    }

    /// The network, with or without BatchNorm, for samples of `shape` `[C, H, W]` (the CNN's input; the
    /// MLP takes 784 features).
    pub fn config(self, bn: bool, seed: u64, shape: [usize; 3]) -> ModelConfig {
        match self {
            ExperimentModel::Mlp => MlpConfig {
                init: Init::Gaussian { std: 0.1 },
                ..MlpConfig::ioffe(bn, seed)
            }
            .into(),
            ExperimentModel::Cnn => ModelConfig::Cnn(CnnConfig {
                in_channels: shape[0],
                in_hw: (shape[1], shape[2]),
                ..CnnConfig::small(bn, seed)
            }),
        }
    }

    /// A one-line description for config.json and summaries.
    pub fn describe(self) -> &'static str {
        match self {
            ExperimentModel::Mlp => "mlp 784-100-100-100-10 sigmoid, init N(0, 0.1^2)",
            ExperimentModel::Cnn => {
                "cnn conv3x3 ->16 [BN] ReLU maxpool2, conv3x3 16->32 [BN] ReLU maxpool2, linear ->10; PyTorch default init"
            }
        }
    }

    /// Rejects a model other than the MLP for an experiment that reproduces an MLP result.
    ///
    /// # Errors
    /// [`Error::BadConfig`] naming the experiment.
    pub fn require_mlp(self, experiment: &str) -> Result<()> {
        if self == ExperimentModel::Mlp {
            return Ok(());
        }
        Err(Error::config(format!(
            "{experiment} runs on the MLP only (--model mlp); --model cnn applies to ics and landscape"
        )))
    }
}

/// Runs experiment `name`.
///
/// # Errors
/// [`Error::BadConfig`] for an unknown name; the experiment's errors.
pub fn run(name: &str, opts: &Options) -> Result<()> {
    if !NAMES.contains(&name) {
        return Err(Error::config(format!(
            "unknown experiment '{name}': choose one of {}",
            NAMES.join(", ")
        )));
    }
    let gpu = Arc::new(Gpu::new()?);
    let started = Instant::now();
    match name {
        "ioffe-mnist" => ioffe::run(&gpu, opts)?,
        "lr-sweep" => lr_sweep::run(&gpu, opts)?,
        "ics" => ics::run(&gpu, opts)?,
        "noisy-bn" => noisy_bn::run(&gpu, opts)?,
        "precise-bn" => precise_bn::run(&gpu, opts)?,
        "batch-size" => batch_size::run(&gpu, opts)?,
        _ => landscape::run(&gpu, opts)?,
    }
    println!(
        "{name}: done in {:.1} s -> {}",
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(())
}

/// `"<name> (<backend>)"` of the adapter, for config.json and summaries.
pub fn adapter_name(gpu: &Gpu) -> String {
    let info = gpu.adapter_info();
    format!("{} ({:?})", info.name, info.backend)
}

/// Loads `kind` from `opts.data_dir` or `data/<kind>`.
///
/// # Errors
/// The loader's errors, naming the file.
pub fn load_data(kind: DatasetKind, opts: &Options) -> Result<Dataset> {
    let dir = opts
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("data").join(kind.name()));
    data::load(kind, &dir)
}

/// One training run's settings.
#[derive(Clone, Debug)]
pub struct Run {
    /// The network.
    pub model: ExperimentModel,
    /// BatchNorm in the network (before each hidden sigmoid of the MLP; after each convolution of the
    /// CNN).
    pub bn: bool,
    /// SGD settings.
    pub sgd: SgdConfig,
    /// Steps.
    pub steps: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Seed of the initializer and the batch order.
    pub seed: u64,
    /// Steps between measurements.
    pub every: u64,
}

impl Run {
    /// A run of `model` with BatchNorm, its optimizer and batch size, `steps` steps measured every
    /// `every` (clamped to `[1, steps]`).
    pub fn new(model: ExperimentModel, steps: u64, every: u64, seed: u64) -> Self {
        Run {
            model,
            bn: true,
            sgd: model.sgd(),
            steps,
            batch_size: model.batch_size(),
            seed,
            every: every.min(steps).max(1),
        }
    }

    /// `bn` or `no-bn`.
    pub fn label(&self) -> &'static str {
        if self.bn {
            "BN"
        } else {
            "no BN"
        }
    }
}

/// What a measurement callback sees: the trainer, the step just completed, and the batch it trained on.
pub struct Point<'a> {
    /// The trainer (its model after `step` updates).
    pub trainer: &'a mut Trainer,
    /// Steps completed.
    pub step: u64,
    /// Inputs of the batch of this step, normalized, row-major.
    pub x: &'a [f32],
    /// Labels of that batch.
    pub y: &'a [u32],
}

/// A run's curve: per measurement `(step, mean train loss since the last point, test accuracy)`, and
/// the step where the loss stopped being finite, if it did.
#[derive(Clone, Debug, Default)]
pub struct Curve {
    /// `(step, train loss, test accuracy)`.
    pub points: Vec<(u64, f64, f64)>,
    /// Training accuracy since the previous point (before each step's update), one per point.
    pub train_accuracy: Vec<f64>,
    /// First measurement step with a non-finite loss.
    pub diverged_at: Option<u64>,
}

impl Curve {
    /// Test accuracy at the last measurement (NaN after divergence).
    pub fn final_accuracy(&self) -> f64 {
        if self.diverged_at.is_some() {
            return f64::NAN;
        }
        self.points.last().map_or(f64::NAN, |p| p.2)
    }
}

/// Trains `run.model` with SGD on `data`; every `run.every` steps (and at the end) it evaluates on the
/// test set (the first [`CNN_EVAL_IMAGES`] for the CNN), calls `measure`, and prints a progress line.
/// Stops at the first non-finite loss.
///
/// # Errors
/// Device and shape errors; the callback's errors.
pub fn train_run(
    gpu: &Arc<Gpu>,
    data: &Dataset,
    run: &Run,
    tag: &str,
    measure: impl FnMut(Point) -> Result<()>,
) -> Result<Curve> {
    train_model(
        gpu,
        data,
        &run.model.config(run.bn, run.seed, data.train.shape),
        run,
        tag,
        |_, _| Ok(()),
        measure,
    )
}

/// [`train_run`] for any network `model` on the inputs of `run.model`'s dataset (`run.bn` only labels
/// it; `run.model` picks the test images evaluated), with a hook: `after_step`
/// is called once with step 0 before training (to configure the model) and after every step with the
/// steps done, before that step's evaluation; the model's activation buffers then still hold that
/// training step's forward.
///
/// # Errors
/// Device and shape errors; the callbacks' errors.
pub fn train_model(
    gpu: &Arc<Gpu>,
    data: &Dataset,
    model: &ModelConfig,
    run: &Run,
    tag: &str,
    mut after_step: impl FnMut(u64, &mut Trainer) -> Result<()>,
    mut measure: impl FnMut(Point) -> Result<()>,
) -> Result<Curve> {
    let norm = Normalization::Unit;
    // The CNN evaluates a prefix of the test set in batches of 500 (its activations at a batch of
    // 1000 would take ~0.6 GB); the MLP the whole set in batches of 1000.
    let (test, eval_batch) = match run.model {
        ExperimentModel::Mlp => (std::borrow::Cow::Borrowed(&data.test), 1000),
        ExperimentModel::Cnn => {
            let mut t = data.test.clone();
            t.truncate(CNN_EVAL_IMAGES);
            (std::borrow::Cow::Owned(t), 500)
        }
    };
    let eval_batch = eval_batch.min(test.len().max(1));
    let mut trainer = Trainer::new(gpu, model, run.sgd, run.batch_size.max(eval_batch))?;
    let mut batcher = Batcher::new(data.train.len(), run.batch_size, run.seed)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut curve = Curve::default();
    let started = Instant::now();
    after_step(0, &mut trainer)?;
    for step in 0..run.steps {
        let done = step + 1;
        let indices = batcher.batch(step);
        let at_point = done % run.every == 0 || done == run.steps;
        if at_point {
            data.train.gather(indices, norm, &mut x, &mut y);
            trainer.train_step(&x, &y)?;
        } else {
            trainer.train_step_on(&data.train, indices, norm)?;
        }
        after_step(done, &mut trainer)?;
        if !at_point {
            continue;
        }
        let stats = trainer.take_stats()?;
        if !stats.mean_loss.is_finite() {
            curve.diverged_at = Some(done);
            curve.points.push((done, stats.mean_loss, f64::NAN));
            curve.train_accuracy.push(f64::NAN);
            println!("  {tag}: step {done}: loss {} -> diverged", stats.mean_loss);
            break;
        }
        let (_, acc) = trainer.evaluate(&test, norm)?;
        curve.points.push((done, stats.mean_loss, acc));
        curve.train_accuracy.push(stats.accuracy);
        measure(Point {
            trainer: &mut trainer,
            step: done,
            x: &x,
            y: &y,
        })?;
        println!(
            "  {tag}: step {done:>6}/{}  train loss {:.4}  test acc {:6.2}%  ({:.0} s)",
            run.steps,
            stats.mean_loss,
            100.0 * acc,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(curve)
}

/// Header of a curve CSV ([`curve_rows`]).
pub const CURVE_HEADER: [&str; 4] = ["step", "train_loss", "train_accuracy", "test_accuracy"];

/// A curve's rows for [`CURVE_HEADER`].
pub fn curve_rows(curve: &Curve) -> Vec<Vec<f64>> {
    curve
        .points
        .iter()
        .zip(&curve.train_accuracy)
        .map(|(&(s, l, a), &ta)| vec![s as f64, l, ta, a])
        .collect()
}

/// Creates `dir`.
///
/// # Errors
/// [`Error::File`] naming the folder.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))
}

/// Writes a CSV file (atomically): a header line, then one line per row; non-finite values are written
/// as `nan`/`inf` so a reader sees where a run diverged.
///
/// # Errors
/// [`Error::File`] naming the file.
pub fn write_csv(path: &Path, header: &[&str], rows: &[Vec<f64>]) -> Result<()> {
    let mut s = header.join(",");
    s.push('\n');
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .map(|v| {
                if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{v:.0}")
                } else {
                    format!("{v}")
                }
            })
            .collect();
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    write_atomically(path, s.as_bytes())
}

/// Writes `config.json`: the experiment's settings plus name, quick flag, seed and adapter.
///
/// # Errors
/// [`Error::File`] naming the file.
pub fn write_config(
    gpu: &Gpu,
    name: &str,
    opts: &Options,
    mut settings: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    settings.insert("experiment".into(), name.into());
    settings.insert("quick".into(), opts.quick.into());
    settings.insert("seed".into(), opts.seed.into());
    settings.insert("adapter".into(), adapter_name(gpu).into());
    settings.insert("batchnorm_version".into(), env!("CARGO_PKG_VERSION").into());
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(settings))
        .map_err(|e| Error::config(format!("config.json: {e}")))?;
    println!("{name} settings: {text}");
    write_atomically(&opts.out.join("config.json"), text.as_bytes())
}

/// A Markdown table from a header and rows of cells.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}|", vec![" --- "; header.len()].join("|"));
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// A percentage with two decimals, or `diverged`.
pub fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.2}%", 100.0 * v)
    } else {
        "diverged".into()
    }
}

/// The default SGD of the MLP experiments: lr 0.1, momentum 0.9 (the `batchnorm train` defaults).
pub fn default_sgd() -> SgdConfig {
    SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    }
}

/// Settings of a [`Run`] as JSON.
pub fn run_json(run: &Run) -> serde_json::Value {
    serde_json::json!({
        "model": run.model.describe(),
        "eval_images": match run.model {
            ExperimentModel::Mlp => "the whole test set".to_string(),
            ExperimentModel::Cnn => format!("the first {CNN_EVAL_IMAGES} test images"),
        },
        "optimizer": format!("SGD lr {} momentum {} weight_decay {} nesterov {}",
            run.sgd.lr, run.sgd.momentum, run.sgd.weight_decay, run.sgd.nesterov),
        "steps": run.steps,
        "batch_size": run.batch_size,
        "measure_every": run.every,
        "seed": run.seed,
        "input_normalization": "x / 255",
    })
}
