//! What a dispatch's bindings cost lavapipe's queue thread: submits of 19 trivial dispatches (each adds
//! 1 to a float of its first buffer), each with a bind group of its own holding 1 storage buffer, 12
//! storage buffers, or 1 storage buffer and 4 textures (sampled, or read-only storage textures). Prints
//! the median host time per submit (submit + wait) of 40, alternating the cases round by round.
//!
//! `cargo run --release --example binding_probe`

use batchnorm::gpu::{storage_usage, Gpu};
use std::time::Instant;

const DISPATCHES: usize = 19;

fn main() {
    let gpu = Gpu::new().expect("gpu");
    let cases: [(&str, usize, usize, bool); 4] = [
        ("1 storage buffer", 1, 0, false),
        ("12 storage buffers", 12, 0, false),
        ("1 buffer + 4 sampled textures", 1, 4, false),
        ("1 buffer + 4 storage textures", 1, 4, true),
    ];
    let tex: Vec<_> = (0..4 * DISPATCHES)
        .map(|_| {
            gpu.device.create_texture(&wgpu::TextureDescriptor {
                label: None,
                size: wgpu::Extent3d {
                    width: 64,
                    height: 64,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::Rgba32Float,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::STORAGE_BINDING,
                view_formats: &[],
            })
        })
        .collect();
    let views: Vec<_> = tex
        .iter()
        .map(|t| t.create_view(&Default::default()))
        .collect();
    let bufs: Vec<_> = (0..12 * DISPATCHES)
        .map(|_| gpu.create_buffer("b", 4096, storage_usage()).unwrap())
        .collect();
    let mut built = Vec::new();
    for (ci, &(name, nbuf, ntex, storage)) in cases.iter().enumerate() {
        let mut src = String::new();
        for b in 0..nbuf {
            src += &format!("@group(0) @binding({b}) var<storage, read_write> v{b}: array<f32>;\n");
        }
        for t in 0..ntex {
            let ty = if storage {
                "texture_storage_2d<rgba32float, read>"
            } else {
                "texture_2d<f32>"
            };
            src += &format!("@group(0) @binding({}) var t{t}: {ty};\n", nbuf + t);
        }
        let mut sum = String::from("1.0");
        for b in 1..nbuf {
            sum += &format!(" + v{b}[g.x]");
        }
        for t in 0..ntex {
            if storage {
                sum += &format!(" + textureLoad(t{t}, vec2<u32>(g.x, 0u)).x");
            } else {
                sum += &format!(" + textureLoad(t{t}, vec2<u32>(g.x, 0u), 0).x");
            }
        }
        src += &format!("@compute @workgroup_size(8)\nfn main(@builtin(global_invocation_id) g: vec3<u32>) {{ v0[g.x] = v0[g.x] + {sum}; }}\n");
        let p = gpu
            .pipeline(&format!("bp{ci}"), "main", || src.clone())
            .unwrap();
        let layout = p.get_bind_group_layout(0);
        let bgs: Vec<_> = (0..DISPATCHES)
            .map(|d| {
                let mut entries = Vec::new();
                for b in 0..nbuf {
                    entries.push(wgpu::BindGroupEntry {
                        binding: b as u32,
                        resource: bufs[d * 12 + b].as_entire_binding(),
                    });
                }
                for t in 0..ntex {
                    entries.push(wgpu::BindGroupEntry {
                        binding: (nbuf + t) as u32,
                        resource: wgpu::BindingResource::TextureView(&views[d * 4 + t]),
                    });
                }
                gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &entries,
                })
            })
            .collect();
        built.push((name, p, bgs));
    }
    let mut ts = vec![Vec::new(); cases.len()];
    for it in 0..45 {
        for (ci, (_, p, bgs)) in built.iter().enumerate() {
            let mut e = gpu.encoder("p");
            {
                let mut pass = e.begin_compute_pass(&Default::default());
                pass.set_pipeline(p);
                for bg in bgs {
                    pass.set_bind_group(0, bg, &[]);
                    pass.dispatch_workgroups(1, 1, 1);
                }
            }
            let t = Instant::now();
            gpu.submit_and_wait(e).unwrap();
            if it >= 5 {
                ts[ci].push(t.elapsed().as_secs_f64());
            }
        }
    }
    for (ci, t) in ts.iter_mut().enumerate() {
        t.sort_by(f64::total_cmp);
        println!(
            "{:<32} {:.1} us per dispatch (median of {} submits of {DISPATCHES}; fastest {:.1})",
            built[ci].0,
            t[t.len() / 2] * 1e6 / DISPATCHES as f64,
            t.len(),
            t[0] * 1e6 / DISPATCHES as f64
        );
    }
}
