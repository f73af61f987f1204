//! Evaluation with mini-batch statistics (Wu & Johnson 2021, Sec. 4): the test set in batches of NBS
//! samples, each BatchNorm normalizing with the statistics of its own batch as in training, without
//! touching the running statistics. Against [`Trainer::evaluate`] (population statistics) it shows the
//! train/test inconsistency of a small normalization batch.

use crate::data::{Normalization, Split};
use crate::error::{Error, Result};
use crate::nn::Layer;
use crate::record::OnePass;
use crate::tensor::DType;

use super::{read_and_clear, Trainer};

/// A BatchNorm's settings that the evaluation changes, to put back.
struct Saved {
    layer: usize,
    virtual_batch_size: Option<usize>,
    frozen: bool,
    fuse_relu: bool,
}

impl Trainer {
    /// Mean loss and accuracy over the first `⌊len / nbs⌋·nbs` samples of `split` (a last partial batch
    /// is dropped) with every BatchNorm normalizing over consecutive runs of `nbs` samples with their
    /// batch statistics (ghost batches inside the model's capacity), running statistics untouched, other
    /// layers (Dropout, Noise) in eval mode. The BatchNorms' ghost and FrozenBN settings are restored and
    /// the model is back in training mode afterwards.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for `nbs` 0, 1 (one value per channel) or larger than the capacity or the
    /// split, or a BatchNorm with Batch Renormalization or f16 storage; device errors.
    pub fn evaluate_batch_stats(
        &mut self,
        split: &Split,
        norm: Normalization,
        nbs: usize,
    ) -> Result<(f64, f64)> {
        let cap = self.model.capacity();
        if nbs < 2 || nbs > cap || nbs > split.len() {
            return Err(Error::config(format!(
                "mini-batch statistics need 2..={} samples per batch (the model's capacity and the \
                 split's size), got {nbs}",
                cap.min(split.len())
            )));
        }
        // Ghost batches do not combine with Batch Renormalization or f16 storage: refuse before
        // changing anything.
        for (l, layer) in self.model.layers.iter().enumerate() {
            if let Layer::BatchNorm { bn, .. } = layer {
                if bn.renorm().is_some() {
                    return Err(Error::config(format!(
                        "layer {l}: mini-batch statistics evaluation of a Batch Renormalization \
                         layer is not supported"
                    )));
                }
                if bn.options().dtype != DType::F32 {
                    return Err(Error::config(format!(
                        "layer {l}: mini-batch statistics evaluation runs ghost batches, which need \
                         f32 storage"
                    )));
                }
            }
        }
        let mut saved = Vec::new();
        self.model.train(false);
        let mut set_up = Ok(());
        for (layer, l) in self.model.layers.iter_mut().enumerate() {
            if let Layer::BatchNorm { bn, .. } = l {
                saved.push(Saved {
                    layer,
                    virtual_batch_size: bn.virtual_batch_size(),
                    frozen: bn.is_frozen(),
                    fuse_relu: bn.options().fuse_relu,
                });
                // A Sequential-fused ReLU is switched off here (ghost batches take no mask); the
                // model decides the fusion again at its next forward.
                set_up = bn
                    .set_fuse_relu(false)
                    .and_then(|_| bn.set_frozen(false))
                    .and_then(|_| bn.set_virtual_batch_size(Some(nbs)));
                bn.set_update_running_stats(false);
                bn.train(true);
                if set_up.is_err() {
                    break;
                }
            }
        }
        let usable = split.len() / nbs * nbs;
        let chunk = cap / nbs * nbs;
        let indices: Vec<usize> = (0..usable).collect();
        let result = set_up.and_then(|_| self.eval_loop(split, norm, &indices, chunk));
        // Put every layer back, whatever failed above: the first error is reported.
        let mut restored = Ok(());
        for s in saved {
            if let Layer::BatchNorm { bn, .. } = &mut self.model.layers[s.layer] {
                bn.set_update_running_stats(true);
                let r = bn
                    .set_virtual_batch_size(None)
                    .and_then(|_| bn.set_frozen(s.frozen))
                    .and_then(|_| bn.set_virtual_batch_size(s.virtual_batch_size))
                    .and_then(|_| bn.set_fuse_relu(s.fuse_relu));
                restored = restored.and(r);
            }
        }
        self.model.train(true);
        let result = result?;
        restored?;
        Ok(result)
    }

    /// Records the forward over the first `n` rows of the uploaded batch and adds its loss and hits
    /// to the evaluation's statistics.
    pub(super) fn record_eval(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        n: usize,
    ) -> Result<()> {
        // As `train_step`: a pass per op under a dispatch profile.
        let mut rec = if self.gpu.dispatch_profile_active() {
            OnePass::pass_per_op(encoder)
        } else {
            OnePass::new(encoder)
        };
        self.model.record_forward(&mut rec, n)?;
        self.xent[&n].record_eval(
            &mut rec,
            self.model.output().into(),
            (&self.labels).into(),
            (&self.eval_stats).into(),
        )?;
        rec.finish();
        Ok(())
    }

    /// Forward and loss over `indices` of `split` in chunks of `chunk` samples, in the model's current
    /// modes; `(mean loss, accuracy)`.
    pub(super) fn eval_loop(
        &mut self,
        split: &Split,
        norm: Normalization,
        indices: &[usize],
        chunk: usize,
    ) -> Result<(f64, f64)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for part in indices.chunks(chunk.max(1)) {
            split.gather(part, norm, &mut x, &mut y);
            let n = self.upload_batch(&x, &y)?;
            let mut encoder = self.gpu.encoder("eval");
            self.record_eval(&mut encoder, n)?;
            // One batch at a time: the input buffer is rewritten by the next chunk's upload, which the
            // queue orders after this submission.
            self.gpu.queue.submit([encoder.finish()]);
        }
        let s = read_and_clear(&self.gpu, &self.eval_stats)?;
        let rows = s[3].max(1.0) as f64;
        Ok((s[1] as f64 / rows, s[2] as f64 / rows))
    }
}
