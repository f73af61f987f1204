//! Fused softmax cross-entropy and accuracy against the f64 reference (fresh random inputs, seed printed
//! on failure, NaN-poisoned outputs). Tolerances: dlogits max |gpu − ref| / (1 + |ref|) <= 1e-6; loss
//! relative error <= 1e-5; the correct count exact.

mod common;

use batchnorm::ops::softmax_xent::{SoftmaxXentOp, STATS_LEN};
use batchnorm::reference::softmax_xent as reference;
use batchnorm::Error;
use common::*;
use rand::Rng;

/// The training form (dlogits poisoned with NaN, the sums starting from `stats`) and the eval form (sums
/// from 0) on `logits`: (dlogits, training stats, eval stats).
fn run(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    stats: [f32; STATS_LEN],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    let rows = labels.len();
    let zb = gpu.upload("z", logits).unwrap();
    let lb = gpu.upload("labels", labels).unwrap();
    let db = gpu.upload("dz", &vec![f32::NAN; rows * classes]).unwrap();
    let sb = gpu.upload("stats", &stats).unwrap();
    let eb = gpu.upload("eval stats", &[0.0f32; STATS_LEN]).unwrap();
    let op = SoftmaxXentOp::new(&gpu, rows, classes).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_train(
        &mut enc,
        (&zb).into(),
        (&lb).into(),
        (&db).into(),
        (&sb).into(),
    )
    .unwrap();
    op.record_eval(&mut enc, (&zb).into(), (&lb).into(), (&eb).into())
        .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    (
        gpu.download(&db, 0, rows * classes).unwrap(),
        gpu.download(&sb, 0, STATS_LEN).unwrap(),
        gpu.download(&eb, 0, STATS_LEN).unwrap(),
    )
}

#[test]
fn softmax_xent_matches_reference() {
    let seed = seed();
    let mut r = rng(seed);
    for &(rows, classes) in &[
        (1usize, 2usize),
        (7, 3),
        (60, 10),
        (64, 10),
        (65, 10),
        (1000, 10),
        (13, 97),
        // Just under lavapipe's loop budget: 19 rows of 3 000 class iterations per invocation.
        (1216, 1000),
    ] {
        let mut logits = normal(&mut r, rows * classes, 0.0, 3.0);
        // A large offset on one row: the max-subtraction must keep it finite.
        logits[0] += 500.0;
        let labels: Vec<u32> = (0..rows)
            .map(|_| r.random_range(0..classes as u32))
            .collect();
        // Start the sums from non-zero values: the kernel must add to them.
        let (dz, s, e) = run(&logits, &labels, classes, [f32::NAN, 1.0, 2.0, 3.0]);
        let want = reference::forward_backward(&f64s(&logits), &labels, classes);
        let ctx = format!("[{rows}, {classes}] (seed {seed})");
        let edz = max_rel_err(&dz, &want.dlogits);
        assert!(edz <= 1e-6, "dlogits {ctx}: {edz:e}");
        let rel = |got: f32, want: f64| (got as f64 - want).abs() / want.abs().max(1e-3);
        assert!(
            rel(s[0], want.loss) <= 1e-5,
            "loss {ctx}: {} vs {}",
            s[0],
            want.loss
        );
        assert!(
            rel(s[1] - 1.0, want.loss * rows as f64) <= 1e-5,
            "loss sum {ctx}"
        );
        assert_eq!(s[2] - 2.0, want.correct as f32, "correct {ctx}");
        assert_eq!(s[3] - 3.0, rows as f32, "rows {ctx}");
        assert!(
            rel(e[1], want.loss * rows as f64) <= 1e-5,
            "eval loss sum {ctx}"
        );
        assert_eq!(e[2], want.correct as f32, "eval correct {ctx}");
        assert_eq!(e[3], rows as f32, "eval rows {ctx}");
    }
}

/// Large logits keep the loss's precision: (max − logit) + log(sum), not (max + log(sum)) − logit, which
/// rounds to max's ulp (0.69336 for the first row below, PyTorch 0.6931472); and torch.argmax's rule for
/// NaN (the first NaN is the prediction). Both kernels: the loss alone and the head fused with the loss.
#[test]
fn softmax_xent_large_logits_and_nan_as_pytorch() {
    let classes = 4;
    #[rustfmt::skip]
    let logits = [
        1e4, -1e4, 0.0, 1e4,
        -1e4, -1e4, -1e4, -1e4,
        88.0, 89.0, 90.0, 100.0,
        3e4, 3e4 - 1.0, 0.0, 2e4,
    ];
    let labels = [3u32, 0, 2, 1];
    let (dz, s, _) = run(&logits, &labels, classes, [0.0; STATS_LEN]);
    let want = reference::forward_backward(&f64s(&logits), &labels, classes);
    // PyTorch 2.15's float32 cross_entropy of the rows, each alone: 0.6931472, 1.3862944, 10.000068,
    // 1.3132616.
    let torch = (std::f64::consts::LN_2 + 1.3862944 + 10.000068 + 1.3132616) / 4.0;
    assert!((want.loss - torch).abs() <= 1e-6, "reference {}", want.loss);
    assert!(
        (s[0] as f64 - want.loss).abs() <= 1e-6 * want.loss,
        "loss {} vs {}",
        s[0],
        want.loss
    );
    let e = max_rel_err(&dz, &want.dlogits);
    assert!(e <= 1e-6, "dlogits error {e:e}");

    // NaN logits: the first NaN is the prediction (row 0 right, row 1 wrong), as torch.argmax.
    let nan = f32::NAN;
    let logits = [0.0, nan, 1.0, nan, nan, 5.0, 1.0, 0.0];
    let labels = [1u32, 1];
    let want = reference::forward_backward(&f64s(&logits), &labels, 4);
    assert_eq!(want.correct, 1);
    let (_, _, e) = run(&logits, &labels, 4, [0.0; STATS_LEN]);
    assert!(e[1].is_nan(), "the loss sum is NaN");
    assert_eq!(e[2], 1.0, "correct predictions");
}

/// A label past the classes (PyTorch raises; the labels are on the device, where a kernel cannot): its row's
/// loss and dlogits are NaN and it is not correct; the other rows are as the reference, so the batch's
/// loss is NaN and a training run stops on it instead of training on a clamped class.
#[test]
fn labels_past_the_classes_give_nan_rows() {
    let seed = seed();
    let mut r = rng(seed);
    for &(rows, classes) in &[(2usize, 2usize), (60, 10), (70, 3)] {
        let logits = normal(&mut r, rows * classes, 0.0, 3.0);
        let mut labels: Vec<u32> = (0..rows)
            .map(|_| r.random_range(0..classes as u32))
            .collect();
        let bad = r.random_range(0..rows);
        labels[bad] = [classes as u32, classes as u32 + 1, u32::MAX][r.random_range(0..3)];
        let ctx = format!(
            "[{rows}, {classes}], label {} at row {bad} (seed {seed})",
            labels[bad]
        );
        let (dz, s, e) = run(&logits, &labels, classes, [0.0; STATS_LEN]);
        let want = reference::forward_backward(&f64s(&logits), &labels, classes);
        assert!(want.loss.is_nan(), "reference {ctx}");
        let row = bad * classes..(bad + 1) * classes;
        assert!(
            dz[row.clone()].iter().all(|v| v.is_nan()),
            "dlogits of the row {ctx}"
        );
        for (i, (&g, &w)) in dz.iter().zip(&want.dlogits).enumerate() {
            if !row.contains(&i) {
                let err = (g as f64 - w).abs() / (1.0 + w.abs());
                assert!(err <= 1e-6, "dlogits[{i}] {g} vs {w} {ctx}");
            }
        }
        assert!(s[0].is_nan() && s[1].is_nan(), "training loss {ctx}: {s:?}");
        assert!(e[1].is_nan(), "eval loss {ctx}: {e:?}");
        assert_eq!(s[2], want.correct as f32, "correct {ctx}");
        assert_eq!(e[2], want.correct as f32, "eval correct {ctx}");
        assert_eq!((s[3], e[3]), (rows as f32, rows as f32), "rows {ctx}");
    }
}

/// The head fused with the loss keeps large logits' precision too: W = 0 and a bias of [1e4, −1e4, 0, 1e4]
/// give every row the loss ln 2 for label 3 (before: 0.69336, max + log(sum) rounded to 1e4's ulp).
#[test]
fn linear_head_with_loss_keeps_large_logits_precise() {
    use batchnorm::ops::linear::{LinearOp, MatmulKernel};
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    let (n, i, o) = (5usize, 4usize, 4usize);
    let up = |v: &[f32]| gpu.upload("t", v).unwrap();
    let (xb, wb, bb) = (
        up(&vec![1.0; n * i]),
        up(&vec![0.0; o * i]),
        up(&[1e4, -1e4, 0.0, 1e4]),
    );
    let labels = vec![3u32; n];
    let lb = gpu.upload("labels", &labels).unwrap();
    let (zb, db) = (up(&vec![f32::NAN; n * o]), up(&vec![f32::NAN; n * o]));
    let sb = up(&[0.0; STATS_LEN]);
    let op = LinearOp::new(&gpu, n, i, o).unwrap();
    let mut enc = gpu.encoder("test");
    op.record_forward_xent(
        &mut enc,
        (&xb).into(),
        (&wb).into(),
        Some((&bb).into()),
        (&zb).into(),
        (&lb).into(),
        (&db).into(),
        (&sb).into(),
    )
    .unwrap();
    gpu.submit_and_wait(enc).unwrap();
    let stats: Vec<f32> = gpu.download(&sb, 0, STATS_LEN).unwrap();
    let ln2 = std::f64::consts::LN_2;
    assert!(
        (stats[0] as f64 - ln2).abs() <= 1e-6,
        "loss {} vs ln 2",
        stats[0]
    );
    let logits: Vec<f32> = gpu.download(&zb, 0, n * o).unwrap();
    let want = reference::forward_backward(&f64s(&logits), &labels, o);
    assert!((want.loss - ln2).abs() <= 1e-12, "reference {}", want.loss);
    let dz: Vec<f32> = gpu.download(&db, 0, n * o).unwrap();
    let e = max_rel_err(&dz, &want.dlogits);
    assert!(e <= 1e-6, "dlogits error {e:e}");
}

/// Past lavapipe's loop limit (ARCHITECTURE.md, "Known limits") the one-workgroup kernel would stop short
/// silently: refused on a CPU device.
#[test]
fn softmax_xent_past_lavapipes_loop_limit_is_refused() {
    let gpu = gpu();
    if !gpu.caps().cpu_device {
        return; // GPUs have no such limit.
    }
    for (rows, classes) in [(1300, 1000), (200_000, 10), (1, 30_000)] {
        let e = SoftmaxXentOp::new(&gpu, rows, classes).unwrap_err();
        assert!(
            matches!(e, Error::LimitExceeded { .. }) && e.to_string().contains("softmax"),
            "[{rows}, {classes}]: {e}"
        );
    }
}

#[test]
fn softmax_xent_rejects_one_class() {
    assert!(SoftmaxXentOp::new(&gpu(), 4, 1).is_err());
}

/// A head's forward and the loss in one dispatch (`LinearOp::record_forward_xent`,
/// `shaders/linear_dot_xent.wgsl`): the logits against the f64 linear reference (max |gpu − ref| /
/// max(1, max |ref|) <= 1e-5), and the loss, dlogits and correct count against the f64 reference on the
/// logits the GPU stored, with this file's tolerances. Includes ties (the first largest logit is the
/// prediction) and, where `bad_label`, a last row whose label is past the classes: that row's dlogits and
/// the loss are NaN, as the plain op gives them, and the other rows as the reference.
#[test]
fn linear_head_with_loss_matches_reference() {
    use batchnorm::ops::linear::{LinearOp, MatmulKernel};
    use batchnorm::reference::linear as linear_ref;
    let seed = seed();
    let gpu = gpu();
    if !MatmulKernel::subgroup_available(&gpu) {
        return;
    }
    let mut r = rng(seed);
    for &(n, i, o, bias, ties, bad_label) in &[
        (60usize, 100usize, 10usize, true, false, false),
        (1, 4, 2, false, false, false),
        (64, 8, 16, true, false, true),
        (13, 36, 3, true, false, true),
        // W = 0 and a bias with a tie at the top: every row's logits are [1, 3, 3, 0].
        (9, 4, 4, true, true, false),
    ] {
        let what = format!(
            "[{n},{i}]->[{n},{o}] bias={bias} ties={ties} bad_label={bad_label} (seed {seed})"
        );
        let x = normal(&mut r, n * i, 0.0, 1.0);
        let (w, b) = if ties {
            (vec![0.0; o * i], vec![1.0, 3.0, 3.0, 0.0])
        } else {
            (normal(&mut r, o * i, 0.0, 0.5), normal(&mut r, o, 0.0, 1.0))
        };
        let mut labels: Vec<u32> = (0..n).map(|_| r.random_range(0..o as u32)).collect();
        if bad_label {
            labels[n - 1] = o as u32 + r.random_range(0..5);
        }
        let up = |v: &[f32]| gpu.upload("t", v).unwrap();
        let (xb, wb, bb) = (up(&x), up(&w), up(&b));
        let lb = gpu.upload("labels", &labels).unwrap();
        let (zb, db) = (up(&vec![f32::NAN; n * o]), up(&vec![f32::NAN; n * o]));
        let sb = up(&[f32::NAN, 1.0, 2.0, 3.0]);
        let op = LinearOp::new(&gpu, n, i, o).unwrap();
        assert!(op.can_fuse_xent(&(&xb).into(), &(&wb).into()), "{what}");
        let mut enc = gpu.encoder("test");
        op.record_forward_xent(
            &mut enc,
            (&xb).into(),
            (&wb).into(),
            bias.then(|| (&bb).into()),
            (&zb).into(),
            (&lb).into(),
            (&db).into(),
            (&sb).into(),
        )
        .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let logits: Vec<f32> = gpu.download(&zb, 0, n * o).unwrap();
        let b64 = f64s(&b);
        let want_z = linear_ref::forward(&f64s(&x), &f64s(&w), bias.then_some(&b64[..]), n, i, o);
        let err = max_err_scaled(&logits, &want_z);
        assert!(err <= 1e-5, "{what}: logits error {err:e}");
        let want = reference::forward_backward(&f64s(&logits), &labels, o);
        let dz: Vec<f32> = gpu.download(&db, 0, n * o).unwrap();
        let good = if bad_label { (n - 1) * o } else { n * o };
        let err = max_rel_err(&dz[..good], &want.dlogits[..good]);
        assert!(err <= 1e-6, "{what}: dlogits error {err:e}");
        let stats: Vec<f32> = gpu.download(&sb, 0, STATS_LEN).unwrap();
        assert_eq!(stats[2], 2.0 + want.correct as f32, "{what}: correct");
        assert_eq!(stats[3], 3.0 + n as f32, "{what}: rows");
        if bad_label {
            assert!(
                dz[good..].iter().all(|v| v.is_nan()),
                "{what}: the row's dlogits"
            );
            assert!(stats[0].is_nan() && stats[1].is_nan(), "{what}: {stats:?}");
            continue;
        }
        let rel = |got: f32, want: f64| (got as f64 - want).abs() / want.abs().max(1e-30);
        assert!(
            rel(stats[0], want.loss) <= 1e-5,
            "{what}: loss {} vs {}",
            stats[0],
            want.loss
        );
        let sum = 1.0 + want.loss * n as f64;
        assert!(
            rel(stats[1], sum) <= 1e-5,
            "{what}: loss sum {} vs {sum}",
            stats[1]
        );
        if ties {
            let first = labels.iter().filter(|&&l| l == 1).count();
            assert_eq!(
                want.correct, first,
                "{what}: the reference takes the first of the tie"
            );
        }
    }
    // What it does not take: more than 64 rows, more than 16 classes, one class.
    for (n, i, o) in [(65, 4, 10), (8, 4, 17), (8, 4, 1)] {
        let op = LinearOp::new(&gpu, n, i, o).unwrap();
        let bufs: Vec<_> = [n * i, o * i, n * o, n, n * o, STATS_LEN]
            .iter()
            .map(|&len| gpu.upload("t", &vec![0.0f32; len.max(4)]).unwrap())
            .collect();
        let mut enc = gpu.encoder("test");
        let got = op.record_forward_xent(
            &mut enc,
            (&bufs[0]).into(),
            (&bufs[1]).into(),
            None,
            (&bufs[2]).into(),
            (&bufs[3]).into(),
            (&bufs[4]).into(),
            (&bufs[5]).into(),
        );
        match got {
            Err(batchnorm::Error::BadConfig(m)) => assert!(m.contains("softmax"), "{m}"),
            other => panic!("({n},{i},{o}): expected BadConfig, got {other:?}"),
        }
    }
}
