//! `batchnorm demo`: the layer on random data in every layout, checked against the f64 reference.

use std::sync::Arc;
use std::time::Instant;

use batchnorm::error::Result;
use batchnorm::gpu::Gpu;
use batchnorm::nn::BatchNorm;
use batchnorm::reference::batchnorm as reference;
use batchnorm::tensor::{Layout, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Random seed (a fresh one when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Input shape, comma-separated, in NCHW order (N,C,H,W...); NHWC and NC runs use the same sizes.
    #[arg(long, value_delimiter = ',', default_value = "32,64,28,28")]
    shape: Vec<usize>,
}

pub fn run(gpu: &Arc<Gpu>, args: &DemoArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    super::info::print(gpu);
    println!();
    println!("BatchNorm forward-train and backward on random data (seed {seed}), against the f64 reference:");
    let nchw = args.shape.clone();
    let dims = Layout::Nchw.dims(&nchw)?;
    let mut nhwc = vec![nchw[0]];
    nhwc.extend_from_slice(&nchw[2..]);
    nhwc.push(nchw[1]);
    let nc = vec![dims.n * dims.spatial, dims.c];
    println!(
        "{:<6} {:<18} {:<28} {:>10} {:>10} {:>10} {:>9}",
        "layout", "shape", "plan", "y err", "dx err", "dw err", "gpu ms"
    );
    for (layout, shape) in [(Layout::Nchw, nchw), (Layout::Nhwc, nhwc), (Layout::Nc, nc)] {
        let d = layout.dims(&shape)?;
        let x: Vec<f32> = (0..d.numel())
            .map(|_| rng.random_range(-3.0..5.0))
            .collect();
        let g: Vec<f32> = (0..d.numel())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut bn = BatchNorm::new(gpu, d.c, Default::default())?;
        let xt = Tensor::from_f32(gpu, &shape, &x)?;
        let dyt = Tensor::from_f32(gpu, &shape, &g)?;
        let plan = bn.op(&shape, layout)?.plan_name();
        // Warm-up: pipelines compile on first use.
        bn.forward(&xt, layout)?;
        bn.backward(&xt, &dyt, layout)?;
        let t = Instant::now();
        let y = bn.forward(&xt, layout)?;
        let dx = bn.backward(&xt, &dyt, layout)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let fr = reference::forward(&x64, &shape, layout, None, None, None, true, None, 1e-5)?;
        let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        let br = reference::backward(&x64, &g64, &shape, layout, None, &fr.mean, &fr.invstd, true)?;
        let dw = bn.read(bn.dweight.as_ref().expect("affine"))?;
        println!(
            "{:<6} {:<18} {:<28} {:>10.2e} {:>10.2e} {:>10.2e} {:>9.2}",
            layout.name(),
            format!("{shape:?}"),
            plan,
            max_err(&y.to_f32()?, &fr.y),
            max_err(&dx.to_f32()?, &br.dx),
            max_err(&dw, &br.dweight),
            ms
        );
    }
    println!("errors: max |gpu - f64 reference| / (1 + |reference|)");
    println!("ms: one forward-train and one backward, each with its output allocation, submit and wait (`batchnorm bench` measures the kernels)");
    Ok(())
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}
