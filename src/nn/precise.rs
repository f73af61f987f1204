//! PreciseBN over a whole model (Wu & Johnson 2021; fvcore's `update_bn_stats`): replace every
//! BatchNorm's running statistics by the exact population statistics of its input over K training
//! samples, as the model with frozen weights produces that input.
//!
//! Layer by layer: BatchNorm l's statistics are recomputed with the BatchNorms before it already
//! recomputed and the model in eval mode, so each layer's new statistics describe exactly the input it
//! sees at inference (one pass over the samples per BatchNorm; fvcore runs one pass in training mode,
//! where earlier layers normalize with batch statistics instead). The per-batch merge runs on the GPU
//! ([`crate::nn::BatchNorm::record_precise_accumulate`]).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::nn::{Layer, Sequential};
use crate::tensor::Layout;

/// [`precise_bn`] for an MLP (kept for its callers: it accepts only BatchNorms right after a Linear).
///
/// # Errors
/// As [`precise_bn`]; [`Error::BadConfig`] for a BatchNorm that does not follow a Linear.
pub fn precise_bn_mlp(gpu: &Arc<Gpu>, model: &mut Sequential, batches: &[&[f32]]) -> Result<()> {
    if let Some(l) = (0..model.layers.len()).find(|&l| {
        matches!(model.layers[l], Layer::BatchNorm { .. })
            && (l == 0 || !matches!(model.layers[l - 1], Layer::Linear(_)))
    }) {
        return Err(Error::config(format!(
            "layer {l}: precise_bn_mlp handles BatchNorm right after a Linear ([N, features]) only; \
             precise_bn takes any Sequential"
        )));
    }
    precise_bn(gpu, model, batches)
}

/// Recomputes the running statistics of every BatchNorm in `model` (BatchNorm1d on features or
/// BatchNorm2d on maps, anywhere in the graph) over `batches` (each n samples of the model's input
/// shape, row-major / NCHW, n at most the model's capacity). The model is left in eval mode; weights,
/// `num_batches_tracked` and the optimizer state are untouched.
///
/// # Errors
/// [`Error::ShapeMismatch`] for a batch that is not whole samples or is larger than the capacity;
/// [`Error::BadConfig`] for no batches, fewer than two samples in all, or a BatchNorm without running
/// statistics; device errors.
pub fn precise_bn(gpu: &Arc<Gpu>, model: &mut Sequential, batches: &[&[f32]]) -> Result<()> {
    let width = model.in_features();
    let mut rows = Vec::new();
    for (k, b) in batches.iter().enumerate() {
        if b.is_empty() || b.len() % width != 0 || b.len() / width > model.capacity() {
            return Err(Error::ShapeMismatch {
                what: format!("PreciseBN batch {k}"),
                expected: format!(
                    "1..={} samples of {width} values (the model's capacity and input size)",
                    model.capacity()
                ),
                got: format!("{} values", b.len()),
            });
        }
        rows.push(b.len() / width);
    }
    if rows.iter().sum::<usize>() < 2 {
        return Err(Error::config(
            "PreciseBN needs at least two samples in all (an unbiased variance)",
        ));
    }
    model.train(false);
    let bn_layers: Vec<usize> = (0..model.layers.len())
        .filter(|&i| matches!(model.layers[i], Layer::BatchNorm { .. }))
        .collect();
    for l in bn_layers {
        let sample = model
            .shape_at(l)
            .ok_or_else(|| Error::config("missing layer shape"))?
            .to_vec();
        let per_sample: usize = sample.iter().product();
        // BatchNorm1d sees [n, features], BatchNorm2d NCHW maps (as Sequential records them).
        let layout = if sample.len() == 1 {
            Layout::Nc
        } else {
            Layout::Nchw
        };
        let Layer::BatchNorm { bn, .. } = &mut model.layers[l] else {
            unreachable!("index of a BatchNorm layer");
        };
        bn.precise_begin()?;
        // The layer's input is copied out of the model's activation buffer (borrowed with the model).
        let scratch = gpu.create_buffer(
            "precise.input",
            4 * (model.capacity() * per_sample) as u64,
            storage_usage(),
        )?;
        for (b, &n) in batches.iter().zip(&rows) {
            gpu.queue
                .write_buffer(model.input(), 0, bytemuck::cast_slice(b));
            let mut encoder = gpu.encoder("precise bn");
            model.record_forward(&mut encoder, n)?;
            let act = model
                .activation(l)
                .ok_or_else(|| Error::config("missing activation"))?;
            encoder.copy_buffer_to_buffer(act, 0, &scratch, 0, 4 * (n * per_sample) as u64);
            let Layer::BatchNorm { bn, .. } = &mut model.layers[l] else {
                unreachable!("index of a BatchNorm layer");
            };
            let shape: Vec<usize> = std::iter::once(n).chain(sample.iter().copied()).collect();
            bn.record_precise_accumulate(&mut encoder, (&scratch).into(), &shape, layout)?;
            gpu.submit_and_wait(encoder)?;
        }
        let Layer::BatchNorm { bn, .. } = &mut model.layers[l] else {
            unreachable!("index of a BatchNorm layer");
        };
        bn.precise_finish()?;
    }
    Ok(())
}
