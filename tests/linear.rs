//! Linear op (forward, backward) against the f64 reference on awkward shapes, for each matmul kernel
//! (the subgroup one where the adapter has subgroups of at least 8 lanes, as lavapipe does).
//!
//! Fresh random inputs each run (seed printed on failure; BN_TEST_SEED replays one); outputs poisoned
//! with NaN first. Tolerance: max |gpu − ref| / max(1, max |ref|) <= 1e-5 per output (f32 sums of up to
//! 784 products against f64).

mod common;

use batchnorm::error::Error;
use batchnorm::gpu::Gpu;
use batchnorm::ops::linear::{LinearOp, MatmulKernel};
use batchnorm::reference::linear as reference;
use common::*;

const TOL: f64 = 1e-5;

/// The kernels this adapter runs; asking for the subgroup kernel where it cannot run is an error.
fn kernels(gpu: &std::sync::Arc<Gpu>) -> Vec<MatmulKernel> {
    let op = LinearOp::new(gpu, 2, 3, 4).unwrap();
    if MatmulKernel::subgroup_available(gpu) {
        assert_eq!(
            op.kernel(),
            MatmulKernel::Subgroup,
            "Auto picks the subgroup kernel"
        );
        vec![MatmulKernel::Blocked, MatmulKernel::Subgroup]
    } else {
        assert_eq!(op.kernel(), MatmulKernel::Blocked);
        let err = op.with_kernel(MatmulKernel::Subgroup).unwrap_err();
        assert!(err.to_string().contains("subgroup"), "{err}");
        vec![MatmulKernel::Blocked]
    }
}

fn check(n: usize, i: usize, o: usize, seed: u64, kernel: MatmulKernel) {
    let gpu = gpu();
    let mut r = rng(seed);
    let x = normal(&mut r, n * i, 0.0, 1.0);
    let w = normal(&mut r, o * i, 0.0, 0.5);
    let b = normal(&mut r, o, 0.0, 1.0);
    let dy = normal(&mut r, n * o, 0.0, 1.0);
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let (xb, wb, bb, dyb) = (up(&x), up(&w), up(&b), up(&dy));
    let (yb, dxb, dwb, dbb) = (
        up(&vec![f32::NAN; n * o]),
        up(&vec![f32::NAN; n * i]),
        up(&vec![f32::NAN; o * i]),
        up(&vec![f32::NAN; o]),
    );
    let op = LinearOp::new(&gpu, n, i, o)
        .unwrap()
        .with_kernel(kernel)
        .unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        Some((&bb).into()),
        (&yb).into(),
    )
    .unwrap();
    op.record_backward(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        (&dyb).into(),
        Some((&dxb).into()),
        (&dwb).into(),
        Some((&dbb).into()),
    )
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let (x64, w64, b64, dy64) = (f64s(&x), f64s(&w), f64s(&b), f64s(&dy));
    let y_ref = reference::forward(&x64, &w64, Some(&b64), n, i, o);
    let g = reference::backward(&x64, &w64, &dy64, n, i, o);
    for (name, buf, want) in [
        ("y", &yb, &y_ref),
        ("dx", &dxb, &g.dx),
        ("dweight", &dwb, &g.dweight),
        ("dbias", &dbb, &g.dbias),
    ] {
        let got: Vec<f32> = gpu.download(buf, 0, want.len()).unwrap();
        let err = max_err_scaled(&got, want);
        assert!(
            err <= TOL,
            "{name} of [{n},{i}]->[{n},{o}] ({kernel:?}): error {err:e} > {TOL:e} (seed {seed})"
        );
    }
}

#[test]
fn linear_matches_reference_on_awkward_shapes() {
    let seed = seed();
    for &(n, i, o) in &[
        (1, 1, 1),
        (1, 5, 3),
        (7, 13, 5),
        (17, 31, 10),
        (3, 100, 1),
        (60, 784, 100),
        (60, 100, 10),
        (37, 16, 16),
        (251, 97, 33),
        // Just past the subgroup kernel's 32-row and 64-column blocks.
        (33, 65, 129),
        (65, 3, 64),
        // K a multiple of 4 (the forward takes matmul_dot): one step of K, and past its 64-row and
        // 16-column blocks (32-column blocks on CPU devices past 32 outputs: one column past 32 and 64).
        (1, 4, 1),
        (65, 4, 9),
        (64, 8, 16),
        (130, 20, 17),
        (129, 36, 33),
        (70, 12, 65),
        // 4 dividing in_features (dx and dW take matmul_outer; a short last group of K where 4 does not
        // divide out_features or the batch, as in (65, 4, 9), (3, 100, 1), (60, 100, 10)): one step of
        // K, and past its 16-row and 64-column blocks.
        (4, 4, 4),
        (20, 68, 36),
        (132, 132, 20),
        // 4 dividing out_features too: a short last group of the batch (dW's K), out_features past
        // dW's 16-row block by one group of 4.
        (65, 8, 20),
    ] {
        for kernel in kernels(&gpu()) {
            check(n, i, o, seed, kernel);
        }
    }
}

#[test]
fn linear_without_bias_and_dx() {
    let seed = seed();
    let gpu = gpu();
    for kernel in kernels(&gpu) {
        without_bias_and_dx(&gpu, seed, kernel);
    }
}

fn without_bias_and_dx(gpu: &std::sync::Arc<Gpu>, seed: u64, kernel: MatmulKernel) {
    let (n, i, o) = (11, 23, 7);
    let mut r = rng(seed);
    let x = normal(&mut r, n * i, 0.0, 1.0);
    let w = normal(&mut r, o * i, 0.0, 1.0);
    let dy = normal(&mut r, n * o, 0.0, 1.0);
    let (xb, wb, dyb) = (
        gpu.upload("x", &x).unwrap(),
        gpu.upload("w", &w).unwrap(),
        gpu.upload("dy", &dy).unwrap(),
    );
    let yb = gpu.upload("y", &vec![f32::NAN; n * o]).unwrap();
    let dwb = gpu.upload("dw", &vec![f32::NAN; o * i]).unwrap();
    let op = LinearOp::new(gpu, n, i, o)
        .unwrap()
        .with_kernel(kernel)
        .unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(&mut enc, (&xb).into(), (&wb).into(), None, (&yb).into())
        .unwrap();
    op.record_backward(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        (&dyb).into(),
        None,
        (&dwb).into(),
        None,
    )
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let y: Vec<f32> = gpu.download(&yb, 0, n * o).unwrap();
    let dw: Vec<f32> = gpu.download(&dwb, 0, o * i).unwrap();
    let (x64, w64) = (f64s(&x), f64s(&w));
    assert!(
        max_err_scaled(&y, &reference::forward(&x64, &w64, None, n, i, o)) <= TOL,
        "{kernel:?} seed {seed}"
    );
    let g = reference::backward(&x64, &w64, &f64s(&dy), n, i, o);
    assert!(
        max_err_scaled(&dw, &g.dweight) <= TOL,
        "{kernel:?} seed {seed}"
    );
}

/// A network's first layer: dW and db without dx (db comes out of the dW kernel, written once per row
/// of dW by the blocks of its first column block: rows past a block, several column blocks).
#[test]
fn linear_bias_grad_without_dx() {
    let seed = seed();
    let gpu = gpu();
    for &(n, i, o) in &[(60, 784, 100), (33, 65, 129), (5, 200, 17), (1, 1, 1)] {
        for kernel in kernels(&gpu) {
            let mut r = rng(seed ^ (n * i * o) as u64);
            let x = normal(&mut r, n * i, 0.0, 1.0);
            let w = normal(&mut r, o * i, 0.0, 1.0);
            let dy = normal(&mut r, n * o, 2.0, 1.0);
            let up = |v: &[f32]| gpu.upload("t", v).unwrap();
            let (xb, wb, dyb) = (up(&x), up(&w), up(&dy));
            let dwb = up(&vec![f32::NAN; o * i]);
            let dbb = up(&vec![f32::NAN; o]);
            let op = LinearOp::new(&gpu, n, i, o)
                .unwrap()
                .with_kernel(kernel)
                .unwrap();
            let mut enc = gpu.encoder("test");
            op.record_backward(
                &mut enc,
                (&xb).into(),
                (&wb).into(),
                (&dyb).into(),
                None,
                (&dwb).into(),
                Some((&dbb).into()),
            )
            .unwrap();
            gpu.submit_and_wait(enc).unwrap();
            let g = reference::backward(&f64s(&x), &f64s(&w), &f64s(&dy), n, i, o);
            for (name, buf, want) in [("dweight", &dwb, &g.dweight), ("dbias", &dbb, &g.dbias)] {
                let got: Vec<f32> = gpu.download(buf, 0, want.len()).unwrap();
                let err = max_err_scaled(&got, want);
                assert!(
                    err <= TOL,
                    "{name} of [{n},{i}]->[{n},{o}] without dx ({kernel:?}): error {err:e} (seed {seed})"
                );
            }
        }
    }
}

/// Records a backward with dx on `gpu` (through the sigmoid's derivative when `through_sigmoid`, with db
/// when `with_db`) on fresh inputs and outputs poisoned with NaN, and checks dx, dW (and db) against the
/// f64 reference. `what` names the case in the failure message.
#[allow(clippy::too_many_arguments)]
fn check_backward(
    gpu: &std::sync::Arc<Gpu>,
    (n, i, o): (usize, usize, usize),
    seed: u64,
    kernel: MatmulKernel,
    through_sigmoid: bool,
    with_db: bool,
    what: &str,
) {
    let mut r = rng(seed ^ (n * i * o) as u64 ^ u64::from(through_sigmoid));
    let x: Vec<f32> = normal(&mut r, n * i, 0.0, 2.0)
        .iter()
        .map(|&v| {
            if through_sigmoid {
                1.0 / (1.0 + (-v).exp())
            } else {
                v
            }
        })
        .collect();
    let w = normal(&mut r, o * i, 0.0, 1.0);
    let dy = normal(&mut r, n * o, 0.5, 1.0);
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let (xb, wb, dyb) = (up(&x), up(&w), up(&dy));
    let (dxb, dwb, dbb) = (
        up(&vec![f32::NAN; n * i]),
        up(&vec![f32::NAN; o * i]),
        up(&vec![f32::NAN; o]),
    );
    let op = LinearOp::new(gpu, n, i, o)
        .unwrap()
        .with_kernel(kernel)
        .unwrap();
    let mut enc = gpu.encoder("test");
    let (x_ref, w_ref, dy_ref) = ((&xb).into(), (&wb).into(), (&dyb).into());
    let db_ref = with_db.then(|| (&dbb).into());
    if through_sigmoid {
        op.record_backward_through_sigmoid(
            &mut enc,
            x_ref,
            w_ref,
            dy_ref,
            (&dxb).into(),
            (&dwb).into(),
            db_ref,
        )
    } else {
        op.record_backward(
            &mut enc,
            x_ref,
            w_ref,
            dy_ref,
            Some((&dxb).into()),
            (&dwb).into(),
            db_ref,
        )
    }
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let x64 = f64s(&x);
    let g = reference::backward(&x64, &f64s(&w), &f64s(&dy), n, i, o);
    let dx_want: Vec<f64> = if through_sigmoid {
        g.dx.iter()
            .zip(&x64)
            .map(|(d, s)| d * s * (1.0 - s))
            .collect()
    } else {
        g.dx.clone()
    };
    let mut outputs = vec![("dx", &dxb, &dx_want), ("dweight", &dwb, &g.dweight)];
    if with_db {
        outputs.push(("dbias", &dbb, &g.dbias));
    }
    for (name, buf, want) in outputs {
        let got: Vec<f32> = gpu.download(buf, 0, want.len()).unwrap();
        let err = max_err_scaled(&got, want);
        assert!(
            err <= TOL,
            "{name} of [{n},{i}]->[{n},{o}] {what}, sigmoid {through_sigmoid} ({kernel:?}): \
             error {err:e} (seed {seed})"
        );
    }
}

/// dx and dW without db, plain and through a sigmoid (with the subgroup kernel, the two products run in
/// one dispatch, and its second half then skips the row sums): a layer without bias.
#[test]
fn linear_dx_and_dweight_without_bias_grad() {
    let seed = seed();
    let gpu = gpu();
    for &shape in &[(60, 100, 100), (33, 65, 129), (7, 13, 5), (1, 1, 1)] {
        for kernel in kernels(&gpu) {
            for through_sigmoid in [false, true] {
                check_backward(
                    &gpu,
                    shape,
                    seed,
                    kernel,
                    through_sigmoid,
                    false,
                    "without db",
                );
            }
        }
    }
}

/// On a device allowing 6 storage buffers per shader stage the subgroup kernels run dx and dW one
/// dispatch each (the paired dispatch binds up to 8): same results, plain and through the sigmoid.
#[test]
fn linear_backward_unpaired_on_a_device_with_six_storage_buffers() {
    let gpu = std::sync::Arc::new(
        Gpu::with_limits(|l| l.max_storage_buffers_per_shader_stage = 6).expect("device"),
    );
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    assert_eq!(
        LinearOp::new(&gpu, 2, 4, 4).unwrap().kernel(),
        MatmulKernel::Subgroup
    );
    let seed = seed();
    for &shape in &[(60, 100, 100), (33, 65, 129), (20, 68, 36)] {
        for through_sigmoid in [false, true] {
            check_backward(
                &gpu,
                shape,
                seed,
                MatmulKernel::Subgroup,
                through_sigmoid,
                true,
                "unpaired",
            );
        }
    }
}

/// The backward of Linear ∘ Sigmoid (the sigmoid's backward in the dx product's stores): dz = (dy W) ⊙
/// s ⊙ (1 − s) for the layer's input s, against the f64 reference of the two steps; dW and db unchanged.
#[test]
fn linear_backward_through_sigmoid() {
    let seed = seed();
    let gpu = gpu();
    for &(n, i, o) in &[
        (60, 100, 100),
        (60, 100, 10),
        (33, 65, 129),
        (7, 13, 5),
        (1, 1, 1),
        // matmul_outer with s read as vec4s: K a multiple of 4, and short last groups of K (dx's K = o,
        // dW's K = n), fewer than 4 steps in all, past the 16x64 block.
        (20, 68, 36),
        (65, 4, 9),
        (3, 100, 1),
        (130, 132, 17),
    ] {
        for kernel in kernels(&gpu) {
            let mut r = rng(seed ^ (n * i * o) as u64);
            let s: Vec<f32> = normal(&mut r, n * i, 0.0, 2.0)
                .iter()
                .map(|&v| 1.0 / (1.0 + (-v).exp()))
                .collect();
            let w = normal(&mut r, o * i, 0.0, 1.0);
            let dy = normal(&mut r, n * o, 0.0, 1.0);
            let up = |v: &[f32]| gpu.upload("t", v).unwrap();
            let (sb, wb, dyb) = (up(&s), up(&w), up(&dy));
            let (dzb, dwb, dbb) = (
                up(&vec![f32::NAN; n * i]),
                up(&vec![f32::NAN; o * i]),
                up(&vec![f32::NAN; o]),
            );
            let op = LinearOp::new(&gpu, n, i, o)
                .unwrap()
                .with_kernel(kernel)
                .unwrap();
            let mut enc = gpu.encoder("test");
            op.record_backward_through_sigmoid(
                &mut enc,
                (&sb).into(),
                (&wb).into(),
                (&dyb).into(),
                (&dzb).into(),
                (&dwb).into(),
                Some((&dbb).into()),
            )
            .unwrap();
            gpu.submit_and_wait(enc).unwrap();
            let s64 = f64s(&s);
            let g = reference::backward(&s64, &f64s(&w), &f64s(&dy), n, i, o);
            let dz: Vec<f64> =
                g.dx.iter()
                    .zip(&s64)
                    .map(|(d, s)| d * s * (1.0 - s))
                    .collect();
            for (name, buf, want) in [
                ("dz", &dzb, &dz),
                ("dweight", &dwb, &g.dweight),
                ("dbias", &dbb, &g.dbias),
            ] {
                let got: Vec<f32> = gpu.download(buf, 0, want.len()).unwrap();
                let err = max_err_scaled(&got, want);
                assert!(
                    err <= TOL,
                    "{name} of [{n},{i}]->[{n},{o}] through sigmoid ({kernel:?}): error {err:e} (seed {seed})"
                );
            }
        }
    }
}

#[test]
fn linear_rejects_small_buffers_and_zero_sizes() {
    let gpu = gpu();
    assert!(LinearOp::new(&gpu, 0, 3, 3).is_err());
    let op = LinearOp::new(&gpu, 4, 8, 2).unwrap();
    let small = gpu.upload("small", &[0.0f32; 8]).unwrap();
    let big = gpu.upload("big", &[0.0f32; 64]).unwrap();
    let mut enc = gpu.encoder("test");
    let err = op
        .record_forward(
            &mut enc,
            (&small).into(),
            (&big).into(),
            None,
            (&big).into(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("linear x"), "{err}");
}

/// Sums over more than `LOOP_K_MAX` terms on a CPU device: lavapipe stops an invocation's loops after
/// 65 535 iterations, so dW over 70 000 rows came out 0 where it should be 4 465 (rows 65 535 and up
/// dropped). Refused with LimitExceeded there; a forward over the same rows (its sums run over 5 inputs)
/// still runs, and is checked against the f64 product (max |gpu − ref| / max(1, max |ref|) <= 1e-5).
#[test]
fn sums_past_lavapipes_loop_limit_are_refused() {
    use batchnorm::ops::linear::LOOP_K_MAX;
    let gpu = gpu();
    let mut r = rng(seed());
    let (n, i, o) = (LOOP_K_MAX + 5_000, 5, 3);
    let x = normal(&mut r, n * i, 0.0, 1.0);
    let w = normal(&mut r, o * i, 0.0, 1.0);
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let (xb, wb, dyb) = (up(&x), up(&w), up(&vec![1.0; n * o]));
    let (yb, dwb) = (up(&vec![f32::NAN; n * o]), up(&vec![f32::NAN; o * i]));
    let op = LinearOp::new(&gpu, n, i, o).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward(&mut enc, (&xb).into(), (&wb).into(), None, (&yb).into())
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let y: Vec<f32> = gpu.download(&yb, 0, n * o).unwrap();
    let want = reference::forward(&f64s(&x), &f64s(&w), None, n, i, o);
    let err = max_err_scaled(&y, &want);
    assert!(err <= 1e-5, "forward over {n} rows: error {err:e}");
    let mut enc = gpu.encoder("test");
    let got = op.record_backward(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        (&dyb).into(),
        None,
        (&dwb).into(),
        None,
    );
    if gpu.caps().cpu_device {
        match got {
            Err(Error::LimitExceeded { what, needed, .. }) => {
                assert!(what.contains("batch rows"), "{what}");
                assert_eq!(needed, n as u64);
            }
            other => panic!("dW over {n} rows: expected LimitExceeded, got {other:?}"),
        }
        let wide = LinearOp::new(&gpu, 2, LOOP_K_MAX + 1, 2).unwrap();
        let x = up(&vec![0.0; 2 * (LOOP_K_MAX + 1)]);
        let w = up(&vec![0.0; 2 * (LOOP_K_MAX + 1)]);
        let y = up(&[0.0; 4]);
        let mut enc = gpu.encoder("test");
        let got = wide.record_forward(&mut enc, (&x).into(), (&w).into(), None, (&y).into());
        assert!(
            matches!(got, Err(Error::LimitExceeded { .. })),
            "forward over {} inputs: {got:?}",
            LOOP_K_MAX + 1
        );
    } else {
        got.unwrap();
    }
}
