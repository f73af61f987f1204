//! What the probe examples (`u8_probe`, `uniform_probe`) share: a three-buffer bind group and the timing
//! of one pipeline's dispatch. Not an example itself (cargo builds only `examples/*.rs` and
//! `examples/*/main.rs`); each probe includes it with `mod probe_timing;`.

use std::time::Instant;

use batchnorm::gpu::Gpu;

/// A bind group of `buffers`, whole, at bindings 0, 1, 2, … of `pipeline`'s group 0.
pub fn bind_whole(
    gpu: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// Seconds per dispatch of `groups` workgroups: the best of 10 submits of 50 dispatches each, host
/// clock around submit + wait.
pub fn best_dispatch_secs(
    gpu: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    bind_group: &wgpu::BindGroup,
    groups: u32,
) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..10 {
        let mut e = gpu.encoder("probe");
        {
            let mut pass = e.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bind_group, &[]);
            for _ in 0..50 {
                pass.dispatch_workgroups(groups, 1, 1);
            }
        }
        let t = Instant::now();
        gpu.submit_and_wait(e).expect("submit");
        best = best.min(t.elapsed().as_secs_f64() / 50.0);
    }
    best
}
