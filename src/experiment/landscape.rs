//! `landscape`: Santurkar et al. (2018), Fig. 4: the optimization landscape along the gradient. At each
//! probed step, with `g` the gradient of the batch at the current parameters `w`, the parameters move to
//! `w − η·g` for several step sizes `η`, and three things are recorded: the range of the loss over those
//! points, the gradient predictiveness (the range of `‖∇L(w) − ∇L(w − η·g)‖₂`), and the effective
//! β-smoothness (the largest `‖∇L(w) − ∇L(w − η·g)‖₂ / ‖η·g‖₂`). The paper's finding: with BN all three
//! are smaller (a smoother landscape).
//!
//! Choices (printed in config.json): the MNIST MLP of `ioffe-mnist`, or with `--model cnn` the small
//! VGG-style CNN on Fashion-MNIST (closer to the paper's VGG on CIFAR-10); `η ∈ lr × {0.5, 1, 2, 4}` with
//! the model's lr (0.1 for the MLP: Santurkar use step sizes from 0.05 to 0.4); the probe uses the training batch of that step. All
//! vectors stay on the GPU; a probe reads back one loss and four sums per step size.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::plot::{line_charts, Chart};

use super::{
    create_dir, load_data, markdown_table, run_json, train_run, write_config, write_csv,
    ExperimentModel, Options, Run,
};

/// Step sizes, as multiples of the learning rate.
pub const ETA_MULTIPLIERS: [f32; 4] = [0.5, 1.0, 2.0, 4.0];

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    let kind = opts.model.dataset(opts.dataset)?;
    let data = load_data(kind, opts)?;
    // The CNN's step costs ~1 s on lavapipe (the MLP's ~10 ms): fewer steps, probed as often.
    let (steps, every) = match (opts.model, opts.quick) {
        (ExperimentModel::Mlp, true) => (300, 50),
        (ExperimentModel::Mlp, false) => (5000, 100),
        (ExperimentModel::Cnn, true) => (20, 10),
        (ExperimentModel::Cnn, false) => (300, 30),
    };
    let steps = opts.steps.unwrap_or(steps);
    create_dir(&opts.out)?;
    let base = Run::new(opts.model, steps, every, opts.seed);
    let etas: Vec<f32> = ETA_MULTIPLIERS.iter().map(|m| m * base.sgd.lr).collect();
    let mut settings = serde_json::Map::new();
    settings.insert("run".into(), run_json(&base));
    settings.insert("dataset".into(), kind.name().into());
    settings.insert("step_sizes".into(), serde_json::json!(etas));
    write_config(gpu, "landscape", opts, settings)?;

    // Rows: step, loss min, loss max, grad diff min, grad diff max, beta.
    let mut results = Vec::new();
    for bn in [true, false] {
        let run = Run { bn, ..base.clone() };
        let mut rows: Vec<Vec<f64>> = Vec::new();
        // The probe scratch (two arena-sized copies) is allocated once per run, not per probe.
        let mut prober = None;
        train_run(gpu, &data, &run, run.label(), |p| {
            let t = p.trainer;
            let saved = t.snapshot()?;
            if prober.is_none() {
                prober = Some(t.prober()?);
            }
            let prober = prober.as_ref().expect("created above");
            let loss0 = t.probe_gradient(p.x, p.y)?;
            t.probe_set_base(prober)?;
            let (mut lmin, mut lmax) = (loss0, loss0);
            let (mut dmin, mut dmax, mut beta) = (f64::MAX, f64::MIN, 0.0f64);
            for &eta in &etas {
                t.probe_step(prober, -eta, |_| true)?;
                let loss = t.probe_gradient(p.x, p.y)?;
                let d = t.probe_grad_diff(prober, None)?;
                let g_norm = d.b_sq.sqrt();
                lmin = lmin.min(loss);
                lmax = lmax.max(loss);
                dmin = dmin.min(d.diff_norm());
                dmax = dmax.max(d.diff_norm());
                if g_norm > 0.0 {
                    beta = beta.max(d.diff_norm() / (eta as f64 * g_norm));
                }
            }
            t.restore_snapshot(&saved)?;
            rows.push(vec![p.step as f64, lmin, lmax, dmin, dmax, beta]);
            Ok(())
        })?;
        results.push((run, rows));
    }
    for (run, rows) in &results {
        write_csv(
            &opts.out.join(format!(
                "landscape_{}.csv",
                if run.bn { "bn" } else { "nobn" }
            )),
            &[
                "step",
                "loss_min",
                "loss_max",
                "grad_diff_min",
                "grad_diff_max",
                "beta_smoothness",
            ],
            rows,
        )?;
    }

    let mut loss = Chart::new(
        "Loss along the gradient: min and max (Santurkar Fig. 4a)",
        "training step",
        "loss",
    )
    .log_y();
    let mut pred = Chart::new(
        "Gradient predictiveness: max ||grad(w) - grad(w - eta g)|| (Fig. 4b)",
        "training step",
        "l2 change of the gradient",
    )
    .log_y();
    let mut beta = Chart::new(
        "Effective beta-smoothness (Fig. 4c)",
        "training step",
        "max ||grad change|| / ||eta g||",
    )
    .log_y();
    for (run, rows) in &results {
        let l = run.label();
        loss = loss
            .with(
                format!("{l} min"),
                rows.iter().map(|r| (r[0], r[1])).collect(),
            )
            .with(
                format!("{l} max"),
                rows.iter().map(|r| (r[0], r[2])).collect(),
            );
        pred = pred.with(l, rows.iter().map(|r| (r[0], r[4])).collect());
        beta = beta.with(l, rows.iter().map(|r| (r[0], r[5])).collect());
    }
    line_charts(&opts.out.join("landscape.png"), &[loss, pred, beta], 3)?;

    let table: Vec<Vec<String>> = results
        .iter()
        .map(|(run, rows)| {
            let n = rows.len().max(1) as f64;
            let mean = |k: usize| rows.iter().map(|r| r[k]).sum::<f64>() / n;
            vec![
                run.label().to_string(),
                format!("{:.4}", rows.iter().map(|r| r[2] - r[1]).sum::<f64>() / n),
                format!("{:.4}", mean(4)),
                format!("{:.3}", mean(5)),
            ]
        })
        .collect();
    let summary = format!(
        "# landscape{}\n\nSanturkar et al. (2018) Fig. 4 on the {} ({}): {} steps, batch {}, SGD lr {} momentum {}, seed {}; \
         probed every {} steps at step sizes {:?}.\n\n{}\nMeans over the probed steps. The paper's finding: with BN the loss \
         varies less along the gradient, the gradient changes less (more predictive), and the effective beta-smoothness \
         is smaller.\n\n![landscape](landscape.png)\n",
        if opts.quick { " (quick)" } else { "" },
        base.model.describe(),
        kind.name(),
        base.steps,
        base.batch_size,
        base.sgd.lr,
        base.sgd.momentum,
        base.seed,
        base.every,
        etas,
        markdown_table(
            &["network", "mean loss range", "mean max grad change", "mean beta-smoothness"],
            &table
        )
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
