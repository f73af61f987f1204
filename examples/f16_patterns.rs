//! f16 storage on the adapter at hand: y = a·x + b over 16 Mi values, stored as f32 (`vec4<f32>` loads)
//! and as packed f16 words (`u32`, `vec2<u32>`, `vec4<u32>`: 2, 4 or 8 halves per load), converted by
//! the crate's integer `unpack_half2`/`pack_half2` or by WGSL's `unpack2x16float`/`pack2x16float`, plus
//! plain copies of each width. Prints the median of 11 device-synchronised runs of each, alternated so
//! that a shared host's drift hits all alike, and each one's time relative to the f32 kernel. The numbers
//! behind the packed f16 kernels' units of 8 (`mat2x4<f32>` in the kernels): lavapipe issues a storage
//! load lane by lane, at most 16 bytes per lane, so only a `vec4<u32>` of halves needs half the loads of
//! f32; the conversions then cost about as much again as the loads.
//!
//! `cargo run --release --example f16_patterns`

use batchnorm::gpu::{storage_usage, Gpu};
use batchnorm::ops::batchnorm::PACK_HALF2_WGSL;
use std::time::Instant;

/// Values per tensor.
const N: u32 = 16 * 1024 * 1024;
/// Loads per invocation (a contiguous run, as the NCHW kernels walk a plane).
const RUN: u32 = 1024;

const KERNELS: &str = r#"
@group(0) @binding(0) var<storage, read_write> x4: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> w1x: array<u32>;
@group(0) @binding(3) var<storage, read_write> w1y: array<u32>;
@group(0) @binding(4) var<storage, read_write> w2x: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> w2y: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read_write> w4x: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read_write> w4y: array<vec4<u32>>;

@compute @workgroup_size(64)
fn f32_affine(@builtin(global_invocation_id) g: vec3<u32>) {
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        y4[i] = x4[i] * 0.5 + 0.25;
    }
}

@compute @workgroup_size(64)
fn f32_copy(@builtin(global_invocation_id) g: vec3<u32>) {
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        y4[i] = x4[i];
    }
}

@compute @workgroup_size(64)
fn half2_affine(@builtin(global_invocation_id) g: vec3<u32>) {
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        w1y[i] = pack_half2(unpack_half2(w1x[i]) * 0.5 + 0.25);
    }
}

fn unit4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack_half2(w.x), unpack_half2(w.y)); }
fn word4(v: vec4<f32>) -> vec2<u32> { return vec2<u32>(pack_half2(v.xy), pack_half2(v.zw)); }

@compute @workgroup_size(64)
fn half4_affine(@builtin(global_invocation_id) g: vec3<u32>) {
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        w2y[i] = word4(unit4(w2x[i]) * 0.5 + 0.25);
    }
}

fn unit8(w: vec4<u32>) -> mat2x4<f32> {
    return mat2x4<f32>(vec4<f32>(unpack_half2(w.x), unpack_half2(w.y)), vec4<f32>(unpack_half2(w.z), unpack_half2(w.w)));
}
fn word8(v: mat2x4<f32>) -> vec4<u32> {
    return vec4<u32>(pack_half2(v[0].xy), pack_half2(v[0].zw), pack_half2(v[1].xy), pack_half2(v[1].zw));
}

@compute @workgroup_size(64)
fn half8_affine(@builtin(global_invocation_id) g: vec3<u32>) {
    let b = mat2x4<f32>(vec4<f32>(0.25), vec4<f32>(0.25));
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        w4y[i] = word8(unit8(w4x[i]) * 0.5 + b);
    }
}

@compute @workgroup_size(64)
fn half8_builtin_affine(@builtin(global_invocation_id) g: vec3<u32>) {
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        let w = w4x[i];
        let v0 = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)) * 0.5 + 0.25;
        let v1 = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)) * 0.5 + 0.25;
        w4y[i] = vec4<u32>(pack2x16float(v0.xy), pack2x16float(v0.zw), pack2x16float(v1.xy), pack2x16float(v1.zw));
    }
}

@compute @workgroup_size(64)
fn half8_copy(@builtin(global_invocation_id) g: vec3<u32>) {
    for (var i = g.x * RUN; i < (g.x + 1u) * RUN; i++) {
        w4y[i] = w4x[i];
    }
}
"#;

struct Case {
    name: &'static str,
    entry: &'static str,
    /// Bytes per value as stored.
    esize: u64,
    /// Values per load, which picks the bindings.
    per_load: u32,
}

fn main() -> batchnorm::Result<()> {
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.adapter_info().name);
    let x32 = gpu.create_buffer("x32", u64::from(N) * 4, storage_usage())?;
    let y32 = gpu.create_buffer("y32", u64::from(N) * 4, storage_usage())?;
    let x16 = gpu.create_buffer("x16", u64::from(N) * 2, storage_usage())?;
    let y16 = gpu.create_buffer("y16", u64::from(N) * 2, storage_usage())?;
    let cases = [
        Case {
            name: "f32, vec4 (4 values a load)",
            entry: "f32_affine",
            esize: 4,
            per_load: 4,
        },
        Case {
            name: "f32 copy",
            entry: "f32_copy",
            esize: 4,
            per_load: 4,
        },
        Case {
            name: "f16 in u32 (2 a load)",
            entry: "half2_affine",
            esize: 2,
            per_load: 2,
        },
        Case {
            name: "f16 in vec2<u32> (4 a load)",
            entry: "half4_affine",
            esize: 2,
            per_load: 4,
        },
        Case {
            name: "f16 in vec4<u32> (8 a load)",
            entry: "half8_affine",
            esize: 2,
            per_load: 8,
        },
        Case {
            name: "same, WGSL's pack/unpack",
            entry: "half8_builtin_affine",
            esize: 2,
            per_load: 8,
        },
        Case {
            name: "vec4<u32> copy (8 halves)",
            entry: "half8_copy",
            esize: 2,
            per_load: 8,
        },
    ];
    let mut runs = Vec::new();
    for case in &cases {
        let pipeline = gpu.pipeline(&format!("f16_patterns {}", case.entry), case.entry, || {
            format!("const RUN: u32 = {RUN}u;\n{PACK_HALF2_WGSL}{KERNELS}")
        })?;
        let (bx, by) = if case.esize == 4 {
            (&x32, &y32)
        } else {
            (&x16, &y16)
        };
        let first = match (case.esize, case.per_load) {
            (4, _) => 0,
            (_, 2) => 2,
            (_, 4) => 4,
            _ => 6,
        };
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("f16_patterns"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: first,
                    resource: bx.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: first + 1,
                    resource: by.as_entire_binding(),
                },
            ],
        });
        let groups = N / case.per_load / RUN / 64;
        runs.push((pipeline, bind_group, groups, Vec::new()));
    }
    for _ in 0..11 {
        for (pipeline, bind_group, groups, times) in runs.iter_mut() {
            let mut encoder = gpu.encoder("f16_patterns");
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &*bind_group, &[]);
                pass.dispatch_workgroups(*groups, 1, 1);
            }
            let start = Instant::now();
            gpu.submit_and_wait(encoder)?;
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let medians: Vec<f64> = runs
        .iter_mut()
        .map(|(_, _, _, times)| {
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        })
        .collect();
    println!(
        "{} Mi values, read and written; time relative to the f32 kernel",
        N >> 20
    );
    for (case, median) in cases.iter().zip(&medians) {
        let gbps = 2.0 * (u64::from(N) * case.esize) as f64 / median / 1e9;
        println!(
            "{:<30} {:>8.3} ms {:>7.2} GB/s {:>6.2}x",
            case.name,
            median * 1e3,
            gbps,
            median / medians[0]
        );
    }
    Ok(())
}
