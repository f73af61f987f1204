//! `lr-sweep`: Ioffe & Szegedy's BN-x5 / BN-x30 on the MNIST MLP. BatchNorm makes training robust to the
//! scale of the parameters, so it tolerates much larger learning rates; the same multipliers without BN
//! saturate the sigmoids or diverge.
//!
//! Choices (printed in config.json): base SGD lr 0.1, momentum 0.9 (the `batchnorm train` default),
//! multipliers ×1, ×5, ×30; the rest as `ioffe-mnist`. A run "diverges" when its loss stops being finite.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::ops::sgd::SgdConfig;
use crate::plot::{line_charts, Chart};

use super::{
    create_dir, load_data, markdown_table, pct, run_json, train_run, write_config, write_csv,
    ExperimentModel, Options, Run,
};

/// Learning-rate multipliers of the sweep.
pub const MULTIPLIERS: [f32; 3] = [1.0, 5.0, 30.0];

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    opts.model.require_mlp("lr-sweep")?;
    let data = load_data(opts.model.dataset(opts.dataset)?, opts)?;
    let (steps, every) = if opts.quick { (300, 100) } else { (5000, 250) };
    let steps = opts.steps.unwrap_or(steps);
    create_dir(&opts.out)?;
    let base = Run::new(ExperimentModel::Mlp, steps, every, opts.seed);
    let mut settings = serde_json::Map::new();
    settings.insert("run".into(), run_json(&base));
    settings.insert("dataset".into(), "mnist".into());
    settings.insert("base_lr".into(), base.sgd.lr.into());
    settings.insert("lr_multipliers".into(), serde_json::json!(MULTIPLIERS));
    write_config(gpu, "lr-sweep", opts, settings)?;

    let mut results = Vec::new();
    for bn in [true, false] {
        for m in MULTIPLIERS {
            let run = Run {
                bn,
                sgd: SgdConfig {
                    lr: base.sgd.lr * m,
                    ..base.sgd
                },
                ..base.clone()
            };
            let tag = format!("{} lr x{m}", run.label());
            let curve = train_run(gpu, &data, &run, &tag, |_| Ok(()))?;
            let rows: Vec<Vec<f64>> = curve
                .points
                .iter()
                .map(|&(s, l, a)| vec![s as f64, l, a])
                .collect();
            write_csv(
                &opts
                    .out
                    .join(format!("curve_{}_x{m}.csv", if bn { "bn" } else { "nobn" })),
                &["step", "train_loss", "test_accuracy"],
                &rows,
            )?;
            results.push((run, m, curve));
        }
    }

    let mut panels = Vec::new();
    for bn in [true, false] {
        let mut c = Chart::new(
            format!(
                "MNIST MLP {}: test accuracy by learning rate",
                if bn { "with BN" } else { "without BN" }
            ),
            "training step",
            "test accuracy",
        );
        for (run, m, curve) in results.iter().filter(|r| r.0.bn == bn) {
            c = c.with(
                format!("lr {} (x{m})", run.sgd.lr),
                curve
                    .points
                    .iter()
                    .map(|&(s, _, a)| (s as f64, a))
                    .collect(),
            );
        }
        panels.push(c);
    }
    let mut loss = Chart::new(
        "Training loss by learning rate",
        "training step",
        "train loss",
    )
    .log_y();
    for (run, m, curve) in &results {
        loss = loss.with(
            format!("{} x{m}", run.label()),
            curve
                .points
                .iter()
                .map(|&(s, l, _)| (s as f64, l))
                .collect(),
        );
    }
    panels.push(loss);
    line_charts(&opts.out.join("lr_sweep.png"), &panels, 3)?;

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(run, m, curve)| {
            vec![
                run.label().to_string(),
                format!("x{m} ({})", run.sgd.lr),
                match curve.diverged_at {
                    Some(s) => format!("diverged at step {s}"),
                    None => pct(curve.final_accuracy()),
                },
            ]
        })
        .collect();
    let summary = format!(
        "# lr-sweep{}\n\nIoffe & Szegedy's BN-x5/x30 on the MNIST MLP: SGD momentum {}, base lr {}, {} steps, batch 60, seed {}.\n\n{}\n\
         The paper's claim: with BN, 5x and 30x the learning rate still train (and train faster); without BN, large \
         rates fail.\n\n![lr-sweep](lr_sweep.png)\n",
        if opts.quick { " (quick)" } else { "" },
        base.sgd.momentum,
        base.sgd.lr,
        base.steps,
        base.seed,
        markdown_table(&["network", "learning rate", "final test accuracy"], &rows)
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
