//! Probe: operands of the MLP's 100-wide products read from uniform buffers against storage buffers on
//! lavapipe (Mesa 22.3 gathers a uniform load across lanes; a storage load is a loop over the lanes).
//! y = x·Wᵀ for x [60, K], W [N, K], 8 rows × 16 columns per lane block as `matmul_dot`.
//! `cargo run --release --example uniform_probe`

use batchnorm::gpu::{storage_usage, Gpu};

mod probe_timing;

const M: u32 = 60;

fn src(n: u32, k: u32, uniform_x: bool, uniform_w: bool) -> String {
    let k4 = k / 4;
    let decl = |name: &str, binding: u32, uniform: bool, len: u32| {
        if uniform {
            format!("@group(0) @binding({binding}) var<uniform> {name}: array<vec4<f32>, {len}>;\n")
        } else {
            format!("@group(0) @binding({binding}) var<storage, read> {name}: array<vec4<f32>>;\n")
        }
    };
    let mut s = decl("xb", 0, uniform_x, M * k4);
    s += &decl("wb", 1, uniform_w, n * k4);
    s += "@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n";
    s += "@compute @workgroup_size(8)\nfn main(@builtin(workgroup_id) g: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {\n  let n0 = g.x * 16u;\n";
    for r in 0..8 {
        s += &format!(
            "  let xr{r} = min(lane + {}u, {}u) * {k4}u;\n",
            8 * r,
            M - 1
        );
        for c in 0..16 {
            s += &format!("  var acc{r}_{c} = 0.0;\n");
        }
    }
    for j in 0..2 {
        s += &format!(
            "  let wr{j} = min(n0 + lane + {}u, {}u) * {k4}u;\n",
            8 * j,
            n - 1
        );
    }
    s += &format!("  for (var k = 0u; k < {k4}u; k++) {{\n");
    for j in 0..2 {
        s += &format!("    let w{j} = wb[wr{j} + k];\n");
    }
    for r in 0..8 {
        s += &format!("    let a{r} = xb[xr{r} + k];\n");
    }
    for j in 0..2 {
        for l in 0..8 {
            let c = j * 8 + l;
            s += &format!("    let b{c} = subgroupBroadcast(w{j}, {l}u);\n");
            for r in 0..8 {
                s += &format!("    acc{r}_{c} = fma(a{r}.x, b{c}.x, fma(a{r}.y, b{c}.y, fma(a{r}.z, b{c}.z, fma(a{r}.w, b{c}.w, acc{r}_{c}))));\n");
            }
        }
    }
    s += "  }\n";
    for r in 0..8 {
        s += &format!("  let mm{r} = lane + {}u;\n", 8 * r);
        for c in 0..16 {
            s += &format!("  if (mm{r} < {M}u && n0 + {c}u < {n}u) {{ y[mm{r} * {n}u + n0 + {c}u] = acc{r}_{c}; }}\n");
        }
    }
    s += "}\n";
    s
}

fn main() {
    let gpu = Gpu::new().expect("gpu");
    let (n, k) = (100u32, 100u32);
    let mut rng = 7u32;
    let mut rand = |len: u32| -> Vec<f32> {
        (0..len)
            .map(|_| {
                rng = rng.wrapping_mul(1664525).wrapping_add(1013904223);
                (rng >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (x, w) = (rand(M * k), rand(n * k));
    let both = storage_usage() | wgpu::BufferUsages::UNIFORM;
    let upload = |name: &str, v: &[f32]| {
        let b = gpu.create_buffer(name, 4 * v.len() as u64, both).unwrap();
        gpu.queue.write_buffer(&b, 0, bytemuck::cast_slice(v));
        b
    };
    let (xb, wb) = (upload("x", &x), upload("w", &w));
    let y = gpu
        .create_buffer("y", 4 * (M * n) as u64, storage_usage())
        .unwrap();
    let want: Vec<f64> = (0..(M * n) as usize)
        .map(|i| {
            (0..k as usize)
                .map(|j| {
                    x[i / n as usize * k as usize + j] as f64
                        * w[i % n as usize * k as usize + j] as f64
                })
                .sum()
        })
        .collect();
    for round in 0..3 {
        for (ux, uw) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = gpu
                .pipeline(&format!("uprobe{ux}{uw}"), "main", || src(n, k, ux, uw))
                .expect("pipeline");
            let bg = probe_timing::bind_whole(&gpu, &p, &[&xb, &wb, &y]);
            let best = probe_timing::best_dispatch_secs(&gpu, &p, &bg, n.div_ceil(16));
            let got: Vec<f32> = gpu.download(&y, 0, want.len()).unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            if round == 2 {
                println!("x {} W {}: {:.4} ms per dispatch (min of 10 submits of 50), max error {err:.1e}",
                    if ux { "uniform" } else { "storage" }, if uw { "uniform" } else { "storage" }, best * 1e3);
            }
        }
    }
}
