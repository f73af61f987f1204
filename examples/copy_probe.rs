//! What a buffer-to-texture copy ([`batchnorm::ops::Texels`]) costs on the adapter: submits of 10
//! copies of a mirrored buffer of 24 KB, 188 KB and 358 KB (a batch of 60 of the 100-wide activations,
//! of the MLP's input, of its parameter arena), against 10 buffer-to-buffer copies of the same bytes
//! and an empty submit. Prints the median host time per copy (submit + wait) over 25 submits.
//!
//! `cargo run --release --example copy_probe`

use batchnorm::gpu::{storage_usage, Gpu};
use batchnorm::ops::{texel_buffer_bytes, Texels};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let gpu = Gpu::new().expect("gpu");
    println!("adapter: {}", gpu.adapter_info().name);
    let time = |record: &dyn Fn(&mut wgpu::CommandEncoder)| {
        let mut ts = Vec::new();
        for it in 0..30 {
            let mut e = gpu.encoder("copy probe");
            record(&mut e);
            let t = Instant::now();
            gpu.submit_and_wait(e).unwrap();
            if it >= 5 {
                ts.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        median(ts)
    };
    let empty = time(&|_| {});
    println!("empty submit + wait {empty:.3} ms");
    for values in [6_000usize, 47_040, 89_616] {
        let bytes = texel_buffer_bytes(values);
        let src = gpu.create_buffer("src", bytes, storage_usage()).unwrap();
        let dst = gpu.create_buffer("dst", bytes, storage_usage()).unwrap();
        let texels = Texels::new(&gpu, "texels", &src, values).unwrap();
        let to_texture = time(&|e| {
            for _ in 0..10 {
                texels.record_copy(e, values);
            }
        });
        let to_buffer = time(&|e| {
            for _ in 0..10 {
                e.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
            }
        });
        println!(
            "{:6.1} KB: to a texture {:.3} ms a copy, to a buffer {:.3} ms a copy",
            bytes as f64 / 1024.0,
            (to_texture - empty) / 10.0,
            (to_buffer - empty) / 10.0
        );
    }
}
