//! The `batchnorm` command: `info`, `demo`, `parity`, `bench`, `train`, `experiment`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use batchnorm::gpu::Gpu;

mod cli;

#[derive(Parser)]
#[command(
    name = "batchnorm",
    version,
    about = "BatchNorm on the GPU: WGSL kernels on wgpu, PyTorch semantics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The adapter (name, backend, device type, driver) and the features and limits in use.
    Info,
    /// BatchNorm forward and backward on random data, every layout, with the error against the f64
    /// reference.
    Demo(cli::demo::DemoArgs),
    /// Run BatchNorm on tensors from a safetensors file (e.g. written by PyTorch) and write the results,
    /// to check this engine against PyTorch.
    Parity(cli::parity::ParityArgs),
    /// Benchmark BatchNorm against the device's streaming roofline.
    Bench(batchnorm::bench::BenchArgs),
    /// Train a network end to end on the GPU (default: Ioffe & Szegedy's MNIST MLP with BatchNorm).
    Train(Box<cli::train::TrainArgs>),
    /// Reproduce a paper's experiment (ioffe-mnist, lr-sweep, ics, landscape, noisy-bn, precise-bn,
    /// batch-size): CSVs, PNG plots and a summary in a run folder.
    Experiment(cli::experiment::ExperimentArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => Gpu::new().map(|gpu| cli::info::print(&gpu)),
        Command::Demo(args) => Gpu::new().and_then(|gpu| cli::demo::run(&Arc::new(gpu), &args)),
        Command::Parity(args) => cli::parity::run(&args),
        Command::Bench(args) => batchnorm::bench::run(&args),
        Command::Train(args) => cli::train::run(&args),
        Command::Experiment(args) => cli::experiment::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
