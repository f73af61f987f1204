//! Times the linear op's three products on the MNIST MLP's shapes: `cargo run --release --example
//! matmul_timing [reps]`. Prints GFLOP/s per product and matmul kernel (host clock around submit + wait,
//! median).

use std::time::Instant;

use batchnorm::gpu::Gpu;
use batchnorm::ops::linear::{LinearOp, MatmulKernel};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let gpu = std::sync::Arc::new(Gpu::new().expect("gpu"));
    let mut kernels = vec![MatmulKernel::Blocked];
    if MatmulKernel::subgroup_available(&gpu) {
        kernels.push(MatmulKernel::Subgroup);
    }
    for (n, i, o, kernel) in [(60, 784, 100), (60, 100, 100), (60, 100, 10)]
        .iter()
        .flat_map(|&(n, i, o)| kernels.iter().map(move |&k| (n, i, o, k)))
    {
        let up = |len: usize| gpu.upload("t", &vec![0.5f32; len]).unwrap();
        let (x, w, b, y, dy, dx, dw, db) = (
            up(n * i),
            up(o * i),
            up(o),
            up(n * o),
            up(n * o),
            up(n * i),
            up(o * i),
            up(o),
        );
        let op = LinearOp::new(&gpu, n, i, o)
            .unwrap()
            .with_kernel(kernel)
            .unwrap();
        let time = |which: usize| {
            let mut ts = Vec::new();
            for _ in 0..reps + 2 {
                let mut enc = gpu.encoder("t");
                match which {
                    0 => op
                        .record_forward(
                            &mut enc,
                            (&x).into(),
                            (&w).into(),
                            Some((&b).into()),
                            (&y).into(),
                        )
                        .unwrap(),
                    1 => op
                        .record_backward(
                            &mut enc,
                            (&x).into(),
                            (&w).into(),
                            (&dy).into(),
                            None,
                            (&dw).into(),
                            None,
                        )
                        .unwrap(),
                    _ => op
                        .record_backward(
                            &mut enc,
                            (&x).into(),
                            (&w).into(),
                            (&dy).into(),
                            Some((&dx).into()),
                            (&dw).into(),
                            Some((&db).into()),
                        )
                        .unwrap(),
                }
                let t = Instant::now();
                gpu.submit_and_wait(enc).unwrap();
                ts.push(t.elapsed().as_secs_f64());
            }
            median(ts[2..].to_vec())
        };
        let flops = 2.0 * (n * i * o) as f64 / 1e9;
        let fwd = time(0);
        let dw_t = time(1);
        let all = time(2);
        // dx+db is the difference of two medians: below ~20 us it is within the host clock's noise.
        let dx_t = all - dw_t;
        let dx_text = if dx_t > 20e-6 {
            format!("{:.2} ms {:.2} GF/s", dx_t * 1e3, flops / dx_t)
        } else {
            "within noise".to_string()
        };
        println!(
            "{kernel:?} [{n}x{i}]->{o}: fwd {:.2} ms {:.2} GF/s | dW {:.2} ms {:.2} GF/s | dx+db {dx_text} | bwd total {:.2} ms",
            fwd * 1e3,
            flops / fwd,
            dw_t * 1e3,
            flops / dw_t,
            all * 1e3
        );
    }
}
