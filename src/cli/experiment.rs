//! `batchnorm experiment NAME`: the papers' experiments (see `batchnorm::experiment`).

use std::path::PathBuf;

use batchnorm::data::DatasetKind;
use batchnorm::error::Result;
use batchnorm::experiment::{self, ExperimentModel, Options};

#[derive(Debug, Clone, clap::Args)]
pub struct ExperimentArgs {
    /// Which experiment: ioffe-mnist, lr-sweep, ics, landscape, noisy-bn, precise-bn,
    /// batch-size.
    name: String,
    /// The shortened version (minutes on a CPU Vulkan driver) used by tests and CI.
    #[arg(long)]
    quick: bool,
    /// Output folder (default runs/experiments/<name>[-quick]).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the dataset's files are (default data/<dataset>).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of initialization and batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Overrides each run's number of training steps.
    #[arg(long)]
    steps: Option<u64>,
    /// The network for ics and landscape: mlp (Ioffe's MLP on MNIST) or cnn (the small VGG-style CNN
    /// on Fashion-MNIST, as Santurkar et al. used a VGG).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// The CNN's dataset: fashion-mnist (default) or cifar10 (its binary files in --data-dir).
    #[arg(long)]
    dataset: Option<String>,
}

pub fn run(args: &ExperimentArgs) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs/experiments").join(format!(
            "{}{}",
            args.name,
            if args.quick { "-quick" } else { "" }
        ))
    });
    experiment::run(
        &args.name,
        &Options {
            quick: args.quick,
            out,
            data_dir: args.data_dir.clone(),
            seed: args.seed,
            steps: args.steps,
            model: ExperimentModel::parse(&args.model)?,
            dataset: args
                .dataset
                .as_deref()
                .map(DatasetKind::parse)
                .transpose()?,
        },
    )
}
