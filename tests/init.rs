//! Initializers against PyTorch's formulas (`torch.nn.init`), on large draws from fresh seeds: Xavier
//! uniform bound √(6 / (fan_in + fan_out)) with PyTorch's fans (a Conv2d's fan_out is out·kh·kw, not
//! out), Kaiming normal std √(2 / fan_in), the Gaussian's std, PyTorch's default U(±1/√fan_in) for Linear
//! and Conv2d, and zero biases under the named schemes. Tolerances: every |w| within the bound and the
//! largest above 0.99 of it; sample std within 2% of the formula's (≥ 50 000 draws: the std of a sample
//! std is ~0.3%).

mod common;

use batchnorm::nn::init::{self, Init};
use batchnorm::nn::Conv2dConfig;
use common::*;

fn std_of(w: &[f32]) -> f64 {
    let n = w.len() as f64;
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
    (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

fn check_uniform(w: &[f32], bound: f64, what: &str) {
    let max = w.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    assert!(
        max <= bound && max >= 0.99 * bound,
        "{what}: max |w| {max} against bound {bound}"
    );
    let s = std_of(w);
    let want = bound / 3f64.sqrt();
    assert!(
        (s / want - 1.0).abs() <= 0.02,
        "{what}: std {s} against {want}"
    );
}

fn check_normal(w: &[f32], std: f64, what: &str) {
    let s = std_of(w);
    assert!(
        (s / std - 1.0).abs() <= 0.02,
        "{what}: std {s} against {std}"
    );
}

#[test]
fn initializers_follow_pytorch_formulas() {
    let seed = seed();
    let mut r = init::rng(seed);
    // Conv2d(16 -> 64, 5x5): fan_in 400, fan_out 1600.
    let conv = Conv2dConfig::new(16, 64, 5).bias(true);
    let (w, b) = conv.initial_values(Some(Init::Xavier), &mut r);
    assert_eq!(w.len(), 64 * 400);
    check_uniform(
        &w,
        (6.0f64 / 2000.0).sqrt(),
        &format!("conv xavier (seed {seed})"),
    );
    assert!(
        b.unwrap().iter().all(|&v| v == 0.0),
        "conv xavier bias zero"
    );
    let (w, _) = conv.initial_values(Some(Init::Kaiming), &mut r);
    check_normal(
        &w,
        (2.0f64 / 400.0).sqrt(),
        &format!("conv kaiming (seed {seed})"),
    );
    let (w, b) = conv.initial_values(None, &mut r);
    assert_eq!(w.len(), 64 * 400);
    check_uniform(&w, 1.0 / 20.0, &format!("conv default (seed {seed})"));
    let b = b.unwrap();
    assert_eq!(b.len(), 64);
    assert!(b.iter().all(|&v| v.abs() <= 0.05) && b.iter().any(|&v| v != 0.0));
    // A Linear-shaped [300, 200] matrix: fan_in 200, fan_out 300.
    let w = Init::Xavier.weight(&mut r, 300, 200, 300);
    check_uniform(
        &w,
        (6.0f64 / 500.0).sqrt(),
        &format!("linear xavier (seed {seed})"),
    );
    let w = Init::Kaiming.weight(&mut r, 300, 200, 300);
    check_normal(&w, 0.1, &format!("linear kaiming (seed {seed})"));
    let w = Init::Gaussian { std: 0.25 }.weight(&mut r, 300, 200, 300);
    check_normal(&w, 0.25, &format!("gaussian (seed {seed})"));
}
