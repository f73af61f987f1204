//! Probe: the MNIST MLP's first product, [60×784]·[784×100], with x as f32 (what `matmul_dot`'s 64×32
//! block reads) against x as bytes (4 pixels a u32, 16 a `vec4<u32>` load, unpacked by
//! `unpack4x8unorm`), in the same 64×32 block: lane l owns rows l + 8r and all 32 columns, W's columns
//! shared by `subgroupBroadcast`. On lavapipe a storage load is a loop over the lanes whatever it
//! carries, and x is 8 of the block's 12 loads per 4 steps of K: bytes make it 2 per 16 steps.
//! Alternated rounds, each the best of 10 submits of 50 dispatches; run with `LP_NUM_THREADS=0` for one
//! thread. `cargo run --release --example u8_probe`

use batchnorm::gpu::{storage_usage, Gpu};

mod probe_timing;

const M: u32 = 60;
const N: u32 = 100;
const K: u32 = 784;

fn src(bytes: bool) -> String {
    let (k4, steps) = (K / 4, if bytes { K / 16 } else { K / 4 });
    let xt = if bytes { "vec4<u32>" } else { "vec4<f32>" };
    let mut s = format!(
        "@group(0) @binding(0) var<storage, read> xb: array<{xt}>;\n\
         @group(0) @binding(1) var<storage, read> wb: array<vec4<f32>>;\n\
         @group(0) @binding(2) var<storage, read_write> y: array<f32>;\n\
         fn dacc(acc: f32, u: vec4<f32>, v: vec4<f32>) -> f32 {{\n\
           return fma(u.x, v.x, fma(u.y, v.y, fma(u.z, v.z, fma(u.w, v.w, acc))));\n}}\n\
         fn drow(r: vec4<f32>, u: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> vec4<f32> {{\n\
           return vec4<f32>(dacc(r.x, u, v0), dacc(r.y, u, v1), dacc(r.z, u, v2), dacc(r.w, u, v3));\n}}\n\
         @compute @workgroup_size(8)\n\
         fn main(@builtin(workgroup_id) g: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{\n\
           let n0 = g.x * 32u;\n"
    );
    for r in 0..8 {
        s += &format!(
            "  let xr{r} = min(lane + {}u, {}u) * {steps}u;\n",
            8 * r,
            M - 1
        );
        for q in 0..8 {
            s += &format!("  var acc{r}_{q} = vec4<f32>(0.0);\n");
        }
    }
    for j in 0..4 {
        s += &format!(
            "  let wr{j} = min(n0 + lane + {}u, {}u) * {k4}u;\n",
            8 * j,
            N - 1
        );
    }
    s += &format!("  for (var k = 0u; k < {steps}u; k++) {{\n");
    if bytes {
        for r in 0..8 {
            s += &format!("    let xq{r} = xb[xr{r} + k];\n");
        }
    }
    let subs = if bytes { 4 } else { 1 };
    for sub in 0..subs {
        for j in 0..4 {
            let at = if bytes {
                format!("4u * k + {sub}u")
            } else {
                "k".into()
            };
            s += &format!("    let w{sub}_{j} = wb[wr{j} + {at}];\n");
        }
        for r in 0..8 {
            if bytes {
                let c = ["x", "y", "z", "w"][sub];
                s += &format!("    let a{sub}_{r} = unpack4x8unorm(xq{r}.{c});\n");
            } else {
                s += &format!("    let a{sub}_{r} = xb[xr{r} + k];\n");
            }
        }
        for j in 0..4 {
            for l in 0..8 {
                s += &format!(
                    "    let b{sub}_{} = subgroupBroadcast(w{sub}_{j}, {l}u);\n",
                    8 * j + l
                );
            }
        }
        for r in 0..8 {
            for q in 0..8 {
                let b = |i: u32| format!("b{sub}_{}", 4 * q + i);
                s += &format!(
                    "    acc{r}_{q} = drow(acc{r}_{q}, a{sub}_{r}, {}, {}, {}, {});\n",
                    b(0),
                    b(1),
                    b(2),
                    b(3)
                );
            }
        }
    }
    s += "  }\n";
    for r in 0..8 {
        s += &format!("  let m{r} = lane + {}u;\n", 8 * r);
        for q in 0..8 {
            for (i, c) in ["x", "y", "z", "w"].iter().enumerate() {
                let col = 4 * q + i as u32;
                s += &format!(
                    "  if (m{r} < {M}u && n0 + {col}u < {N}u) {{ y[m{r} * {N}u + n0 + {col}u] = acc{r}_{q}.{c}; }}\n"
                );
            }
        }
    }
    s += "}\n";
    s
}

fn main() {
    let gpu = Gpu::new().expect("gpu");
    let mut state = 7u32;
    let mut next = || {
        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
        state >> 8
    };
    let pixels: Vec<u8> = (0..M * K).map(|_| (next() % 256) as u8).collect();
    let x: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
    let w: Vec<f32> = (0..N * K)
        .map(|_| next() as f32 / (1u32 << 24) as f32 - 0.5)
        .collect();
    let upload = |name: &str, bytes: &[u8]| {
        let b = gpu
            .create_buffer(name, bytes.len() as u64, storage_usage())
            .unwrap();
        gpu.queue.write_buffer(&b, 0, bytes);
        b
    };
    let (xf, x8, wb) = (
        upload("x f32", bytemuck::cast_slice(&x)),
        upload("x bytes", &pixels),
        upload("w", bytemuck::cast_slice(&w)),
    );
    let y = gpu
        .create_buffer("y", 4 * (M * N) as u64, storage_usage())
        .unwrap();
    let want: Vec<f64> = (0..(M * N) as usize)
        .map(|i| {
            let (m, n) = (i / N as usize, i % N as usize);
            (0..K as usize)
                .map(|k| x[m * K as usize + k] as f64 * w[n * K as usize + k] as f64)
                .sum()
        })
        .collect();
    let mut best = [Vec::new(), Vec::new()];
    for round in 0..6 {
        for (v, bytes) in [false, true].into_iter().enumerate() {
            let p = gpu
                .pipeline(&format!("u8probe{bytes}"), "main", || src(bytes))
                .expect("pipeline");
            let xin = if bytes { &x8 } else { &xf };
            let bg = probe_timing::bind_whole(&gpu, &p, &[xin, &wb, &y]);
            let t_best = probe_timing::best_dispatch_secs(&gpu, &p, &bg, N.div_ceil(32));
            let got: Vec<f32> = gpu.download(&y, 0, want.len()).unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs() / (1.0 + b.abs()))
                .fold(0.0, f64::max);
            assert!(
                err < 1e-4,
                "x as {}: error {err:e}",
                if bytes { "bytes" } else { "f32" }
            );
            if round > 0 {
                best[v].push(t_best * 1e3);
            }
        }
    }
    for (v, name) in ["x as f32  ", "x as bytes"].iter().enumerate() {
        let t = &best[v];
        let (lo, hi) = t
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        println!("{name}: {lo:.3}–{hi:.3} ms per dispatch over 5 rounds");
    }
    let ratios: Vec<f64> = best[1].iter().zip(&best[0]).map(|(b, f)| b / f).collect();
    println!("bytes / f32 per round: {ratios:.3?}");
}
