//! Data loading: the shipped MNIST files, IDX errors that name the file and the problem, and the seeded
//! batcher's determinism.

mod common;

use std::path::{Path, PathBuf};

use batchnorm::data::{self, idx, Batcher, DatasetKind, Normalization};
use common::ScratchDir;

fn tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
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
    assert_eq!(d.train.shape, [1, 28, 28]);
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
    let dir = ScratchDir::new("idx");
    let bad_magic = tmp(&dir, "bad-magic", &[1, 2, 3, 4, 0, 0, 0, 0]);
    let e = idx::read_idx_u8(&bad_magic).unwrap_err().to_string();
    assert!(
        e.contains("bad-magic") && e.contains("bad IDX magic"),
        "{e}"
    );

    let truncated = tmp(&dir, "truncated", &idx_bytes(&[3, 2, 2], &[0; 5]));
    let e = idx::read_idx_u8(&truncated).unwrap_err().to_string();
    assert!(
        e.contains("truncated") && e.contains("need 12 bytes"),
        "{e}"
    );

    let short_header = tmp(&dir, "short-header", &[0, 0, 8, 3, 0, 0]);
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
    let ok = tmp(&dir, "ok.gz", &gz);
    assert_eq!(idx::read_idx_u8(&ok).unwrap().dims, vec![2, 2, 2]);
    let cut = tmp(&dir, "cut.gz", &gz[..gz.len() / 2]);
    let e = idx::read_idx_u8(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.gz"), "{e}");

    let images = tmp(&dir, "images", &idx_bytes(&[3, 2, 2], &[0; 12]));
    let labels = tmp(&dir, "labels", &idx_bytes(&[2], &[0, 1]));
    let e = data::load_split(&images, &labels, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("count mismatch") && e.contains("labels"), "{e}");
    let labels = tmp(&dir, "labels-range", &idx_bytes(&[3], &[0, 1, 12]));
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

/// A CIFAR-10 record: label, then 3072 pixels where pixel j of example `tag` is `(tag + j) % 251`.
fn cifar_record(label: u8, tag: usize) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072).map(|j| ((tag + j) % 251) as u8));
    r
}

/// A fresh folder for CIFAR-10 files. Its name holds no word the error checks look for ("empty" in the
/// folder's name once made the empty-file check pass on the path alone).
fn cifar_dir() -> ScratchDir {
    ScratchDir::new("cifar")
}

/// Five training files of 1..=3 records and a test file of 2, written to `dir`; returns the labels in
/// file order.
fn write_cifar(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut train_labels = Vec::new();
    let mut tag = 0;
    for (k, count) in [3usize, 1, 2, 2, 1].into_iter().enumerate() {
        let mut bytes = Vec::new();
        for _ in 0..count {
            let label = (tag * 7 % 10) as u8;
            bytes.extend(cifar_record(label, tag));
            train_labels.push(label);
            tag += 1;
        }
        std::fs::write(dir.join(format!("data_batch_{}.bin", k + 1)), bytes).unwrap();
    }
    let test: Vec<u8> = [cifar_record(9, 100), cifar_record(0, 101)].concat();
    std::fs::write(dir.join("test_batch.bin"), test).unwrap();
    (train_labels, vec![9, 0])
}

#[test]
fn cifar10_loads_records_in_file_order_as_3x32x32() {
    assert_eq!(DatasetKind::parse("cifar10").unwrap(), DatasetKind::Cifar10);
    let dir = cifar_dir();
    let (train_labels, test_labels) = write_cifar(&dir);
    let d = data::load(DatasetKind::Cifar10, &dir).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (9, 2));
    assert_eq!((d.train.features, d.train.shape), (3072, [3, 32, 32]));
    assert_eq!(d.train.labels, train_labels);
    assert_eq!(d.test.labels, test_labels);
    // Example 4 (the second record of data_batch_3) kept its bytes in order: red plane first.
    let ex4 = &d.train.pixels[4 * 3072..5 * 3072];
    assert!(ex4
        .iter()
        .enumerate()
        .all(|(j, &p)| p as usize == (4 + j) % 251));
    let (mut x, mut y) = (Vec::new(), Vec::new());
    d.test.gather(&[1], Normalization::Unit, &mut x, &mut y);
    assert_eq!((x.len(), y), (3072, vec![0]));
    assert_eq!(x[5], 106.0 / 255.0, "pixel 5 of example 101");

    // The official archive's folder inside --data-dir is found too.
    let outer = cifar_dir();
    let inner = outer.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&inner).unwrap();
    write_cifar(&inner);
    assert_eq!(
        data::load(DatasetKind::Cifar10, &outer)
            .unwrap()
            .train
            .len(),
        9
    );
}

#[test]
fn cifar10_errors_name_the_file_and_the_problem() {
    let err = |dir: &Path| {
        data::load(DatasetKind::Cifar10, dir)
            .unwrap_err()
            .to_string()
    };
    // Truncated: one byte short of two records.
    let dir = cifar_dir();
    write_cifar(&dir);
    let p = dir.join("data_batch_4.bin");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
    let e = err(&dir);
    assert!(
        e.contains("data_batch_4.bin")
            && e.contains("6145 bytes")
            && e.contains("3073-byte records"),
        "{e}"
    );

    // A label out of range (e.g. a CIFAR-100 file).
    let dir = cifar_dir();
    write_cifar(&dir);
    let mut bytes = std::fs::read(dir.join("test_batch.bin")).unwrap();
    bytes[3073] = 10;
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    let e = err(&dir);
    assert!(
        e.contains("test_batch.bin") && e.contains("record 1") && e.contains("label 10"),
        "{e}"
    );

    // Empty file.
    let dir = cifar_dir();
    write_cifar(&dir);
    std::fs::write(dir.join("data_batch_1.bin"), b"").unwrap();
    let e = err(&dir);
    assert!(e.contains("data_batch_1.bin") && e.contains("empty"), "{e}");

    // A missing training file, and a folder with no CIFAR-10 at all.
    let dir = cifar_dir();
    write_cifar(&dir);
    std::fs::remove_file(dir.join("data_batch_3.bin")).unwrap();
    let e = err(&dir);
    assert!(
        e.contains("data_batch_3.bin") && e.contains("not found"),
        "{e}"
    );
    let e = err(&cifar_dir());
    assert!(
        e.contains("test_batch.bin") && e.contains("--data-dir"),
        "{e}"
    );
}
