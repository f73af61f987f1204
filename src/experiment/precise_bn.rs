//! `precise-bn`: Wu & Johnson (2021), Sec. 3. BatchNorm's population statistics at evaluation: the
//! exponential moving average of training (PyTorch momentum 0.1) against PreciseBN (the frozen model run
//! over K training samples, exact statistics merged with Chan's formula: [`precise_bn_mlp`]), at a small
//! and a large batch. At each evaluation point: evaluate with the EMA statistics; snapshot them, compute
//! PreciseBN statistics, evaluate again, and put the EMA statistics back, so training never sees PreciseBN
//! (`tests/experiment_metrics.rs` checks that a run's losses are the same with and without these evals).
//! The paper's claim: the EMA is stale or noisy, worst at a large batch with a high learning rate (few
//! steps, large weight changes per step); PreciseBN evaluates better and steadier.
//!
//! Choices (printed in config.json): the `ioffe-mnist` MLP with BN; batch 60 at SGD lr 0.1 and batch
//! 1000 at lr 1.0 (momentum 0.9 both); K training images drawn once (seed-determined) and used at every
//! point.

use std::sync::Arc;

use crate::data::{Batcher, Normalization, Split};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::nn::precise::precise_bn_mlp;
use crate::ops::sgd::SgdConfig;
use crate::plot::{line_charts, Chart};
use crate::train::Trainer;

use super::{
    create_dir, default_sgd, load_data, markdown_table, pct, run_json, train_run, write_config,
    write_csv, Curve, ExperimentModel, Options, Run,
};

/// Test `(mean loss, accuracy)` of `trainer`'s model with PreciseBN statistics over `batches` (rows of `[n, in]`, n at
/// most the model's capacity), after which the model's running statistics (and everything else) are
/// restored: training continues as if nothing happened. The model is in training mode afterwards.
///
/// # Errors
/// As [`precise_bn_mlp`] and [`Trainer::evaluate`]; device errors.
pub fn precise_bn_evaluate(
    gpu: &Arc<Gpu>,
    trainer: &mut Trainer,
    batches: &[Vec<f32>],
    test: &Split,
) -> Result<(f64, f64)> {
    let snapshot = trainer.snapshot()?;
    let refs: Vec<&[f32]> = batches.iter().map(Vec::as_slice).collect();
    let result = precise_bn_mlp(gpu, &mut trainer.model, &refs)
        .and_then(|()| trainer.evaluate(test, Normalization::Unit));
    trainer.restore_snapshot(&snapshot)?;
    trainer.model.train(true);
    result
}

/// `k` training images (a seed-determined sample without replacement), normalized, in batches of at most
/// `batch` rows.
///
/// # Errors
/// [`crate::Error::BadConfig`] when `k` is 0 or more than the split holds.
pub fn sample_batches(split: &Split, k: usize, batch: usize, seed: u64) -> Result<Vec<Vec<f32>>> {
    let mut sampler = Batcher::new(split.len(), k, seed)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    Ok(sampler
        .batch(0)
        .chunks(batch.max(1))
        .map(|chunk| {
            split.gather(chunk, Normalization::Unit, &mut x, &mut y);
            x.clone()
        })
        .collect())
}

/// One training run with EMA and PreciseBN evaluations: the curve (EMA test accuracy in its points) and
/// the PreciseBN test accuracy at each point (`None`: no PreciseBN evals, the control run).
///
/// # Errors
/// Device, data and shape errors.
pub fn run_with_precise_evals(
    gpu: &Arc<Gpu>,
    data: &crate::data::Dataset,
    run: &Run,
    tag: &str,
    precise: Option<&[Vec<f32>]>,
) -> Result<(Curve, Vec<f64>)> {
    let mut accs = Vec::new();
    let curve = train_run(gpu, data, run, tag, |p| {
        if let Some(batches) = precise {
            let (_, acc) = precise_bn_evaluate(gpu, p.trainer, batches, &data.test)?;
            println!(
                "  {tag}: step {:>6}  PreciseBN test acc {:6.2}%",
                p.step,
                100.0 * acc
            );
            accs.push(acc);
        }
        Ok(())
    })?;
    Ok((curve, accs))
}

/// Mean and standard deviation of the second half of `v` (the steadiness of a curve late in training).
fn late_stats(v: &[f64]) -> (f64, f64) {
    let late = &v[v.len() / 2..];
    if late.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = late.len() as f64;
    let mean = late.iter().sum::<f64>() / n;
    let var = late.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    opts.model.require_mlp("precise-bn")?;
    let data = load_data(opts.model.dataset(opts.dataset)?, opts)?;
    // (batch, lr, steps, every) per setting; K PreciseBN samples.
    let (settings_list, k) = if opts.quick {
        (
            [(60usize, 0.1f32, 100u64, 50u64), (1000, 1.0, 20, 10)],
            1000usize,
        )
    } else {
        ([(60, 0.1, 2000, 200), (1000, 1.0, 200, 20)], 4000)
    };
    create_dir(&opts.out)?;
    let runs: Vec<Run> = settings_list
        .iter()
        .map(|&(batch_size, lr, steps, every)| {
            let steps = opts.steps.unwrap_or(steps);
            Run {
                model: ExperimentModel::Mlp,
                bn: true,
                sgd: SgdConfig {
                    lr,
                    ..default_sgd()
                },
                steps,
                batch_size,
                seed: opts.seed,
                every: every.min(steps).max(1),
            }
        })
        .collect();
    let mut settings = serde_json::Map::new();
    settings.insert(
        "runs".into(),
        serde_json::json!(runs.iter().map(run_json).collect::<Vec<_>>()),
    );
    settings.insert("dataset".into(), "mnist".into());
    settings.insert(
        "ema".into(),
        "PyTorch running statistics, momentum 0.1".into(),
    );
    settings.insert(
        "precise_bn".into(),
        format!(
            "{k} training images (sampled once, seed {}), batches of 1000, layer by layer in eval mode, \
             Chan merge, unbiased variance; EMA statistics restored after each evaluation",
            opts.seed
        )
        .into(),
    );
    settings.insert("precise_samples".into(), k.into());
    write_config(gpu, "precise-bn", opts, settings)?;
    let batches = sample_batches(
        &data.train,
        k.min(data.train.len()),
        1000,
        opts.seed ^ 0x5eed,
    )?;

    let mut results = Vec::new();
    for run in &runs {
        let tag = format!("batch {} lr {}", run.batch_size, run.sgd.lr);
        let (curve, precise) = run_with_precise_evals(gpu, &data, run, &tag, Some(&batches))?;
        let rows: Vec<Vec<f64>> = curve
            .points
            .iter()
            .zip(&curve.train_accuracy)
            .zip(&precise)
            .map(|((&(s, l, ema), &ta), &p)| vec![s as f64, l, ta, ema, p])
            .collect();
        write_csv(
            &opts.out.join(format!("precise_b{}.csv", run.batch_size)),
            &[
                "step",
                "train_loss",
                "train_accuracy",
                "ema_test_accuracy",
                "precise_test_accuracy",
            ],
            &rows,
        )?;
        results.push((run.clone(), curve, precise));
    }

    let mut panels = Vec::new();
    for (run, curve, precise) in &results {
        let steps: Vec<f64> = curve.points.iter().map(|p| p.0 as f64).collect();
        panels.push(
            Chart::new(
                format!(
                    "Batch {}, lr {}: test accuracy by statistics (Wu & Johnson Sec. 3)",
                    run.batch_size, run.sgd.lr
                ),
                "training step",
                "test accuracy",
            )
            .with(
                "EMA (momentum 0.1)",
                steps
                    .iter()
                    .zip(&curve.points)
                    .map(|(&s, p)| (s, p.2))
                    .collect(),
            )
            .with(
                format!("PreciseBN ({k} samples)"),
                steps.iter().copied().zip(precise.iter().copied()).collect(),
            ),
        );
    }
    panels.push(results.iter().fold(
        Chart::new(
            "PreciseBN minus EMA test accuracy",
            "fraction of training done",
            "accuracy gain of PreciseBN",
        ),
        |c, (run, curve, precise)| {
            c.with(
                format!("batch {}", run.batch_size),
                curve
                    .points
                    .iter()
                    .zip(precise)
                    .map(|(p, &a)| (p.0 as f64 / run.steps as f64, a - p.2))
                    .collect(),
            )
        },
    ));
    line_charts(&opts.out.join("precise_bn.png"), &panels, 3)?;

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(run, curve, precise)| {
            let ema: Vec<f64> = curve.points.iter().map(|p| p.2).collect();
            let gap: Vec<f64> = ema.iter().zip(precise).map(|(e, p)| p - e).collect();
            let (ema_mean, ema_std) = late_stats(&ema);
            let (p_mean, p_std) = late_stats(precise);
            vec![
                format!(
                    "batch {}, lr {}, {} steps",
                    run.batch_size, run.sgd.lr, run.steps
                ),
                pct(curve.final_accuracy()),
                pct(precise.last().copied().unwrap_or(f64::NAN)),
                format!("{} ± {:.2}", pct(ema_mean), 100.0 * ema_std),
                format!("{} ± {:.2}", pct(p_mean), 100.0 * p_std),
                format!("{:+.2} points", 100.0 * late_stats(&gap).0),
                format!(
                    "{:+.2} points (largest {:+.2})",
                    100.0 * gap.iter().sum::<f64>() / gap.len().max(1) as f64,
                    100.0 * gap.iter().cloned().fold(f64::MIN, f64::max)
                ),
                format!(
                    "{} of {}",
                    gap.iter().filter(|&&g| g >= 0.0).count(),
                    gap.len()
                ),
            ]
        })
        .collect();
    let summary = format!(
        "# precise-bn{}\n\nWu & Johnson (2021) Sec. 3: MNIST MLP 784-100-100-100-10 (sigmoid, BN), SGD momentum \
         0.9, seed {}; test accuracy at each evaluation point with the EMA running statistics (momentum 0.1) and \
         with PreciseBN statistics over {k} training images (then the EMA statistics are put back).\n\n{}\n\
         \"Late\" is the second half of the evaluation points: mean ± standard deviation (in points) across \
         them.\n\nThe paper's claim: PreciseBN's statistics evaluate better and steadier than the EMA's, most \
         of all at a large batch with a high learning rate, where the EMA lags behind the fast-changing \
         model.\n\n![precise-bn](precise_bn.png)\n",
        if opts.quick { " (quick)" } else { "" },
        opts.seed,
        markdown_table(
            &[
                "setting",
                "final EMA test acc.",
                "final PreciseBN test acc.",
                "late EMA",
                "late PreciseBN",
                "late mean gain",
                "mean gain, all points",
                "points where PreciseBN >= EMA",
            ],
            &rows
        ),
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
