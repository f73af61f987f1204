//! `batchnorm parity --input IN.safetensors --output OUT.safetensors`: run the engine on tensors a user
//! wrote (typically from PyTorch) and write every result, so the two can be compared.
//!
//! Input tensors: `x` (required), `dy`, `weight`, `bias`, `running_mean`, `running_var` (f32 or f64;
//! optional `num_batches_tracked` as an integer tensor). Metadata (all optional, strings): `layout`
//! (NCHW | NHWC | NC, default NCHW), `eps` (1e-5), `momentum` (a number or `none`, 0.1), `training`
//! (true), `affine` (true), `track_running_stats` (true), `num_batches_tracked` (0).
//! Output tensors (f32): `y`; with `dy`: `dx`, and `dweight`, `dbias` when affine; when tracking: the
//! updated `running_mean`, `running_var` and `num_batches_tracked` (i64); `save_mean` and `save_invstd`
//! when batch statistics were used.
//!
//! Variant metadata (issue 6; see [`apply_variants`]): `virtual_batch_size` (ghost BatchNorm),
//! `renorm_rmax` and `renorm_dmax` (Batch Renormalization, both or neither), `frozen` (FrozenBN).
//! Kernel variants (see `run_kernel_variant`): `x` (and `dy`) may be F16, and then run with f16 storage
//! and `y`/`dx` are written as F16; metadata `fuse_relu` (false) runs y = relu(bn(x)) with the backward
//! through the ReLU mask. These drive the op directly (the layer is f32 without ReLU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use batchnorm::error::{Error, Result};
use batchnorm::gpu::Gpu;
use batchnorm::io::write_atomically;
use batchnorm::nn::BatchNorm;
use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, ForwardBuffers, OpOptions, PlanChoice,
};
use batchnorm::ops::bn_variants::Renorm;
use batchnorm::tensor::{f16_padded, DType, Layout, Tensor};
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
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// Tensors given as F16 (only `x` and `dy` may be).
    f16: Vec<String>,
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
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytemuck::pod_collect_to_vec(view.data()),
            Dtype::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(view.data())
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            Dtype::F16 if name == "x" || name == "dy" => {
                f16.push(name.clone());
                bytemuck::pod_collect_to_vec::<u8, half::f16>(view.data())
                    .into_iter()
                    .map(half::f16::to_f32)
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
    let per_channel = |name: &str| -> Result<Option<Vec<f32>>> {
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

    let gpu = Arc::new(Gpu::new()?);
    let fuse_relu = parse_bool(meta, "fuse_relu", false)?;
    let x_f16 = input.f16.iter().any(|n| n == "x");
    if fuse_relu || x_f16 {
        // These runs drive the op directly; the layer-level variants are not available there, and
        // silently ignoring them would write results for a different computation.
        if let Some(k) = VARIANT_KEYS.iter().find(|k| meta.contains_key(**k)) {
            return Err(Error::config(format!(
                "metadata '{k}' cannot be combined with fuse_relu or an F16 x in this version"
            )));
        }
        let run = VariantRun {
            shape,
            layout,
            config,
            training,
            nbt,
            x,
            dtype: if x_f16 { DType::F16 } else { DType::F32 },
            dy: dy.as_deref(),
            weight: weight.as_deref(),
            bias: bias.as_deref(),
            running_mean: running_mean.as_deref(),
            running_var: running_var.as_deref(),
            fuse_relu,
        };
        let (out, plan) = run_kernel_variant(&gpu, &run)?;
        return write_output(args, &gpu, out, plan, shape, layout, training, fuse_relu);
    }
    let mut bn = BatchNorm::new(&gpu, c, config)?;
    bn.train(training);
    bn.num_batches_tracked = nbt;
    if let (Some(b), Some(v)) = (&bn.weight, &weight) {
        bn.write("weight", b, v)?;
    }
    if let (Some(b), Some(v)) = (&bn.bias, &bias) {
        bn.write("bias", b, v)?;
    }
    if let (Some(b), Some(v)) = (&bn.running_mean, &running_mean) {
        bn.write("running_mean", b, v)?;
    }
    if let (Some(b), Some(v)) = (&bn.running_var, &running_var) {
        bn.write("running_var", b, v)?;
    }
    apply_variants(&mut bn, meta)?;
    let xt = Tensor::from_f32(&gpu, shape, x)?;
    let plan = bn.op(shape, layout)?.plan_name();
    let y = bn.forward(&xt, layout)?;
    let mut out: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    let f32s = |v: Vec<f32>| bytemuck::cast_slice::<f32, u8>(&v).to_vec();
    out.push(("y".into(), shape.clone(), f32s(y.to_f32()?), Dtype::F32));
    // Ghost batches keep one (mean, invstd) per ghost batch, not one per channel: none is written.
    let ghost = bn.virtual_batch_size().is_some_and(|v| v != shape[0]);
    if bn.uses_batch_stats() && !ghost {
        let (mean, invstd) = bn.read_saved()?;
        out.push(("save_mean".into(), vec![c], f32s(mean), Dtype::F32));
        out.push(("save_invstd".into(), vec![c], f32s(invstd), Dtype::F32));
    }
    if let Some(dy) = dy {
        let dyt = Tensor::from_f32(&gpu, shape, &dy)?;
        let dx = bn.backward(&xt, &dyt, layout)?;
        out.push(("dx".into(), shape.clone(), f32s(dx.to_f32()?), Dtype::F32));
        if let (Some(dw), Some(db)) = (&bn.dweight, &bn.dbias) {
            out.push(("dweight".into(), vec![c], f32s(bn.read(dw)?), Dtype::F32));
            out.push(("dbias".into(), vec![c], f32s(bn.read(db)?), Dtype::F32));
        }
    }
    if let (Some(rm), Some(rv)) = (&bn.running_mean, &bn.running_var) {
        out.push((
            "running_mean".into(),
            vec![c],
            f32s(bn.read(rm)?),
            Dtype::F32,
        ));
        out.push((
            "running_var".into(),
            vec![c],
            f32s(bn.read(rv)?),
            Dtype::F32,
        ));
        out.push((
            "num_batches_tracked".into(),
            vec![],
            bn.num_batches_tracked.to_le_bytes().to_vec(),
            Dtype::I64,
        ));
    }
    write_output(args, &gpu, out, plan, shape, layout, training, false)
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

/// One parity run of a kernel variant (f16 storage and/or fused ReLU), on the op directly.
struct VariantRun<'a> {
    shape: &'a [usize],
    layout: Layout,
    config: BatchNormConfig,
    training: bool,
    nbt: i64,
    x: &'a [f32],
    /// Storage of x, y, dy and dx: x's dtype (an f32 dy is rounded to f16 for an f16 x, an f16 dy widened
    /// exactly for an f32 x).
    dtype: DType,
    dy: Option<&'a [f32]>,
    weight: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
    running_mean: Option<&'a [f32]>,
    running_var: Option<&'a [f32]>,
    fuse_relu: bool,
}

/// Runs forward (and backward with dy) with PyTorch's mode rules, as the layer does: batch statistics
/// when training or not tracking; the running update with factor momentum, or 1/(num_batches_tracked+1)
/// for momentum `none`, counting the batch.
fn run_kernel_variant(gpu: &Arc<Gpu>, r: &VariantRun) -> Result<(Outputs, String)> {
    let dims = r.layout.dims(r.shape)?;
    let c = dims.c;
    let cfg = r.config;
    let options = OpOptions {
        dtype: r.dtype,
        fuse_relu: r.fuse_relu,
        ..Default::default()
    };
    let op = BatchNormOp::with_options(gpu, r.shape, r.layout, cfg, PlanChoice::Auto, options)?;
    let upload_tensor = |label: &str, v: &[f32]| -> Result<wgpu::Buffer> {
        match r.dtype {
            DType::F32 => gpu.upload(label, v),
            DType::F16 => gpu.upload(label, &f16_padded(v)),
        }
    };
    let numel = dims.numel();
    let zeros = vec![0f32; numel];
    let bx = upload_tensor("x", r.x)?;
    let by = upload_tensor("y", &zeros)?;
    let per_channel = |label: &str, v: Option<&[f32]>, default: f32| -> Result<wgpu::Buffer> {
        gpu.upload(label, v.unwrap_or(&vec![default; c]))
    };
    let bw = per_channel("weight", r.weight, 1.0)?;
    let bb = per_channel("bias", r.bias, 0.0)?;
    let brm = per_channel("running_mean", r.running_mean, 0.0)?;
    let brv = per_channel("running_var", r.running_var, 1.0)?;
    let bsaved = gpu.upload("saved", &vec![0f32; 2 * c])?;
    let bmask = gpu.upload("mask", &vec![0u32; (op.mask_bytes() / 4) as usize])?;
    let track = cfg.track_running_stats;
    let batch_stats = r.training || !track;
    let update = r.training && track;
    let mut nbt = r.nbt;
    let factor = match cfg.momentum {
        Some(m) => m,
        None => 1.0 / (nbt + 1) as f32,
    };
    let fwd = ForwardBuffers {
        x: (&bx).into(),
        y: (&by).into(),
        weight: cfg.affine.then(|| BufferRef::from(&bw)),
        bias: cfg.affine.then(|| BufferRef::from(&bb)),
        running_mean: track.then(|| BufferRef::from(&brm)),
        running_var: track.then(|| BufferRef::from(&brv)),
        saved: (&bsaved).into(),
    };
    let mask = BufferRef::from(&bmask);
    let mut enc = gpu.encoder("parity variant");
    match (batch_stats, r.fuse_relu) {
        (true, false) => op.record_forward_train(&mut enc, &fwd, update.then_some(factor))?,
        (true, true) => {
            op.record_forward_train_relu(&mut enc, &fwd, mask, update.then_some(factor))?
        }
        (false, false) => op.record_forward_eval(&mut enc, &fwd)?,
        (false, true) => op.record_forward_eval_relu(&mut enc, &fwd, mask)?,
    }
    if update {
        nbt += 1;
    }
    let mut grads = None;
    if let Some(dy) = r.dy {
        let bdy = upload_tensor("dy", dy)?;
        let bdx = upload_tensor("dx", &zeros)?;
        let bdw = gpu.upload("dweight", &vec![0f32; c])?;
        let bdb = gpu.upload("dbias", &vec![0f32; c])?;
        let bwd = BackwardBuffers {
            x: (&bx).into(),
            dy: (&bdy).into(),
            dx: (&bdx).into(),
            weight: cfg.affine.then(|| BufferRef::from(&bw)),
            saved: (&bsaved).into(),
            dweight: cfg.affine.then(|| BufferRef::from(&bdw)),
            dbias: cfg.affine.then(|| BufferRef::from(&bdb)),
        };
        if r.fuse_relu {
            op.record_backward_relu(&mut enc, &bwd, mask, batch_stats)?;
        } else {
            op.record_backward(&mut enc, &bwd, batch_stats)?;
        }
        grads = Some((bdy, bdx, bdw, bdb));
    }
    gpu.submit_and_wait(enc)?;

    let f32s = |v: Vec<f32>| bytemuck::cast_slice::<f32, u8>(&v).to_vec();
    // f16 tensors go out as F16, their bytes as stored (without the padding half).
    let tensor_out =
        |name: &str, b: &wgpu::Buffer| -> Result<(String, Vec<usize>, Vec<u8>, Dtype)> {
            Ok(match r.dtype {
                DType::F32 => (
                    name.to_string(),
                    r.shape.to_vec(),
                    f32s(gpu.download(b, 0, numel)?),
                    Dtype::F32,
                ),
                DType::F16 => {
                    let v: Vec<half::f16> = gpu.download(b, 0, numel)?;
                    (
                        name.to_string(),
                        r.shape.to_vec(),
                        bytemuck::cast_slice(&v).to_vec(),
                        Dtype::F16,
                    )
                }
            })
        };
    let mut out: Outputs = vec![tensor_out("y", &by)?];
    if batch_stats {
        let saved: Vec<f32> = gpu.download(&bsaved, 0, 2 * c)?;
        out.push((
            "save_mean".into(),
            vec![c],
            f32s(saved[..c].to_vec()),
            Dtype::F32,
        ));
        out.push((
            "save_invstd".into(),
            vec![c],
            f32s(saved[c..].to_vec()),
            Dtype::F32,
        ));
    }
    if let Some((_, bdx, bdw, bdb)) = &grads {
        out.push(tensor_out("dx", bdx)?);
        if cfg.affine {
            out.push((
                "dweight".into(),
                vec![c],
                f32s(gpu.download(bdw, 0, c)?),
                Dtype::F32,
            ));
            out.push((
                "dbias".into(),
                vec![c],
                f32s(gpu.download(bdb, 0, c)?),
                Dtype::F32,
            ));
        }
    }
    if track {
        out.push((
            "running_mean".into(),
            vec![c],
            f32s(gpu.download(&brm, 0, c)?),
            Dtype::F32,
        ));
        out.push((
            "running_var".into(),
            vec![c],
            f32s(gpu.download(&brv, 0, c)?),
            Dtype::F32,
        ));
        out.push((
            "num_batches_tracked".into(),
            vec![],
            nbt.to_le_bytes().to_vec(),
            Dtype::I64,
        ));
    }
    Ok((out, op.plan_name()))
}
