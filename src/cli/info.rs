//! `batchnorm info`.

use batchnorm::gpu::Gpu;

pub fn print(gpu: &Gpu) {
    let info = gpu.adapter_info();
    let limits = gpu.limits();
    let caps = gpu.caps();
    println!("adapter        {}", info.name);
    println!("backend        {:?}", info.backend);
    println!("device type    {:?}", info.device_type);
    println!("driver         {} {}", info.driver, info.driver_info);
    println!("vendor/device  {:#06x}/{:#06x}", info.vendor, info.device);
    println!("features in use:");
    println!("  SHADER_F16       {}", yes(caps.shader_f16));
    println!("  SUBGROUP         {}", yes(caps.subgroups));
    println!("  TIMESTAMP_QUERY  {}", yes(caps.timestamps));
    println!("limits in use:");
    println!(
        "  max_buffer_size                      {}",
        limits.max_buffer_size
    );
    println!(
        "  max_storage_buffer_binding_size      {}",
        limits.max_storage_buffer_binding_size
    );
    println!(
        "  max_storage_buffers_per_shader_stage {}",
        limits.max_storage_buffers_per_shader_stage
    );
    println!(
        "  max_compute_workgroup_storage_size   {}",
        limits.max_compute_workgroup_storage_size
    );
    println!(
        "  max_compute_invocations_per_workgroup {}",
        limits.max_compute_invocations_per_workgroup
    );
    println!(
        "  max_compute_workgroups_per_dimension {}",
        limits.max_compute_workgroups_per_dimension
    );
    println!(
        "  min_storage_buffer_offset_alignment  {}",
        limits.min_storage_buffer_offset_alignment
    );
    println!(
        "access pattern  {}",
        if caps.cpu_device {
            "consecutive units per invocation (CPU device)"
        } else {
            "adjacent invocations on adjacent addresses (GPU)"
        }
    );
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
