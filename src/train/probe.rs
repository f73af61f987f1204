//! What the experiments measure on a [`Trainer`]'s model besides training it: the loss and gradient of a
//! batch without an optimizer step, the input of a layer, and steps of the parameters along a direction.
//! The vectors stay on the GPU ([`crate::ops::probe`]); a probe reads back a loss and four sums.

use crate::error::{Error, Result};
use crate::nn::{Layer, StateDict};
use crate::ops::batchnorm::BufferRef;
use crate::ops::probe::{DiffStats, ProbeOp, DIFF_STATS_LEN};

use super::{read_and_clear, Trainer};

/// GPU scratch for probing a model: a copy of the parameters (the point probed around), a copy of the
/// gradient there, and the four sums of the last comparison.
#[derive(Debug)]
pub struct Prober {
    /// The parameters being probed around (a copy of the arena).
    pub base: wgpu::Buffer,
    /// The gradient at `base` (a copy of the gradient arena).
    pub base_grad: wgpu::Buffer,
    stats: wgpu::Buffer,
    whole: ProbeOp,
}

impl Trainer {
    /// Mean loss of one batch at the current parameters in training mode, its gradients left in
    /// `self.model.grads`; no optimizer step. The training forward updates BatchNorm's running statistics:
    /// [`Self::snapshot`] and [`Self::restore_snapshot`] undo that.
    ///
    /// # Errors
    /// Shape errors for a bad batch; device errors.
    pub fn probe_gradient(&mut self, x: &[f32], labels: &[u32]) -> Result<f64> {
        let n = self.upload_batch(x, labels)?;
        self.model.train(true);
        let mut encoder = self.gpu.encoder("probe gradient");
        self.model.record_forward(&mut encoder, n)?;
        self.xent[&n].record_train(
            &mut encoder,
            self.model.output().into(),
            (&self.labels).into(),
            self.model.output_grad().into(),
            (&self.eval_stats).into(),
        )?;
        self.model.record_backward(&mut encoder, n)?;
        self.gpu.queue.submit([encoder.finish()]);
        let s = read_and_clear(&self.gpu, &self.eval_stats)?;
        Ok(s[1] as f64 / s[3].max(1.0) as f64)
    }

    /// The input of layer `layer` (`layers.len()`: the logits) for a batch, `[n, ...]` row-major, from a
    /// forward in eval mode (BatchNorm with running statistics; nothing is updated).
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a layer index past the output or the input of a ReLU fused into the
    /// BatchNorm before it; shape and device errors.
    pub fn layer_input(&mut self, x: &[f32], labels: &[u32], layer: usize) -> Result<Vec<f32>> {
        // This forward is the probe's own: it writes every sigmoid input (no BN+sigmoid fusion), and
        // puts the model's setting back whatever happens.
        let sigmoid_fusion = self.model.fuse_bn_sigmoid();
        self.model.set_fuse_bn_sigmoid(false);
        let out = self.unfused_layer_input(x, labels, layer);
        self.model.set_fuse_bn_sigmoid(sigmoid_fusion);
        out
    }

    fn unfused_layer_input(&mut self, x: &[f32], labels: &[u32], layer: usize) -> Result<Vec<f32>> {
        let n = self.upload_batch(x, labels)?;
        let layers = self.model.layers.len();
        let buffer = self.model.activation(layer).ok_or_else(|| {
            Error::config(if layer > layers {
                format!("layer {layer} does not exist: the model has {layers} layers")
            } else {
                format!(
                    "the input of layer {layer} is not written: that ReLU runs fused into the \
                     BatchNorm before it (Sequential::set_fuse_bn_relu(false) materializes it)"
                )
            })
        })?;
        let width = buffer.size() as usize / 4 / self.model.capacity();
        self.model.train(false);
        let mut encoder = self.gpu.encoder("probe layer input");
        let recorded = self.model.record_forward(&mut encoder, n);
        self.model.train(true);
        recorded?;
        self.gpu.queue.submit([encoder.finish()]);
        let buffer = self.model.activation(layer).expect("checked above");
        self.gpu.download::<f32>(buffer, 0, n * width)
    }

    /// The model's whole state (parameters, running statistics, counters), to put back after probes.
    ///
    /// # Errors
    /// Device errors.
    pub fn snapshot(&self) -> Result<StateDict> {
        self.gpu.wait()?;
        self.model.state_dict()
    }

    /// Puts back a [`Self::snapshot`].
    ///
    /// # Errors
    /// Device errors.
    pub fn restore_snapshot(&mut self, state: &StateDict) -> Result<()> {
        self.model.load_state_dict(state)
    }

    /// GPU scratch sized for this model.
    ///
    /// # Errors
    /// Device errors.
    pub fn prober(&self) -> Result<Prober> {
        let len = self.model.arena_len();
        let usage = crate::gpu::storage_usage();
        Ok(Prober {
            base: self
                .gpu
                .create_buffer("probe.base", 4 * len as u64, usage)?,
            base_grad: self
                .gpu
                .create_buffer("probe.base_grad", 4 * len as u64, usage)?,
            stats: self
                .gpu
                .create_buffer("probe.stats", 4 * DIFF_STATS_LEN as u64, usage)?,
            whole: ProbeOp::new(&self.gpu, len)?,
        })
    }

    /// Copies the current parameters and gradients into `p.base` and `p.base_grad`.
    ///
    /// # Errors
    /// Device errors.
    pub fn probe_set_base(&mut self, p: &Prober) -> Result<()> {
        let bytes = 4 * self.model.arena_len() as u64;
        let mut encoder = self.gpu.encoder("probe base");
        encoder.copy_buffer_to_buffer(&self.model.params, 0, &p.base, 0, bytes);
        encoder.copy_buffer_to_buffer(&self.model.grads, 0, &p.base_grad, 0, bytes);
        self.gpu.submit_and_wait(encoder)
    }

    /// Sets the parameters to `base + alpha·base_grad`, on the parameter slots selected by `which`
    /// (slot index → step it?), and to `base` elsewhere.
    ///
    /// # Errors
    /// Device errors.
    pub fn probe_step(
        &mut self,
        p: &Prober,
        alpha: f32,
        which: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let bytes = 4 * self.model.arena_len() as u64;
        let mut encoder = self.gpu.encoder("probe step");
        encoder.copy_buffer_to_buffer(&p.base, 0, &self.model.params, 0, bytes);
        let slots: Vec<_> = self.model.slots().to_vec();
        let all = (0..slots.len()).all(&which);
        if all {
            p.whole.record_axpy(
                &mut encoder,
                (&p.base).into(),
                alpha,
                (&p.base_grad).into(),
                (&self.model.params).into(),
            )?;
        }
        // Each slot's op has its own uniform holding alpha; they live until the submission below.
        let mut ops = Vec::new();
        if !all {
            for s in slots
                .iter()
                .enumerate()
                .filter(|(i, _)| which(*i))
                .map(|(_, s)| s)
            {
                let op = ProbeOp::new(&self.gpu, s.len())?;
                op.record_axpy(
                    &mut encoder,
                    s.at(&p.base),
                    alpha,
                    s.at(&p.base_grad),
                    s.at(&self.model.params),
                )?;
                ops.push(op);
            }
        }
        self.gpu.submit_and_wait(encoder)?;
        drop(ops);
        Ok(())
    }

    /// `[Σ(g−g₀)², Σg·g₀, Σg², Σg₀²]` between the current gradient `g` and `p.base_grad` `g₀`, over the
    /// slot `slot` or (None) the whole arena.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for a slot index out of range; device errors.
    pub fn probe_grad_diff(&mut self, p: &Prober, slot: Option<usize>) -> Result<DiffStats> {
        let mut encoder = self.gpu.encoder("probe grad diff");
        let stats = BufferRef::from(&p.stats);
        match slot {
            None => p.whole.record_diff_stats(
                &mut encoder,
                (&self.model.grads).into(),
                (&p.base_grad).into(),
                stats,
            )?,
            Some(i) => {
                let s =
                    self.model.slots().get(i).cloned().ok_or_else(|| {
                        Error::config(format!("parameter slot {i} does not exist"))
                    })?;
                let op = ProbeOp::new(&self.gpu, s.len())?;
                op.record_diff_stats(
                    &mut encoder,
                    s.at(&self.model.grads),
                    s.at(&p.base_grad),
                    stats,
                )?;
            }
        }
        self.gpu.submit_and_wait(encoder)?;
        let v = self.gpu.download::<f32>(&p.stats, 0, DIFF_STATS_LEN)?;
        Ok(DiffStats::from_slice(&v))
    }

    /// Index of the last layer of the model that is an activation function (its input is what Ioffe &
    /// Szegedy's Fig. 1 follows).
    pub fn last_activation_layer(&self) -> Option<usize> {
        self.model
            .layers
            .iter()
            .rposition(|l| matches!(l, Layer::Sigmoid(_)))
    }
}
