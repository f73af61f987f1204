//! Evaluation with mini-batch statistics (Wu & Johnson 2021, Sec. 4): the test set in batches of NBS
//! samples, each BatchNorm normalizing with the statistics of its own batch as in training, without
//! touching the running statistics. Against [`Trainer::evaluate`] (population statistics) it shows the
//! train/test inconsistency of a small normalization batch.

use crate::data::{Normalization, Split};
use crate::error::{Error, Result};
use crate::nn::Layer;

use super::{read_and_clear, Trainer};

/// A BatchNorm's settings that the evaluation changes, to put back.
struct Saved {
    layer: usize,
    virtual_batch_size: Option<usize>,
    frozen: bool,
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
    /// split, or a BatchNorm with Batch Renormalization; device errors.
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
        // Batch Renormalization does not combine with ghost batches: refuse before changing anything.
        if let Some(l) = self
            .model
            .layers
            .iter()
            .position(|l| matches!(l, Layer::BatchNorm { bn, .. } if bn.renorm().is_some()))
        {
            return Err(Error::config(format!(
                "layer {l}: mini-batch statistics evaluation of a Batch Renormalization layer is not supported"
            )));
        }
        let mut saved = Vec::new();
        self.model.train(false);
        for (layer, l) in self.model.layers.iter_mut().enumerate() {
            if let Layer::BatchNorm { bn, .. } = l {
                saved.push(Saved {
                    layer,
                    virtual_batch_size: bn.virtual_batch_size(),
                    frozen: bn.is_frozen(),
                });
                bn.set_frozen(false)?;
                bn.set_virtual_batch_size(Some(nbs))?;
                bn.set_update_running_stats(false);
                bn.train(true);
            }
        }
        let usable = split.len() / nbs * nbs;
        let chunk = cap / nbs * nbs;
        let indices: Vec<usize> = (0..usable).collect();
        let result = self.eval_loop(split, norm, &indices, chunk);
        for s in saved {
            if let Layer::BatchNorm { bn, .. } = &mut self.model.layers[s.layer] {
                bn.set_update_running_stats(true);
                bn.set_virtual_batch_size(None)?;
                bn.set_frozen(s.frozen)?;
                bn.set_virtual_batch_size(s.virtual_batch_size)?;
            }
        }
        self.model.train(true);
        result
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
            self.model.record_forward(&mut encoder, n)?;
            self.xent[&n].record_eval(
                &mut encoder,
                self.model.output().into(),
                (&self.labels).into(),
                (&self.eval_stats).into(),
            )?;
            // One batch at a time: the input buffer is rewritten by the next chunk's upload, which the
            // queue orders after this submission.
            self.gpu.queue.submit([encoder.finish()]);
        }
        let s = read_and_clear(&self.gpu, &self.eval_stats)?;
        let rows = s[3].max(1.0) as f64;
        Ok((s[1] as f64 / rows, s[2] as f64 / rows))
    }
}
