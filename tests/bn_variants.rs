//! The BatchNorm variants (ghost BN, Batch Renormalization, FrozenBN, PreciseBN, per-domain statistics)
//! through the layer API against their f64 references (`batchnorm::reference::bn_variants`).
//!
//! Inputs are fresh random values each run (seed printed in every assertion; BN_TEST_SEED replays one);
//! y, dx, dweight and dbias are poisoned with NaN before each run, so an unwritten value fails.
//!
//! Tolerances (f32 against f64), as in tests/batchnorm.rs:
//! - y, running_mean, running_var (and PreciseBN's): max |gpu - ref| / (1 + |ref|) <= 1e-4
//! - dx: max |gpu - ref| / (1 + |ref| + |weight| * r * invstd * (|dy| + mean|dy| + |xhat| * mean|dy*xhat|))
//!   <= 1e-4 (r = 1 but for Renorm; invstd, means per ghost batch for ghost BN)
//! - dweight, dbias: max |gpu - ref| / max(1, max |ref|) <= 1e-4

mod common;

use batchnorm::error::Error;
use batchnorm::nn::BatchNorm;
use batchnorm::ops::batchnorm::BatchNormConfig;
use batchnorm::ops::bn_variants::{Renorm, RenormSchedule};
use batchnorm::reference::batchnorm::{self as bnref, RunningStats};
use batchnorm::reference::bn_variants as vref;
use batchnorm::tensor::{Layout, Tensor};
use common::*;
use rand::Rng;

const TOL: f64 = 1e-4;

/// What one forward + backward through the layer produced.
struct Run {
    y: Vec<f32>,
    dx: Vec<f32>,
    dweight: Option<Vec<f32>>,
    dbias: Option<Vec<f32>>,
    running_mean: Option<Vec<f32>>,
    running_var: Option<Vec<f32>>,
}

/// Forward then backward in one submit, x and dy at `offset` bytes into their buffers, outputs poisoned.
fn run_layer(
    bn: &mut BatchNorm,
    x: &[f32],
    dy: &[f32],
    shape: &[usize],
    layout: Layout,
    offset: usize,
) -> Run {
    let gpu = gpu();
    let pad = vec![0.0f32; offset / 4];
    let with_pad = |v: &[f32]| [pad.as_slice(), v].concat();
    let nan = vec![f32::NAN; x.len()];
    let bx = gpu.upload("x", &with_pad(x)).unwrap();
    let bdy = gpu.upload("dy", &with_pad(dy)).unwrap();
    let by = gpu.upload("y", &with_pad(&nan)).unwrap();
    let bdx = gpu.upload("dx", &with_pad(&nan)).unwrap();
    let c = bn.num_features();
    for b in [&bn.dweight, &bn.dbias].into_iter().flatten() {
        bn.write("grad", b, &vec![f32::NAN; c]).unwrap();
    }
    let at = |b| batchnorm::ops::batchnorm::BufferRef {
        buffer: b,
        offset: offset as u64,
    };
    let mut enc = gpu.encoder("test");
    bn.record_forward(&mut enc, at(&bx), at(&by), shape, layout)
        .unwrap();
    bn.record_backward(&mut enc, at(&bx), at(&bdy), at(&bdx), shape, layout)
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let read = |b: &Option<wgpu::Buffer>| b.as_ref().map(|b| bn.read(b).unwrap());
    let n = offset / 4;
    Run {
        y: gpu.download::<f32>(&by, 0, n + x.len()).unwrap()[n..].to_vec(),
        dx: gpu.download::<f32>(&bdx, 0, n + x.len()).unwrap()[n..].to_vec(),
        dweight: read(&bn.dweight),
        dbias: read(&bn.dbias),
        running_mean: read(&bn.running_mean),
        running_var: read(&bn.running_var),
    }
}

/// Per element, |weight| * r * invstd * (|dy| + mean|dy| + |xhat| * mean|dy*xhat|) over one batch (or one
/// ghost batch) with the statistics it was normalized with.
#[allow(clippy::too_many_arguments)]
fn dx_terms(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    layout: Layout,
    weight: Option<&[f64]>,
    mean: &[f64],
    invstd: &[f64],
    r: Option<&[f64]>,
) -> Vec<f64> {
    let d = layout.dims(shape).unwrap();
    let m = d.per_channel() as f64;
    let (mut ady, mut adyx) = (vec![0.0; d.c], vec![0.0; d.c]);
    let mut out = vec![0.0; x.len()];
    for pass in 0..2 {
        for n in 0..d.n {
            for c in 0..d.c {
                for s in 0..d.spatial {
                    let i = d.index(layout, n, c, s);
                    let xhat = ((x[i] - mean[c]) * invstd[c]).abs();
                    if pass == 0 {
                        ady[c] += dy[i].abs() / m;
                        adyx[c] += (dy[i] * xhat).abs() / m;
                    } else {
                        let k = weight.map_or(1.0, |w| w[c].abs()) * r.map_or(1.0, |r| r[c]);
                        out[i] = k * invstd[c] * (dy[i].abs() + ady[c] + xhat * adyx[c]);
                    }
                }
            }
        }
    }
    out
}

fn dx_err(got: &[f32], want: &[f64], terms: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .zip(terms)
        .map(|((&g, &w), &t)| {
            if g.is_finite() {
                (g as f64 - w).abs() / (1.0 + w.abs() + t)
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// A layer with random gamma/beta (when affine) and random running statistics (when tracking).
fn layer(
    c: usize,
    config: BatchNormConfig,
    rng: &mut rand::rngs::StdRng,
) -> (BatchNorm, Option<Vec<f64>>, Option<Vec<f64>>, RunningStats) {
    let bn = BatchNorm::new(&gpu(), c, config).unwrap();
    let mut w = None;
    let mut b = None;
    if config.affine {
        let wv = uniform(rng, c, 0.5, 1.5);
        let bv = normal(rng, c, 0.0, 0.5);
        bn.write("weight", bn.weight.as_ref().unwrap(), &wv)
            .unwrap();
        bn.write("bias", bn.bias.as_ref().unwrap(), &bv).unwrap();
        w = Some(f64s(&wv));
        b = Some(f64s(&bv));
    }
    let mut running = RunningStats::new(c);
    if config.track_running_stats {
        let rm = normal(rng, c, 0.0, 1.0);
        let rv = uniform(rng, c, 0.3, 3.0);
        bn.write("running_mean", bn.running_mean.as_ref().unwrap(), &rm)
            .unwrap();
        bn.write("running_var", bn.running_var.as_ref().unwrap(), &rv)
            .unwrap();
        running.mean = f64s(&rm);
        running.var = f64s(&rv);
    }
    (bn, w, b, running)
}

#[test]
fn ghost_batchnorm_matches_reference() {
    let seed = seed();
    let mut rng = rng(seed);
    // (shape, layout, virtual batch, momentum, byte offset of x/y/dy/dx). 12x3x5x5 / V=4 and 20x7 / V=5
    // put ghost batches at offsets that are not storage-aligned (the scratch path); 8x4x4x4 / V=2 at
    // aligned ones.
    type GhostCase<'a> = (&'a [usize], Layout, usize, Option<f32>, usize);
    let cases: &[GhostCase] = &[
        (&[12, 3, 5, 5], Layout::Nchw, 4, Some(0.1), 0),
        (&[8, 4, 4, 4], Layout::Nchw, 2, None, 256),
        (&[6, 3, 7, 5], Layout::Nhwc, 3, Some(0.3), 0),
        (&[20, 7], Layout::Nc, 5, Some(0.1), 0),
        (&[9, 1, 13], Layout::Nchw, 3, Some(0.1), 0),
    ];
    for &(shape, layout, v, momentum, offset) in cases {
        for affine in [true, false] {
            let config = BatchNormConfig {
                momentum,
                affine,
                ..Default::default()
            };
            let c = layout.dims(shape).unwrap().c;
            let (mut bn, w, b, mut running) = layer(c, config, &mut rng);
            bn.set_virtual_batch_size(Some(v)).unwrap();
            // Two steps: the second moves the running statistics from where the first left them.
            for step in 0..2 {
                let numel: usize = shape.iter().product();
                let x = normal(&mut rng, numel, 2.0, 3.0);
                let dy = normal(&mut rng, numel, 0.0, 1.0);
                let got = run_layer(&mut bn, &x, &dy, shape, layout, offset);
                let (xd, dyd) = (f64s(&x), f64s(&dy));
                let eps = config.eps as f64;
                let fwd = vref::ghost_forward(
                    &xd,
                    shape,
                    layout,
                    v,
                    w.as_deref(),
                    b.as_deref(),
                    Some(&mut running),
                    momentum.map(f64::from),
                    eps,
                )
                .unwrap();
                let bwd =
                    vref::ghost_backward(&xd, &dyd, shape, layout, v, w.as_deref(), &fwd).unwrap();
                let mut ghost = shape.to_vec();
                ghost[0] = v;
                let glen = numel / (shape[0] / v);
                let terms: Vec<f64> = (0..shape[0] / v)
                    .flat_map(|g| {
                        let s = g * glen..(g + 1) * glen;
                        dx_terms(
                            &xd[s.clone()],
                            &dyd[s],
                            &ghost,
                            layout,
                            w.as_deref(),
                            &fwd.means[g],
                            &fwd.invstds[g],
                            None,
                        )
                    })
                    .collect();
                let ctx =
                    format!("{shape:?} {layout:?} V={v} affine={affine} step {step} seed={seed}");
                let e_y = max_rel_err(&got.y, &fwd.y);
                let e_dx = dx_err(&got.dx, &bwd.dx, &terms);
                let e_rm = max_rel_err(got.running_mean.as_ref().unwrap(), &running.mean);
                let e_rv = max_rel_err(got.running_var.as_ref().unwrap(), &running.var);
                println!("ghost {ctx}: y {e_y:.1e} dx {e_dx:.1e} running {e_rm:.1e} {e_rv:.1e}");
                assert!(e_y <= TOL, "{ctx}: y err {e_y}");
                assert!(e_dx <= TOL, "{ctx}: dx err {e_dx}");
                assert!(e_rm <= TOL && e_rv <= TOL, "{ctx}: running {e_rm} {e_rv}");
                assert_eq!(bn.num_batches_tracked, running.num_batches_tracked, "{ctx}");
                if affine {
                    let e_w = max_err_scaled(got.dweight.as_ref().unwrap(), &bwd.dweight);
                    let e_b = max_err_scaled(got.dbias.as_ref().unwrap(), &bwd.dbias);
                    assert!(e_w <= TOL && e_b <= TOL, "{ctx}: dweight {e_w} dbias {e_b}");
                }
            }
        }
    }
}

#[test]
fn ghost_batchnorm_rejects_bad_settings() {
    let gpu = gpu();
    let mut bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
    assert!(matches!(
        bn.set_virtual_batch_size(Some(0)),
        Err(Error::BadConfig(_))
    ));
    bn.set_virtual_batch_size(Some(4)).unwrap();
    let x = Tensor::from_f32(&gpu, &[6, 3, 2, 2], &[1.0; 72]).unwrap();
    match bn.forward(&x, Layout::Nchw) {
        Err(Error::BadConfig(m)) => assert!(m.contains("divide the batch size 6"), "{m}"),
        other => panic!("expected BadConfig, got {other:?}"),
    }
    // A ghost batch of one value per channel is PyTorch's error.
    bn.set_virtual_batch_size(Some(1)).unwrap();
    let x = Tensor::from_f32(&gpu, &[4, 3], &[1.0; 12]).unwrap();
    assert!(matches!(
        bn.forward(&x, Layout::Nc),
        Err(Error::OneValuePerChannel { .. })
    ));
    let r = Renorm {
        rmax: 2.0,
        dmax: 1.0,
    };
    assert!(matches!(bn.set_renorm(Some(r)), Err(Error::BadConfig(_))));
    assert!(matches!(bn.set_frozen(true), Err(Error::BadConfig(_))));
    // Unaligned ghost batches (2 x 3 values = 24 bytes) need copies: a caller's storage-only buffer is
    // refused with a typed error, not a validation error.
    bn.set_virtual_batch_size(Some(2)).unwrap();
    let storage_only = gpu
        .create_buffer("storage only", 4 * 12, wgpu::BufferUsages::STORAGE)
        .unwrap();
    let y = gpu.upload("y", &[0.0f32; 12]).unwrap();
    let mut enc = gpu.encoder("ghost");
    match bn.record_forward(
        &mut enc,
        (&storage_only).into(),
        (&y).into(),
        &[4, 3],
        Layout::Nc,
    ) {
        Err(Error::BadConfig(m)) => assert!(m.contains("COPY_SRC"), "{m}"),
        other => panic!("expected BadConfig, got {other:?}"),
    }
    // More ghost batches than one invocation may loop over on lavapipe (the per-channel merge walks
    // them all): refused before anything is recorded.
    if gpu.caps().cpu_device {
        let mut bn = BatchNorm::new(&gpu, 1, BatchNormConfig::default()).unwrap();
        bn.set_virtual_batch_size(Some(2)).unwrap();
        let n = 2 * 60_001;
        let x = Tensor::from_f32(&gpu, &[n, 1], &vec![1.0; n]).unwrap();
        let e = bn.forward(&x, Layout::Nc).unwrap_err();
        assert!(
            matches!(e, Error::LimitExceeded { .. }) && e.to_string().contains("ghost"),
            "{e}"
        );
    }
}

#[test]
fn batch_renorm_matches_reference() {
    let seed = seed();
    let mut rng = rng(seed);
    // Running statistics random (mean N(0,1), var U(0.3, 3)) against batches of mean 0.5, std 1.5, so
    // some channels clip r and d and some do not.
    let cases: &[(&[usize], Layout, f32, f32)] = &[
        (&[7, 5, 3, 3], Layout::Nchw, 1.5, 0.5),
        (&[4, 5, 3, 6], Layout::Nhwc, 3.0, 5.0),
        (&[9, 11], Layout::Nc, 1.2, 0.2),
        (&[2, 3, 17], Layout::Nchw, 1.0, 0.0),
    ];
    for &(shape, layout, rmax, dmax) in cases {
        for affine in [true, false] {
            let config = BatchNormConfig {
                affine,
                ..Default::default()
            };
            let c = layout.dims(shape).unwrap().c;
            let (mut bn, w, b, mut running) = layer(c, config, &mut rng);
            bn.set_renorm(Some(Renorm { rmax, dmax })).unwrap();
            for step in 0..2 {
                let numel: usize = shape.iter().product();
                let x = normal(&mut rng, numel, 0.5, 1.5);
                let dy = normal(&mut rng, numel, 0.0, 1.0);
                let got = run_layer(&mut bn, &x, &dy, shape, layout, 0);
                let (xd, dyd) = (f64s(&x), f64s(&dy));
                let fwd = vref::renorm_forward(
                    &xd,
                    shape,
                    layout,
                    w.as_deref(),
                    b.as_deref(),
                    &mut running,
                    Some(0.1),
                    config.eps as f64,
                    rmax as f64,
                    dmax as f64,
                )
                .unwrap();
                let bwd =
                    vref::renorm_backward(&xd, &dyd, shape, layout, w.as_deref(), &fwd).unwrap();
                let terms = dx_terms(
                    &xd,
                    &dyd,
                    shape,
                    layout,
                    w.as_deref(),
                    &fwd.mean,
                    &fwd.invstd,
                    Some(&fwd.r),
                );
                let clipped = fwd
                    .r
                    .iter()
                    .filter(|&&r| r == rmax as f64 || r == 1.0 / rmax as f64)
                    .count();
                let ctx = format!("{shape:?} {layout:?} rmax {rmax} dmax {dmax} affine={affine} step {step} seed={seed}");
                let e_y = max_rel_err(&got.y, &fwd.y);
                let e_dx = dx_err(&got.dx, &bwd.dx, &terms);
                let e_rm = max_rel_err(got.running_mean.as_ref().unwrap(), &running.mean);
                let e_rv = max_rel_err(got.running_var.as_ref().unwrap(), &running.var);
                println!(
                    "renorm {ctx}: y {e_y:.1e} dx {e_dx:.1e} running {e_rm:.1e} {e_rv:.1e} \
                     ({clipped}/{c} channels clip r)"
                );
                assert!(e_y <= TOL, "{ctx}: y err {e_y}");
                assert!(e_dx <= TOL, "{ctx}: dx err {e_dx}");
                assert!(e_rm <= TOL && e_rv <= TOL, "{ctx}: running {e_rm} {e_rv}");
                if affine {
                    let e_w = max_err_scaled(got.dweight.as_ref().unwrap(), &bwd.dweight);
                    let e_b = max_err_scaled(got.dbias.as_ref().unwrap(), &bwd.dbias);
                    assert!(e_w <= TOL && e_b <= TOL, "{ctx}: dweight {e_w} dbias {e_b}");
                }
            }
        }
    }
}

#[test]
fn batch_renorm_rejects_bad_settings() {
    let gpu = gpu();
    let mut bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
    for (rmax, dmax) in [
        (0.5, 1.0),
        (2.0, -1.0),
        (f32::NAN, 1.0),
        (2.0, f32::INFINITY),
    ] {
        match bn.set_renorm(Some(Renorm { rmax, dmax })) {
            Err(Error::BadConfig(m)) => assert!(m.contains("renorm"), "{m}"),
            other => panic!("rmax {rmax} dmax {dmax}: expected BadConfig, got {other:?}"),
        }
    }
    let untracked = BatchNormConfig {
        track_running_stats: false,
        ..Default::default()
    };
    let mut bn = BatchNorm::new(&gpu, 3, untracked).unwrap();
    let r = Renorm {
        rmax: 2.0,
        dmax: 1.0,
    };
    assert!(matches!(bn.set_renorm(Some(r)), Err(Error::BadConfig(_))));
    assert!(matches!(bn.set_frozen(true), Err(Error::BadConfig(_))));
    // Unaligned ghost batches (2 x 3 values = 24 bytes) need copies: a caller's storage-only buffer is
    // refused with a typed error, not a validation error.
    bn.set_virtual_batch_size(Some(2)).unwrap();
    let storage_only = gpu
        .create_buffer("storage only", 4 * 12, wgpu::BufferUsages::STORAGE)
        .unwrap();
    let y = gpu.upload("y", &[0.0f32; 12]).unwrap();
    let mut enc = gpu.encoder("ghost");
    match bn.record_forward(
        &mut enc,
        (&storage_only).into(),
        (&y).into(),
        &[4, 3],
        Layout::Nc,
    ) {
        Err(Error::BadConfig(m)) => assert!(m.contains("COPY_SRC"), "{m}"),
        other => panic!("expected BadConfig, got {other:?}"),
    }
}

#[test]
fn renorm_schedule_follows_the_paper() {
    let s = RenormSchedule::paper();
    assert_eq!(
        s.at(0),
        Renorm {
            rmax: 1.0,
            dmax: 0.0
        }
    );
    assert_eq!(
        s.at(5_000),
        Renorm {
            rmax: 1.0,
            dmax: 0.0
        }
    );
    let mid = s.at(22_500); // halfway from 5k to 40k for rmax; 17.5k of 20k for dmax
    assert!((mid.rmax - 2.0).abs() < 1e-6, "{mid:?}");
    assert!((mid.dmax - 5.0 * 17.5 / 20.0).abs() < 1e-5, "{mid:?}");
    assert_eq!(
        s.at(40_000),
        Renorm {
            rmax: 3.0,
            dmax: 5.0
        }
    );
    assert_eq!(
        s.at(1_000_000),
        Renorm {
            rmax: 3.0,
            dmax: 5.0
        }
    );
}

#[test]
fn frozen_batchnorm_matches_reference() {
    let seed = seed();
    let mut rng = rng(seed);
    let cases: &[(&[usize], Layout)] = &[
        (&[5, 3, 7, 3], Layout::Nchw),
        (&[3, 4, 2, 6], Layout::Nhwc),
        (&[1, 13], Layout::Nc), // one sample: fine, no batch statistics are taken
    ];
    for &(shape, layout) in cases {
        let config = BatchNormConfig::default();
        let c = layout.dims(shape).unwrap().c;
        let (mut bn, w, b, running) = layer(c, config, &mut rng);
        bn.set_frozen(true).unwrap();
        assert!(bn.is_training() && !bn.uses_batch_stats());
        let numel: usize = shape.iter().product();
        let x = normal(&mut rng, numel, 1.0, 2.0);
        let dy = normal(&mut rng, numel, 0.0, 1.0);
        let got = run_layer(&mut bn, &x, &dy, shape, layout, 0);
        let (xd, dyd) = (f64s(&x), f64s(&dy));
        let eps = config.eps as f64;
        let fwd = vref::frozen_forward(
            &xd,
            shape,
            layout,
            w.as_deref(),
            b.as_deref(),
            &running,
            eps,
        )
        .unwrap();
        let bwd = vref::frozen_backward(&xd, &dyd, shape, layout, w.as_deref(), &fwd).unwrap();
        let terms = dx_terms(
            &xd,
            &dyd,
            shape,
            layout,
            w.as_deref(),
            &fwd.mean,
            &fwd.invstd,
            None,
        );
        let ctx = format!("{shape:?} {layout:?} seed={seed}");
        let e_y = max_rel_err(&got.y, &fwd.y);
        let e_dx = dx_err(&got.dx, &bwd.dx, &terms);
        let e_w = max_err_scaled(got.dweight.as_ref().unwrap(), &bwd.dweight);
        let e_b = max_err_scaled(got.dbias.as_ref().unwrap(), &bwd.dbias);
        println!("frozen {ctx}: y {e_y:.1e} dx {e_dx:.1e} dweight {e_w:.1e} dbias {e_b:.1e}");
        assert!(e_y <= TOL && e_dx <= TOL, "{ctx}: y {e_y} dx {e_dx}");
        assert!(e_w <= TOL && e_b <= TOL, "{ctx}: dweight {e_w} dbias {e_b}");
        // The running statistics do not move and no batch is counted.
        let want_rm: Vec<f32> = running.mean.iter().map(|&v| v as f32).collect();
        let want_rv: Vec<f32> = running.var.iter().map(|&v| v as f32).collect();
        assert_eq!(got.running_mean.unwrap(), want_rm, "{ctx}");
        assert_eq!(got.running_var.unwrap(), want_rv, "{ctx}");
        assert_eq!(bn.num_batches_tracked, 0, "{ctx}");
    }
}

/// PreciseBN over `batches` (values, shape) in `layout` on `bn`: (running mean, running var) as the GPU
/// left them, and (mean, var) of the f64 reference over the batches taken together.
#[allow(clippy::type_complexity)]
fn precise_over(
    bn: &mut BatchNorm,
    batches: &[(Vec<f32>, Vec<usize>)],
    layout: Layout,
) -> ((Vec<f32>, Vec<f32>), (Vec<f64>, Vec<f64>)) {
    bn.precise_begin().unwrap();
    for (x, s) in batches {
        let t = Tensor::from_f32(&gpu(), s, x).unwrap();
        bn.precise_accumulate(&t, layout).unwrap();
    }
    bn.precise_finish().unwrap();
    let xs: Vec<Vec<f64>> = batches.iter().map(|(x, _)| f64s(x)).collect();
    let refs: Vec<(&[f64], &[usize])> = xs
        .iter()
        .zip(batches)
        .map(|(x, (_, s))| (x.as_slice(), s.as_slice()))
        .collect();
    let want = vref::precise_stats(&refs, layout).unwrap();
    let got_mean = bn.read(bn.running_mean.as_ref().unwrap()).unwrap();
    let got_var = bn.read(bn.running_var.as_ref().unwrap()).unwrap();
    ((got_mean, got_var), want)
}

#[test]
fn precise_bn_matches_statistics_of_the_concatenated_batches() {
    let seed = seed();
    let mut rng = rng(seed);
    // Batches of different N (Chan's weights matter), a large mean (the shift matters).
    let cases: &[(&[usize], Layout, &[usize], f32)] = &[
        (&[3, 4, 4], Layout::Nchw, &[5, 3, 7], 5.0),
        (&[5, 3, 7], Layout::Nhwc, &[2, 1, 4, 3], -3.0),
        (&[13], Layout::Nc, &[64, 1, 37], 1e3),
        (&[2, 17, 9], Layout::Nchw, &[1, 2], 0.0),
    ];
    for &(rest, layout, ns, mean) in cases {
        let shapes: Vec<Vec<usize>> = ns.iter().map(|&n| [&[n][..], rest].concat()).collect();
        let c = layout.dims(&shapes[0]).unwrap().c;
        let mut bn = BatchNorm::new(&gpu(), c, BatchNormConfig::default()).unwrap();
        bn.num_batches_tracked = 7;
        let batches: Vec<(Vec<f32>, Vec<usize>)> = shapes
            .iter()
            .map(|s| (normal(&mut rng, s.iter().product(), mean, 2.0), s.clone()))
            .collect();
        let ((got_mean, got_var), (want_mean, want_var)) = precise_over(&mut bn, &batches, layout);
        let ctx = format!("batches {shapes:?} {layout:?} mean {mean} seed={seed}");
        let (e_m, e_v) = (
            max_rel_err(&got_mean, &want_mean),
            max_rel_err(&got_var, &want_var),
        );
        println!("precise {ctx}: mean {e_m:.1e} var {e_v:.1e}");
        assert!(e_m <= TOL && e_v <= TOL, "{ctx}: mean {e_m} var {e_v}");
        assert_eq!(bn.num_batches_tracked, 7, "{ctx}");
    }
}

/// Infinities in PreciseBN's batches give the statistics of the concatenated batches, as PyTorch's batch
/// statistics give them: a channel holding +inf has mean +inf and variance NaN, one holding +inf and -inf
/// (in different batches) NaN for both, one whose very first value is -inf (the kernel's shift) mean -inf;
/// the other channels stay finite and exact. Fresh random values, the infinities at random places.
#[test]
fn precise_bn_with_infinities_as_the_concatenated_statistics() {
    let seed = seed();
    let mut rng = rng(seed);
    for layout in [Layout::Nc, Layout::Nchw, Layout::Nhwc] {
        // 6 channels in each layout.
        let rest: &[usize] = match layout {
            Layout::Nc => &[6],
            Layout::Nchw => &[6, 3, 2],
            _ => &[3, 2, 6],
        };
        let shapes: Vec<Vec<usize>> = [4usize, 3, 5]
            .iter()
            .map(|&n| [&[n][..], rest].concat())
            .collect();
        let c = layout.dims(&shapes[0]).unwrap().c;
        let mut bn = BatchNorm::new(&gpu(), c, BatchNormConfig::default()).unwrap();
        let mut batches = Vec::new();
        for (b, s) in shapes.iter().enumerate() {
            let mut x = normal(&mut rng, s.iter().product(), 3.0, 2.0);
            let dims = layout.dims(s).unwrap();
            // The flat index of value j of channel ch in this batch.
            let at = |ch: usize, j: usize| {
                let (n, sp) = (j / dims.spatial, j % dims.spatial);
                match layout {
                    Layout::Nchw => (n * dims.c + ch) * dims.spatial + sp,
                    _ => (n * dims.spatial + sp) * dims.c + ch,
                }
            };
            let per = dims.per_channel();
            if b == 1 {
                x[at(0, rng.random_range(0..per))] = f32::INFINITY;
                x[at(1, rng.random_range(0..per))] = f32::INFINITY;
            }
            if b == 2 {
                x[at(1, rng.random_range(0..per))] = f32::NEG_INFINITY;
            }
            if b == 0 {
                x[at(2, 0)] = f32::NEG_INFINITY;
            }
            batches.push((x, s.clone()));
        }
        let ((got_mean, got_var), (want_mean, want_var)) = precise_over(&mut bn, &batches, layout);
        let ctx = format!("{layout:?} seed={seed}");
        assert_eq!(want_mean[0], f64::INFINITY, "reference {ctx}");
        assert!(
            want_mean[1].is_nan() && want_var[0].is_nan(),
            "reference {ctx}"
        );
        assert_eq!(want_mean[2], f64::NEG_INFINITY, "reference {ctx}");
        for ch in 0..c {
            for (what, got, want) in [
                ("mean", got_mean[ch], want_mean[ch]),
                ("var", got_var[ch], want_var[ch]),
            ] {
                let ok = if want.is_nan() {
                    got.is_nan()
                } else if want.is_infinite() {
                    got as f64 == want
                } else {
                    (got as f64 - want).abs() / (1.0 + want.abs()) <= TOL
                };
                assert!(ok, "{ctx}: channel {ch} {what} {got} vs {want}");
            }
        }
    }
}

#[test]
fn precise_bn_rejects_misuse() {
    let gpu = gpu();
    let mut bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
    let x = Tensor::from_f32(&gpu, &[1, 3], &[1.0, 2.0, 3.0]).unwrap();
    assert!(matches!(
        bn.precise_accumulate(&x, Layout::Nc),
        Err(Error::BadConfig(_))
    ));
    assert!(matches!(bn.precise_finish(), Err(Error::BadConfig(_))));
    bn.precise_begin().unwrap();
    bn.precise_accumulate(&x, Layout::Nc).unwrap();
    // One value per channel has no unbiased variance.
    assert!(matches!(bn.precise_finish(), Err(Error::BadConfig(_))));
    let wrong = Tensor::from_f32(&gpu, &[1, 4], &[1.0; 4]).unwrap();
    assert!(matches!(
        bn.precise_accumulate(&wrong, Layout::Nc),
        Err(Error::ShapeMismatch { .. })
    ));
    let untracked = BatchNormConfig {
        track_running_stats: false,
        ..Default::default()
    };
    let mut bn = BatchNorm::new(&gpu, 3, untracked).unwrap();
    assert!(matches!(bn.precise_begin(), Err(Error::BadConfig(_))));
    // A batch whose channel walks would pass lavapipe's loop limit (64 invocations a channel, 60 000
    // values each at most): refused on a CPU device rather than merged short.
    if gpu.caps().cpu_device {
        let mut bn = BatchNorm::new(&gpu, 1, BatchNormConfig::default()).unwrap();
        let len = 64 * 60_000 + 1;
        let big = Tensor::from_f32(&gpu, &[1, 1, len], &vec![1.0; len]).unwrap();
        bn.precise_begin().unwrap();
        let got = bn.precise_accumulate(&big, Layout::Nchw);
        assert!(
            matches!(got, Err(Error::LimitExceeded { .. })),
            "{len} values a channel: {got:?}"
        );
    }
}

#[test]
fn per_domain_statistics_keep_one_set_per_domain() {
    let seed = seed();
    let mut rng = rng(seed);
    let gpu = gpu();
    let (shape, layout, c) = ([6usize, 5, 3, 3], Layout::Nchw, 5);
    let mut bn = BatchNorm::new_2d(&gpu, c, BatchNormConfig::default()).unwrap();
    bn.set_num_domains(3).unwrap();
    let mut refs = [
        RunningStats::new(c),
        RunningStats::new(c),
        RunningStats::new(c),
    ];
    // Domain d sees data of mean 3d: its statistics must follow only its own batches.
    for (step, d) in [0usize, 2, 2, 0, 2].into_iter().enumerate() {
        bn.set_domain(d).unwrap();
        let x = normal(&mut rng, 270, 3.0 * d as f32, 1.0 + d as f32);
        let y = bn
            .forward(&Tensor::from_f32(&gpu, &shape, &x).unwrap(), layout)
            .unwrap();
        let want = bnref::forward(
            &f64s(&x),
            &shape,
            layout,
            Some(&[1.0; 5]),
            Some(&[0.0; 5]),
            Some(&mut refs[d]),
            true,
            Some(0.1),
            1e-5,
        )
        .unwrap();
        let e = max_rel_err(&y.to_f32().unwrap(), &want.y);
        assert!(e <= TOL, "step {step} domain {d} seed={seed}: y {e}");
    }
    let (tensors, counters) = bn.domain_state_dict("bn.").unwrap();
    let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "bn.0.running_mean",
            "bn.0.running_var",
            "bn.1.running_mean",
            "bn.1.running_var",
            "bn.2.running_mean",
            "bn.2.running_var"
        ]
    );
    for d in 0..3 {
        let ctx = format!("domain {d} seed={seed}");
        let e_m = max_rel_err(&tensors[2 * d].1, &refs[d].mean);
        let e_v = max_rel_err(&tensors[2 * d + 1].1, &refs[d].var);
        assert!(e_m <= TOL && e_v <= TOL, "{ctx}: {e_m} {e_v}");
        assert_eq!(counters[d].1, refs[d].num_batches_tracked, "{ctx}");
    }
    assert_eq!(counters[1], ("bn.1.num_batches_tracked".to_string(), 0));
    // Eval on domain 0 uses domain 0's statistics.
    bn.set_domain(0).unwrap();
    bn.train(false);
    let x = normal(&mut rng, 270, 0.0, 1.0);
    let y = bn
        .forward(&Tensor::from_f32(&gpu, &shape, &x).unwrap(), layout)
        .unwrap();
    let mut r0 = refs[0].clone();
    let want = bnref::forward(
        &f64s(&x),
        &shape,
        layout,
        None,
        None,
        Some(&mut r0),
        false,
        None,
        1e-5,
    )
    .unwrap();
    let e = max_rel_err(&y.to_f32().unwrap(), &want.y);
    assert!(e <= TOL, "eval domain 0 seed={seed}: y {e}");
    assert!(matches!(bn.set_domain(3), Err(Error::BadConfig(_))));
    assert!(matches!(bn.set_num_domains(0), Err(Error::BadConfig(_))));
}

#[test]
fn folded_mlp_matches_the_unfolded_one_in_eval_mode() {
    use batchnorm::nn::{fold, Init, MlpConfig, Sequential};
    let seed = seed();
    let mut rng = rng(seed);
    let gpu = gpu();
    // Awkward widths; gamma, beta and running statistics far from their initial values.
    let config = MlpConfig {
        sizes: vec![13, 7, 5, 3],
        bn: true,
        init: Init::Gaussian { std: 0.5 },
        seed,
    };
    let n = 11;
    let mut model = Sequential::mlp(&gpu, &config, n).unwrap();
    let mut sd = model.state_dict().unwrap();
    for (key, _, v) in &mut sd.tensors {
        let len = v.len();
        if key == "1.weight" || key == "4.weight" {
            *v = uniform(&mut rng, len, -2.0, 2.0);
        } else if key.ends_with("running_var") {
            *v = uniform(&mut rng, len, 0.05, 4.0);
        } else if key.ends_with("running_mean") || key.ends_with("bias") {
            *v = normal(&mut rng, len, 0.0, 1.0);
        }
    }
    model.load_state_dict(&sd).unwrap();
    model.train(false);
    let x = normal(&mut rng, n * 13, 0.0, 2.0);
    let run = |m: &mut Sequential| {
        gpu.queue
            .write_buffer(m.input(), 0, bytemuck::cast_slice(&x));
        let mut enc = gpu.encoder("mlp");
        m.record_forward(&mut enc, n).unwrap();
        gpu.submit_and_wait(enc).unwrap();
        gpu.download::<f32>(m.output(), 0, n * 3).unwrap()
    };
    let want = run(&mut model);
    let mut folded = fold::fold_mlp(&gpu, &model, n).unwrap();
    assert_eq!(
        folded.layers.len(),
        model.layers.len() - 2,
        "BatchNorm layers dropped"
    );
    let got = run(&mut folded);
    let e = max_rel_err(&got, &f64s(&want));
    println!("fold: max rel err {e:.1e} seed={seed}");
    assert!(e <= TOL, "folded vs unfolded, seed={seed}: {e}");
    let keys: Vec<String> = folded
        .state_dict()
        .unwrap()
        .tensors
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(
        keys,
        ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    );

    // Folding one BatchNorm into one Linear in place gives the same network as fold_mlp.
    let (Some(batchnorm::nn::Layer::Linear(l)), Some(batchnorm::nn::Layer::BatchNorm { bn, .. })) =
        (model.layers.first(), model.layers.get(1))
    else {
        panic!("MLP starts Linear, BatchNorm");
    };
    fold::fold_into_linear(&gpu, &model.params, l, bn).unwrap();
    let arena = gpu
        .download::<f32>(&model.params, 0, model.arena_len())
        .unwrap();
    let fsd = folded.state_dict().unwrap();
    let w0 = model.slots()[0].values(&arena);
    let e = max_rel_err(w0, &f64s(fsd.get("0.weight").unwrap()));
    assert!(
        e <= 1e-6,
        "in-place fold of layer 0 differs from fold_mlp: {e}"
    );
}

#[test]
fn folding_rejects_what_cannot_fold() {
    use batchnorm::nn::{fold, Linear, ParamSlot};
    let gpu = gpu();
    let params = gpu.upload("p", &[0.0f32; 64]).unwrap();
    let slot = |name: &str, shape: Vec<usize>| ParamSlot {
        name: name.into(),
        shape,
        offset: 0,
    };
    let no_bias = Linear::new(&gpu, 2, 3, slot("w", vec![3, 2]), None);
    let bn = BatchNorm::new(&gpu, 3, BatchNormConfig::default()).unwrap();
    assert!(matches!(
        fold::fold_into_linear(&gpu, &params, &no_bias, &bn),
        Err(Error::BadConfig(_))
    ));
    let lin = Linear::new(&gpu, 2, 4, slot("w", vec![4, 2]), Some(slot("b", vec![4])));
    assert!(matches!(
        fold::fold_into_linear(&gpu, &params, &lin, &bn),
        Err(Error::ShapeMismatch { .. })
    ));
    let untracked = BatchNormConfig {
        track_running_stats: false,
        ..Default::default()
    };
    let bn4 = BatchNorm::new(&gpu, 4, untracked).unwrap();
    assert!(matches!(
        fold::fold_into_linear(&gpu, &params, &lin, &bn4),
        Err(Error::BadConfig(_))
    ));
}

/// `batchnorm parity` with the variant metadata keys: each variant's outputs against its reference, and
/// bad values rejected with a message (no output written).
#[test]
fn parity_reaches_the_variants() {
    use safetensors::{Dtype, SafeTensors};
    use std::collections::HashMap;
    let seed = seed();
    let mut rng = rng(seed);
    let dir = ScratchDir::new("bnvar");
    let run = |tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)], name: &str| {
        let (input, output) = (
            dir.join(format!("{name}.in")),
            dir.join(format!("{name}.out")),
        );
        write_safetensors(&input, Dtype::F32, tensors, meta);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_batchnorm"))
            .args(["parity", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            assert!(!output.exists(), "{name}: output written on failure");
            return Err(stderr);
        }
        let bytes = std::fs::read(&output).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        Ok(st
            .tensors()
            .into_iter()
            .filter(|(_, v)| v.dtype() == Dtype::F32)
            .map(|(n, v)| (n, bytemuck::pod_collect_to_vec::<u8, f32>(v.data())))
            .collect::<HashMap<String, Vec<f32>>>())
    };
    let shape = vec![6usize, 3, 2, 5];
    let x = normal(&mut rng, 180, 1.0, 2.0);
    let dy = normal(&mut rng, 180, 0.0, 1.0);
    let w = uniform(&mut rng, 3, 0.5, 1.5);
    let b = normal(&mut rng, 3, 0.0, 1.0);
    let rm = normal(&mut rng, 3, 0.0, 1.0);
    let rv = uniform(&mut rng, 3, 0.5, 2.0);
    let tensors = [
        ("x", shape.clone(), x.clone()),
        ("dy", shape.clone(), dy.clone()),
        ("weight", vec![3], w.clone()),
        ("bias", vec![3], b.clone()),
        ("running_mean", vec![3], rm.clone()),
        ("running_var", vec![3], rv.clone()),
    ];
    let (xd, dyd, wd, bd) = (f64s(&x), f64s(&dy), f64s(&w), f64s(&b));
    let start = RunningStats {
        mean: f64s(&rm),
        var: f64s(&rv),
        num_batches_tracked: 0,
    };
    let l = Layout::Nchw;
    let check = |got: &HashMap<String, Vec<f32>>, y: &[f64], dx: &[f64], r: &RunningStats, what| {
        let ctx = format!("parity {what} seed={seed}");
        assert!(max_rel_err(&got["y"], y) <= TOL, "{ctx}: y");
        // dx through the tolerance of tests/batchnorm.rs is overkill for one small case: the absolute
        // error of O(1) values is what f32 gives here.
        assert!(max_rel_err(&got["dx"], dx) <= 1e-4, "{ctx}: dx");
        assert!(max_rel_err(&got["running_mean"], &r.mean) <= TOL, "{ctx}");
        assert!(max_rel_err(&got["running_var"], &r.var) <= TOL, "{ctx}");
    };

    let got = run(&tensors, &[("virtual_batch_size", "2")], "ghost").unwrap();
    let mut r = start.clone();
    let f = vref::ghost_forward(
        &xd,
        &shape,
        l,
        2,
        Some(&wd),
        Some(&bd),
        Some(&mut r),
        Some(0.1),
        1e-5,
    )
    .unwrap();
    let bw = vref::ghost_backward(&xd, &dyd, &shape, l, 2, Some(&wd), &f).unwrap();
    check(&got, &f.y, &bw.dx, &r, "ghost");
    assert!(
        !got.contains_key("save_mean"),
        "ghost BN writes no save_mean"
    );

    let meta = [("renorm_rmax", "1.2"), ("renorm_dmax", "0.3")];
    let got = run(&tensors, &meta, "renorm").unwrap();
    let mut r = start.clone();
    let f = vref::renorm_forward(
        &xd,
        &shape,
        l,
        Some(&wd),
        Some(&bd),
        &mut r,
        Some(0.1),
        1e-5,
        1.2,
        0.3,
    )
    .unwrap();
    let bw = vref::renorm_backward(&xd, &dyd, &shape, l, Some(&wd), &f).unwrap();
    check(&got, &f.y, &bw.dx, &r, "renorm");
    assert!(max_err_scaled(&got["dweight"], &bw.dweight) <= TOL);

    let got = run(&tensors, &[("frozen", "true")], "frozen").unwrap();
    let f = vref::frozen_forward(&xd, &shape, l, Some(&wd), Some(&bd), &start, 1e-5).unwrap();
    let bw = vref::frozen_backward(&xd, &dyd, &shape, l, Some(&wd), &f).unwrap();
    check(&got, &f.y, &bw.dx, &start, "frozen");

    for (meta, expect) in [
        (
            &[("virtual_batch_size", "4")][..],
            "divide the batch size 6",
        ),
        (&[("virtual_batch_size", "-1")], "virtual_batch_size"),
        (&[("renorm_rmax", "2")], "renorm_dmax"),
        (&[("renorm_rmax", "0.5"), ("renorm_dmax", "1")], "rmax"),
        (&[("frozen", "yes")], "'frozen'"),
        (
            &[("frozen", "true"), ("virtual_batch_size", "2")],
            "does not combine",
        ),
    ] {
        let err = run(&tensors, meta, "bad").expect_err(expect);
        assert!(
            err.contains(expect),
            "{meta:?}: stderr lacks '{expect}': {err}"
        );
        assert!(!err.contains("panicked"), "{meta:?}: {err}");
    }
}

#[test]
fn precise_bn_over_an_mlp_matches_the_layerwise_reference() {
    use batchnorm::nn::{precise, Init, Layer, MlpConfig, Sequential};
    use batchnorm::reference::{linear, sigmoid};
    let seed = seed();
    let mut rng = rng(seed);
    let gpu = gpu();
    let sizes = [13usize, 7, 5, 3];
    let config = MlpConfig {
        sizes: sizes.to_vec(),
        bn: true,
        init: Init::Gaussian { std: 0.5 },
        seed,
    };
    let mut model = Sequential::mlp(&gpu, &config, 11).unwrap();
    let ns = [9usize, 4, 11];
    let batches: Vec<Vec<f32>> = ns
        .iter()
        .map(|&n| normal(&mut rng, n * 13, 0.5, 2.0))
        .collect();
    let refs: Vec<&[f32]> = batches.iter().map(|b| b.as_slice()).collect();
    precise::precise_bn_mlp(&gpu, &mut model, &refs).unwrap();
    let sd = model.state_dict().unwrap();
    let get = |k: &str| f64s(sd.get(k).unwrap());
    // Host f64: the input of each BatchNorm over all rows, the earlier ones normalized with their new
    // (reference) statistics, gamma 1 and beta 0 as initialized.
    let mut h: Vec<f64> = batches.iter().flat_map(|b| f64s(b)).collect();
    let total: usize = ns.iter().sum();
    for (k, (li, bi)) in [(0usize, 1usize), (3, 4)].into_iter().enumerate() {
        let (fi, fo) = (sizes[k], sizes[k + 1]);
        let z = linear::forward(
            &h,
            &get(&format!("{li}.weight")),
            Some(&get(&format!("{li}.bias"))),
            total,
            fi,
            fo,
        );
        let (mean, var) = vref::precise_stats(&[(&z, &[total, fo])], Layout::Nc).unwrap();
        let ctx = format!("BatchNorm {bi} seed={seed}");
        let e_m = max_rel_err(sd.get(&format!("{bi}.running_mean")).unwrap(), &mean);
        let e_v = max_rel_err(sd.get(&format!("{bi}.running_var")).unwrap(), &var);
        println!("precise mlp {ctx}: mean {e_m:.1e} var {e_v:.1e}");
        assert!(e_m <= TOL && e_v <= TOL, "{ctx}: mean {e_m} var {e_v}");
        let mut r = RunningStats {
            mean,
            var,
            num_batches_tracked: 0,
        };
        let y = bnref::forward(
            &z,
            &[total, fo],
            Layout::Nc,
            None,
            None,
            Some(&mut r),
            false,
            None,
            1e-5,
        )
        .unwrap();
        h = sigmoid::forward(&y.y);
    }
    assert!(model
        .layers
        .iter()
        .all(|l| !matches!(l, Layer::BatchNorm { bn, .. } if bn.is_training())));
    assert!(matches!(
        precise::precise_bn_mlp(&gpu, &mut model, &[&[1.0; 12]]),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn variant_kernels_reject_bad_buffers() {
    use batchnorm::ops::batchnorm::BufferRef;
    use batchnorm::ops::bn_variants::BnVariantOp;
    let gpu = gpu();
    let op = BnVariantOp::new(&gpu, &[2, 3, 5], Layout::Nchw).unwrap();
    let t = gpu.upload("t", &[0.0f32; 64]).unwrap();
    let small = gpu.upload("small", &[0.0f32; 5]).unwrap();
    let mut enc = gpu.encoder("bad");
    let misaligned = BufferRef {
        buffer: &t,
        offset: 4,
    };
    assert!(matches!(
        op.record_channel_affine(&mut enc, misaligned, (&t).into()),
        Err(Error::BadConfig(_))
    ));
    // coef needs 2C = 6 values.
    assert!(matches!(
        op.record_channel_affine(&mut enc, (&t).into(), (&small).into()),
        Err(Error::ShapeMismatch { .. })
    ));
    let bad = Renorm {
        rmax: 0.9,
        dmax: 0.0,
    };
    let r = BufferRef::from(&t);
    assert!(matches!(
        op.record_renorm_coef(&mut enc, r, r, r, r, r, r, r, bad, 1e-5),
        Err(Error::BadConfig(_))
    ));
    assert!(matches!(
        op.record_precise_finish(&mut enc, r, 1, r, r),
        Err(Error::BadConfig(_))
    ));
    assert!(matches!(
        op.record_ghost_running(&mut enc, r, 6, 2, 10, r, r, f32::NAN, 1e-5),
        Err(Error::BadConfig(_))
    ));
    assert!(matches!(
        BnVariantOp::new(&gpu, &[2, 0, 5], Layout::Nchw),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn folded_conv2d_matches_conv_then_batchnorm_in_eval_mode() {
    use batchnorm::nn::{fold, Conv2d, Conv2dConfig, ParamSlot};
    use batchnorm::ops::batchnorm::BufferRef;
    let seed = seed();
    let mut rng = rng(seed);
    let gpu = gpu();
    let (n, cin, cout, h, w) = (3usize, 3usize, 5usize, 9usize, 7usize);
    for bias in [false, true] {
        let config = Conv2dConfig::new(cin, cout, 3)
            .stride(2)
            .padding(1)
            .bias(bias);
        let (ho, wo) = config.out_hw((h, w)).unwrap();
        let wlen = cout * cin * 9;
        // Arena: weight at 0, bias at a 256-byte boundary after it.
        let boff = wlen.div_ceil(64) * 64;
        let wslot = ParamSlot {
            name: "0.weight".into(),
            shape: config.weight_shape(),
            offset: 0,
        };
        let bslot = ParamSlot {
            name: "0.bias".into(),
            shape: vec![cout],
            offset: boff,
        };
        let mut arena = vec![0.0f32; boff + 64];
        arena[..wlen].copy_from_slice(&normal(&mut rng, wlen, 0.0, 0.3));
        if bias {
            arena[boff..boff + cout].copy_from_slice(&normal(&mut rng, cout, 0.0, 1.0));
        }
        let params = gpu.upload("arena", &arena).unwrap();
        let mut conv =
            Conv2d::new(&gpu, config, wslot.clone(), bias.then(|| bslot.clone())).unwrap();
        let (mut bn, ..) = layer(cout, BatchNormConfig::default(), &mut rng);
        bn.train(false);
        let x = normal(&mut rng, n * cin * h * w, 0.0, 1.0);
        let bx = gpu.upload("x", &x).unwrap();
        let ylen = n * cout * ho * wo;
        let by = gpu.upload("y", &vec![f32::NAN; ylen]).unwrap();
        let bz = gpu.upload("z", &vec![f32::NAN; ylen]).unwrap();
        let mut enc = gpu.encoder("conv-bn");
        conv.record_forward(&mut enc, &params, (&bx).into(), (&by).into(), n, (h, w))
            .unwrap();
        let yshape = [n, cout, ho, wo];
        bn.record_forward(&mut enc, (&by).into(), (&bz).into(), &yshape, Layout::Nchw)
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let want: Vec<f32> = gpu.download(&bz, 0, ylen).unwrap();

        let (fw, fb) = fold::folded_conv2d(&gpu, &params, &conv, &bn).unwrap();
        let mut farena = vec![0.0f32; boff + 64];
        farena[..wlen].copy_from_slice(&fw);
        farena[boff..boff + cout].copy_from_slice(&fb);
        let fparams = gpu.upload("folded arena", &farena).unwrap();
        let mut fconv =
            Conv2d::new(&gpu, config.bias(true), wslot.clone(), Some(bslot.clone())).unwrap();
        let run_conv = |c: &mut Conv2d, p: &wgpu::Buffer| {
            let out = gpu.upload("out", &vec![f32::NAN; ylen]).unwrap();
            let mut enc = gpu.encoder("folded conv");
            let o = BufferRef::from(&out);
            c.record_forward(&mut enc, p, (&bx).into(), o, n, (h, w))
                .unwrap();
            gpu.submit_and_wait(enc).unwrap();
            gpu.download::<f32>(&out, 0, ylen).unwrap()
        };
        let got = run_conv(&mut fconv, &fparams);
        let e = max_rel_err(&got, &f64s(&want));
        println!("fold conv2d bias={bias}: max rel err {e:.1e} seed={seed}");
        assert!(
            e <= TOL,
            "folded conv (bias={bias}) vs conv+BN, seed={seed}: {e}"
        );
        if bias {
            fold::fold_into_conv2d(&gpu, &params, &conv, &bn).unwrap();
            let e = max_rel_err(&run_conv(&mut conv, &params), &f64s(&want));
            assert!(
                e <= TOL,
                "in-place folded conv vs conv+BN, seed={seed}: {e}"
            );
        } else {
            assert!(matches!(
                fold::fold_into_conv2d(&gpu, &params, &conv, &bn),
                Err(Error::BadConfig(_))
            ));
        }
    }
}

/// The variants inside the training engine: Ioffe's MNIST MLP (every BatchNorm switched to the variant)
/// trains on 3 000 shipped MNIST images for 75 steps; the loss must fall and the test accuracy on 1 000
/// images must be well above chance. Then, as Wu & Johnson use it, the Renorm-trained model continues 25
/// steps with FrozenBN (its running statistics must not move, its accuracy must hold), and the ghost-BN
/// model is recalibrated with PreciseBN over 1 000 training images (its accuracy must hold). Thresholds
/// are loose (a smoke test of the wiring; exactness is the other tests' job) but a variant that breaks
/// training or yields NaN fails them.
#[test]
fn variants_train_the_mnist_mlp() {
    use batchnorm::data::{self, Batcher, DatasetKind, Normalization};
    use batchnorm::nn::{precise, Layer, MlpConfig};
    use batchnorm::ops::sgd::SgdConfig;
    use batchnorm::train::Trainer;
    let gpu = gpu();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let mut d = data::load(DatasetKind::Mnist, &dir).unwrap();
    d.train.truncate(3000);
    d.test.truncate(1000);
    let norm = Normalization::Unit;
    let schedule = RenormSchedule {
        warmup: 10,
        rmax_end: 60,
        rmax_final: 3.0,
        dmax_end: 50,
        dmax_final: 5.0,
    };
    let each_bn = |t: &mut Trainer, f: &mut dyn FnMut(&mut BatchNorm)| {
        for layer in t.model.layers.iter_mut() {
            if let Layer::BatchNorm { bn, .. } = layer {
                f(bn);
            }
        }
    };
    for variant in ["ghost V=15", "renorm"] {
        let mut t =
            Trainer::new(&gpu, &MlpConfig::ioffe(true, 7), SgdConfig::default(), 1000).unwrap();
        let mut batcher = Batcher::new(d.train.len(), 60, 7).unwrap();
        let mut windows = Vec::new();
        for step in 0..75u64 {
            each_bn(&mut t, &mut |bn| match variant {
                "renorm" => bn.set_renorm(Some(schedule.at(step))).unwrap(),
                _ => bn.set_virtual_batch_size(Some(15)).unwrap(),
            });
            t.train_step_on(&d.train, batcher.batch(step), norm)
                .unwrap();
            if (step + 1) % 25 == 0 {
                windows.push(t.take_stats().unwrap().mean_loss);
            }
        }
        let (first, last) = (windows[0], *windows.last().unwrap());
        let (_, acc) = t.evaluate(&d.test, norm).unwrap();
        println!("train {variant}: loss windows {windows:.3?}, test accuracy {acc:.4}");
        assert!(
            last.is_finite() && last < 0.6 * first,
            "{variant}: loss did not fall: {windows:?}"
        );
        assert!(acc > 0.75, "{variant}: test accuracy {acc}");
        if variant.starts_with("ghost") {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            let batches: Vec<Vec<f32>> = (0..4)
                .map(|k| {
                    let idx: Vec<usize> = (k * 250..(k + 1) * 250).collect();
                    d.train.gather(&idx, norm, &mut x, &mut y);
                    x.clone()
                })
                .collect();
            let refs: Vec<&[f32]> = batches.iter().map(|b| b.as_slice()).collect();
            precise::precise_bn_mlp(&gpu, &mut t.model, &refs).unwrap();
            let (_, acc_precise) = t.evaluate(&d.test, norm).unwrap();
            println!(
                "train {variant} + PreciseBN over 1000 images: test accuracy {acc_precise:.4}"
            );
            assert!(
                acc_precise > acc - 0.05,
                "PreciseBN lost accuracy: {acc} -> {acc_precise}"
            );
        } else {
            let mut before = Vec::new();
            each_bn(&mut t, &mut |bn| {
                bn.set_renorm(None).unwrap();
                bn.set_frozen(true).unwrap();
                before.push(bn.read(bn.running_mean.as_ref().unwrap()).unwrap());
            });
            for step in 75..100u64 {
                t.train_step_on(&d.train, batcher.batch(step), norm)
                    .unwrap();
            }
            let loss = t.take_stats().unwrap().mean_loss;
            let mut after = Vec::new();
            each_bn(&mut t, &mut |bn| {
                after.push(bn.read(bn.running_mean.as_ref().unwrap()).unwrap())
            });
            let (_, acc_frozen) = t.evaluate(&d.test, norm).unwrap();
            println!("then 25 steps FrozenBN: loss {loss:.3}, test accuracy {acc_frozen:.4}");
            assert!(
                loss.is_finite() && loss < first,
                "FrozenBN phase loss {loss}"
            );
            assert!(
                acc_frozen > acc - 0.05,
                "FrozenBN lost accuracy: {acc} -> {acc_frozen}"
            );
            assert_eq!(before, after, "FrozenBN moved the running statistics");
        }
    }
}
