//! Criterion benchmark of the BatchNorm ops: forward-train, forward-eval and backward, NCHW and NHWC (the
//! (N,C) shapes in NC), on `batchnorm bench`'s standard shapes (`bench::standard_shapes`). Throughput is
//! the op's minimal traffic (3, 2 and 5 tensor passes), so criterion's "thrpt" is the same effective
//! bandwidth the bench prints.
//!
//! One iteration records the op into a fresh encoder, submits it and waits for the device, so the numbers
//! include submit and wait (tens of µs here); `batchnorm bench` times the kernels alone with timestamps and
//! puts them next to the device's copy bandwidth.
//!
//! Each shape and layout runs three ways: f32, f16 storage (id suffix `/f16`; native where the device has
//! SHADER_F16) and f32 with the ReLU fused (`/relu`; its traffic includes the mask).
//!
//! Lavapipe (the CPU Vulkan driver) is slow, so the groups take 10 samples over short measurement times
//! (the whole run takes ~6 minutes there). Run: `WGPU_BACKEND=vulkan cargo bench --bench batchnorm`
//! (filters work as usual, e.g. `-- forward_eval/NCHW` or `-- 256x512x7x7`).

use std::sync::Arc;
use std::time::Duration;

use batchnorm::bench::{layout_shape, standard_shapes, BenchOp, Workload};
use batchnorm::gpu::Gpu;
use batchnorm::ops::batchnorm::{OpOptions, PlanChoice};
use batchnorm::tensor::{DType, Layout};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn group_name(op: BenchOp) -> &'static str {
    match op {
        BenchOp::ForwardTrain => "forward_train",
        BenchOp::ForwardEval => "forward_eval",
        BenchOp::Backward => "backward",
    }
}

fn batchnorm_ops(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => Arc::new(gpu),
        Err(e) => {
            eprintln!("skipping the BatchNorm benchmarks: {e}");
            return;
        }
    };
    let mut workloads = Vec::new();
    for logical in standard_shapes() {
        let layouts: &[Layout] = if logical.len() == 2 {
            &[Layout::Nc]
        } else {
            &[Layout::Nchw, Layout::Nhwc]
        };
        for &layout in layouts {
            let shape = layout_shape(&logical, layout);
            let variants = [
                ("", OpOptions::default()),
                (
                    "/f16",
                    OpOptions {
                        dtype: DType::F16,
                        ..Default::default()
                    },
                ),
                (
                    "/relu",
                    OpOptions {
                        fuse_relu: true,
                        ..Default::default()
                    },
                ),
            ];
            for (suffix, options) in variants {
                let id = format!("{}/{}{suffix}", layout.name(), shape_text(&logical));
                match prepare(&gpu, &shape, layout, options) {
                    Ok(work) => workloads.push((id, work)),
                    Err(e) => eprintln!("skipping {id}: {e}"),
                }
            }
        }
    }
    for op in BenchOp::ALL {
        let mut group = c.benchmark_group(group_name(op));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for (id, work) in &workloads {
            group.throughput(Throughput::Bytes(work.min_bytes(op)));
            let mut copy = 0usize;
            group.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| {
                    let mut encoder = gpu.encoder("bench");
                    copy += 1;
                    work.record(&mut encoder, op, copy)
                        .and_then(|()| gpu.submit_and_wait(encoder))
                        .expect("recorded and run once in prepare(), so it runs again")
                })
            });
        }
        group.finish();
    }
}

/// A workload whose ops have all run once (pipelines compiled, the saved statistics the backward reads
/// written), so recording errors surface here rather than inside criterion's loop.
fn prepare(
    gpu: &Arc<Gpu>,
    shape: &[usize],
    layout: Layout,
    options: OpOptions,
) -> batchnorm::Result<Workload> {
    let work = Workload::with_options(gpu, shape, layout, PlanChoice::Auto, None, 0x5eed, options)?;
    for op in BenchOp::ALL {
        let mut encoder = gpu.encoder("bench warm-up");
        work.record(&mut encoder, op, 0)?;
        gpu.submit_and_wait(encoder)?;
    }
    Ok(work)
}

fn shape_text(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

criterion_group!(benches, batchnorm_ops);
criterion_main!(benches);
