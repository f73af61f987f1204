//! Data loading: the shipped MNIST files, IDX errors that name the file and the problem, and the seeded
//! batcher's determinism.

use std::path::{Path, PathBuf};

use batchnorm::data::{self, idx, Batcher, DatasetKind, Normalization};

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bn-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

#[test]
fn shipped_mnist_loads_with_known_counts_labels_and_mean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let d = data::load(DatasetKind::Mnist, &dir).unwrap();
    assert_eq!(
        (d.train.len(), d.test.len(), d.train.features),
        (60000, 10000, 784)
    );
    assert_eq!(&d.train.labels[..5], &[5, 0, 4, 1, 9]);
    assert_eq!(&d.test.labels[..5], &[7, 2, 1, 0, 4]);
    let mean = d.train.pixels.iter().map(|&p| p as f64).sum::<f64>()
        / (255.0 * d.train.pixels.len() as f64);
    assert!((mean - 0.1307).abs() < 1e-3, "train pixel mean {mean}");
    let (mut x, mut y) = (Vec::new(), Vec::new());
    d.train.gather(&[0, 1], Normalization::Unit, &mut x, &mut y);
    assert_eq!((x.len(), y), (2 * 784, vec![5, 0]));
    assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn idx_errors_name_the_file_and_the_problem() {
    let bad_magic = tmp("bad-magic", &[1, 2, 3, 4, 0, 0, 0, 0]);
    let e = idx::read_idx_u8(&bad_magic).unwrap_err().to_string();
    assert!(
        e.contains("bad-magic") && e.contains("bad IDX magic"),
        "{e}"
    );

    let truncated = tmp("truncated", &idx_bytes(&[3, 2, 2], &[0; 5]));
    let e = idx::read_idx_u8(&truncated).unwrap_err().to_string();
    assert!(
        e.contains("truncated") && e.contains("need 12 bytes"),
        "{e}"
    );

    let short_header = tmp("short-header", &[0, 0, 8, 3, 0, 0]);
    let e = idx::read_idx_u8(&short_header).unwrap_err().to_string();
    assert!(
        e.contains("short-header") && e.contains("truncated IDX header"),
        "{e}"
    );

    let mut gz = Vec::new();
    {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
        enc.write_all(&idx_bytes(&[2, 2, 2], &[0; 8])).unwrap();
        enc.finish().unwrap();
    }
    let ok = tmp("ok.gz", &gz);
    assert_eq!(idx::read_idx_u8(&ok).unwrap().dims, vec![2, 2, 2]);
    let cut = tmp("cut.gz", &gz[..gz.len() / 2]);
    let e = idx::read_idx_u8(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.gz"), "{e}");

    let images = tmp("images", &idx_bytes(&[3, 2, 2], &[0; 12]));
    let labels = tmp("labels", &idx_bytes(&[2], &[0, 1]));
    let e = data::load_split(&images, &labels, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("count mismatch") && e.contains("labels"), "{e}");
    let labels = tmp("labels-range", &idx_bytes(&[3], &[0, 1, 12]));
    let e = data::load_split(&images, &labels, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 12"), "{e}");

    let e = data::load(DatasetKind::Mnist, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
}

#[test]
fn batcher_is_a_seeded_function_of_the_step() {
    let mut a = Batcher::new(100, 30, 5).unwrap();
    let mut b = Batcher::new(100, 30, 5).unwrap();
    assert_eq!(a.batches_per_epoch(), 3);
    let e0: Vec<usize> = (0..3).flat_map(|s| a.batch(s).to_vec()).collect();
    let mut sorted = e0.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 90, "an epoch draws without replacement");
    // Random access (as after a resume) gives the same batches.
    assert_eq!(b.batch(4).to_vec(), a.batch(4).to_vec());
    assert_eq!(b.batch(1).to_vec(), e0[30..60].to_vec());
    assert_ne!(
        a.batch(3).to_vec(),
        e0[..30].to_vec(),
        "a new epoch is a new permutation"
    );
    assert!(Batcher::new(10, 0, 1).is_err() && Batcher::new(10, 11, 1).is_err());
}
