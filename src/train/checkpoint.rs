//! Checkpoints: one safetensors file holding the model's state dict under PyTorch's keys (`0.weight`,
//! `1.running_mean`, `1.num_batches_tracked` as a 0-d int64, ...), the optimizer's state under
//! PyTorch-like keys (SGD's `optimizer.<key>.momentum_buffer`; Adam's `optimizer.<key>.exp_avg`,
//! `.exp_avg_sq` and `.step`, a 0-d f32), and in the metadata the step, the seed, the Dropout and Noise
//! layers' random-stream positions (`rng_steps`) and the run's settings (model, optimizer, schedule, accumulated
//! training time).
//! Written atomically: a crash mid-write leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::io::write_atomically;
use crate::nn::{NamedTensor, StateDict};

/// Everything a run needs to continue.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// The model's state dict.
    pub model: StateDict,
    /// Optimizer state tensors `(key, shape, values)`.
    pub optimizer: Vec<NamedTensor>,
    /// Steps completed.
    pub step: u64,
    /// The run's seed (initialization and batch order).
    pub seed: u64,
    /// Other settings, as strings (model, dataset, lr, ...).
    pub meta: HashMap<String, String>,
}

/// Writes `ckpt` to `path` atomically.
///
/// # Errors
/// [`Error::File`] naming the path; [`Error::BadConfig`] when a value is NaN or infinite (a diverged
/// model is never written over a good checkpoint).
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<()> {
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (key, shape, values) in ckpt.model.tensors.iter().chain(&ckpt.optimizer) {
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::config(format!(
                "refusing to write checkpoint {}: '{key}' holds {bad}",
                path.display()
            )));
        }
        entries.push((
            key.clone(),
            Dtype::F32,
            shape.clone(),
            bytemuck::cast_slice(values).to_vec(),
        ));
    }
    for (key, v) in &ckpt.model.counters {
        entries.push((key.clone(), Dtype::I64, vec![], v.to_le_bytes().to_vec()));
    }
    let views = entries
        .iter()
        .map(|(k, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::file(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = ckpt.meta.clone();
    meta.insert("step".into(), ckpt.step.to_string());
    meta.insert("seed".into(), ckpt.seed.to_string());
    meta.insert("format".into(), "batchnorm-checkpoint-1".into());
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::file(path, e))?;
    write_atomically(path, &bytes)
}

/// Reads a checkpoint written by [`save`].
///
/// # Errors
/// [`Error::File`] naming the path when it is unreadable, not safetensors, or lacks the step or seed.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("bad safetensors header: {e}")))?;
    let mut meta = header.metadata().clone().unwrap_or_default();
    let number = |meta: &mut HashMap<String, String>, key: &str| -> Result<u64> {
        meta.remove(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Error::file(
                    path,
                    format!("not a training checkpoint: no '{key}' in the metadata"),
                )
            })
    };
    let step = number(&mut meta, "step")?;
    let seed = number(&mut meta, "seed")?;
    let mut ckpt = Checkpoint {
        step,
        seed,
        ..Default::default()
    };
    // Keep the file's tensor order out of it: the state dict is matched by key.
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| Error::file(path, e))?;
        match view.dtype() {
            Dtype::F32 => {
                let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
                let entry = (name.clone(), view.shape().to_vec(), values);
                if name.starts_with("optimizer.") {
                    ckpt.optimizer.push(entry);
                } else {
                    ckpt.model.tensors.push(entry);
                }
            }
            Dtype::I64 if view.data().len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(view.data());
                ckpt.model.counters.push((name, i64::from_le_bytes(b)));
            }
            other => {
                return Err(Error::file(
                    path,
                    format!("tensor '{name}' has unsupported dtype {other:?}"),
                ));
            }
        }
    }
    meta.remove("format");
    ckpt.meta = meta;
    Ok(ckpt)
}
