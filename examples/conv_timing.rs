//! Times the conv2d op's three products on a small VGG-style MNIST CNN's shapes at batch 128:
//! `cargo run --release --example conv_timing [reps] [batch]`. Prints GFLOP/s per product (2 FLOP per
//! multiply-add; host clock around submit + wait, median of `reps` after one warm-up) and the time the
//! first use of each product's pipelines took (shader compilation).

use std::time::Instant;

use batchnorm::gpu::Gpu;
use batchnorm::ops::conv2d::{Conv2dOp, Conv2dShape};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let batch: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(128);
    let gpu = std::sync::Arc::new(Gpu::new().expect("gpu"));
    println!("adapter: {}", gpu.adapter_info().name);
    for &(cin, cout, hw) in &[(1, 32, 28), (32, 32, 28), (32, 64, 14), (64, 64, 14)] {
        let s = Conv2dShape {
            n: batch,
            cin,
            h: hw,
            w: hw,
            cout,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
            bias: true,
        };
        let up = |len: usize| gpu.upload("t", &vec![0.5f32; len]).unwrap();
        let (x, w, b, y, dy, dx, dw, db) = (
            up(s.x_len()),
            up(s.weight_len()),
            up(cout),
            up(s.y_len()),
            up(s.y_len()),
            up(s.x_len()),
            up(s.weight_len()),
            up(cout),
        );
        let op = Conv2dOp::new(&gpu, s).unwrap();
        // 0: forward; 1: dweight + dbias; 2: dx + dweight + dbias.
        let time = |which: usize| {
            let mut ts = Vec::new();
            for _ in 0..reps + 1 {
                let mut enc = gpu.encoder("t");
                let t = Instant::now();
                match which {
                    0 => op.record_forward(
                        &mut enc,
                        (&x).into(),
                        (&w).into(),
                        Some((&b).into()),
                        (&y).into(),
                    ),
                    _ => op.record_backward(
                        &mut enc,
                        (&x).into(),
                        (&w).into(),
                        (&dy).into(),
                        (which == 2).then(|| (&dx).into()),
                        (&dw).into(),
                        Some((&db).into()),
                    ),
                }
                .unwrap();
                gpu.submit_and_wait(enc).unwrap();
                ts.push(t.elapsed().as_secs_f64());
            }
            (ts[0], median(ts[1..].to_vec()))
        };
        let gflop = 2.0 * s.macs() as f64 / 1e9;
        let (fwd_first, fwd) = time(0);
        let (dw_first, dw_t) = time(1);
        let (_, all) = time(2);
        let dx_t = (all - dw_t).max(1e-9);
        println!(
            "{cin:>2}->{cout:<2} {hw}x{hw} 3x3 p1 (N={batch}, {gflop:.2} GFLOP/product): fwd {:.1} ms {:.1} GF/s | \
             dx {:.1} ms {:.1} GF/s | dW+db {:.1} ms {:.1} GF/s ({} splits) | first use incl. compile: fwd {:.0} ms, dW {:.0} ms",
            fwd * 1e3,
            gflop / fwd,
            dx_t * 1e3,
            gflop / dx_t,
            dw_t * 1e3,
            gflop / dw_t,
            op.dweight_splits(),
            fwd_first * 1e3,
            dw_first * 1e3,
        );
    }
}
