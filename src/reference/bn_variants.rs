//! The BatchNorm variants in f64: ghost BatchNorm, Batch Renormalization, FrozenBN, PreciseBN's
//! population statistics and inference folding. Each is written out from its definition (or, where the
//! variant is plain BatchNorm applied differently, from [`super::batchnorm`]) so the GPU paths in
//! [`crate::nn::BatchNorm`] and [`crate::nn::fold`] have something independent to be checked against.
//!
//! Every ghost batch, every sample slice, is contiguous in all three layouts because N is the outermost
//! axis of NCHW, NHWC and NC alike.

use crate::error::{Error, Result};
use crate::reference::batchnorm::{self, channel_stats, BackwardOut, RunningStats};
use crate::tensor::Layout;

/// Result of [`ghost_forward`].
#[derive(Clone, Debug)]
pub struct GhostForwardOut {
    /// Output, same layout as the input.
    pub y: Vec<f64>,
    /// Per ghost batch: the mean it was normalized with.
    pub means: Vec<Vec<f64>>,
    /// Per ghost batch: 1/sqrt(biased var + eps).
    pub invstds: Vec<Vec<f64>>,
}

/// Shape of one ghost batch of `virtual_batch_size` samples, after checking that it divides N.
///
/// # Errors
/// [`Error::BadConfig`] when `virtual_batch_size` is 0 or does not divide N.
pub fn ghost_shape(shape: &[usize], virtual_batch_size: usize) -> Result<Vec<usize>> {
    let n = shape.first().copied().unwrap_or(0);
    if virtual_batch_size == 0 || n % virtual_batch_size != 0 {
        return Err(Error::config(format!(
            "virtual_batch_size {virtual_batch_size} must be at least 1 and divide the batch size {n} \
             (input shape {shape:?})"
        )));
    }
    let mut ghost = shape.to_vec();
    ghost[0] = virtual_batch_size;
    Ok(ghost)
}

/// Ghost BatchNorm forward (Hoffer et al. 2017; Keras's `virtual_batch_size`): each run of
/// `virtual_batch_size` consecutive samples is normalized with its own mean and biased variance; gamma and
/// beta are shared. With `running: Some`, the running statistics move once for the whole batch, towards the
/// average of the ghost batches' means and the average of their unbiased variances (Keras averages the
/// ghost moments the same way; it keeps the biased variance, this crate keeps PyTorch's unbiased one), with
/// factor `momentum`, or 1/num_batches_tracked when `momentum` is `None`.
///
/// # Errors
/// As [`ghost_shape`]; [`Error::OneValuePerChannel`] for a ghost batch of one value per channel.
#[allow(clippy::too_many_arguments)]
pub fn ghost_forward(
    x: &[f64],
    shape: &[usize],
    layout: Layout,
    virtual_batch_size: usize,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    running: Option<&mut RunningStats>,
    momentum: Option<f64>,
    eps: f64,
) -> Result<GhostForwardOut> {
    let ghost = ghost_shape(shape, virtual_batch_size)?;
    let gdims = layout.dims(&ghost)?;
    let glen = gdims.numel();
    let ghosts = shape[0] / virtual_batch_size;
    check_len("x", x.len(), glen * ghosts)?;
    let mut out = GhostForwardOut {
        y: Vec::with_capacity(x.len()),
        means: Vec::new(),
        invstds: Vec::new(),
    };
    let mut var_sum = vec![0.0; gdims.c];
    for g in 0..ghosts {
        let xs = &x[g * glen..(g + 1) * glen];
        let f = batchnorm::forward(xs, &ghost, layout, weight, bias, None, true, None, eps)?;
        let (_, var) = channel_stats(xs, gdims, layout);
        var_sum.iter_mut().zip(&var).for_each(|(s, v)| *s += v);
        out.y.extend_from_slice(&f.y);
        out.means.push(f.mean);
        out.invstds.push(f.invstd);
    }
    if let Some(r) = running {
        check_len("running_mean", r.mean.len(), gdims.c)?;
        check_len("running_var", r.var.len(), gdims.c)?;
        r.num_batches_tracked += 1;
        let f = momentum.unwrap_or(1.0 / r.num_batches_tracked as f64);
        let m = gdims.per_channel() as f64;
        for c in 0..gdims.c {
            let mean = out.means.iter().map(|v| v[c]).sum::<f64>() / ghosts as f64;
            let var = var_sum[c] / ghosts as f64 * m / (m - 1.0);
            r.mean[c] = (1.0 - f) * r.mean[c] + f * mean;
            r.var[c] = (1.0 - f) * r.var[c] + f * var;
        }
    }
    Ok(out)
}

/// Ghost BatchNorm backward: the ordinary batch-statistics backward within each ghost batch; the
/// parameter gradients summed over the ghost batches.
///
/// # Errors
/// As [`ghost_shape`]; [`Error::ShapeMismatch`] for inconsistent lengths.
pub fn ghost_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    layout: Layout,
    virtual_batch_size: usize,
    weight: Option<&[f64]>,
    fwd: &GhostForwardOut,
) -> Result<BackwardOut> {
    let ghost = ghost_shape(shape, virtual_batch_size)?;
    let gdims = layout.dims(&ghost)?;
    let glen = gdims.numel();
    let ghosts = shape[0] / virtual_batch_size;
    check_len("x", x.len(), glen * ghosts)?;
    check_len("dy", dy.len(), glen * ghosts)?;
    check_len("ghost statistics", fwd.means.len(), ghosts)?;
    let mut out = BackwardOut {
        dx: Vec::with_capacity(x.len()),
        dweight: vec![0.0; gdims.c],
        dbias: vec![0.0; gdims.c],
    };
    for g in 0..ghosts {
        let s = g * glen..(g + 1) * glen;
        let b = batchnorm::backward(
            &x[s.clone()],
            &dy[s],
            &ghost,
            layout,
            weight,
            &fwd.means[g],
            &fwd.invstds[g],
            true,
        )?;
        out.dx.extend_from_slice(&b.dx);
        out.dweight
            .iter_mut()
            .zip(&b.dweight)
            .for_each(|(a, v)| *a += v);
        out.dbias
            .iter_mut()
            .zip(&b.dbias)
            .for_each(|(a, v)| *a += v);
    }
    Ok(out)
}

/// Result of [`renorm_forward`].
#[derive(Clone, Debug)]
pub struct RenormForwardOut {
    /// Output, same layout as the input.
    pub y: Vec<f64>,
    /// Batch mean.
    pub mean: Vec<f64>,
    /// Batch 1/sqrt(biased var + eps).
    pub invstd: Vec<f64>,
    /// r = clip(sigma_B / sigma_run, 1/rmax, rmax).
    pub r: Vec<f64>,
    /// d = clip((mu_B - mu_run) / sigma_run, -dmax, dmax).
    pub d: Vec<f64>,
}

/// Batch Renormalization forward (Ioffe 2017, Alg. 1) in training mode. With sigma_B = sqrt(var_B + eps)
/// and sigma_run = sqrt(running_var + eps) from the running statistics *before* this step's update:
/// `r = clip(sigma_B/sigma_run, 1/rmax, rmax)`, `d = clip((mu_B - mu_run)/sigma_run, -dmax, dmax)`,
/// `y = gamma * (xhat * r + d) + beta` with xhat from the batch statistics. The running statistics then
/// move as in ordinary BatchNorm (momentum or cumulative average; unbiased variance).
///
/// # Errors
/// [`Error::BadConfig`] for rmax < 1 or dmax < 0; as [`batchnorm::forward`].
#[allow(clippy::too_many_arguments)]
pub fn renorm_forward(
    x: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    running: &mut RunningStats,
    momentum: Option<f64>,
    eps: f64,
    rmax: f64,
    dmax: f64,
) -> Result<RenormForwardOut> {
    if !(rmax >= 1.0 && rmax.is_finite() && dmax >= 0.0 && dmax.is_finite()) {
        return Err(Error::config(format!(
            "batch renormalization needs finite rmax >= 1 and dmax >= 0, got rmax {rmax}, dmax {dmax}"
        )));
    }
    let before = running.clone();
    let f = batchnorm::forward(
        x,
        shape,
        layout,
        weight,
        bias,
        Some(running),
        true,
        momentum,
        eps,
    )?;
    let dims = layout.dims(shape)?;
    let mut r = vec![0.0; dims.c];
    let mut d = vec![0.0; dims.c];
    for c in 0..dims.c {
        let sigma_run = (before.var[c] + eps).sqrt();
        r[c] = (1.0 / f.invstd[c] / sigma_run).clamp(1.0 / rmax, rmax);
        d[c] = ((f.mean[c] - before.mean[c]) / sigma_run).clamp(-dmax, dmax);
    }
    let mut y = vec![0.0; x.len()];
    for n in 0..dims.n {
        for c in 0..dims.c {
            let g = weight.map_or(1.0, |w| w[c]);
            let b = bias.map_or(0.0, |b| b[c]);
            for s in 0..dims.spatial {
                let i = dims.index(layout, n, c, s);
                let xhat = (x[i] - f.mean[c]) * f.invstd[c];
                y[i] = g * (xhat * r[c] + d[c]) + b;
            }
        }
    }
    Ok(RenormForwardOut {
        y,
        mean: f.mean,
        invstd: f.invstd,
        r,
        d,
    })
}

/// Batch Renormalization backward with r and d held constant (the paper's rule):
/// `dx = r * gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`,
/// `dgamma = sum(dy * (r * xhat + d))`, `dbeta = sum(dy)`.
///
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths.
#[allow(clippy::too_many_arguments)]
pub fn renorm_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    fwd: &RenormForwardOut,
) -> Result<BackwardOut> {
    let dims = layout.dims(shape)?;
    check_len("x", x.len(), dims.numel())?;
    check_len("dy", dy.len(), dims.numel())?;
    let m = dims.per_channel() as f64;
    let mut sum_dy = vec![0.0; dims.c];
    let mut sum_dy_xhat = vec![0.0; dims.c];
    let xhat = |i: usize, c: usize| (x[i] - fwd.mean[c]) * fwd.invstd[c];
    for n in 0..dims.n {
        for c in 0..dims.c {
            for s in 0..dims.spatial {
                let i = dims.index(layout, n, c, s);
                sum_dy[c] += dy[i];
                sum_dy_xhat[c] += dy[i] * xhat(i, c);
            }
        }
    }
    let mut dx = vec![0.0; x.len()];
    for n in 0..dims.n {
        for c in 0..dims.c {
            let g = weight.map_or(1.0, |w| w[c]);
            for s in 0..dims.spatial {
                let i = dims.index(layout, n, c, s);
                dx[i] = fwd.r[c]
                    * g
                    * fwd.invstd[c]
                    * (dy[i] - sum_dy[c] / m - xhat(i, c) * sum_dy_xhat[c] / m);
            }
        }
    }
    let dweight = (0..dims.c)
        .map(|c| fwd.r[c] * sum_dy_xhat[c] + fwd.d[c] * sum_dy[c])
        .collect();
    Ok(BackwardOut {
        dx,
        dweight,
        dbias: sum_dy,
    })
}

/// FrozenBN forward (Wu & Johnson 2021): training, but normalized with the running statistics, which stay
/// as they are. Returns y and the (mean, invstd) used.
///
/// # Errors
/// As [`batchnorm::forward`].
#[allow(clippy::too_many_arguments)]
pub fn frozen_forward(
    x: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    running: &RunningStats,
    eps: f64,
) -> Result<batchnorm::ForwardOut> {
    // Eval-mode BatchNorm on a copy: the frozen layer never moves its statistics.
    let mut copy = running.clone();
    batchnorm::forward(
        x,
        shape,
        layout,
        weight,
        bias,
        Some(&mut copy),
        false,
        None,
        eps,
    )
}

/// FrozenBN backward: the statistics are constants, so `dx = gamma * invstd_run * dy`,
/// `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)` with xhat from the running statistics.
///
/// # Errors
/// As [`batchnorm::backward`].
pub fn frozen_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    fwd: &batchnorm::ForwardOut,
) -> Result<BackwardOut> {
    batchnorm::backward(x, dy, shape, layout, weight, &fwd.mean, &fwd.invstd, false)
}

/// PreciseBN's population statistics: per-channel mean and *unbiased* variance over every batch taken
/// together (as if the batches were concatenated along N), two-pass in f64. Batches may differ in N but
/// not in the other dimensions.
///
/// # Errors
/// [`Error::ShapeMismatch`] for batches of other channel or spatial sizes; [`Error::BadConfig`] for fewer
/// than two values per channel in all.
pub fn precise_stats(
    batches: &[(&[f64], &[usize])],
    layout: Layout,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let Some((_, first)) = batches.first() else {
        return Err(Error::config("PreciseBN needs at least one batch"));
    };
    let d0 = layout.dims(first)?;
    let mut all = Vec::new();
    let mut n = 0;
    for (x, shape) in batches {
        let d = layout.dims(shape)?;
        if (d.c, d.spatial) != (d0.c, d0.spatial) {
            return Err(Error::ShapeMismatch {
                what: "PreciseBN batch".into(),
                expected: format!("the channels and spatial size of {first:?}"),
                got: format!("{shape:?}"),
            });
        }
        check_len("batch", x.len(), d.numel())?;
        all.extend_from_slice(x);
        n += d.n;
    }
    let mut shape = first.to_vec();
    shape[0] = n;
    let dims = layout.dims(&shape)?;
    let m = dims.per_channel() as f64;
    if m < 2.0 {
        return Err(Error::config(
            "PreciseBN needs at least two values per channel for an unbiased variance",
        ));
    }
    let (mean, var) = channel_stats(&all, dims, layout);
    Ok((mean, var.iter().map(|v| v * m / (m - 1.0)).collect()))
}

/// Folds an eval-mode BatchNorm over the outputs of a `Linear` (`weight [out, in]`, `bias [out]`) into
/// that Linear: with `s = gamma / sqrt(running_var + eps)`, `W' = s[o] * W[o, :]` and
/// `b' = s * (b - running_mean) + beta`. Missing gamma/beta/bias count as 1/0/0.
///
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths.
#[allow(clippy::too_many_arguments)]
pub fn fold_linear(
    weight: &[f64],
    bias: Option<&[f64]>,
    out_features: usize,
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if out_features == 0 || weight.len() % out_features != 0 {
        return Err(Error::ShapeMismatch {
            what: "Linear weight to fold".into(),
            expected: format!("a multiple of {out_features} values (out_features)"),
            got: format!("{} values", weight.len()),
        });
    }
    let fan_in = weight.len() / out_features;
    for (what, v) in [
        ("bias", bias),
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", Some(running_mean)),
        ("running_var", Some(running_var)),
    ] {
        if let Some(v) = v {
            check_len(what, v.len(), out_features)?;
        }
    }
    let mut w = weight.to_vec();
    let mut b = vec![0.0; out_features];
    for o in 0..out_features {
        let s = gamma.map_or(1.0, |g| g[o]) / (running_var[o] + eps).sqrt();
        w[o * fan_in..(o + 1) * fan_in]
            .iter_mut()
            .for_each(|v| *v *= s);
        b[o] = s * (bias.map_or(0.0, |b| b[o]) - running_mean[o]) + beta.map_or(0.0, |b| b[o]);
    }
    Ok((w, b))
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
