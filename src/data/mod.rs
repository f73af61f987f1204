//! Data: IDX loaders (MNIST, Fashion-MNIST), the CIFAR-10 binary loader, normalization, and a seeded
//! shuffling batcher.

pub mod cifar;
pub mod idx;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// The image datasets `batchnorm train` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// MNIST handwritten digits (28×28, 10 classes).
    Mnist,
    /// Fashion-MNIST (28×28, 10 classes, same file names as MNIST).
    FashionMnist,
    /// CIFAR-10, binary version (3×32×32 colour images, 10 classes).
    Cifar10,
}

impl DatasetKind {
    /// Parses `mnist` or `fashion-mnist`.
    ///
    /// # Errors
    /// [`Error::BadConfig`] for any other name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mnist" => Ok(DatasetKind::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Ok(DatasetKind::FashionMnist),
            "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
            other => Err(Error::config(format!(
                "unknown dataset '{other}': expected mnist, fashion-mnist or cifar10"
            ))),
        }
    }

    /// The name as `parse` accepts it.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
        }
    }

    /// Each example's shape `[channels, height, width]` in the published files (a loaded [`Split`]
    /// says what a given file holds).
    pub fn example_shape(self) -> [usize; 3] {
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
        }
    }

    /// Examples in the published test split (10 000 for each).
    pub fn test_examples(self) -> usize {
        10_000
    }
}

/// How pixel bytes become network inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Normalization {
    /// x / 255, in [0, 1] (Ioffe's MNIST experiment feeds raw intensities; this is their scale).
    Unit,
    /// (x / 255 − mean) / std, e.g. MNIST's 0.1307 and 0.3081.
    Standardize {
        /// Mean of x / 255.
        mean: f32,
        /// Standard deviation of x / 255.
        std: f32,
    },
}

impl Normalization {
    fn apply(self, byte: u8) -> f32 {
        let x = byte as f32 / 255.0;
        match self {
            Normalization::Unit => x,
            Normalization::Standardize { mean, std } => (x - mean) / std,
        }
    }
}

/// One split of an image classification dataset: `len` images of `features` bytes and their labels.
#[derive(Clone, Debug)]
pub struct Split {
    /// Pixels, `len × features`, row-major, as stored (0..=255).
    pub pixels: Vec<u8>,
    /// Labels, `len` of them, each `< classes`.
    pub labels: Vec<u8>,
    /// Values per image (784 for 28×28).
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
    /// Each example's shape `[channels, height, width]` (`[1, 28, 28]` for MNIST, `[3, 32, 32]` for
    /// CIFAR-10); its product is `features`. An MLP flattens it.
    pub shape: [usize; 3],
}

impl Split {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Keeps only the first `n` examples (tests and quick runs).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * self.features);
    }

    /// Writes examples `indices` into `x` (`indices.len() × features`, normalized) and `y` (labels).
    pub fn gather(
        &self,
        indices: &[usize],
        norm: Normalization,
        x: &mut Vec<f32>,
        y: &mut Vec<u32>,
    ) {
        x.clear();
        y.clear();
        for &i in indices {
            let row = &self.pixels[i * self.features..(i + 1) * self.features];
            x.extend(row.iter().map(|&b| norm.apply(b)));
            y.push(self.labels[i] as u32);
        }
    }
}

/// Loads an images file and a labels file (IDX, plain or `.gz`) as one split with `classes` classes.
///
/// # Errors
/// [`Error::File`] naming the file: unreadable, bad magic, truncated, wrong rank, a count mismatch
/// between images and labels, or a label `>= classes`.
pub fn load_split(images: &Path, labels: &Path, classes: usize) -> Result<Split> {
    let img = idx::read_idx_u8(images)?;
    let lab = idx::read_idx_u8(labels)?;
    if img.dims.len() < 2 {
        return Err(Error::file(
            images,
            format!(
                "expected an images file (rank >= 2, e.g. [N, 28, 28]), got dimensions {:?} — labels and \
                 images swapped?",
                img.dims
            ),
        ));
    }
    if lab.dims.len() != 1 {
        return Err(Error::file(
            labels,
            format!(
                "expected a labels file (rank 1, [N]), got dimensions {:?}",
                lab.dims
            ),
        ));
    }
    if img.dims[0] != lab.dims[0] {
        return Err(Error::file(
            labels,
            format!(
                "count mismatch: {} labels for {} images in {}",
                lab.dims[0],
                img.dims[0],
                images.display()
            ),
        ));
    }
    if let Some(pos) = lab.data.iter().position(|&l| l as usize >= classes) {
        return Err(Error::file(
            labels,
            format!(
                "label {} at index {pos} is out of range: expected 0..{classes}",
                lab.data[pos]
            ),
        ));
    }
    // [N, H, W] grey images, [N, C, H, W], or anything else as one row of values.
    let features: usize = img.dims[1..].iter().product();
    let shape = match img.dims[1..] {
        [h, w] => [1, h, w],
        [c, h, w] => [c, h, w],
        _ => [1, 1, features],
    };
    Ok(Split {
        features,
        shape,
        pixels: img.data,
        labels: lab.data,
        classes,
    })
}

/// A dataset's train and test splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Which dataset.
    pub kind: DatasetKind,
    /// Training split (60 000 examples for MNIST).
    pub train: Split,
    /// Test split (10 000 examples for MNIST).
    pub test: Split,
}

/// The four files of an MNIST-style dataset in `dir`: the standard names, with or without `.gz`.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::file(
        dir.join(format!("{stem}.gz")),
        format!(
            "not found (nor {stem} uncompressed): point --data-dir at a folder holding the four IDX files"
        ),
    ))
}

/// Loads a dataset from `dir`: for MNIST and Fashion-MNIST the four standard IDX file names (`.gz` or
/// plain), for CIFAR-10 the binary version's six files (see [`cifar`]).
///
/// # Errors
/// [`Error::File`] for a missing or corrupt file, naming it.
pub fn load(kind: DatasetKind, dir: &Path) -> Result<Dataset> {
    if kind == DatasetKind::Cifar10 {
        let (train, test) = cifar::load(dir)?;
        return Ok(Dataset { kind, train, test });
    }
    let train = load_split(
        &find(dir, "train-images-idx3-ubyte")?,
        &find(dir, "train-labels-idx1-ubyte")?,
        10,
    )?;
    let test = load_split(
        &find(dir, "t10k-images-idx3-ubyte")?,
        &find(dir, "t10k-labels-idx1-ubyte")?,
        10,
    )?;
    if train.shape != test.shape {
        return Err(Error::file(
            dir,
            format!(
                "train images are {:?} each, test images {:?}",
                train.shape, test.shape
            ),
        ));
    }
    Ok(Dataset { kind, train, test })
}

/// Seeded shuffling batcher without state: the batch of step `s` is a function of (seed, s) alone, so a
/// resumed run sees exactly the batches an uninterrupted one would.
///
/// Each epoch is a fresh permutation (seeded by seed and epoch); the last partial batch of an epoch is
/// dropped, as with PyTorch's `drop_last=True`.
#[derive(Clone, Debug)]
pub struct Batcher {
    len: usize,
    batch_size: usize,
    seed: u64,
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl Batcher {
    /// A batcher over `len` examples.
    ///
    /// # Errors
    /// [`Error::BadConfig`] when `batch_size` is 0 or larger than `len`.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 || batch_size > len {
            return Err(Error::config(format!(
                "batch size {batch_size} must be between 1 and the number of training examples ({len})"
            )));
        }
        Ok(Batcher {
            len,
            batch_size,
            seed,
            epoch: None,
            perm: Vec::new(),
        })
    }

    /// Full batches per epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        (self.len / self.batch_size) as u64
    }

    /// The example indices of step `step`'s batch.
    pub fn batch(&mut self, step: u64) -> &[usize] {
        let bpe = self.batches_per_epoch();
        let epoch = step / bpe;
        if self.epoch != Some(epoch) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            self.perm = (0..self.len).collect();
            self.perm.shuffle(&mut rng);
            self.epoch = Some(epoch);
        }
        let start = (step % bpe) as usize * self.batch_size;
        &self.perm[start..start + self.batch_size]
    }
}
