//! `batch-size`: Wu & Johnson (2021), Sec. 4. The normalization batch size (NBS) against the total batch:
//! BatchNorm normalizes over runs of NBS consecutive samples of each batch (ghost BatchNorm,
//! [`crate::nn::BatchNorm::set_virtual_batch_size`]) while the loss and update use the whole batch. For each
//! NBS the trained model is evaluated with population statistics (the EMA running statistics, as usual)
//! and with mini-batch statistics (the test set in batches of NBS, normalized like in training:
//! [`Trainer::evaluate_batch_stats`]). Then the FrozenBN fix at the smallest NBS: the last part of
//! training normalizes with the running statistics (and stops updating them), so training and test see
//! the same normalization.
//! The paper's claim: a small NBS makes the training statistics noisy and creates a train/test
//! inconsistency — at small NBS, evaluating with mini-batch statistics beats population statistics;
//! FrozenBN near the end of training closes that gap.
//!
//! Choices (printed in config.json): the `ioffe-mnist` MLP with BN, total batch 64 (divisible by every NBS),
//! NBS 2, 4, 8, 16, 64, SGD lr 0.1 momentum 0.9; FrozenBN for the last 20% of the steps of an NBS-2 run.

use std::sync::Arc;

use crate::data::Normalization;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::nn::Layer;
use crate::plot::{line_charts, Chart};
use crate::train::Trainer;

use super::{
    create_dir, curve_rows, default_sgd, load_data, markdown_table, pct, run_json, train_model,
    write_config, write_csv, ExperimentModel, Options, Run, CURVE_HEADER,
};

/// The total batch of every run.
pub const TOTAL_BATCH: usize = 64;
/// Normalization batch sizes of the sweep.
pub const NBS: [usize; 5] = [2, 4, 8, 16, 64];
/// Fraction of the steps at the end that the FrozenBN run trains with frozen statistics.
pub const FROZEN_FRACTION: f64 = 0.2;

/// Sets every BatchNorm of the model to ghost batches of `nbs` (`None`: the whole batch).
///
/// # Errors
/// As [`crate::nn::BatchNorm::set_virtual_batch_size`].
pub fn set_nbs(t: &mut Trainer, nbs: Option<usize>) -> Result<()> {
    for l in &mut t.model.layers {
        if let Layer::BatchNorm { bn, .. } = l {
            bn.set_virtual_batch_size(nbs)?;
        }
    }
    Ok(())
}

/// Switches every BatchNorm to FrozenBN (ghost batches off).
///
/// # Errors
/// As [`crate::nn::BatchNorm::set_frozen`].
pub fn freeze(t: &mut Trainer) -> Result<()> {
    set_nbs(t, None)?;
    for l in &mut t.model.layers {
        if let Layer::BatchNorm { bn, .. } = l {
            bn.set_frozen(true)?;
        }
    }
    Ok(())
}

/// One run's outcome.
struct Outcome {
    label: String,
    tag: String,
    nbs: usize,
    curve: super::Curve,
    population: f64,
    minibatch: f64,
}

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    opts.model.require_mlp("batch-size")?;
    let mut data = load_data(opts.model.dataset(opts.dataset)?, opts)?;
    let (steps, every, test_images) = if opts.quick {
        (100, 50, 1000)
    } else {
        (1500, 150, 10_000)
    };
    data.test.truncate(test_images);
    let steps = opts.steps.unwrap_or(steps);
    create_dir(&opts.out)?;
    let base = Run {
        model: ExperimentModel::Mlp,
        bn: true,
        sgd: default_sgd(),
        steps,
        batch_size: TOTAL_BATCH,
        seed: opts.seed,
        every: every.min(steps).max(1),
    };
    let frozen_from = steps - ((steps as f64 * FROZEN_FRACTION).round() as u64).min(steps);
    let mut settings = serde_json::Map::new();
    settings.insert("run".into(), run_json(&base));
    settings.insert("dataset".into(), "mnist".into());
    settings.insert("test_images".into(), data.test.len().into());
    settings.insert("total_batch".into(), TOTAL_BATCH.into());
    settings.insert("normalization_batch_sizes".into(), serde_json::json!(NBS));
    settings.insert(
        "population_statistics".into(),
        "EMA running statistics (momentum 0.1) of the ghost batches (mean of ghost means and of ghost \
         unbiased variances per step)"
            .into(),
    );
    settings.insert(
        "minibatch_statistics".into(),
        "test set in consecutive batches of NBS (a last partial batch dropped), each normalized with its own \
         batch mean and biased variance, running statistics untouched"
            .into(),
    );
    settings.insert(
        "frozen_bn".into(),
        format!(
            "NBS {} run; from step {} on (the last {:.0}% of {steps}), every BatchNorm normalizes with its \
             running statistics and stops updating them",
            NBS[0],
            frozen_from + 1,
            100.0 * FROZEN_FRACTION
        )
        .into(),
    );
    write_config(gpu, "batch-size", opts, settings)?;

    let mut outcomes = Vec::new();
    let mut plans: Vec<(usize, bool)> = NBS.iter().map(|&n| (n, false)).collect();
    plans.push((NBS[0], true));
    for (nbs, frozen) in plans {
        let (label, tag) = if frozen {
            (format!("NBS {nbs} + FrozenBN"), format!("nbs{nbs}_frozen"))
        } else {
            (format!("NBS {nbs}"), format!("nbs{nbs}"))
        };
        let ghost = (nbs < TOTAL_BATCH).then_some(nbs);
        let mut trainer_out = None;
        let curve = train_model(
            gpu,
            &data,
            &base.model.config(base.bn, base.seed, data.train.shape),
            &base,
            &label,
            |done, t| {
                if done == 0 {
                    set_nbs(t, ghost)?;
                }
                if frozen && done == frozen_from {
                    freeze(t)?;
                }
                Ok(())
            },
            |p| {
                if p.step == base.steps {
                    let (_, pop) = p.trainer.evaluate(&data.test, Normalization::Unit)?;
                    let (_, mini) =
                        p.trainer
                            .evaluate_batch_stats(&data.test, Normalization::Unit, nbs)?;
                    println!(
                        "  {label}: population statistics {:.2}%, mini-batch statistics {:.2}%",
                        100.0 * pop,
                        100.0 * mini
                    );
                    trainer_out = Some((pop, mini));
                }
                Ok(())
            },
        )?;
        let (population, minibatch) = trainer_out.unwrap_or((f64::NAN, f64::NAN));
        write_csv(
            &opts.out.join(format!("curve_{tag}.csv")),
            &CURVE_HEADER,
            &curve_rows(&curve),
        )?;
        outcomes.push(Outcome {
            label,
            tag,
            nbs,
            curve,
            population,
            minibatch,
        });
    }
    let sweep: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.tag.ends_with("frozen"))
        .collect();
    write_csv(
        &opts.out.join("nbs_sweep.csv"),
        &[
            "nbs",
            "frozen_bn",
            "train_accuracy",
            "test_population",
            "test_minibatch",
        ],
        &outcomes
            .iter()
            .map(|o| {
                vec![
                    o.nbs as f64,
                    if o.tag.ends_with("frozen") { 1.0 } else { 0.0 },
                    o.curve.train_accuracy.last().copied().unwrap_or(f64::NAN),
                    o.population,
                    o.minibatch,
                ]
            })
            .collect::<Vec<_>>(),
    )?;

    let log2 = |n: usize| (n as f64).log2();
    let sweep_chart = Chart::new(
        format!("Final test accuracy vs NBS (total batch {TOTAL_BATCH}; Wu & Johnson Sec. 4)"),
        "log2(normalization batch size)",
        "accuracy (test, or training where labelled)",
    )
    .with(
        "population statistics (EMA)",
        sweep.iter().map(|o| (log2(o.nbs), o.population)).collect(),
    )
    .with(
        "mini-batch statistics (batches of NBS)",
        sweep.iter().map(|o| (log2(o.nbs), o.minibatch)).collect(),
    )
    .with(
        "training accuracy (last points, batch statistics)",
        sweep
            .iter()
            .map(|o| {
                (
                    log2(o.nbs),
                    o.curve.train_accuracy.last().copied().unwrap_or(f64::NAN),
                )
            })
            .collect(),
    );
    let over_steps = |title: &str, y: &str, pick: &dyn Fn(&super::Curve) -> Vec<(f64, f64)>| {
        outcomes
            .iter()
            .fold(Chart::new(title, "training step", y), |c, o| {
                c.with(o.label.clone(), pick(&o.curve))
            })
    };
    let panels = vec![
        sweep_chart,
        over_steps(
            "Test accuracy, population statistics",
            "test accuracy",
            &|c| c.points.iter().map(|&(s, _, a)| (s as f64, a)).collect(),
        ),
        over_steps(
            "Training loss (batch statistics; FrozenBN: running)",
            "training loss",
            &|c| c.points.iter().map(|&(s, l, _)| (s as f64, l)).collect(),
        )
        .log_y(),
    ];
    line_charts(&opts.out.join("batch_size.png"), &panels, 3)?;

    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.label.clone(),
                pct(o.curve.train_accuracy.last().copied().unwrap_or(f64::NAN)),
                pct(o.population),
                pct(o.minibatch),
                format!("{:+.2} points", 100.0 * (o.minibatch - o.population)),
            ]
        })
        .collect();
    let summary = format!(
        "# batch-size{}\n\nWu & Johnson (2021) Sec. 4: MNIST MLP 784-100-100-100-10 (sigmoid, BN), total batch \
         {TOTAL_BATCH}, {} steps, SGD lr {} momentum {}, seed {}; BatchNorm over ghost batches of NBS samples. \
         Test accuracy over {} test images at the end of training.\n\n{}\nTraining accuracy is over the last {} \
         steps, before each update, with the training normalization. FrozenBN: the last {:.0}% of the steps of \
         an NBS-{} run normalize with the running statistics.\n\nThe paper's claim: at small NBS, evaluating with \
         mini-batch statistics beats population statistics (a train/test inconsistency); at large NBS the two \
         agree; FrozenBN at the end of training closes the gap for population statistics.\n\n\
         ![batch-size](batch_size.png)\n",
        if opts.quick { " (quick)" } else { "" },
        base.steps,
        base.sgd.lr,
        base.sgd.momentum,
        base.seed,
        data.test.len(),
        markdown_table(
            &[
                "run",
                "final training accuracy",
                "test, population statistics",
                "test, mini-batch statistics",
                "mini-batch minus population",
            ],
            &rows
        ),
        base.every,
        100.0 * FROZEN_FRACTION,
        NBS[0],
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
