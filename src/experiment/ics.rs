//! `ics`: Santurkar et al. (2018), Fig. 3: internal covariate shift measured through gradients. For each
//! layer `i` at a probed step: `G` is the gradient of layer i's weight on the batch; `G'` is the same
//! gradient after every earlier layer has taken its update on that batch. `‖G − G'‖₂` and `cos(G, G')`
//! per layer over training, with and without BatchNorm. The paper's finding: BN does not reduce this
//! shift (it is as large or larger with BN), so "reducing ICS" is not why BN helps.
//!
//! Choices (printed in config.json): the MNIST MLP of `ioffe-mnist` (SGD lr 0.1 momentum 0.9), or with
//! `--model cnn` the small VGG-style CNN on Fashion-MNIST (SGD lr 0.05 momentum 0.9, batch 128); the
//! earlier layers' update is the plain gradient step `W − lr·G` on the probed batch (the optimizer's
//! momentum is left out so the shift is that of this batch's gradient alone); BatchNorm's γ and β count
//! as parts of their layer. All vectors stay on the GPU; a probe reads back four sums per layer.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::nn::Layer;
use crate::plot::{line_charts, Chart};

use super::{
    create_dir, load_data, markdown_table, run_json, train_run, write_config, write_csv,
    ExperimentModel, Options, Run,
};

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    let kind = opts.model.dataset(opts.dataset)?;
    let data = load_data(kind, opts)?;
    // The CNN's step costs ~1 s on lavapipe (the MLP's ~10 ms): fewer steps, probed as often.
    let (steps, every) = match (opts.model, opts.quick) {
        (ExperimentModel::Mlp, true) => (300, 100),
        (ExperimentModel::Mlp, false) => (5000, 250),
        (ExperimentModel::Cnn, true) => (20, 10),
        (ExperimentModel::Cnn, false) => (300, 30),
    };
    let steps = opts.steps.unwrap_or(steps);
    create_dir(&opts.out)?;
    let base = Run::new(opts.model, steps, every, opts.seed);
    let mut settings = serde_json::Map::new();
    settings.insert("run".into(), run_json(&base));
    settings.insert("dataset".into(), kind.name().into());
    settings.insert(
        "earlier_layer_update".into(),
        format!("W - lr*G on the probed batch, lr {}", base.sgd.lr).into(),
    );
    settings.insert(
        "layers".into(),
        "the weight of every Linear and Conv2d layer".into(),
    );
    write_config(gpu, "ics", opts, settings)?;

    // Per run: rows of (step, then per linear layer: l2 diff, cosine, ||G||).
    let mut results = Vec::new();
    for bn in [true, false] {
        let run = Run { bn, ..base.clone() };
        let mut rows: Vec<Vec<f64>> = Vec::new();
        // The probe scratch (two arena-sized copies) is allocated once per run, not per probe.
        let mut prober = None;
        let mut names: Vec<String> = Vec::new();
        let lr = run.sgd.lr;
        train_run(gpu, &data, &run, run.label(), |p| {
            let t = p.trainer;
            let saved = t.snapshot()?;
            if prober.is_none() {
                prober = Some(t.prober()?);
            }
            let prober = prober.as_ref().expect("created above");
            t.probe_gradient(p.x, p.y)?;
            t.probe_set_base(prober)?;
            // Slot j belongs to layer `layer_of[j]` (the state-dict prefix).
            let slots = t.model.slots().to_vec();
            let layer_of: Vec<usize> = slots
                .iter()
                .map(|s| {
                    s.name
                        .split('.')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                })
                .collect();
            let mut row = vec![p.step as f64];
            names.clear();
            for (j, s) in slots.iter().enumerate() {
                let layer = layer_of[j];
                if !s.name.ends_with(".weight")
                    || !matches!(t.model.layers[layer], Layer::Linear(_) | Layer::Conv2d(_))
                {
                    continue;
                }
                t.probe_step(prober, -lr, |k| layer_of[k] < layer)?;
                t.probe_gradient(p.x, p.y)?;
                let d = t.probe_grad_diff(prober, Some(j))?;
                row.extend([d.diff_norm(), d.cosine(), d.b_sq.sqrt()]);
                names.push(s.name.clone());
            }
            t.restore_snapshot(&saved)?;
            rows.push(row);
            Ok(())
        })?;
        results.push((run, names, rows));
    }

    for (run, names, rows) in &results {
        let mut header = vec!["step".to_string()];
        for n in names {
            header.extend([
                format!("{n}.l2_diff"),
                format!("{n}.cosine"),
                format!("{n}.grad_norm"),
            ]);
        }
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        write_csv(
            &opts
                .out
                .join(format!("ics_{}.csv", if run.bn { "bn" } else { "nobn" })),
            &header,
            rows,
        )?;
    }

    let mut l2 = Chart::new(
        "ICS: ||G - G'||_2 per layer (Santurkar Fig. 3)",
        "training step",
        "l2 difference",
    )
    .log_y();
    let mut cos = Chart::new("ICS: cos(G, G') per layer", "training step", "cosine");
    for (run, names, rows) in &results {
        for (k, n) in names.iter().enumerate() {
            let label = format!("{} layer {}", run.label(), n.trim_end_matches(".weight"));
            l2 = l2.with(
                label.clone(),
                rows.iter().map(|r| (r[0], r[1 + 3 * k])).collect(),
            );
            cos = cos.with(label, rows.iter().map(|r| (r[0], r[2 + 3 * k])).collect());
        }
    }
    line_charts(&opts.out.join("ics.png"), &[l2, cos], 2)?;

    let mut table = Vec::new();
    for (run, names, rows) in &results {
        for (k, n) in names.iter().enumerate() {
            let mean = |off: usize| {
                rows.iter().map(|r| r[off + 3 * k]).sum::<f64>() / rows.len().max(1) as f64
            };
            table.push(vec![
                run.label().to_string(),
                n.clone(),
                format!("{:.4}", mean(1)),
                format!("{:.4}", mean(2)),
                format!("{:.4}", mean(3)),
            ]);
        }
    }
    let summary = format!(
        "# ics{}\n\nSanturkar et al. (2018) Fig. 3 on the {} ({}): {} steps, batch {}, SGD lr {} momentum {}, seed {}; \
         probed every {} steps. G' is layer i's gradient after the earlier layers took the step W - lr*G on the same batch.\n\n{}\n\
         Means over the probed steps. The paper's finding: BN does not reduce this shift (l2 difference as large or larger, \
         cosine no closer to 1 with BN).\n\n![ics](ics.png)\n",
        if opts.quick { " (quick)" } else { "" },
        base.model.describe(),
        kind.name(),
        base.steps,
        base.batch_size,
        base.sgd.lr,
        base.sgd.momentum,
        base.seed,
        base.every,
        markdown_table(
            &["network", "layer", "mean ‖G−G'‖₂", "mean cos(G, G')", "mean ‖G‖₂"],
            &table
        )
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
