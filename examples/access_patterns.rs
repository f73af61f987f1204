//! Access patterns on the adapter at hand: one body, y = a·x + b over a 1024 × 4096 f32 tensor (16 MiB),
//! walked in the ways the BatchNorm kernels could walk it. Prints the median of 15 device-synchronised
//! runs of each, alternated so that a shared host's drift hits all alike. The numbers behind
//! ARCHITECTURE.md's "Performance on lavapipe" and the NCHW kernels' plane runs.
//!
//! `cargo run --release --example access_patterns`

use batchnorm::gpu::{storage_usage, Gpu};
use std::time::Instant;

const ROWS: u32 = 1024;
/// vec4 units per row (4096 channels).
const INNER: u32 = 1024;

const KERNELS: &str = r#"
@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y: array<vec4<f32>>;
// a for unit j at 2j, b at 2j + 1
@group(0) @binding(2) var<storage, read_write> ab: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> xs: array<f32>;
@group(0) @binding(4) var<storage, read_write> ys: array<f32>;

// Channel-last: invocation = one vec4 column, rows walked one after another (16 KB apart); PARTS
// workgroups split the rows.
@compute @workgroup_size(64)
fn column(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = id.x * 64u + t;
    let a = ab[2u * j];
    let b = ab[2u * j + 1u];
    let r0 = id.y * (ROWS / PARTS);
    for (var r = r0; r < r0 + ROWS / PARTS; r++) {
        let i = r * INNER + j;
        y[i] = x[i] * a + b;
    }
}

// Channel-last: invocation = U consecutive columns, coefficients in private arrays.
@compute @workgroup_size(64)
fn columns(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j0 = (id.x * 64u + t) * U;
    if (j0 >= INNER) {
        return;
    }
    var a: array<vec4<f32>, U>;
    var b: array<vec4<f32>, U>;
    for (var u = 0u; u < U; u++) {
        a[u] = ab[2u * (j0 + u)];
        b[u] = ab[2u * (j0 + u) + 1u];
    }
    let r0 = id.y * (ROWS / PARTS);
    for (var r = r0; r < r0 + ROWS / PARTS; r++) {
        let base = r * INNER + j0;
        for (var u = 0u; u < U; u++) {
            y[base + u] = x[base + u] * a[u] + b[u];
        }
    }
}

// Channel-major: invocation = one long contiguous run of vec4 (a plane run of the NCHW kernels).
@compute @workgroup_size(64)
fn run_vec4(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = id.x * 64u + t;
    let a = ab[2u * j];
    let b = ab[2u * j + 1u];
    let base = j * ROWS;
    for (var i = base; i < base + ROWS; i++) {
        y[i] = x[i] * a + b;
    }
}

// The same run with scalar loads and stores (planes whose size is not a multiple of 4).
@compute @workgroup_size(64)
fn run_scalar(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = id.x * 64u + t;
    let a = ab[2u * j].x;
    let b = ab[2u * j + 1u].x;
    let base = j * ROWS * 4u;
    for (var i = base; i < base + ROWS * 4u; i++) {
        ys[i] = xs[i] * a + b;
    }
}

// Scalar loads, four per iteration, one vec4 of arithmetic.
@compute @workgroup_size(64)
fn run_scalar_by4(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let j = id.x * 64u + t;
    let a = ab[2u * j].x;
    let b = ab[2u * j + 1u].x;
    let base = j * ROWS * 4u;
    for (var i = base; i < base + ROWS * 4u; i += 4u) {
        let v = vec4<f32>(xs[i], xs[i + 1u], xs[i + 2u], xs[i + 3u]) * a + b;
        ys[i] = v.x;
        ys[i + 1u] = v.y;
        ys[i + 2u] = v.z;
        ys[i + 3u] = v.w;
    }
}

// The copy roofline's shape: 8 consecutive vec4 per invocation, thousands of workgroups.
@compute @workgroup_size(64)
fn blocks(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let begin = (id.x * 64u + t) * 8u;
    let a = ab[0];
    let b = ab[1];
    for (var i = begin; i < begin + 8u; i++) {
        y[i] = x[i] * a + b;
    }
}
"#;

struct Case {
    name: &'static str,
    entry: &'static str,
    per: u32,
    parts: u32,
    groups: (u32, u32),
}

fn main() -> batchnorm::Result<()> {
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.adapter_info().name);
    let units = u64::from(ROWS) * u64::from(INNER);
    let x = gpu.upload("x", &vec![1.0f32; (units * 4) as usize])?;
    let y = gpu.create_buffer("y", units * 16, storage_usage())?;
    let ab = gpu.upload("ab", &vec![0.5f32; (INNER * 8) as usize])?;
    let cases = [
        Case {
            name: "column per invocation",
            entry: "column",
            per: 1,
            parts: 1,
            groups: (16, 1),
        },
        Case {
            name: "column, rows in 16 parts",
            entry: "column",
            per: 1,
            parts: 16,
            groups: (16, 16),
        },
        Case {
            name: "4 columns, 16 parts",
            entry: "columns",
            per: 4,
            parts: 16,
            groups: (4, 16),
        },
        Case {
            name: "8 columns, 16 parts",
            entry: "columns",
            per: 8,
            parts: 16,
            groups: (2, 16),
        },
        Case {
            name: "contiguous vec4 run",
            entry: "run_vec4",
            per: 1,
            parts: 1,
            groups: (16, 1),
        },
        Case {
            name: "contiguous scalar run",
            entry: "run_scalar",
            per: 1,
            parts: 1,
            groups: (16, 1),
        },
        Case {
            name: "scalar run, 4 per iteration",
            entry: "run_scalar_by4",
            per: 1,
            parts: 1,
            groups: (16, 1),
        },
        Case {
            name: "8 vec4 per invocation",
            entry: "blocks",
            per: 1,
            parts: 1,
            groups: (2048, 1),
        },
    ];
    let mut runs = Vec::new();
    for case in &cases {
        let key = format!("access_patterns {} {} {}", case.entry, case.per, case.parts);
        let pipeline = gpu.pipeline(&key, case.entry, || {
            format!(
                "const U: u32 = {}u;\nconst PARTS: u32 = {}u;\nconst ROWS: u32 = {ROWS}u;\n\
                 const INNER: u32 = {INNER}u;\n{KERNELS}",
                case.per, case.parts
            )
        })?;
        // Default layouts hold only the bindings an entry point uses.
        let scalar = case.entry.starts_with("run_scalar");
        let bound = if scalar {
            [(2, &ab), (3, &x), (4, &y)]
        } else {
            [(0, &x), (1, &y), (2, &ab)]
        };
        let entries: Vec<wgpu::BindGroupEntry> = bound
            .iter()
            .map(|&(binding, buffer)| wgpu::BindGroupEntry {
                binding,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("access_patterns"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        runs.push((pipeline, bind_group, Vec::new()));
    }
    for _ in 0..15 {
        for (case, (pipeline, bind_group, times)) in cases.iter().zip(runs.iter_mut()) {
            let mut encoder = gpu.encoder("access_patterns");
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &*bind_group, &[]);
                pass.dispatch_workgroups(case.groups.0, case.groups.1, 1);
            }
            let start = Instant::now();
            gpu.submit_and_wait(encoder)?;
            times.push(start.elapsed().as_secs_f64());
        }
    }
    println!(
        "y = a*x + b over {} MiB (GB/s counts read + write)",
        (units * 16) >> 20
    );
    for (case, (_, _, times)) in cases.iter().zip(runs.iter_mut()) {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let gbps = 2.0 * (units * 16) as f64 / median / 1e9;
        println!(
            "{:<30} {:>8.3} ms {:>7.2} GB/s",
            case.name,
            median * 1e3,
            gbps
        );
    }
    Ok(())
}
