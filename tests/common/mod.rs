//! Shared test helpers: one device per test binary, seeded random inputs (seed printed on failure),
//! poisoned outputs, and error measures with stated tolerances.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use batchnorm::gpu::Gpu;
use rand::{Rng, SeedableRng};

/// Storage bindings the tests' device allows at most: lavapipe's own limit. GPUs allow several GiB, and
/// the tests' "over one binding" shapes (derived from the limit or written for 128 MiB) would then run
/// unchunked or be skipped; capped, the chunked plans run on every adapter.
pub const TEST_BINDING_LIMIT: u64 = 128 << 20;

/// A device of the calling test's own, planning as [`gpu`] does: for what counts or profiles every
/// pipeline or dispatch on its device (the tests of a binary share `gpu()`, and those move with them).
pub fn own_gpu() -> Arc<Gpu> {
    let gpu = Gpu::new().expect("a GPU adapter (install mesa-vulkan-drivers)");
    Arc::new(if gpu_plans_from_env() {
        gpu.plan_as(wgpu::DeviceType::DiscreteGpu)
    } else {
        gpu
    })
}

/// The test device (lavapipe in CI), its binding size capped at [`TEST_BINDING_LIMIT`]. With
/// `BN_TEST_WEBGPU_DEFAULTS=1`, a device as a caller opens it with `DeviceDescriptor::default()` instead
/// (WebGPU's default limits, no optional features: no subgroups, no SHADER_F16, no timestamps). With
/// `BN_TEST_GPU_PLANS=1`, the kernels plan as for a discrete GPU whatever the adapter is
/// (`Gpu::plan_as`): on lavapipe, the GPU plans of every op run against the references.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        if std::env::var_os("BN_TEST_WEBGPU_DEFAULTS").is_some() {
            return webgpu_defaults_gpu();
        }
        let gpu = Gpu::with_limits(|l| {
            l.max_storage_buffer_binding_size =
                l.max_storage_buffer_binding_size.min(TEST_BINDING_LIMIT)
        })
        .expect("a GPU adapter (install mesa-vulkan-drivers)");
        Arc::new(if gpu_plans_from_env() {
            gpu.plan_as(wgpu::DeviceType::DiscreteGpu)
        } else {
            gpu
        })
    })
    .clone()
}

/// Whether `BN_TEST_GPU_PLANS` asks every test device to plan as a discrete GPU.
pub fn gpu_plans_from_env() -> bool {
    std::env::var_os("BN_TEST_GPU_PLANS").is_some()
}

/// A caller's device opened with `DeviceDescriptor::default()`: WebGPU's default limits (8 storage
/// buffers per stage, 16 KiB of workgroup memory, 128 MiB bindings) and no optional features.
pub fn webgpu_defaults_gpu() -> Arc<Gpu> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))
        .expect("a GPU adapter (install mesa-vulkan-drivers)");
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default()))
        .expect("a device with WebGPU's default limits");
    Arc::new(Gpu::from_device(device, queue))
}

/// A fresh seed per run unless BN_TEST_SEED fixes one; every failure message carries it.
pub fn seed() -> u64 {
    match std::env::var("BN_TEST_SEED") {
        Ok(s) => s.parse().expect("BN_TEST_SEED must be an integer"),
        Err(_) => rand::rng().random(),
    }
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Normal(mean, std) samples as f32 (Box-Muller; rand's distributions crate is not a dependency).
pub fn normal(rng: &mut impl Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(1e-12..1.0);
            let u2: f64 = rng.random();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mean as f64 + std as f64 * z) as f32
        })
        .collect()
}

pub fn uniform(rng: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// max |got - want| / (1 + |want|); NaN anywhere (an unwritten poisoned output) counts as infinite.
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if !g.is_finite() {
                f64::INFINITY
            } else {
                (g as f64 - w).abs() / (1.0 + w.abs())
            }
        })
        .fold(0.0, f64::max)
}

/// max |got - want| / max(1, max |want|): for sums over many values, whose f32 error scales with size.
pub fn max_err_scaled(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if !g.is_finite() {
                f64::INFINITY
            } else {
                (g as f64 - w).abs() / scale
            }
        })
        .fold(0.0, f64::max)
}

/// A directory of its own under the system's temporary directory, removed when dropped (also when the
/// test panics), so that test runs leave nothing behind. Unique per process and per call.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("batchnorm-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        ScratchDir(path)
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl AsRef<std::path::Path> for ScratchDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

/// Writes `tensors` (name, shape, values, all of one dtype) and string metadata as one safetensors
/// file: how the tests hand their inputs to `batchnorm parity`.
pub fn write_safetensors<T: bytemuck::Pod>(
    path: &std::path::Path,
    dtype: safetensors::Dtype,
    tensors: &[(&str, Vec<usize>, Vec<T>)],
    meta: &[(&str, &str)],
) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let view = safetensors::tensor::TensorView::new(
                dtype,
                shape.clone(),
                bytemuck::cast_slice(values),
            )
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
            (name.to_string(), view)
        })
        .collect();
    let meta: std::collections::HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
