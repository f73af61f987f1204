//! `noisy-bn`: Santurkar et al. (2018), Fig. 2. Four MNIST MLPs trained alike: standard (no BN), BN,
//! "noisy BN" (BN followed by noise of non-zero mean and non-unit variance whose distribution changes
//! every step, [`crate::ops::noise`]), and the same noise without BN. Curves: training loss, training and
//! test accuracy against steps; and the distribution (15th/50th/85th percentiles over the training batch)
//! of one unit's sigmoid input — the BN output, after the noise where there is noise — over training.
//! The paper's claim: noisy BN trains about as well as BN although its activations shift far more; the
//! same noise without BN hurts training badly.
//!
//! Choices (printed in config.json): the `ioffe-mnist` MLP (784-100-100-100-10 sigmoid, N(0, 0.1²) init,
//! SGD lr 0.1 momentum 0.9, batch 60); the noise sits right before every hidden sigmoid (after its
//! BatchNorm, or after its Linear without BN), with the default [`NoiseConfig`]; it acts in training only
//! (evaluation has no noise). The followed unit is unit 0 of the last hidden layer, over the 60 rows of
//! the training batch at each measurement, taken from that training step's own forward.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::write_atomically;
use crate::nn::{Init, LayerSpec, MlpConfig, ModelConfig};
use crate::ops::noise::NoiseConfig;
use crate::plot::{line_charts, Chart};
use crate::reference::probe::percentile;
use crate::train::Trainer;

use super::{
    create_dir, curve_rows, default_sgd, load_data, markdown_table, pct, run_json, train_model,
    write_config, write_csv, ExperimentModel, Options, Run, CURVE_HEADER,
};

/// Which unit's sigmoid input is followed (of the last hidden layer).
pub const UNIT: usize = 0;
const PERCENTILES: [f64; 3] = [15.0, 50.0, 85.0];

/// One of the four networks.
#[derive(Clone, Copy, Debug)]
struct Variant {
    label: &'static str,
    tag: &'static str,
    bn: bool,
    noise: bool,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        label: "standard (no BN)",
        tag: "standard",
        bn: false,
        noise: false,
    },
    Variant {
        label: "BN",
        tag: "bn",
        bn: true,
        noise: false,
    },
    Variant {
        label: "noisy BN",
        tag: "noisy_bn",
        bn: true,
        noise: true,
    },
    Variant {
        label: "noise, no BN",
        tag: "noise_no_bn",
        bn: false,
        noise: true,
    },
];

/// The MLP of `run` with `noise` inserted before every sigmoid (after its BatchNorm, if any).
///
/// # Errors
/// As [`MlpConfig::specs`].
pub fn noisy_mlp(bn: bool, noise: Option<NoiseConfig>, seed: u64) -> Result<ModelConfig> {
    let mlp = MlpConfig {
        init: Init::Gaussian { std: 0.1 },
        ..MlpConfig::ioffe(bn, seed)
    };
    let mut specs = Vec::new();
    for spec in mlp.specs()? {
        if let (LayerSpec::Sigmoid, Some(config)) = (&spec, noise) {
            specs.push(LayerSpec::Noise(config));
        }
        specs.push(spec);
    }
    Ok(ModelConfig::Layers {
        input_shape: vec![mlp.sizes[0]],
        specs,
        init: Some(mlp.init),
        seed,
    })
}

/// `[step, p15, p50, p85]` of unit [`UNIT`] of the last sigmoid's input over the `rows` rows of the last
/// training forward.
fn followed_percentiles(gpu: &Gpu, t: &Trainer, step: u64, rows: usize) -> Result<Vec<f64>> {
    let layer = t
        .last_activation_layer()
        .ok_or_else(|| Error::config("the model has no sigmoid to follow"))?;
    let width = t.model.shape_at(layer).map_or(0, |s| s.iter().product());
    let buffer = t
        .model
        .activation(layer)
        .ok_or_else(|| Error::config("missing activation buffer"))?;
    let values = gpu.download::<f32>(buffer, 0, rows * width)?;
    let column: Vec<f64> = values.chunks(width).map(|r| r[UNIT] as f64).collect();
    let mut row = vec![step as f64];
    row.extend(PERCENTILES.iter().map(|&q| percentile(&column, q)));
    Ok(row)
}

/// Mean |change| of the median between consecutive measurements: how much the distribution shifts.
fn median_shift(rows: &[Vec<f64>]) -> f64 {
    if rows.len() < 2 {
        return 0.0;
    }
    rows.windows(2)
        .map(|w| (w[1][2] - w[0][2]).abs())
        .sum::<f64>()
        / (rows.len() - 1) as f64
}

/// Runs the experiment into `opts.out`.
///
/// # Errors
/// Data, device and file errors.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<()> {
    opts.model.require_mlp("noisy-bn")?;
    let data = load_data(opts.model.dataset(opts.dataset)?, opts)?;
    let (steps, every) = if opts.quick { (300, 50) } else { (5000, 250) };
    let steps = opts.steps.unwrap_or(steps);
    let every = every.min(steps).max(1);
    create_dir(&opts.out)?;
    let noise = NoiseConfig::default();
    let base = Run {
        model: ExperimentModel::Mlp,
        bn: true,
        sgd: default_sgd(),
        steps,
        batch_size: 60,
        seed: opts.seed,
        every,
    };
    let mut settings = serde_json::Map::new();
    settings.insert("run".into(), run_json(&base));
    settings.insert("dataset".into(), "mnist".into());
    settings.insert(
        "networks".into(),
        serde_json::json!(VARIANTS.iter().map(|v| v.label).collect::<Vec<_>>()),
    );
    settings.insert("noise".into(), noise.describe().into());
    settings.insert(
        "noise_config".into(),
        serde_json::json!({
            "shift_range": noise.shift_range, "scale_range": noise.scale_range,
            "shift_jitter": noise.shift_jitter, "scale_jitter": noise.scale_jitter,
        }),
    );
    settings.insert(
        "noise_position".into(),
        "before every hidden sigmoid: after its BatchNorm (noisy BN) or its Linear (noise, no BN)"
            .into(),
    );
    settings.insert(
        "followed_unit".into(),
        format!(
            "unit {UNIT} of the last hidden layer's sigmoid input, over the {} rows of the training batch \
             at each measurement (that step's own training forward)",
            base.batch_size
        )
        .into(),
    );
    write_config(gpu, "noisy-bn", opts, settings)?;

    let mut results = Vec::new();
    for v in VARIANTS {
        let run = Run {
            bn: v.bn,
            ..base.clone()
        };
        let model = noisy_mlp(v.bn, v.noise.then_some(noise), run.seed)?;
        let mut acts: Vec<Vec<f64>> = Vec::new();
        let curve = train_model(
            gpu,
            &data,
            &model,
            &run,
            v.label,
            |done, t| {
                if done == 0 {
                    // The followed sigmoid input is read from the training forward: keep it written.
                    t.model.set_fuse_bn_sigmoid(false);
                }
                if done > 0 && (done % run.every == 0 || done == run.steps) {
                    acts.push(followed_percentiles(gpu, t, done, run.batch_size)?);
                }
                Ok(())
            },
            |_| Ok(()),
        )?;
        write_csv(
            &opts.out.join(format!("curve_{}.csv", v.tag)),
            &CURVE_HEADER,
            &curve_rows(&curve),
        )?;
        write_csv(
            &opts.out.join(format!("activation_{}.csv", v.tag)),
            &["step", "p15", "p50", "p85"],
            &acts,
        )?;
        results.push((v, curve, acts));
    }

    let curve_chart = |title: &str, y: &str, pick: &dyn Fn(&super::Curve) -> Vec<(f64, f64)>| {
        results
            .iter()
            .fold(Chart::new(title, "training step", y), |c, (v, curve, _)| {
                c.with(v.label, pick(curve))
            })
    };
    let panels = vec![
        curve_chart(
            "MNIST MLP: training loss (Santurkar Fig. 2)",
            "training loss (mean since last point)",
            &|c| c.points.iter().map(|&(s, l, _)| (s as f64, l)).collect(),
        )
        .log_y(),
        curve_chart("Training accuracy", "training accuracy", &|c| {
            c.points
                .iter()
                .zip(&c.train_accuracy)
                .map(|(p, &a)| (p.0 as f64, a))
                .collect()
        }),
        curve_chart(
            "Test accuracy (no noise at test time)",
            "test accuracy",
            &|c| c.points.iter().map(|&(s, _, a)| (s as f64, a)).collect(),
        ),
    ];
    line_charts(&opts.out.join("noisy_bn.png"), &panels, 3)?;
    let act_panels: Vec<Chart> = results
        .iter()
        .map(|(v, _, acts)| {
            PERCENTILES.iter().enumerate().fold(
                Chart::new(
                    format!("Input of a last-layer sigmoid, {}", v.label),
                    "training step",
                    "sigmoid input (training batch)",
                ),
                |c, (k, q)| {
                    c.with(
                        format!("{q:.0}th percentile"),
                        acts.iter().map(|r| (r[0], r[k + 1])).collect(),
                    )
                },
            )
        })
        .collect();
    line_charts(&opts.out.join("noisy_bn_activations.png"), &act_panels, 2)?;

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(v, curve, acts)| {
            let last = curve
                .points
                .last()
                .copied()
                .unwrap_or((0, f64::NAN, f64::NAN));
            let last_act = acts.last().cloned().unwrap_or_default();
            vec![
                v.label.to_string(),
                format!("{:.4}", last.1),
                pct(curve.train_accuracy.last().copied().unwrap_or(f64::NAN)),
                pct(curve.final_accuracy()),
                format!(
                    "{:.3} / {:.3} / {:.3}",
                    last_act.get(1).unwrap_or(&f64::NAN),
                    last_act.get(2).unwrap_or(&f64::NAN),
                    last_act.get(3).unwrap_or(&f64::NAN)
                ),
                format!("{:.3}", median_shift(acts)),
            ]
        })
        .collect();
    let summary = format!(
        "# noisy-bn{}\n\nSanturkar et al. (2018) Fig. 2: MNIST MLP 784-100-100-100-10 (sigmoid), batch {}, {} \
         steps, SGD lr {} momentum {}, seed {}. Noise: {}.\n\n{}\nThe training numbers are over the last {} \
         steps (noise on where the network has it); test accuracy is without noise. Percentiles and the shift \
         are of the input of sigmoid {UNIT} of the last hidden layer over each measured training batch; the \
         shift is the mean |change| of its median between consecutive measurements (every {} steps).\n\n\
         The paper's claim: noisy BN trains about as well as BN although its activation distribution \
         shifts far more than the standard network's; the same noise without BN stops the network from \
         training well.\n\n![curves](noisy_bn.png)\n\n![activations](noisy_bn_activations.png)\n",
        if opts.quick { " (quick)" } else { "" },
        base.batch_size,
        base.steps,
        base.sgd.lr,
        base.sgd.momentum,
        base.seed,
        noise.describe(),
        markdown_table(
            &[
                "network",
                "final train loss",
                "final train accuracy",
                "final test accuracy",
                "p15 / p50 / p85 at the end",
                "median shift per point",
            ],
            &rows
        ),
        base.every,
        base.every,
    );
    print!("{summary}");
    write_atomically(&opts.out.join("summary.md"), summary.as_bytes())
}
