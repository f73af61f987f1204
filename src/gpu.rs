//! The device: adapter choice, device and queue (our own or a caller's), the features and limits in use,
//! the pipeline cache, and the one upload and one readback path.
//!
//! Nothing here is global: every op takes the [`Gpu`] it runs on, so a program that already owns a
//! `wgpu::Device` can hand it to [`Gpu::from_device`] and use this crate as its backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// What the device can do, as far as the kernels care.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// `SHADER_F16` is enabled: f16 arithmetic and storage in WGSL.
    pub shader_f16: bool,
    /// `SUBGROUP` is enabled.
    pub subgroups: bool,
    /// The fewest lanes a subgroup of this adapter can have (0 without subgroups): kernels that share
    /// registers across a workgroup of 8 by subgroup operations need at least 8.
    pub subgroup_min_size: u32,
    /// `TIMESTAMP_QUERY` and `TIMESTAMP_QUERY_INSIDE_ENCODERS` are enabled: the bench times kernels on
    /// the device (dispatch profiles also need `TIMESTAMP_QUERY_INSIDE_PASSES`).
    pub timestamps: bool,
    /// The device is a CPU rasterizer (lavapipe, WARP, SwiftShader): the planner prefers consecutive
    /// elements per invocation there, and adjacent-address (coalesced) access on real GPUs.
    pub cpu_device: bool,
}

/// A device and queue with the adapter facts and a pipeline cache.
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Gpu {
    /// The wgpu device every buffer and pipeline of this crate lives on.
    pub device: wgpu::Device,
    /// The queue work is submitted to.
    pub queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    caps: Capabilities,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    pipelines_built: std::sync::atomic::AtomicUsize,
    /// Errors the device raised outside any error scope (only on devices we created).
    uncaptured: Arc<Mutex<Option<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    /// Device timestamps around each dispatch, while a profile is on ([`Gpu::start_dispatch_profile`]).
    profile: Mutex<Option<DispatchProfile>>,
    /// Bind groups already made, so a training step that binds the same buffers every step creates
    /// none after the first ([`Gpu::bind_group`]).
    bind_groups: Mutex<BindGroupCache>,
    /// What [`Gpu::pipeline`] hands out inside [`Gpu::gather_pipelines`]: an empty kernel, never
    /// dispatched.
    placeholder: std::sync::OnceLock<Arc<wgpu::ComputePipeline>>,
}

/// Most bind groups [`Gpu::bind_group`] keeps, and most bytes of buffers they may keep alive (a cached
/// bind group holds its buffers: the byte cap keeps the cache from holding large tensors a caller has
/// dropped). A training step of this crate's networks binds a few dozen.
const BIND_GROUP_CACHE_ENTRIES: usize = 256;
const BIND_GROUP_CACHE_BYTES: u64 = 256 << 20;

/// A pipeline [`Gpu::gather_pipelines`] found missing: its cache key, entry point and WGSL.
#[derive(Clone, Debug)]
pub struct PipelineSpec {
    /// The key [`Gpu::pipeline`] caches it under.
    pub key: String,
    /// The WGSL entry point.
    pub entry: String,
    /// The whole module's WGSL.
    pub source: String,
}

thread_local! {
    /// The device this thread gathers pipelines for (by address), and what it found missing.
    static GATHER: std::cell::RefCell<Option<(usize, Vec<PipelineSpec>)>> =
        const { std::cell::RefCell::new(None) };
}

/// A pipeline and the buffer ranges and texture views bound to it: what makes two bind groups
/// interchangeable.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    pipeline: wgpu::ComputePipeline,
    entries: Vec<(u32, BoundResource)>,
}

/// What a cached bind group binds at one binding.
#[derive(Clone, PartialEq, Eq, Hash)]
enum BoundResource {
    /// A buffer range: offset and size.
    Buffer(wgpu::Buffer, u64, Option<wgpu::BufferSize>),
    /// A texture view (`crate::ops::kernel::Texels`).
    Texture(wgpu::TextureView),
}

#[derive(Default)]
struct BindGroupCache {
    /// Bind group, the tick of its last use, and the bytes of the buffers it holds.
    map: HashMap<BindKey, (wgpu::BindGroup, u64, u64)>,
    tick: u64,
    bytes: u64,
    made: usize,
}

/// The query set a dispatch profile writes into and what each pair of queries timed.
struct DispatchProfile {
    queries: wgpu::QuerySet,
    capacity: u32,
    labels: Vec<String>,
}

/// One dispatch of a profile: its label (the kernel's entry point or op) and its device time.
#[derive(Clone, Debug)]
pub struct DispatchTime {
    /// What ran: the op's label or the kernel's entry point.
    pub label: String,
    /// Device time between the timestamps written before and after the dispatch, in milliseconds.
    pub ms: f64,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

/// Features we use when the adapter has them; none is required.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

impl Gpu {
    /// Creates an instance, picks an adapter and opens a device on it.
    ///
    /// Honours `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`) and `WGPU_ADAPTER_NAME` (a case-insensitive
    /// substring of the adapter's name). Requests `SHADER_F16`, `SUBGROUP` and `TIMESTAMP_QUERY` where the
    /// adapter has them, and the adapter's own limits (larger buffers and bindings than WebGPU's defaults).
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no adapter matches; [`Error::DeviceRequest`] when the device cannot be opened.
    pub fn new() -> Result<Self> {
        Self::with_limits(|_| {})
    }

    /// [`Self::new`] with the adapter's limits changed by `adjust` before the device is requested: a
    /// smaller `max_storage_buffer_binding_size` makes large tensors run in chunks on any adapter (the
    /// tests use it to run the chunked plans on GPUs with multi-GiB bindings), smaller buffer limits cap
    /// what one op may allocate.
    ///
    /// # Errors
    /// As [`Self::new`]; [`Error::DeviceRequest`] also for limits above the adapter's.
    pub fn with_limits(adjust: impl FnOnce(&mut wgpu::Limits)) -> Result<Self> {
        pollster::block_on(Self::new_async(adjust))
    }

    async fn new_async(adjust: impl FnOnce(&mut wgpu::Limits)) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let wanted_name = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .map(|s| s.to_lowercase());
        let adapter = match &wanted_name {
            Some(name) => {
                let adapters = instance.enumerate_adapters(backends).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(name))
                    .ok_or_else(|| Error::NoAdapter {
                        detail: format!(
                            " whose name contains WGPU_ADAPTER_NAME='{name}' (adapters present: {names:?})"
                        ),
                    })?
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    apply_limit_buckets: false,
                })
                .await
                .map_err(|e| Error::NoAdapter {
                    detail: format!(" for backends {backends:?} ({e})"),
                })?,
        };
        let info = adapter.get_info();
        let features = adapter.features() & WANTED_FEATURES;
        let mut limits = adapter.limits();
        adjust(&mut limits);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("batchnorm"),
                required_features: features,
                required_limits: limits,
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::DeviceRequest {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let gpu = Self::wrap(device, queue, info);
        // On our own device, errors outside a scope are recorded and returned by the next `check`, not
        // panicked on (wgpu's default handler panics).
        let sink = gpu.uncaptured.clone();
        gpu.device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(e.to_string());
                }
            }));
        Ok(gpu)
    }

    /// Wraps a device and queue the caller already owns (linking this crate as a GPU backend).
    ///
    /// The features and limits used are the device's own; kernels that need a missing feature fall back
    /// (f16 through packed u32, reductions without subgroups). The caller's error handler is left alone.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        Self::wrap(device, queue, info)
    }

    fn wrap(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let features = device.features();
        let limits = device.limits();
        let caps = Capabilities {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: if features.contains(wgpu::Features::SUBGROUP) {
                info.subgroup_min_size
            } else {
                0
            },
            timestamps: features.contains(
                wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
            ),
            cpu_device: info.device_type == wgpu::DeviceType::Cpu,
        };
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut slot) = lost_sink.lock() {
                *slot = Some(format!("{reason:?}: {msg}"));
            }
        });
        Gpu {
            device,
            queue,
            info,
            limits,
            features,
            caps,
            pipelines: Mutex::new(HashMap::new()),
            pipelines_built: std::sync::atomic::AtomicUsize::new(0),
            uncaptured: Arc::new(Mutex::new(None)),
            lost,
            profile: Mutex::new(None),
            bind_groups: Mutex::new(BindGroupCache::default()),
            placeholder: std::sync::OnceLock::new(),
        }
    }

    /// The adapter's name, backend, device type and driver.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits (the adapter's own when we created the device).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The device's enabled features.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// The capabilities the kernels plan with.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// Plans kernels from now on as for a device of `device_type` rather than the adapter's own: the
    /// planners choose access patterns, workgroup counts and merges by whether the device is a CPU
    /// driver. Tests pass `DiscreteGpu` to run the GPU plans on lavapipe, where CI runs (a GPU plan
    /// there is correct but slow). Lavapipe's loop limit (65 535 iterations per invocation, which the
    /// CPU plans respect) is then not checked, so keep such tensors small.
    pub fn plan_as(mut self, device_type: wgpu::DeviceType) -> Self {
        self.caps.cpu_device = device_type == wgpu::DeviceType::Cpu;
        self
    }

    /// How many distinct pipelines have been compiled on this device (each key once).
    pub fn pipelines_built(&self) -> usize {
        self.pipelines_built
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cached compute pipeline for `key`, compiling `source()`'s WGSL entry point `entry` on first use.
    ///
    /// Pipelines use the default layout deduced from the shader (bind group 0 holds exactly the bindings
    /// the entry point uses). First use of a pipeline costs milliseconds on lavapipe (LLVM JIT), so no
    /// pipeline is ever built twice.
    ///
    /// Inside [`Self::gather_pipelines`] on this thread, a missing pipeline is noted instead and a
    /// placeholder returned, which the ops never dispatch there.
    pub fn pipeline(
        &self,
        key: &str,
        entry: &str,
        source: impl FnOnce() -> String,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.lock_pipelines().get(key) {
            return Ok(p.clone());
        }
        if self.gathering() {
            GATHER.with_borrow_mut(|g| {
                if let Some((_, specs)) = g {
                    if !specs.iter().any(|s| s.key == key) {
                        specs.push(PipelineSpec {
                            key: key.to_string(),
                            entry: entry.to_string(),
                            source: source(),
                        });
                    }
                }
            });
            return self.placeholder();
        }
        let pipeline = Arc::new(self.compile(key, entry, source())?);
        // Two threads may have built the same key at once: the first one in stays (and counts).
        let mut pipelines = self.lock_pipelines();
        let kept = pipelines.entry(key.to_string()).or_insert_with(|| {
            self.pipelines_built
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            pipeline
        });
        Ok(kept.clone())
    }

    fn compile(&self, key: &str, entry: &str, src: String) -> Result<wgpu::ComputePipeline> {
        // Error scopes are the calling thread's own, so pipelines compile on several threads at once.
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::DeviceLost(format!(
                "pipeline '{key}' failed to compile: {err}"
            )));
        }
        Ok(pipeline)
    }

    /// Runs `record` with this thread's pipeline requests noted rather than compiled, and returns them
    /// with its result: the pipelines it would have built, each once, in the order it asked for them.
    ///
    /// While it runs, [`Self::pipeline`] hands this thread a placeholder for every pipeline not yet
    /// built and the ops skip their dispatches (their bind groups need the real pipeline's layout), so
    /// what `record` encodes must be dropped, never submitted. Copies and clears still encode; host
    /// state `record` changes stays changed (counters a forward moves, say): record on a twin built
    /// for the purpose, as [`crate::train::Trainer::prebuild_pipelines`] does. Other threads work as
    /// usual meanwhile.
    ///
    /// Why: lavapipe builds each pipeline on the thread that asks (80-160 ms for a step's fused
    /// kernels), one after another as a step records; knowing them up front,
    /// [`Self::build_pipelines`] builds them on every core.
    pub fn gather_pipelines<T>(&self, record: impl FnOnce() -> T) -> (T, Vec<PipelineSpec>) {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                GATHER.with_borrow_mut(|g| *g = None);
            }
        }
        let outer = GATHER.with_borrow_mut(|g| g.replace((self.id(), Vec::new())));
        let reset = Reset;
        let out = record();
        let specs = GATHER
            .with_borrow_mut(|g| g.take())
            .map(|(_, specs)| specs)
            .unwrap_or_default();
        drop(reset);
        // A gather inside another (of another device, say) resumes the outer one.
        GATHER.with_borrow_mut(|g| *g = outer);
        (out, specs)
    }

    /// Builds `specs` (from [`Self::gather_pipelines`]) on up to as many threads as the machine has
    /// cores, skipping those built since; afterwards [`Self::pipeline`] finds them all.
    ///
    /// # Errors
    /// [`Error::DeviceLost`] naming a pipeline that failed to compile (each thread stops at its first
    /// failure; the others' pipelines are built as far as they got).
    pub fn build_pipelines(&self, specs: &[PipelineSpec]) -> Result<()> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(specs.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let build = || -> Result<()> {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(s) = specs.get(i) else {
                    return Ok(());
                };
                self.pipeline(&s.key, &s.entry, || s.source.clone())?;
            }
        };
        if threads <= 1 {
            return build();
        }
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(build)).collect();
            let mut result = build();
            for helper in helpers {
                let joined = helper.join().unwrap_or_else(|_| {
                    Err(Error::DeviceLost(
                        "a pipeline-building thread panicked".into(),
                    ))
                });
                result = result.and(joined);
            }
            result
        })
    }

    fn placeholder(&self) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.placeholder.get() {
            return Ok(p.clone());
        }
        let source = "@compute @workgroup_size(1) fn placeholder() {}".to_string();
        let p = Arc::new(self.compile("gpu.placeholder", "placeholder", source)?);
        Ok(self.placeholder.get_or_init(|| p).clone())
    }

    /// Whether this thread is inside [`Self::gather_pipelines`] for this device: ops then skip their
    /// dispatches.
    pub(crate) fn gathering(&self) -> bool {
        GATHER.with_borrow(|g| g.as_ref().is_some_and(|(id, _)| *id == self.id()))
    }

    fn id(&self) -> usize {
        self as *const Gpu as usize
    }

    fn lock_pipelines(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<wgpu::ComputePipeline>>> {
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a buffer of `size` bytes, checking the device's limit and reporting out-of-memory as an
    /// error instead of a panic.
    pub fn create_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        if size > self.limits.max_buffer_size {
            return Err(Error::LimitExceeded {
                what: format!("buffer '{label}'"),
                needed: size,
                limit: self.limits.max_buffer_size,
            });
        }
        // wgpu wants sizes in multiples of 4 for copies and bindings.
        let size = size.max(4).div_ceil(4) * 4;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory(format!(
                "buffer '{label}' of {size} bytes: {err}"
            )));
        }
        Ok(buffer)
    }

    /// A storage buffer (also copy source and destination) holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buffer = self.create_buffer(label, bytes.len() as u64, storage_usage())?;
        self.queue.write_buffer(&buffer, 0, bytes);
        Ok(buffer)
    }

    /// Reads `len` elements of `T` from `buffer` starting at byte `offset`: copies into a staging buffer,
    /// submits, waits, maps. This is the crate's one readback path.
    pub fn download<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        len: usize,
    ) -> Result<Vec<T>> {
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let padded = bytes.div_ceil(4) * 4;
        let staging = self.create_buffer(
            "readback",
            padded,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, padded);
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        match pollster::block_on(rx.receive()) {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::DeviceLost(format!("readback failed: {e}"))),
            None => return Err(Error::DeviceLost("readback never completed".into())),
        }
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::DeviceLost(format!("readback map failed: {e}")))?;
        let out = bytemuck::pod_collect_to_vec::<u8, T>(&view[..bytes as usize]);
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Blocks until all submitted work is done, then reports any device error seen since the last check.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        self.check()
    }

    /// Returns the first device error (validation, loss) recorded since the last call, if any.
    pub fn check(&self) -> Result<()> {
        if let Some(msg) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(Error::DeviceLost(msg));
        }
        if let Some(msg) = self
            .uncaptured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(Error::DeviceLost(msg));
        }
        Ok(())
    }

    /// Submits one command buffer and waits for it.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit([encoder.finish()]);
        self.wait()
    }

    /// Starts timing every dispatch this crate records from now on (up to `max_dispatches` of them), by
    /// device timestamps written inside the passes just before and after each dispatch. For finding where
    /// a step spends its time (`examples/step_profile.rs`), not for benchmarks: the timestamps themselves
    /// cost a little. Record, submit and wait, then read the times with [`Self::finish_dispatch_profile`].
    /// Every dispatch an op records on this `Gpu` while the profile is on takes a slot, from any thread,
    /// so profile one thing at a time, and submit everything recorded before finishing (a slot whose
    /// encoder was never submitted holds no timestamps). The bench's own copy kernels are not ops and
    /// are not profiled.
    ///
    /// # Errors
    /// [`Error::BadConfig`] when the device lacks `TIMESTAMP_QUERY_INSIDE_PASSES`, and for
    /// `max_dispatches` of 0 or above 2048.
    pub fn start_dispatch_profile(&self, max_dispatches: u32) -> Result<()> {
        let inside =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        if !self.features.contains(inside) {
            return Err(Error::config(format!(
                "dispatch profiles need TIMESTAMP_QUERY_INSIDE_PASSES, which {} lacks",
                self.info.name
            )));
        }
        if max_dispatches == 0 || max_dispatches > 2048 {
            return Err(Error::config(format!(
                "a dispatch profile holds 1 to 2048 dispatches, not {max_dispatches}"
            )));
        }
        let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("dispatch profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * max_dispatches,
        });
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(DispatchProfile {
            queries,
            capacity: max_dispatches,
            labels: Vec::new(),
        });
        Ok(())
    }

    /// Records `dispatch` into `pass`, between two timestamps when a dispatch profile is on and has room
    /// (every op's dispatch goes through here).
    pub(crate) fn profiled(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        label: impl FnOnce() -> String,
        dispatch: impl FnOnce(&mut wgpu::ComputePass<'_>),
    ) {
        let mut guard = self.profile.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(profile) if (profile.labels.len() as u32) < profile.capacity => {
                let i = 2 * profile.labels.len() as u32;
                profile.labels.push(label());
                pass.write_timestamp(&profile.queries, i);
                dispatch(pass);
                pass.write_timestamp(&profile.queries, i + 1);
            }
            _ => {
                drop(guard);
                dispatch(pass);
            }
        }
    }

    /// Whether a dispatch profile is being recorded ([`Self::start_dispatch_profile`]).
    pub fn dispatch_profile_active(&self) -> bool {
        self.profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Ends the dispatch profile started by [`Self::start_dispatch_profile`] and returns each profiled
    /// dispatch's device time, in recording order. The profiled work must have been submitted; this waits
    /// for it. Dispatches past the profile's capacity were run but not timed.
    ///
    /// # Errors
    /// [`Error::BadConfig`] when no profile was started; device errors from the readback.
    pub fn finish_dispatch_profile(&self) -> Result<Vec<DispatchTime>> {
        let profile = self
            .profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::config("no dispatch profile was started"))?;
        let count = 2 * profile.labels.len() as u32;
        if count == 0 {
            return Ok(Vec::new());
        }
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dispatch profile resolve"),
            size: 8 * count as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = self.encoder("dispatch profile resolve");
        encoder.resolve_query_set(&profile.queries, 0..count, &resolved, 0);
        self.submit_and_wait(encoder)?;
        let ticks: Vec<u64> = self.download(&resolved, 0, count as usize)?;
        let period_ns = self.queue.get_timestamp_period() as f64;
        Ok(profile
            .labels
            .into_iter()
            .zip(ticks.chunks_exact(2))
            .map(|(label, t)| DispatchTime {
                label,
                ms: t[1].saturating_sub(t[0]) as f64 * period_ns * 1e-6,
            })
            .collect())
    }

    /// The bind group 0 of `pipeline` holding `entries` (buffer bindings): made once and reused while
    /// the same buffer ranges are bound to the same pipeline, so steady-state training steps create no
    /// bind groups. Bounded: at most 256 kept, holding at most 256 MiB of buffers between them (least
    /// recently used dropped first), and bind groups over buffers larger than that are not kept.
    pub(crate) fn bind_group(
        &self,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindGroupEntry],
    ) -> wgpu::BindGroup {
        let make = || {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout: &pipeline.get_bind_group_layout(0),
                entries,
            })
        };
        let mut key = BindKey {
            pipeline: pipeline.clone(),
            entries: Vec::with_capacity(entries.len()),
        };
        let mut bytes = 0u64;
        for e in entries {
            match &e.resource {
                wgpu::BindingResource::Buffer(b) => {
                    bytes += b.buffer.size();
                    key.entries.push((
                        e.binding,
                        BoundResource::Buffer(b.buffer.clone(), b.offset, b.size),
                    ));
                }
                wgpu::BindingResource::TextureView(view) => {
                    key.entries
                        .push((e.binding, BoundResource::Texture((*view).clone())));
                }
                _ => return make(),
            }
        }
        let mut cache = self.bind_groups.lock().unwrap_or_else(|p| p.into_inner());
        cache.tick += 1;
        let tick = cache.tick;
        if let Some((group, used, _)) = cache.map.get_mut(&key) {
            *used = tick;
            return group.clone();
        }
        let group = make();
        cache.made += 1;
        if bytes > BIND_GROUP_CACHE_BYTES {
            return group;
        }
        while cache.map.len() >= BIND_GROUP_CACHE_ENTRIES
            || cache.bytes + bytes > BIND_GROUP_CACHE_BYTES
        {
            let Some(oldest) = cache
                .map
                .iter()
                .min_by_key(|(_, v)| v.1)
                .map(|(k, _)| BindKey {
                    pipeline: k.pipeline.clone(),
                    entries: k.entries.clone(),
                })
            else {
                break;
            };
            if let Some((_, _, b)) = cache.map.remove(&oldest) {
                cache.bytes -= b;
            }
        }
        cache.bytes += bytes;
        cache.map.insert(key, (group.clone(), tick, bytes));
        group
    }

    /// How many bind groups the device's bind-group cache has made (not reused) so far: a training
    /// step that makes none after the first allocates nothing per step.
    pub fn bind_groups_made(&self) -> usize {
        self.bind_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .made
    }

    /// A fresh command encoder on this device.
    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }
}

/// The usage every tensor buffer of this crate has: storage, copy source and copy destination.
pub fn storage_usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
}
