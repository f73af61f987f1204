//! `batchnorm parity --input IN.safetensors --output OUT.safetensors`: run the engine on tensors a user
//! wrote (typically from PyTorch) and write every result, so the two can be compared.
//!
//! Input tensors: `x` (required), `dy`, `weight`, `bias`, `running_mean`, `running_var` (f32 or f64;
//! optional `num_batches_tracked` as an integer tensor). Metadata (all optional, strings): `layout`
//! (NCHW | NHWC | NC, default NCHW), `eps` (1e-5), `momentum` (a number or `none`, 0.1), `training`
//! (true), `affine` (true), `track_running_stats` (true), `num_batches_tracked` (0).
//! Output tensors (F32; F64 when `x` is F64, F16 `y`/`dx` when `x` is F16): `y`; with `dy`: `dx`, and
//! `dweight`, `dbias` when affine; when tracking: the updated `running_mean`, `running_var` and
//! `num_batches_tracked` (i64); `save_mean` and `save_invstd` when batch statistics were used. An F64
//! `x` is shifted per channel before the f32 engine sees it (see `run`), so its results keep f32's
//! relative accuracy about the channel's own spread, whatever its mean.
//!
//! Variant metadata (issue 6; see [`apply_variants`]): `virtual_batch_size` (ghost BatchNorm),
//! `renorm_rmax` and `renorm_dmax` (Batch Renormalization, both or neither), `frozen` (FrozenBN).
//! Storage and fusion (the layer's [`batchnorm::ops::batchnorm::OpOptions`]): `x` (and `dy`) may be
//! F16, and then run with f16 storage and `y`/`dx` are written as F16; metadata `fuse_relu` (false) runs
//! y = relu(bn(x)) with the backward through the ReLU mask. Every run goes through `nn::BatchNorm`, so
//! these combine with `frozen`; the layer refuses them with ghost BatchNorm or Batch Renormalization.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use batchnorm::error::{Error, Result};
use batchnorm::gpu::Gpu;
use batchnorm::io::write_atomically;
use batchnorm::nn::BatchNorm;
use batchnorm::ops::batchnorm::{BatchNormConfig, OpOptions};
use batchnorm::ops::bn_variants::Renorm;
use batchnorm::tensor::{DType, Layout, Tensor};
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, Clone, clap::Args)]
pub struct ParityArgs {
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    output: PathBuf,
}

const KNOWN_KEYS: [&str; 8] = [
    "layout",
    "eps",
    "momentum",
    "training",
    "affine",
    "track_running_stats",
    "num_batches_tracked",
    "fuse_relu",
];
const KNOWN_TENSORS: [&str; 7] = [
    "x",
    "dy",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
];

struct Input {
    /// Every floating tensor widened to f64 (exact for F16, F32 and F64 files).
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    /// Tensors given as F16 (only `x` and `dy` may be).
    f16: Vec<String>,
    /// Tensors given as F64.
    f64: Vec<String>,
    nbt_tensor: Option<i64>,
    meta: HashMap<String, String>,
}

fn read_input(path: &Path) -> Result<Input> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("bad safetensors header: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut tensors = HashMap::new();
    let mut nbt_tensor = None;
    let mut f16 = Vec::new();
    let mut f64 = Vec::new();
    for (name, view) in st.tensors() {
        if !KNOWN_TENSORS.contains(&name.as_str()) {
            return Err(Error::file(
                path,
                format!(
                    "unknown tensor '{name}' (known: {})",
                    KNOWN_TENSORS.join(", ")
                ),
            ));
        }
        if name == "num_batches_tracked" {
            nbt_tensor = Some(match view.dtype() {
                Dtype::I64 if view.data().len() == 8 => {
                    i64::from_le_bytes(view.data().try_into().expect("8 bytes"))
                }
                Dtype::I32 if view.data().len() == 4 => {
                    i32::from_le_bytes(view.data().try_into().expect("4 bytes")) as i64
                }
                d => {
                    return Err(Error::file(
                        path,
                        format!("tensor 'num_batches_tracked' must be one i64 or i32, got {d:?} of {} bytes", view.data().len()),
                    ))
                }
            });
            continue;
        }
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(view.data())
                .into_iter()
                .map(f64::from)
                .collect(),
            Dtype::F64 => {
                f64.push(name.clone());
                bytemuck::pod_collect_to_vec(view.data())
            }
            Dtype::F16 if name == "x" || name == "dy" => {
                f16.push(name.clone());
                bytemuck::pod_collect_to_vec::<u8, half::f16>(view.data())
                    .into_iter()
                    .map(half::f16::to_f64)
                    .collect()
            }
            d => {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor '{name}' has dtype {d:?}; expected F32 or F64 (F16 for x and dy)"
                    ),
                ))
            }
        };
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(Input {
        tensors,
        f16,
        f64,
        nbt_tensor,
        meta,
    })
}

fn parse_bool(meta: &HashMap<String, String>, key: &str, default: bool) -> Result<bool> {
    match meta.get(key).map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(s) if s == "true" || s == "1" => Ok(true),
        Some(s) if s == "false" || s == "0" => Ok(false),
        Some(s) => Err(Error::config(format!(
            "metadata '{key}' must be true or false, got '{s}'"
        ))),
    }
}

fn parse_f32(meta: &HashMap<String, String>, key: &str, default: f32) -> Result<f32> {
    match meta.get(key) {
        None => Ok(default),
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| Error::config(format!("metadata '{key}' must be a number, got '{s}'"))),
    }
}

pub fn run(args: &ParityArgs) -> Result<()> {
    let input = read_input(&args.input)?;
    let meta = &input.meta;
    if let Some(k) = meta.keys().find(|k| {
        !KNOWN_KEYS.contains(&k.as_str())
            && !VARIANT_KEYS.contains(&k.as_str())
            && k.as_str() != "format"
    }) {
        return Err(Error::config(format!(
            "unknown metadata key '{k}' (known: {}, {})",
            KNOWN_KEYS.join(", "),
            VARIANT_KEYS.join(", ")
        )));
    }
    let layout = Layout::parse(meta.get("layout").map_or("NCHW", |s| s.as_str()))?;
    let momentum = match meta.get("momentum").map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if s == "none" || s == "null" => None,
        _ => Some(parse_f32(meta, "momentum", 0.1)?),
    };
    let config = BatchNormConfig {
        eps: parse_f32(meta, "eps", 1e-5)?,
        momentum,
        affine: parse_bool(meta, "affine", true)?,
        track_running_stats: parse_bool(meta, "track_running_stats", true)?,
    };
    config.validate()?;
    let training = parse_bool(meta, "training", true)?;
    let nbt = match (meta.get("num_batches_tracked"), input.nbt_tensor) {
        (Some(s), _) => s.trim().parse::<i64>().map_err(|_| {
            Error::config(format!(
                "metadata 'num_batches_tracked' must be an integer, got '{s}'"
            ))
        })?,
        (None, Some(v)) => v,
        (None, None) => 0,
    };
    if nbt < 0 {
        return Err(Error::config(format!(
            "num_batches_tracked must be >= 0, got {nbt}"
        )));
    }

    let (shape, x) = input
        .tensors
        .get("x")
        .ok_or_else(|| Error::file(&args.input, "missing tensor 'x'"))?;
    let dims = layout.dims(shape)?;
    let c = dims.c;
    let per_channel = |name: &str| -> Result<Option<Vec<f64>>> {
        match input.tensors.get(name) {
            None => Ok(None),
            Some((s, v)) if s.as_slice() == [c] => Ok(Some(v.clone())),
            Some((s, _)) => Err(Error::ShapeMismatch {
                what: format!("tensor '{name}'"),
                expected: format!("[{c}] (C of x {shape:?}, layout {})", layout.name()),
                got: format!("{s:?}"),
            }),
        }
    };
    let weight = per_channel("weight")?;
    let bias = per_channel("bias")?;
    let running_mean = per_channel("running_mean")?;
    let running_var = per_channel("running_var")?;
    if !config.affine && (weight.is_some() || bias.is_some()) {
        return Err(Error::config("weight/bias given but affine=false"));
    }
    if !config.track_running_stats && (running_mean.is_some() || running_var.is_some()) {
        return Err(Error::config(
            "running_mean/running_var given but track_running_stats=false",
        ));
    }
    let dy = match input.tensors.get("dy") {
        None => None,
        Some((s, v)) if s == shape => Some(v.clone()),
        Some((s, _)) => {
            return Err(Error::ShapeMismatch {
                what: "tensor 'dy'".into(),
                expected: format!("{shape:?} (the shape of x)"),
                got: format!("{s:?}"),
            })
        }
    };

    // An F64 x keeps f64 accuracy through the f32 engine by a change of variable: each channel is
    // shifted by its f64 mean on the host before rounding to f32 (x − s, and the running mean − s), and
    // s is added back to the mean outputs. BatchNorm is exactly invariant to a per-channel shift: y, dx,
    // dγ, dβ, the variances and invstd do not change, and the running mean's update is an affine
    // combination whose weights sum to 1. Without it, x ≈ 1e4 would be rounded to f32's 1e-3 steps
    // before the engine saw it (y off by ~5e-4 against PyTorch in float64). The engine computes every
    // statistic itself; s is only the origin of the f32 values.
    let wide = input.f64.iter().any(|n| n == "x");
    let channel_of = |i: usize| match layout {
        Layout::Nchw => (i / dims.spatial) % c,
        _ => i % c,
    };
    let shift: Vec<f64> = if wide {
        let mut sum = vec![0.0f64; c];
        for (i, v) in x.iter().enumerate() {
            sum[channel_of(i)] += v;
        }
        let count = dims.per_channel() as f64;
        // A channel holding an infinity or NaN keeps its values as given (shift 0), as PyTorch does.
        sum.into_iter()
            .map(|t| t / count)
            .map(|m| if m.is_finite() { m } else { 0.0 })
            .collect()
    } else {
        vec![0.0; c]
    };
    let x32: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| (v - shift[channel_of(i)]) as f32)
        .collect();
    let f32s_of = |v: &[f64]| v.iter().map(|&t| t as f32).collect::<Vec<f32>>();
    // The running mean goes in shifted too (the layer's default 0 must then be written), and comes out
    // as the value given plus the change the engine made: r_out − r_in + running_mean. That is exact
    // where the engine leaves it (eval, FrozenBN, momentum 0) and carries the shifted value's f32
    // rounding only scaled by the momentum, where adding the shift back would carry it whole.
    let running_mean = match (running_mean, wide && config.track_running_stats) {
        (Some(rm), _) => Some(rm),
        (None, true) => Some(vec![0.0; c]),
        (None, false) => None,
    };
    let running_mean_in: Option<Vec<f32>> = running_mean
        .as_ref()
        .map(|rm| rm.iter().zip(&shift).map(|(r, s)| (r - s) as f32).collect());
    let running_mean_add: Vec<f64> = match (&running_mean, &running_mean_in) {
        (Some(given), Some(written)) => given
            .iter()
            .zip(written)
            .map(|(&g, &w)| g - w as f64)
            .collect(),
        _ => vec![0.0; c],
    };

    let gpu = Arc::new(Gpu::new()?);
    let fuse_relu = parse_bool(meta, "fuse_relu", false)?;
    // Storage follows x: an f32 dy is rounded to f16 for an F16 x, an F16 dy widened exactly for an f32 x.
    let dtype = if input.f16.iter().any(|n| n == "x") {
        DType::F16
    } else {
        DType::F32
    };
    let mut bn = BatchNorm::new(&gpu, c, config)?;
    bn.set_options(OpOptions {
        dtype,
        fuse_relu,
        ..Default::default()
    })?;
    bn.train(training);
    bn.num_batches_tracked = nbt;
    if let (Some(b), Some(v)) = (&bn.weight, &weight) {
        bn.write("weight", b, &f32s_of(v))?;
    }
    if let (Some(b), Some(v)) = (&bn.bias, &bias) {
        bn.write("bias", b, &f32s_of(v))?;
    }
    if let (Some(b), Some(v)) = (&bn.running_mean, &running_mean_in) {
        bn.write("running_mean", b, v)?;
    }
    if let (Some(b), Some(v)) = (&bn.running_var, &running_var) {
        bn.write("running_var", b, &f32s_of(v))?;
    }
    apply_variants(&mut bn, meta)?;
    let tensor_in = |v: &[f32]| match dtype {
        DType::F32 => Tensor::from_f32(&gpu, shape, v),
        DType::F16 => Tensor::from_f32_as_f16(&gpu, shape, v),
    };
    let xt = tensor_in(&x32)?;
    let plan = bn.op(shape, layout)?.plan_name();
    let y = bn.forward(&xt, layout)?;
    let mut out: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    // Outputs come out in x's precision: F16 for an F16 x (the bytes as stored, without the padding
    // half), F64 for an F64 x (as a PyTorch module in double precision gives), F32 otherwise.
    let floats = |v: Vec<f32>, add: Option<&[f64]>| -> (Vec<u8>, Dtype) {
        if wide {
            let v: Vec<f64> = match add {
                Some(s) => v.iter().zip(s).map(|(&t, s)| t as f64 + s).collect(),
                None => v.iter().map(|&t| t as f64).collect(),
            };
            (bytemuck::cast_slice::<f64, u8>(&v).to_vec(), Dtype::F64)
        } else {
            (bytemuck::cast_slice::<f32, u8>(&v).to_vec(), Dtype::F32)
        }
    };
    let tensor_out = |name: &str, t: &Tensor| -> Result<(String, Vec<usize>, Vec<u8>, Dtype)> {
        Ok(match t.dtype {
            DType::F32 => {
                let (bytes, dt) = floats(t.to_f32()?, None);
                (name.into(), shape.clone(), bytes, dt)
            }
            DType::F16 => {
                let v: Vec<half::f16> = gpu.download(&t.buffer, 0, t.numel())?;
                let bytes = bytemuck::cast_slice(&v).to_vec();
                (name.into(), shape.clone(), bytes, Dtype::F16)
            }
        })
    };
    let per_channel_out = |name: &str, v: Vec<f32>, add: Option<&[f64]>| {
        let (bytes, dt) = floats(v, add);
        (name.to_string(), vec![c], bytes, dt)
    };
    out.push(tensor_out("y", &y)?);
    // Ghost batches keep one (mean, invstd) per ghost batch, not one per channel: none is written.
    let ghost = bn.virtual_batch_size().is_some_and(|v| v != shape[0]);
    if bn.uses_batch_stats() && !ghost {
        let (mean, invstd) = bn.read_saved()?;
        out.push(per_channel_out("save_mean", mean, Some(&shift)));
        out.push(per_channel_out("save_invstd", invstd, None));
    }
    if let Some(dy) = dy {
        let dyt = tensor_in(&f32s_of(&dy))?;
        let dx = bn.backward(&xt, &dyt, layout)?;
        out.push(tensor_out("dx", &dx)?);
        if let (Some(dw), Some(db)) = (&bn.dweight, &bn.dbias) {
            out.push(per_channel_out("dweight", bn.read(dw)?, None));
            out.push(per_channel_out("dbias", bn.read(db)?, None));
        }
    }
    if let (Some(rm), Some(rv)) = (&bn.running_mean, &bn.running_var) {
        out.push(per_channel_out(
            "running_mean",
            bn.read(rm)?,
            Some(&running_mean_add),
        ));
        out.push(per_channel_out("running_var", bn.read(rv)?, None));
        out.push((
            "num_batches_tracked".into(),
            vec![],
            bn.num_batches_tracked.to_le_bytes().to_vec(),
            Dtype::I64,
        ));
    }
    write_output(args, &gpu, out, plan, shape, layout, training, fuse_relu)
}

type Outputs = Vec<(String, Vec<usize>, Vec<u8>, Dtype)>;

#[allow(clippy::too_many_arguments)]
fn write_output(
    args: &ParityArgs,
    gpu: &Gpu,
    out: Outputs,
    plan: String,
    shape: &[usize],
    layout: Layout,
    training: bool,
    fuse_relu: bool,
) -> Result<()> {
    let views = out
        .iter()
        .map(|(name, shape, data, dtype)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::file(&args.output, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let info = gpu.adapter_info();
    let mut out_meta = HashMap::new();
    out_meta.insert("plan".to_string(), plan.clone());
    out_meta.insert("fuse_relu".to_string(), fuse_relu.to_string());
    out_meta.insert(
        "adapter".to_string(),
        format!("{} ({:?})", info.name, info.backend),
    );
    let bytes =
        safetensors::serialize(views, Some(out_meta)).map_err(|e| Error::file(&args.output, e))?;
    write_atomically(&args.output, &bytes)?;
    let names: Vec<&str> = out.iter().map(|o| o.0.as_str()).collect();
    println!(
        "wrote {} ({}) — layout {}, shape {shape:?}, {} mode, plan {plan}",
        args.output.display(),
        names.join(", "),
        layout.name(),
        if training { "training" } else { "eval" },
    );
    Ok(())
}

/// Metadata keys of the BatchNorm variants (issue 6).
const VARIANT_KEYS: [&str; 4] = ["virtual_batch_size", "renorm_rmax", "renorm_dmax", "frozen"];

/// Sets the variants the metadata asks for: `virtual_batch_size` (an integer dividing N),
/// `renorm_rmax` with `renorm_dmax` (numbers, rmax >= 1, dmax >= 0), `frozen` (true/false). The layer
/// rejects bad values and combinations it does not support with a message naming them.
fn apply_variants(bn: &mut BatchNorm, meta: &HashMap<String, String>) -> Result<()> {
    if let Some(s) = meta.get("virtual_batch_size") {
        let v = s.trim().parse::<usize>().map_err(|_| {
            Error::config(format!(
                "metadata 'virtual_batch_size' must be a positive integer, got '{s}'"
            ))
        })?;
        bn.set_virtual_batch_size(Some(v))?;
    }
    match (
        meta.contains_key("renorm_rmax"),
        meta.contains_key("renorm_dmax"),
    ) {
        (true, true) => bn.set_renorm(Some(Renorm {
            rmax: parse_f32(meta, "renorm_rmax", 1.0)?,
            dmax: parse_f32(meta, "renorm_dmax", 0.0)?,
        }))?,
        (false, false) => {}
        _ => {
            return Err(Error::config(
                "batch renormalization needs both metadata 'renorm_rmax' and 'renorm_dmax'",
            ))
        }
    }
    if parse_bool(meta, "frozen", false)? {
        bn.set_frozen(true)?;
    }
    Ok(())
}
