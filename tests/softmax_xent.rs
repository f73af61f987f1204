//! Fused softmax cross-entropy and accuracy against the f64 reference (fresh random inputs, seed printed
//! on failure, NaN-poisoned outputs). Tolerances: dlogits max |gpu − ref| / (1 + |ref|) <= 1e-6; loss
//! relative error <= 1e-5; the correct count exact.

mod common;

use batchnorm::ops::softmax_xent::{SoftmaxXentOp, STATS_LEN};
use batchnorm::reference::softmax_xent as reference;
use common::*;
use rand::Rng;

#[test]
fn softmax_xent_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    for &(rows, classes) in &[
        (1usize, 2usize),
        (7, 3),
        (60, 10),
        (64, 10),
        (65, 10),
        (1000, 10),
        (13, 97),
    ] {
        let mut logits = normal(&mut r, rows * classes, 0.0, 3.0);
        // A large offset on one row: the max-subtraction must keep it finite.
        logits[0] += 500.0;
        let labels: Vec<u32> = (0..rows)
            .map(|_| r.random_range(0..classes as u32))
            .collect();
        let zb = gpu.upload("z", &logits).unwrap();
        let lb = gpu.upload("labels", &labels).unwrap();
        let db = gpu.upload("dz", &vec![f32::NAN; rows * classes]).unwrap();
        // Start the sums from non-zero values: the kernel must add to them.
        let sb = gpu.upload("stats", &[f32::NAN, 1.0, 2.0, 3.0]).unwrap();
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
        let want = reference::forward_backward(&f64s(&logits), &labels, classes);
        let dz: Vec<f32> = gpu.download(&db, 0, rows * classes).unwrap();
        let s: Vec<f32> = gpu.download(&sb, 0, STATS_LEN).unwrap();
        let e: Vec<f32> = gpu.download(&eb, 0, STATS_LEN).unwrap();
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

#[test]
fn softmax_xent_rejects_one_class() {
    assert!(SoftmaxXentOp::new(&gpu(), 4, 1).is_err());
}
