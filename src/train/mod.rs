//! Training: one step = forward, loss, backward and optimizer update recorded into one command encoder
//! and one submission; the loss is read back only when asked ([`Trainer::take_stats`]).

pub mod checkpoint;
pub mod eval;
pub mod probe;

use std::collections::HashMap;
use std::sync::Arc;

use crate::data::{Normalization, Split};
use crate::error::{Error, Result};
use crate::gpu::{storage_usage, Gpu};
use crate::nn::{Layer, ModelConfig, Sequential};
use crate::ops::softmax_xent::{SoftmaxXentOp, STATS_LEN};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::record::OnePass;

/// Most bytes of buffers [`Trainer::prebuild_pipelines`] allocates for its twin; a larger model builds
/// its pipelines as its first step records them, one after another, rather than hold twice its memory.
pub const PREBUILD_TWIN_MAX_BYTES: u64 = 256 << 20;

/// Checkpoint metadata key of the random streams' positions (Dropout masks, Noise draws).
pub const RNG_STEPS_KEY: &str = "rng_steps";

/// Training loss and accuracy over the steps since the last read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainStats {
    /// Mean loss of the most recent step's batch.
    pub last_loss: f64,
    /// Mean loss over the samples since the last read.
    pub mean_loss: f64,
    /// Fraction classified correctly since the last read (before each step's update).
    pub accuracy: f64,
    /// Samples since the last read.
    pub samples: u64,
}

/// A model, its optimizer and the step's fixed buffers.
#[derive(Debug)]
pub struct Trainer {
    gpu: Arc<Gpu>,
    /// The network.
    pub model: Sequential,
    /// The optimizer (SGD or Adam) and its learning-rate schedule.
    pub optim: Optimizer,
    /// Steps completed.
    pub step: u64,
    labels: wgpu::Buffer,
    stats: wgpu::Buffer,
    eval_stats: wgpu::Buffer,
    xent: HashMap<usize, SoftmaxXentOp>,
    x_host: Vec<f32>,
    y_host: Vec<u32>,
    one_pass: bool,
    fuse_loss: bool,
    fuse_sgd: bool,
    fuse_head: bool,
    /// What the trainer was built from, for the twin [`Self::prebuild_pipelines`] records.
    config: ModelConfig,
    optim_config: OptimizerConfig,
    /// Whether the first step builds its pipelines on every core first ([`Self::set_prebuild`]), and
    /// whether that has run.
    prebuild: bool,
    prebuilt: bool,
    eval_prebuilt: bool,
}

impl Trainer {
    /// A model (an [`crate::nn::MlpConfig`], a [`crate::nn::CnnConfig`] or a [`ModelConfig`]) and its
    /// optimizer (an [`OptimizerConfig`], or an `SgdConfig` / `AdamConfig`), with buffers for up to
    /// `capacity` samples per call (the larger of the training and evaluation batch sizes). The learning
    /// rate is constant until [`Optimizer::set_schedule`].
    ///
    /// # Errors
    /// Configuration and device errors.
    pub fn new<'m, M>(
        gpu: &Arc<Gpu>,
        model: &'m M,
        optim: impl Into<OptimizerConfig>,
        capacity: usize,
    ) -> Result<Self>
    where
        &'m M: Into<ModelConfig>,
    {
        let config: ModelConfig = model.into();
        let optim_config = optim.into();
        let model = Sequential::build(gpu, &config, capacity)?;
        let optim = Optimizer::new(gpu, &model, optim_config)?;
        Ok(Trainer {
            gpu: gpu.clone(),
            labels: gpu.create_buffer("train.labels", 4 * capacity as u64, storage_usage())?,
            stats: gpu.upload("train.stats", &[0.0f32; STATS_LEN])?,
            eval_stats: gpu.upload("eval.stats", &[0.0f32; STATS_LEN])?,
            model,
            optim,
            step: 0,
            xent: HashMap::new(),
            one_pass: true,
            fuse_loss: true,
            fuse_sgd: true,
            fuse_head: true,
            x_host: Vec::new(),
            y_host: Vec::new(),
            config,
            optim_config,
            prebuild: true,
            prebuilt: false,
            eval_prebuilt: false,
        })
    }

    fn upload_batch(&mut self, x: &[f32], labels: &[u32]) -> Result<usize> {
        let n = labels.len();
        let f = self.model.in_features();
        if x.len() != n * f {
            return Err(Error::ShapeMismatch {
                what: "batch inputs".into(),
                expected: format!("{n} rows of {f} values ({} values)", n * f),
                got: format!("{} values", x.len()),
            });
        }
        if n == 0 || n > self.model.capacity() {
            return Err(Error::ShapeMismatch {
                what: "batch rows".into(),
                expected: format!("1..={}", self.model.capacity()),
                got: n.to_string(),
            });
        }
        let classes = self.model.out_features() as u32;
        if let Some(bad) = labels.iter().find(|&&l| l >= classes) {
            return Err(Error::config(format!(
                "label {bad} is out of range 0..{classes}"
            )));
        }
        let q = &self.gpu.queue;
        q.write_buffer(self.model.input(), 0, bytemuck::cast_slice(x));
        q.write_buffer(&self.labels, 0, bytemuck::cast_slice(labels));
        self.ensure_xent(n)?;
        Ok(n)
    }

    fn ensure_xent(&mut self, n: usize) -> Result<()> {
        if !self.xent.contains_key(&n) {
            let op = SoftmaxXentOp::new(&self.gpu, n, self.model.out_features())?;
            self.xent.insert(n, op);
        }
        Ok(())
    }

    /// One training step on a batch (`x` row-major `[n, in_features]`; NCHW `[n, C, H, W]` for a CNN): records forward, loss,
    /// backward and update into one encoder and submits it without waiting.
    ///
    /// # Errors
    /// Shape errors for a bad batch; device errors.
    pub fn train_step(&mut self, x: &[f32], labels: &[u32]) -> Result<()> {
        let n = self.upload_batch(x, labels)?;
        if self.prebuild && !self.prebuilt {
            self.prebuilt = true;
            // Only a head start: where it fails (the twin's memory, say), the step builds what it
            // needs as it records and reports any error of its own.
            let _ = self.prebuild_pipelines(n);
        }
        let mut encoder = self.gpu.encoder("train step");
        self.record_step(&mut encoder, n)?;
        self.gpu.queue.submit([encoder.finish()]);
        self.step += 1;
        Ok(())
    }

    /// Records a training step over the first `n` rows of the uploaded batch into `encoder`.
    fn record_step(&mut self, encoder: &mut wgpu::CommandEncoder, n: usize) -> Result<()> {
        self.model.train(true);
        // The whole step in one compute pass (lavapipe pays for each pass: `crate::record`), but a
        // pass per op under a dispatch profile, so that its timestamps time each dispatch alone.
        let mut rec = if !self.one_pass || self.gpu.dispatch_profile_active() {
            OnePass::pass_per_op(encoder)
        } else {
            OnePass::new(encoder)
        };
        // SGD's update in the first Linear's dW dispatch where it can run there (one dispatch less).
        let fusion = if self.fuse_sgd {
            self.optim.sgd_fusion()?
        } else {
            None
        };
        // The head's forward, the loss and the head's backward in one dispatch where they can be.
        let (labels, stats) = ((&self.labels).into(), (&self.stats).into());
        let whole = if self.fuse_loss && self.fuse_head {
            self.model
                .record_step_with_head(&mut rec, n, labels, stats, fusion.as_ref())?
        } else {
            None
        };
        let updated = match whole {
            Some(updated) => updated,
            None => {
                // The head and the loss in one dispatch where its kernel takes them.
                let loss_done = if self.fuse_loss {
                    self.model
                        .record_forward_with_loss(&mut rec, n, labels, stats)?
                } else {
                    self.model.record_forward(&mut rec, n)?;
                    false
                };
                if !loss_done {
                    self.xent[&n].record_train(
                        &mut rec,
                        self.model.output().into(),
                        labels,
                        self.model.output_grad().into(),
                        stats,
                    )?;
                }
                self.model
                    .record_backward_with_sgd(&mut rec, n, fusion.as_ref())?
            }
        };
        if updated {
            self.optim.fused_step_recorded();
        } else {
            self.optim.record_step(&mut rec, &self.model)?;
        }
        rec.finish();
        Ok(())
    }

    /// Builds, on every core at once, the pipelines a training step of `n` rows uses and returns how
    /// many it found missing. The first [`Self::train_step`] calls this unless
    /// [`Self::set_prebuild`] turned it off; a step's recording would otherwise build them one after
    /// another on the calling thread (on lavapipe 80-160 ms each; about 0.6 s for the MLP's step).
    ///
    /// The pipelines are found by recording the step, pipelines noted rather than built
    /// ([`Gpu::gather_pipelines`]), on a twin: a fresh trainer of the same model, optimizer and
    /// switches, with capacity `n`, so that this trainer's state (BatchNorm's `num_batches_tracked`, Adam's step)
    /// does not move. Where a BatchNorm layer's settings differ from a fresh layer's (ghost batches,
    /// renormalization, a frozen layer, another plan or dtype) the twin would record other kernels:
    /// this then builds nothing and the step builds its pipelines as it records. So it does where the
    /// twin would hold more than [`PREBUILD_TWIN_MAX_BYTES`] of buffers.
    ///
    /// # Errors
    /// Configuration errors for `n` (as [`Self::train_step`]); device errors, or a pipeline that
    /// fails to compile.
    pub fn prebuild_pipelines(&self, n: usize) -> Result<usize> {
        self.prebuild_for(&[n], |twin, encoder, n| twin.record_step(encoder, n))
    }

    /// As [`Self::prebuild_pipelines`], for evaluations over batches of each of `sizes` rows (eval
    /// mode, as [`Self::evaluate`] records them). The first [`Self::evaluate`] calls this for its batch
    /// sizes unless [`Self::set_prebuild`] turned it off.
    ///
    /// # Errors
    /// As [`Self::prebuild_pipelines`].
    pub fn prebuild_eval_pipelines(&self, sizes: &[usize]) -> Result<usize> {
        self.prebuild_for(sizes, |twin, encoder, n| {
            twin.model.train(false);
            twin.record_eval(encoder, n)
        })
    }

    /// As [`Self::prebuild_eval_pipelines`], for the batches [`Self::evaluate`] records over a split of
    /// `examples`: whole ones of the model's capacity, and the remainder.
    ///
    /// # Errors
    /// As [`Self::prebuild_pipelines`].
    pub fn prebuild_evaluation(&self, examples: usize) -> Result<usize> {
        let cap = self.model.capacity();
        let sizes: Vec<usize> = [
            (examples >= cap).then_some(cap),
            Some(examples % cap).filter(|&r| r > 0),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.prebuild_eval_pipelines(&sizes)
    }

    /// Gathers what `record` records on a twin for each of `sizes` rows, and builds it.
    fn prebuild_for(
        &self,
        sizes: &[usize],
        record: impl Fn(&mut Trainer, &mut wgpu::CommandEncoder, usize) -> Result<()>,
    ) -> Result<usize> {
        let Some(&rows) = sizes.iter().max() else {
            return Ok(0);
        };
        for &n in sizes {
            self.model.check_rows(n)?;
        }
        // The twin's buffers and its optimizer's (two arenas at most) exist while it records.
        let twin_bytes = self.model.buffer_bytes(rows) + 8 * self.model.arena_len() as u64;
        if twin_bytes > PREBUILD_TWIN_MAX_BYTES {
            return Ok(0);
        }
        // Capacity `rows`, not the model's: the buffers (and memory) the recordings need, no more.
        let mut twin = Trainer::new(&self.gpu, &self.config, self.optim_config, rows)?;
        if !twin.model.copy_switches_from(&self.model) {
            return Ok(0);
        }
        twin.one_pass = self.one_pass;
        twin.fuse_loss = self.fuse_loss;
        twin.fuse_sgd = self.fuse_sgd;
        twin.fuse_head = self.fuse_head;
        for &n in sizes {
            twin.ensure_xent(n)?;
        }
        let (recorded, specs) = self.gpu.gather_pipelines(|| {
            // Dropped unsubmitted: its dispatches were skipped.
            let mut encoder = self.gpu.encoder("pipeline gather");
            sizes
                .iter()
                .try_for_each(|&n| record(&mut twin, &mut encoder, n))
        });
        recorded?;
        self.gpu.build_pipelines(&specs)?;
        Ok(specs.len())
    }

    /// Whether the first training step and the first evaluation build their pipelines on every core
    /// first (the default), as [`Self::prebuild_pipelines`] and [`Self::prebuild_eval_pipelines`] do,
    /// or one by one as they record.
    pub fn set_prebuild(&mut self, on: bool) {
        self.prebuild = on;
    }

    /// Record each step's ops in one compute pass (the default), or each op in a pass of its own, as
    /// they would record into a bare encoder (labelled passes for a GPU debugger; the A/B in
    /// `examples/step_profile.rs`). The results are the same to the bit (`tests/record.rs`).
    pub fn set_one_pass(&mut self, on: bool) {
        self.one_pass = on;
    }

    /// Run SGD's update inside the first Linear's dW dispatch where it can (the default; on CPU
    /// devices, for the MLPs: [`crate::ops::linear::LinearOp::record_dw_with_sgd`]), or as a dispatch
    /// of its own. The results are the same to the bit (`tests/sgd_fusion.rs`).
    pub fn set_fuse_sgd(&mut self, on: bool) {
        self.fuse_sgd = on;
    }

    /// Record the model's head and the loss as one dispatch where the head's kernel takes them (the
    /// default; [`Sequential::record_forward_with_loss`]), or apart.
    pub fn set_fuse_loss(&mut self, on: bool) {
        self.fuse_loss = on;
    }

    /// Record the head's forward, the loss and the head's backward as one dispatch where the network
    /// ends `BatchNorm → Sigmoid → Linear` on a CPU device (the default, with the loss fused:
    /// [`Sequential::record_step_with_head`]), or the forward with the loss and the backward apart.
    /// The results are the same to the bit (`tests/train.rs`).
    pub fn set_fuse_head(&mut self, on: bool) {
        self.fuse_head = on;
    }

    /// One step on examples `indices` of `split`, normalized with `norm`.
    ///
    /// # Errors
    /// As [`Self::train_step`].
    pub fn train_step_on(
        &mut self,
        split: &Split,
        indices: &[usize],
        norm: Normalization,
    ) -> Result<()> {
        let (mut x, mut y) = (
            std::mem::take(&mut self.x_host),
            std::mem::take(&mut self.y_host),
        );
        split.gather(indices, norm, &mut x, &mut y);
        let r = self.train_step(&x, &y);
        (self.x_host, self.y_host) = (x, y);
        r
    }

    /// Waits for the submitted steps, reads the loss and accuracy accumulated since the last call and
    /// clears them.
    ///
    /// # Errors
    /// Device errors.
    pub fn take_stats(&mut self) -> Result<TrainStats> {
        let s = read_and_clear(&self.gpu, &self.stats)?;
        let samples = s[3] as u64;
        let per = |v: f32| {
            if samples == 0 {
                f64::NAN
            } else {
                v as f64 / samples as f64
            }
        };
        Ok(TrainStats {
            last_loss: s[0] as f64,
            mean_loss: per(s[1]),
            accuracy: per(s[2]),
            samples,
        })
    }

    /// Mean loss and accuracy over all of `split`, in eval mode (BatchNorm with running statistics), in
    /// batches of up to the model's capacity; the model is back in training mode afterwards.
    ///
    /// # Errors
    /// Device errors.
    pub fn evaluate(&mut self, split: &Split, norm: Normalization) -> Result<(f64, f64)> {
        let cap = self.model.capacity();
        if self.prebuild && !self.eval_prebuilt {
            self.eval_prebuilt = true;
            // A head start only, as in `train_step`.
            let _ = self.prebuild_evaluation(split.len());
        }
        let indices: Vec<usize> = (0..split.len()).collect();
        self.model.train(false);
        let result = self.eval_loop(split, norm, &indices, cap);
        self.model.train(true);
        result
    }

    /// The checkpoint of the current state.
    ///
    /// # Errors
    /// Device errors.
    pub fn checkpoint(
        &self,
        seed: u64,
        meta: HashMap<String, String>,
    ) -> Result<checkpoint::Checkpoint> {
        self.gpu.wait()?;
        let mut meta = meta;
        let rng_steps = self.rng_steps()?;
        if !rng_steps.is_empty() {
            meta.insert(RNG_STEPS_KEY.into(), rng_steps);
        }
        Ok(checkpoint::Checkpoint {
            model: self.model.state_dict()?,
            optimizer: self.optim.state(&self.model)?,
            step: self.step,
            seed,
            meta,
        })
    }

    /// `"<layer>:<training forwards>"` per Dropout or Noise layer, comma-separated: the random stream's
    /// position, which no PyTorch state-dict key holds.
    fn rng_steps(&self) -> Result<String> {
        let mut parts = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            match layer {
                Layer::Dropout(d) => parts.push(format!("{i}:{}", d.step()?)),
                Layer::Noise(n) => parts.push(format!("{i}:{}", n.step()?)),
                _ => {}
            }
        }
        Ok(parts.join(","))
    }

    /// Puts each Dropout or Noise layer's random stream where the checkpoint's metadata says (a
    /// checkpoint without the key, from a model without them, restores nothing).
    fn restore_rng_steps(&mut self, ckpt: &checkpoint::Checkpoint) -> Result<()> {
        let Some(text) = ckpt.meta.get(RNG_STEPS_KEY) else {
            return Ok(());
        };
        let bad = |why: &str| {
            Error::config(format!(
                "checkpoint metadata {RNG_STEPS_KEY} = '{text}': {why}"
            ))
        };
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (layer, step) = part
                .split_once(':')
                .ok_or_else(|| bad("expected <layer>:<step> pairs"))?;
            let (layer, step): (usize, u32) = match (layer.parse(), step.parse()) {
                (Ok(l), Ok(s)) => (l, s),
                _ => return Err(bad("expected <layer>:<step> pairs of integers")),
            };
            match self.model.layers.get(layer) {
                Some(Layer::Dropout(d)) => d.set_step(step),
                Some(Layer::Noise(n)) => n.set_step(step),
                _ => {
                    return Err(bad(&format!(
                        "layer {layer} of this model is neither Dropout nor Noise"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Restores model, optimizer and step from a checkpoint.
    ///
    /// # Errors
    /// [`Error::BadConfig`] / [`Error::ShapeMismatch`] when it does not fit the model.
    pub fn restore(&mut self, ckpt: &checkpoint::Checkpoint) -> Result<()> {
        self.model.load_state_dict(&ckpt.model)?;
        self.optim
            .load_state(&self.model, &ckpt.optimizer, ckpt.step)?;
        self.restore_rng_steps(ckpt)?;
        self.step = ckpt.step;
        self.gpu.wait()
    }
}

fn read_and_clear(gpu: &Gpu, stats: &wgpu::Buffer) -> Result<Vec<f32>> {
    let s = gpu.download::<f32>(stats, 0, STATS_LEN)?;
    gpu.queue
        .write_buffer(stats, 0, bytemuck::cast_slice(&[0.0f32; STATS_LEN]));
    Ok(s)
}
