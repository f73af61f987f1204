//! Linking `batchnorm` as the BatchNorm backend of another wgpu program.
//!
//! The program owns everything: the device and queue, one activation arena holding x and y at offsets,
//! one parameter arena holding weight, bias, the running statistics and the saved statistics, and the
//! command encoder. `batchnorm` only records its dispatches into that encoder; the program submits.
//!
//! Run: `cargo run --release --example link_backend`

use std::sync::Arc;

use batchnorm::gpu::Gpu;
use batchnorm::ops::batchnorm::{
    BackwardBuffers, BatchNormConfig, BatchNormOp, BufferRef, ForwardBuffers, PlanChoice,
};
use batchnorm::tensor::Layout;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The host program's own device.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("host program"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    println!("host device: {}", adapter.get_info().name);

    // 2. Its buffers: an activation arena [x | dy | y | dx] and a parameter arena, 256-byte aligned slots.
    let (n, c, h, w) = (8usize, 16, 12, 12);
    let numel = n * c * h * w;
    let bytes = (numel * 4) as u64;
    let slot = bytes.div_ceil(256) * 256;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let arena = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("activations"),
        size: 4 * slot,
        usage,
        mapped_at_creation: false,
    });
    let params = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("parameters"),
        size: 8 * 256,
        usage,
        mapped_at_creation: false,
    });
    let x: Vec<f32> = (0..numel)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let dy: Vec<f32> = (0..numel)
        .map(|i| ((i * 104_729) % 200) as f32 / 100.0 - 1.0)
        .collect();
    queue.write_buffer(&arena, 0, bytemuck::cast_slice(&x));
    queue.write_buffer(&arena, slot, bytemuck::cast_slice(&dy));
    queue.write_buffer(&params, 0, bytemuck::cast_slice(&vec![1.0f32; c])); // weight
    queue.write_buffer(&params, 256, bytemuck::cast_slice(&vec![0.0f32; c])); // bias
    queue.write_buffer(&params, 512, bytemuck::cast_slice(&vec![0.0f32; c])); // running_mean
    queue.write_buffer(&params, 768, bytemuck::cast_slice(&vec![1.0f32; c])); // running_var

    // 3. Hand the device to batchnorm and plan once for this shape.
    let gpu = Arc::new(Gpu::from_device(device.clone(), queue.clone()));
    let shape = [n, c, h, w];
    let bn = BatchNormOp::new(
        &gpu,
        &shape,
        Layout::Nchw,
        BatchNormConfig::default(),
        PlanChoice::Auto,
    )?;
    println!("plan: {}", bn.plan_name());
    let at = |buffer, offset| BufferRef { buffer, offset };

    // 4. Record forward-train and backward into the host's encoder, next to the host's own commands.
    let mut encoder = device.create_command_encoder(&Default::default());
    bn.record_forward_train(
        &mut encoder,
        &ForwardBuffers {
            x: at(&arena, 0),
            y: at(&arena, 2 * slot),
            weight: Some(at(&params, 0)),
            bias: Some(at(&params, 256)),
            running_mean: Some(at(&params, 512)),
            running_var: Some(at(&params, 768)),
            saved: at(&params, 1024),
        },
        Some(0.1),
    )?;
    bn.record_backward(
        &mut encoder,
        &BackwardBuffers {
            x: at(&arena, 0),
            dy: at(&arena, slot),
            dx: at(&arena, 3 * slot),
            weight: Some(at(&params, 0)),
            saved: at(&params, 1024),
            dweight: Some(at(&params, 1536)),
            dbias: Some(at(&params, 1792)),
        },
        true,
    )?;
    queue.submit([encoder.finish()]);

    // 5. Read a few results back (through batchnorm's readback helper, for brevity).
    let y: Vec<f32> = gpu.download(&arena, 2 * slot, 4)?;
    let rm: Vec<f32> = gpu.download(&params, 512, 4)?;
    let dw: Vec<f32> = gpu.download(&params, 1536, 4)?;
    println!("y[0..4]            = {y:?}");
    println!("running_mean[0..4] = {rm:?}");
    println!("dweight[0..4]      = {dw:?}");
    Ok(())
}
