//! Residual add forward and backward against the f64 reference (fresh random inputs, seed printed on
//! failure, NaN-poisoned outputs). Tolerances: y, max |gpu − ref| / (1 + |ref|) <= 1e-7 (one f32
//! rounding of the sum); da and db are copies of dy, so exact.

mod common;

use batchnorm::ops::add::AddOp;
use batchnorm::reference::add as reference;
use common::*;

#[test]
fn add_matches_reference() {
    let seed = seed();
    let gpu = gpu();
    let mut r = rng(seed);
    for &len in &[1usize, 13, 256, 4099, 100_003] {
        let a = normal(&mut r, len, 0.0, 3.0);
        let b = normal(&mut r, len, 1.0, 0.5);
        let dy = normal(&mut r, len, 0.0, 1.0);
        let up = |name: &str, v: &[f32]| gpu.upload(name, v).unwrap();
        let (ab, bb, dyb) = (up("a", &a), up("b", &b), up("dy", &dy));
        let nan = vec![f32::NAN; len];
        let (yb, dab, dbb) = (up("y", &nan), up("da", &nan), up("db", &nan));
        let op = AddOp::new(&gpu, len).unwrap();
        let mut enc = gpu.encoder("test");
        op.record_forward(&mut enc, (&ab).into(), (&bb).into(), (&yb).into())
            .unwrap();
        op.record_backward(&mut enc, (&dyb).into(), (&dab).into(), (&dbb).into())
            .unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let y: Vec<f32> = gpu.download(&yb, 0, len).unwrap();
        let e = max_rel_err(&y, &reference::forward(&f64s(&a), &f64s(&b)));
        assert!(e <= 1e-7, "y len {len}: error {e:e} (seed {seed})");
        let (da_ref, db_ref) = reference::backward(&f64s(&dy));
        let da: Vec<f32> = gpu.download(&dab, 0, len).unwrap();
        let db: Vec<f32> = gpu.download(&dbb, 0, len).unwrap();
        assert_eq!(max_rel_err(&da, &da_ref), 0.0, "da len {len} (seed {seed})");
        assert_eq!(max_rel_err(&db, &db_ref), 0.0, "db len {len} (seed {seed})");
    }
}

#[test]
fn add_rejects_bad_input() {
    let gpu = gpu();
    assert!(AddOp::new(&gpu, 0).is_err());
    let op = AddOp::new(&gpu, 10).unwrap();
    let small = gpu.upload("small", &[0.0f32; 9]).unwrap();
    let ok = gpu.upload("ok", &[0.0f32; 10]).unwrap();
    let mut enc = gpu.encoder("test");
    let err = op
        .record_forward(&mut enc, (&ok).into(), (&small).into(), (&ok).into())
        .unwrap_err();
    assert!(err.to_string().contains("add b"), "{err}");
}
