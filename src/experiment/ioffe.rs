//! `ioffe-mnist`: Ioffe & Szegedy (2015), Fig. 1. The MNIST MLP (3 hidden layers of 100 sigmoids, batch
//! 60, 50 000 steps) with and without BatchNorm: (a) test accuracy against steps; (b, c) the {15, 50,
//! 85}th percentiles of the input of one sigmoid of the last hidden layer over training.
//!
//! Choices the paper leaves open (printed in config.json): SGD lr 0.1 momentum 0.9 (the paper does not
//! give its optimizer settings for this network); the sigmoid followed is unit 0 of the last hidden
//! layer; its input distribution is taken over the first 1000 test images in eval mode (BatchNorm with
//! its running statistics: the network as it would be used), at every measurement point.

use std::sync::Arc;

use crate::data::Normalization;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::plot::{line_charts, Chart};
use crate::reference::probe::percentile;

use super::{
    create_dir, load_data, markdown_table, pct, run_json, train_run, write_config, write_csv,
    ExperimentModel, Options, Run,
};

/// Which sigmoid's input is followed.
pub const UNIT: usize = 0;
/// Test images its distribution is taken over.
pub const PROBE_IMAGES: usize = 1000;
const PERCENTILES: [f64; 3] = [15.0, 50.0, 85.0];

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    opts.model.require_mlp("ioffe-mnist")?;
    let data = load_data(opts.model.dataset(opts.dataset)?, opts)?;
    let (steps, every) = if opts.quick {
        (600, 100)
    } else {
        (50_000, 1000)
    };
    let steps = opts.steps.unwrap_or(steps);
    let every = every.min(steps).max(1);
    create_dir(&opts.out)?;
    let base = Run::new(ExperimentModel::Mlp, steps, every, opts.seed);
    let mut settings = serde_json::Map::new();
    settings.insert("run".into(), run_json(&base));
    settings.insert("dataset".into(), "mnist".into());
    settings.insert(
        "followed_sigmoid".into(),
        format!("unit {UNIT} of the last hidden layer; input over the first {PROBE_IMAGES} test images, eval mode").into(),
    );
    settings.insert("percentiles".into(), serde_json::json!(PERCENTILES));
    write_config(gpu, "ioffe-mnist", opts, settings)?;

    let probe_n = PROBE_IMAGES.min(data.test.len());
    let indices: Vec<usize> = (0..probe_n).collect();
    let (mut px, mut py) = (Vec::new(), Vec::new());
    data.test
        .gather(&indices, Normalization::Unit, &mut px, &mut py);

    let mut results = Vec::new();
    for bn in [true, false] {
        let run = Run { bn, ..base.clone() };
        let mut pcts: Vec<Vec<f64>> = Vec::new();
        let curve = train_run(gpu, &data, &run, run.label(), |p| {
            let layer = p
                .trainer
                .last_activation_layer()
                .ok_or_else(|| Error::config("the model has no sigmoid to follow"))?;
            let input = p.trainer.layer_input(&px, &py, layer)?;
            let width = input.len() / probe_n;
            let column: Vec<f64> = input.chunks(width).map(|row| row[UNIT] as f64).collect();
            let mut row = vec![p.step as f64];
            row.extend(PERCENTILES.iter().map(|&q| percentile(&column, q)));
            pcts.push(row);
            Ok(())
        })?;
        results.push((run, curve, pcts));
    }

    let tag = |bn: bool| if bn { "bn" } else { "nobn" };
    for (run, curve, pcts) in &results {
        let rows: Vec<Vec<f64>> = curve
            .points
            .iter()
            .map(|&(s, l, a)| vec![s as f64, l, a])
            .collect();
        write_csv(
            &opts.out.join(format!("accuracy_{}.csv", tag(run.bn))),
            &["step", "train_loss", "test_accuracy"],
            &rows,
        )?;
        write_csv(
            &opts.out.join(format!("sigmoid_input_{}.csv", tag(run.bn))),
            &["step", "p15", "p50", "p85"],
            pcts,
        )?;
    }

    let mut acc = Chart::new(
        "MNIST MLP: test accuracy (Ioffe & Szegedy Fig. 1a)",
        "training step",
        "test accuracy",
    );
    for (run, curve, _) in &results {
        acc = acc.with(
            run.label(),
            curve
                .points
                .iter()
                .map(|&(s, _, a)| (s as f64, a))
                .collect(),
        );
    }
    let mut panels = vec![acc];
    for (run, _, pcts) in &results {
        let mut c = Chart::new(
            format!("Input of a last-layer sigmoid, {} (Fig. 1b/c)", run.label()),
            "training step",
            "sigmoid input",
        );
        for (k, q) in PERCENTILES.iter().enumerate() {
            c = c.with(
                format!("{q:.0}th percentile"),
                pcts.iter().map(|r| (r[0], r[k + 1])).collect(),
            );
        }
        panels.push(c);
    }
    line_charts(&opts.out.join("ioffe_mnist.png"), &panels, 3)?;

    let mut rows = Vec::new();
    for (run, curve, pcts) in &results {
        let first = pcts.first().cloned().unwrap_or_default();
        let last = pcts.last().cloned().unwrap_or_default();
        let drift = |k: usize| {
            let (lo, hi) = pcts.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| {
                (lo.min(r[k]), hi.max(r[k]))
            });
            hi - lo
        };
        rows.push(vec![
            run.label().to_string(),
            pct(curve.final_accuracy()),
            format!(
                "{:.3} / {:.3} / {:.3}",
                first.get(1).unwrap_or(&f64::NAN),
                first.get(2).unwrap_or(&f64::NAN),
                first.get(3).unwrap_or(&f64::NAN)
            ),
            format!(
                "{:.3} / {:.3} / {:.3}",
                last.get(1).unwrap_or(&f64::NAN),
                last.get(2).unwrap_or(&f64::NAN),
                last.get(3).unwrap_or(&f64::NAN)
            ),
            format!("{:.3}", drift(2)),
        ]);
    }
    let summary = format!(
        "# ioffe-mnist{}\n\nIoffe & Szegedy (2015) Fig. 1: MNIST MLP 784-100-100-100-10 (sigmoid), batch 60, {} steps, \
         SGD lr {} momentum {}, seed {}.\n\n{}\nPercentiles (15th / 50th / 85th) are of the input of sigmoid {UNIT} of the \
         last hidden layer over {probe_n} test images at the first and last measurement; the drift is the range of \
         its median over training. The paper's claim: with BN the distribution is stable and accuracy is higher; \
         without it the distribution drifts.\n\n![ioffe-mnist](ioffe_mnist.png)\n",
        if opts.quick { " (quick)" } else { "" },
        base.steps,
        base.sgd.lr,
        base.sgd.momentum,
        base.seed,
        markdown_table(
            &[
                "network",
                "final test accuracy",
                "percentiles at first point",
                "percentiles at last point",
                "median drift",
            ],
            &rows
        ),
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
