//! BatchNorm in f64, PyTorch's `nn.BatchNorm*d` semantics (Ioffe & Szegedy 2015, Alg. 1 and 2).
//!
//! Forward with batch statistics: mean and biased variance over (N, spatial) per channel,
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`; the running statistics take the unbiased variance.
//! Backward: `dbias = sum(dy)`, `dweight = sum(dy * xhat)`,
//! `dx = weight * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M)` (batch statistics) or
//! `dx = weight * invstd * dy` (running statistics).

use crate::error::{Error, Result};
use crate::tensor::{BnDims, Layout};

/// The running state a BatchNorm layer carries between calls (PyTorch's buffers).
#[derive(Clone, Debug, PartialEq)]
pub struct RunningStats {
    /// `running_mean`, one per channel.
    pub mean: Vec<f64>,
    /// `running_var` (unbiased), one per channel.
    pub var: Vec<f64>,
    /// `num_batches_tracked`.
    pub num_batches_tracked: i64,
}

impl RunningStats {
    /// PyTorch's initial state: mean 0, var 1, no batches.
    pub fn new(channels: usize) -> Self {
        RunningStats {
            mean: vec![0.0; channels],
            var: vec![1.0; channels],
            num_batches_tracked: 0,
        }
    }
}

/// Result of [`forward`].
#[derive(Clone, Debug)]
pub struct ForwardOut {
    /// Output, same layout as the input.
    pub y: Vec<f64>,
    /// The mean used per channel (batch or running).
    pub mean: Vec<f64>,
    /// 1/sqrt(var + eps) used per channel.
    pub invstd: Vec<f64>,
    /// Whether batch statistics were used (then `mean`/`invstd` are PyTorch's save_mean/save_invstd).
    pub batch_stats: bool,
}

/// Result of [`backward`].
#[derive(Clone, Debug)]
pub struct BackwardOut {
    /// Gradient w.r.t. the input, same layout.
    pub dx: Vec<f64>,
    /// Gradient w.r.t. weight (sum of dy * xhat).
    pub dweight: Vec<f64>,
    /// Gradient w.r.t. bias (sum of dy).
    pub dbias: Vec<f64>,
}

/// Per-channel mean and biased variance, two-pass in f64.
pub fn channel_stats(x: &[f64], dims: BnDims, layout: Layout) -> (Vec<f64>, Vec<f64>) {
    let m = dims.per_channel() as f64;
    let mut mean = vec![0.0; dims.c];
    let mut var = vec![0.0; dims.c];
    for_each(dims, layout, |i, c| mean[c] += x[i]);
    mean.iter_mut().for_each(|v| *v /= m);
    for_each(dims, layout, |i, c| var[c] += (x[i] - mean[c]).powi(2));
    var.iter_mut().for_each(|v| *v /= m);
    (mean, var)
}

fn for_each(dims: BnDims, layout: Layout, mut f: impl FnMut(usize, usize)) {
    for n in 0..dims.n {
        for c in 0..dims.c {
            for s in 0..dims.spatial {
                f(dims.index(layout, n, c, s), c);
            }
        }
    }
}

/// BatchNorm forward.
///
/// `training` with `running: Some` updates the running statistics (momentum `Some(m)`:
/// `r = (1-m) r + m batch`; `None`: cumulative average over `num_batches_tracked`). Batch statistics are
/// used when `training` or when there are no running statistics (`track_running_stats=false`).
///
/// # Errors
/// [`Error::OneValuePerChannel`] when batch statistics are needed over one value per channel;
/// [`Error::ShapeMismatch`] for inconsistent lengths.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    running: Option<&mut RunningStats>,
    training: bool,
    momentum: Option<f64>,
    eps: f64,
) -> Result<ForwardOut> {
    let dims = layout.dims(shape)?;
    check_len("x", x.len(), dims.numel())?;
    for (name, v) in [("weight", weight), ("bias", bias)] {
        if let Some(v) = v {
            check_len(name, v.len(), dims.c)?;
        }
    }
    let batch_stats = training || running.is_none();
    let (mean, invstd) = if batch_stats {
        let m = dims.per_channel();
        if m <= 1 {
            return Err(Error::OneValuePerChannel {
                shape: shape.to_vec(),
                count: m,
            });
        }
        let (mean, var) = channel_stats(x, dims, layout);
        if let (true, Some(r)) = (training, running) {
            check_len("running_mean", r.mean.len(), dims.c)?;
            check_len("running_var", r.var.len(), dims.c)?;
            r.num_batches_tracked += 1;
            let f = momentum.unwrap_or(1.0 / r.num_batches_tracked as f64);
            let unbias = m as f64 / (m as f64 - 1.0);
            for c in 0..dims.c {
                r.mean[c] = (1.0 - f) * r.mean[c] + f * mean[c];
                r.var[c] = (1.0 - f) * r.var[c] + f * var[c] * unbias;
            }
        }
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        (mean, invstd)
    } else {
        let r = running.expect("eval without batch statistics has running statistics");
        check_len("running_mean", r.mean.len(), dims.c)?;
        check_len("running_var", r.var.len(), dims.c)?;
        (
            r.mean.clone(),
            r.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
        )
    };
    let mut y = vec![0.0; x.len()];
    for_each(dims, layout, |i, c| {
        let g = weight.map_or(1.0, |w| w[c]);
        let b = bias.map_or(0.0, |b| b[c]);
        y[i] = (x[i] - mean[c]) * invstd[c] * g + b;
    });
    Ok(ForwardOut {
        y,
        mean,
        invstd,
        batch_stats,
    })
}

/// BatchNorm backward, given the statistics the forward used.
///
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    mean: &[f64],
    invstd: &[f64],
    batch_stats: bool,
) -> Result<BackwardOut> {
    let dims = layout.dims(shape)?;
    check_len("x", x.len(), dims.numel())?;
    check_len("dy", dy.len(), dims.numel())?;
    check_len("mean", mean.len(), dims.c)?;
    check_len("invstd", invstd.len(), dims.c)?;
    let m = dims.per_channel() as f64;
    let mut dbias = vec![0.0; dims.c];
    let mut dweight = vec![0.0; dims.c];
    for_each(dims, layout, |i, c| {
        dbias[c] += dy[i];
        dweight[c] += dy[i] * (x[i] - mean[c]) * invstd[c];
    });
    let mut dx = vec![0.0; x.len()];
    for_each(dims, layout, |i, c| {
        let g = weight.map_or(1.0, |w| w[c]);
        let xhat = (x[i] - mean[c]) * invstd[c];
        dx[i] = if batch_stats {
            g * invstd[c] * (dy[i] - dbias[c] / m - xhat * dweight[c] / m)
        } else {
            g * invstd[c] * dy[i]
        };
    });
    Ok(BackwardOut { dx, dweight, dbias })
}

fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::ShapeMismatch {
            what: what.to_string(),
            expected: format!("{expected} values"),
            got: format!("{got} values"),
        });
    }
    Ok(())
}
