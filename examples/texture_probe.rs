//! Probe behind ARCHITECTURE.md's "Textures" note: the MNIST MLP's first-layer products with operands
//! read from rgba32float textures (`textureLoad`: lavapipe gathers texels for all lanes at once, without
//! the per-lane loop of a storage load) against the same kernels reading storage, and against
//! `LinearOp`. y = x·Wᵀ for x [60, 784], W [100, 784]; dW = dzᵀ·x for dz [60, 100]. Prints the median
//! time per dispatch (20 dispatches per submit, host clock) and each result's max error against f64.
//!
//! `cargo run --release --example texture_probe`
//!
//! `PROBE_SHAPES=8x2,8x4,...` runs only the forward with x from storage in those blocks (rows × column
//! groups of 8 per lane: 8x2 is `matmul_dot`'s 64×16); `PROBE_SUBMITS=N` times N submits instead of 5 and
//! `PROBE_MIN=1` reports the fastest instead of the median (on a noisy host, with `LP_NUM_THREADS=0`,
//! the stable figure).

use batchnorm::gpu::{storage_usage, Gpu};
use batchnorm::ops::linear::LinearOp;
use std::time::Instant;

const M: u32 = 60;
const N: u32 = 100;
const K: u32 = 784;

fn src(rb: u32, cb: u32, tex: bool) -> String {
    let k4 = K / 4;
    let decl = if tex {
        "@group(0) @binding(0) var xt: texture_2d<f32>;\n@group(0) @binding(1) var wt: texture_2d<f32>;\n"
            .to_string()
    } else {
        "@group(0) @binding(0) var<storage, read> xb: array<vec4<f32>>;\n@group(0) @binding(1) var<storage, read> wb: array<vec4<f32>>;\n".to_string()
    };
    let load_x = |r: u32| {
        if tex {
            format!(
                "textureLoad(xt, vec2<i32>(i32(k), i32(min(m0 + {r}u, {}u))), 0)",
                M - 1
            )
        } else {
            format!("xb[min(m0 + {r}u, {}u) * {k4}u + k]", M - 1)
        }
    };
    let load_w = |c: u32| {
        if tex {
            format!(
                "textureLoad(wt, vec2<i32>(i32(k), i32(min(n0 + {c}u, {}u))), 0)",
                N - 1
            )
        } else {
            format!("wb[min(n0 + {c}u, {}u) * {k4}u + k]", N - 1)
        }
    };
    let mut s = decl;
    s += "@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n";
    s += &format!(
        "@compute @workgroup_size(8)\nfn main(@builtin(global_invocation_id) g: vec3<u32>) {{\n  let nb = {}u;\n  let m0 = (g.x / nb) * {rb}u;\n  let n0 = (g.x % nb) * {cb}u;\n  if (m0 >= {M}u) {{ return; }}\n",
        N.div_ceil(cb)
    );
    for r in 0..rb {
        for c in 0..cb {
            s += &format!("  var acc{r}_{c} = 0.0;\n");
        }
    }
    s += &format!("  for (var k = 0u; k < {k4}u; k++) {{\n");
    for r in 0..rb {
        s += &format!("    let a{r} = {};\n", load_x(r));
    }
    for c in 0..cb {
        s += &format!("    let b{c} = {};\n", load_w(c));
    }
    for r in 0..rb {
        for c in 0..cb {
            s += &format!("    acc{r}_{c} = fma(a{r}.x, b{c}.x, fma(a{r}.y, b{c}.y, fma(a{r}.z, b{c}.z, fma(a{r}.w, b{c}.w, acc{r}_{c}))));\n");
        }
    }
    s += "  }\n";
    for r in 0..rb {
        for c in 0..cb {
            s += &format!(
                "  if (m0 + {r}u < {M}u && n0 + {c}u < {N}u) {{ y[(m0 + {r}u) * {N}u + n0 + {c}u] = acc{r}_{c}; }}\n"
            );
        }
    }
    s += "}\n";
    s
}

/// x from the texture, W from storage: lane l loads W rows n0 + l + 8j and the subgroup shares them by
/// subgroupBroadcast; lane l owns rows m0 + l + 8r.
fn hyb(r_: u32, cw: u32, tex: bool) -> String {
    let k4 = K / 4;
    let rows = 8 * r_;
    let cols = 8 * cw;
    let mut s = String::new();
    s += if tex {
        "@group(0) @binding(0) var xt: texture_2d<f32>;\n"
    } else {
        "@group(0) @binding(0) var<storage, read> xb: array<vec4<f32>>;\n"
    };
    s += "@group(0) @binding(1) var<storage, read> wb: array<vec4<f32>>;\n@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n";
    s += &format!("@compute @workgroup_size(8)\nfn main(@builtin(workgroup_id) g: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{\n  let nb = {}u;\n  let m0 = (g.x / nb) * {rows}u;\n  let n0 = (g.x % nb) * {cols}u;\n", N.div_ceil(cols));
    for r in 0..r_ {
        s += &format!(
            "  let xr{r} = i32(min(m0 + lane + {}u, {}u));\n",
            8 * r,
            M - 1
        );
        for c in 0..cols {
            s += &format!("  var acc{r}_{c} = 0.0;\n");
        }
    }
    for j in 0..cw {
        s += &format!(
            "  let wr{j} = min(n0 + lane + {}u, {}u) * {k4}u;\n",
            8 * j,
            N - 1
        );
    }
    s += &format!("  for (var k = 0u; k < {k4}u; k++) {{\n");
    for j in 0..cw {
        s += &format!("    let w{j} = wb[wr{j} + k];\n");
    }
    for r in 0..r_ {
        if tex {
            s += &format!("    let a{r} = textureLoad(xt, vec2<i32>(i32(k), xr{r}), 0);\n");
        } else {
            s += &format!("    let a{r} = xb[u32(xr{r}) * {k4}u + k];\n");
        }
    }
    for j in 0..cw {
        for l in 0..8 {
            let c = j * 8 + l;
            s += &format!("    let b{c} = subgroupBroadcast(w{j}, {l}u);\n");
            for r in 0..r_ {
                s += &format!("    acc{r}_{c} = fma(a{r}.x, b{c}.x, fma(a{r}.y, b{c}.y, fma(a{r}.z, b{c}.z, fma(a{r}.w, b{c}.w, acc{r}_{c}))));\n");
            }
        }
    }
    s += "  }\n";
    for r in 0..r_ {
        s += &format!("  let mm{r} = m0 + lane + {}u;\n", 8 * r);
        for j in 0..cw {
            for l in 0..8 {
                let c = j * 8 + l;
                s += &format!("  if (mm{r} < {M}u && n0 + {c}u < {N}u) {{ y[mm{r} * {N}u + n0 + {c}u] = acc{r}_{c}; }}\n");
            }
        }
    }
    s += "}\n";
    s
}

/// dW[o, i] = sum_b dz[b, o] x[b, i] (o < N, i < K, b < M): x from the texture (texel (i/4, b)), dz from
/// storage, lane l loading dz[b, o0 + l + 8j] and the subgroup sharing them; lane l owns texels
/// i4 = c0 + l + 8c (c < ci).
fn dw_tex(oj: u32, ci: u32) -> String {
    let k4 = K / 4;
    let os = 8 * oj;
    let cs = 8 * ci;
    let mut s = String::new();
    s += "@group(0) @binding(0) var xt: texture_2d<f32>;\n@group(0) @binding(1) var<storage, read> dz: array<f32>;\n@group(0) @binding(2) var<storage, read_write> dw: array<vec4<f32>>;\n";
    s += &format!("@compute @workgroup_size(8)\nfn main(@builtin(workgroup_id) g: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{\n  let cb = {}u;\n  let o0 = (g.x / cb) * {os}u;\n  let c0 = (g.x % cb) * {cs}u;\n", k4.div_ceil(cs));
    for c in 0..ci {
        s += &format!(
            "  let xc{c} = i32(min(c0 + lane + {}u, {}u));\n",
            8 * c,
            k4 - 1
        );
    }
    for j in 0..oj {
        s += &format!("  let oc{j} = min(o0 + lane + {}u, {}u);\n", 8 * j, N - 1);
    }
    for o in 0..os {
        for c in 0..ci {
            s += &format!("  var acc{o}_{c} = vec4<f32>(0.0);\n");
        }
    }
    s += &format!("  for (var b = 0u; b < {M}u; b++) {{\n");
    for c in 0..ci {
        s += &format!("    let xv{c} = textureLoad(xt, vec2<i32>(xc{c}, i32(b)), 0);\n");
    }
    for j in 0..oj {
        s += &format!("    let d{j} = dz[b * {N}u + oc{j}];\n");
        for l in 0..8 {
            let o = j * 8 + l;
            s += &format!("    let e{o} = subgroupBroadcast(d{j}, {l}u);\n");
            for c in 0..ci {
                s += &format!("    acc{o}_{c} = fma(vec4<f32>(e{o}), xv{c}, acc{o}_{c});\n");
            }
        }
    }
    s += "  }\n";
    for o in 0..os {
        for c in 0..ci {
            s += &format!("  if (o0 + {o}u < {N}u && c0 + lane + {}u < {k4}u) {{ dw[(o0 + {o}u) * {k4}u + c0 + lane + {}u] = acc{o}_{c}; }}\n", 8 * c, 8 * c);
        }
    }
    s += "}\n";
    s
}

type Record<'a> = Box<dyn Fn(&mut wgpu::CommandEncoder) + 'a>;

/// Median time per dispatch of `record` (which records one), over 4 submits of `REPS` after a warm-up.
fn per_dispatch(gpu: &Gpu, record: &Record) -> f64 {
    let env = |key: &str| std::env::var(key).ok();
    let submits = env("PROBE_SUBMITS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize);
    let mut times = Vec::new();
    for it in 0..submits.max(2) {
        let mut e = gpu.encoder("probe");
        for _ in 0..REPS {
            record(&mut e);
        }
        let t = Instant::now();
        gpu.submit_and_wait(e).expect("submit");
        if it > 0 {
            times.push(t.elapsed().as_secs_f64() / REPS as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    if env("PROBE_MIN").is_some() {
        return times[0];
    }
    times[times.len() / 2]
}

/// Records one dispatch of `source`'s `main` over `resources` (bindings 0, 1, 2).
fn raw<'a>(
    gpu: &'a Gpu,
    key: &str,
    source: String,
    resources: [wgpu::BindingResource<'a>; 3],
    groups: u32,
) -> Record<'a> {
    let p = gpu.pipeline(key, "main", || source).expect("pipeline");
    let entries: Vec<_> = resources
        .into_iter()
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    let bg = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &p.get_bind_group_layout(0),
        entries: &entries,
    });
    Box::new(move |e| {
        let mut pass = e.begin_compute_pass(&Default::default());
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups, 1, 1);
    })
}

const REPS: usize = 20;

fn main() {
    let gpu = std::sync::Arc::new(Gpu::new().expect("gpu"));
    let mut rng = 1u32;
    let mut rand = |n: u32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                rng = rng.wrapping_mul(1664525).wrapping_add(1013904223);
                (rng >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (x, dz, w) = (rand(M * K), rand(M * N), rand(N * K));
    let texture = |rows: u32, data: &[f32]| {
        let size = wgpu::Extent3d {
            width: K / 4,
            height: rows,
            depth_or_array_layers: 1,
        };
        let t = gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("probe"),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        gpu.queue.write_texture(
            t.as_image_copy(),
            bytemuck::cast_slice(data),
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(K * 4),
                rows_per_image: None,
            },
            size,
        );
        t.create_view(&Default::default())
    };
    let (xt, wt) = (texture(M, &x), texture(N, &w));
    let (xb, wb, dzb) = (
        gpu.upload("x", &x).unwrap(),
        gpu.upload("w", &w).unwrap(),
        gpu.upload("dz", &dz).unwrap(),
    );
    let out = |len: u32| {
        gpu.create_buffer("out", len as u64 * 4, storage_usage())
            .unwrap()
    };
    let (y, dw, db) = (out(M * N), out(N * K), out(N));
    let (mu, nu, ku) = (M as usize, N as usize, K as usize);
    let y_ref: Vec<f64> = (0..mu * nu)
        .map(|i| {
            (0..ku)
                .map(|k| x[i / nu * ku + k] as f64 * w[i % nu * ku + k] as f64)
                .sum()
        })
        .collect();
    let dw_ref: Vec<f64> = (0..nu * ku)
        .map(|i| {
            (0..mu)
                .map(|b| dz[b * nu + i / ku] as f64 * x[b * ku + i % ku] as f64)
                .sum()
        })
        .collect();
    let report = |name: &str, record: Record, out: &wgpu::Buffer, want: &[f64]| {
        let t = per_dispatch(&gpu, &record);
        let got: Vec<f32> = gpu.download(out, 0, want.len()).unwrap();
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        let gflops = 2.0 * (M * N * K) as f64 / t / 1e9;
        println!(
            "{name:<48} {:.3} ms {gflops:6.2} GFLOP/s (max error {err:.1e})",
            t * 1e3
        );
    };
    let op = LinearOp::new(&gpu, mu, ku, nu).unwrap();

    report(
        "forward: LinearOp",
        Box::new(|e| {
            op.record_forward(e, (&xb).into(), (&wb).into(), None, (&y).into())
                .unwrap()
        }),
        &y,
        &y_ref,
    );
    let sweep: Option<Vec<(u32, u32)>> = std::env::var("PROBE_SHAPES").ok().map(|v| {
        v.split(',')
            .filter_map(|p| p.split_once('x'))
            .filter_map(|(r, c)| Some((r.trim().parse().ok()?, c.trim().parse().ok()?)))
            .collect()
    });
    let shapes = sweep
        .clone()
        .unwrap_or_else(|| vec![(4, 2), (4, 4), (2, 4), (8, 2)]);
    let textures: &[bool] = if sweep.is_some() {
        &[false]
    } else {
        &[true, false]
    };
    for (rows, cols) in shapes {
        for &tex in textures {
            let xr = if tex {
                wgpu::BindingResource::TextureView(&xt)
            } else {
                xb.as_entire_binding()
            };
            let record = raw(
                &gpu,
                &format!("hyb{rows}x{cols}{tex}"),
                hyb(rows, cols, tex),
                [xr, wb.as_entire_binding(), y.as_entire_binding()],
                M.div_ceil(8 * rows) * N.div_ceil(8 * cols),
            );
            let name = format!(
                "forward: x from {}, {rows} rows x {cols}x8 cols/lane",
                if tex { "texture" } else { "storage" }
            );
            report(&name, record, &y, &y_ref);
        }
    }
    if sweep.is_some() {
        return;
    }
    for (rb, cb) in [(6, 8), (6, 16)] {
        for tex in [true, false] {
            let (xr, wr) = if tex {
                (
                    wgpu::BindingResource::TextureView(&xt),
                    wgpu::BindingResource::TextureView(&wt),
                )
            } else {
                (xb.as_entire_binding(), wb.as_entire_binding())
            };
            let record = raw(
                &gpu,
                &format!("probe{rb}x{cb}{tex}"),
                src(rb, cb, tex),
                [xr, wr, y.as_entire_binding()],
                (M.div_ceil(rb) * N.div_ceil(cb)).div_ceil(8),
            );
            let name = format!(
                "forward: both from {}, {rb}x{cb} block/invocation",
                if tex { "textures" } else { "storage" }
            );
            report(&name, record, &y, &y_ref);
        }
    }
    report(
        "dW + db: LinearOp",
        Box::new(|e| {
            op.record_backward(
                e,
                (&xb).into(),
                (&wb).into(),
                (&dzb).into(),
                None,
                (&dw).into(),
                Some((&db).into()),
            )
            .unwrap()
        }),
        &dw,
        &dw_ref,
    );
    for (oj, ci) in [(1u32, 1u32), (1, 2), (2, 2), (1, 3)] {
        let record = raw(
            &gpu,
            &format!("dw{oj}x{ci}"),
            dw_tex(oj, ci),
            [
                wgpu::BindingResource::TextureView(&xt),
                dzb.as_entire_binding(),
                dw.as_entire_binding(),
            ],
            N.div_ceil(8 * oj) * (K / 4).div_ceil(8 * ci),
        );
        let name = format!("dW: x from texture, {}x{} per lane", 8 * oj, 4 * ci);
        report(&name, record, &dw, &dw_ref);
    }
}
