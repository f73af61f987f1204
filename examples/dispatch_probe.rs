//! What a dispatch costs on the adapter before any work: submits of 1 or 19 trivial dispatches (each
//! adds 1 to a few floats), dependent (one buffer) or independent (a buffer each), in one compute pass
//! or a pass each, 1 or 4 workgroups. Prints the median host time per submit (submit + wait) of 25.
//!
//! `cargo run --release --example dispatch_probe`

use batchnorm::gpu::{storage_usage, Gpu};
use std::time::Instant;

fn main() {
    let gpu = Gpu::new().expect("gpu");
    let src = "@group(0) @binding(0) var<storage, read_write> v: array<f32>;\n@compute @workgroup_size(8)\nfn main(@builtin(global_invocation_id) g: vec3<u32>) { v[g.x] = v[g.x] + 1.0; }\n";
    let p = gpu.pipeline("dp", "main", || src.to_string()).unwrap();
    let bufs: Vec<_> = (0..20)
        .map(|_| gpu.create_buffer("b", 4096, storage_usage()).unwrap())
        .collect();
    let bgs: Vec<_> = bufs
        .iter()
        .map(|b| {
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &p.get_bind_group_layout(0),
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: b.as_entire_binding(),
                }],
            })
        })
        .collect();
    for &(n, same, one_pass, groups) in &[
        (1usize, true, true, 1u32),
        (19, true, true, 1),
        (19, false, true, 1),
        (19, true, false, 1),
        (19, true, true, 4),
        (19, false, false, 4),
    ] {
        let mut ts = Vec::new();
        for it in 0..30 {
            let mut e = gpu.encoder("p");
            if one_pass {
                let mut pass = e.begin_compute_pass(&Default::default());
                pass.set_pipeline(&p);
                for i in 0..n {
                    pass.set_bind_group(0, &bgs[if same { 0 } else { i }], &[]);
                    pass.dispatch_workgroups(groups, 1, 1);
                }
            } else {
                for i in 0..n {
                    let mut pass = e.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&p);
                    pass.set_bind_group(0, &bgs[if same { 0 } else { i }], &[]);
                    pass.dispatch_workgroups(groups, 1, 1);
                }
            }
            let t = Instant::now();
            gpu.submit_and_wait(e).unwrap();
            if it > 4 {
                ts.push(t.elapsed().as_secs_f64());
            }
        }
        ts.sort_by(f64::total_cmp);
        println!("{n} dispatches, same buffer {same}, one pass {one_pass}, {groups} groups: {:.3} ms per submit", ts[ts.len() / 2] * 1e3);
    }
}
