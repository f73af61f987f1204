//! CIFAR-10, binary version: `data_batch_1.bin` … `data_batch_5.bin` (training, 10 000 records each) and
//! `test_batch.bin`. A record is 1 label byte (0..=9) then 3072 pixel bytes: the 1024 red values of the
//! 32×32 image row by row, then green, then blue — per example `[3, 32, 32]`, channel-major (NCHW).

use std::path::{Path, PathBuf};

use crate::data::Split;
use crate::error::{Error, Result};

/// Pixel bytes per record: 3 channels × 32 × 32.
pub const PIXELS: usize = 3 * 32 * 32;
/// Bytes per record: the label, then the pixels.
pub const RECORD: usize = 1 + PIXELS;
/// Number of classes.
pub const CLASSES: usize = 10;
/// The training files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file.
pub const TEST_FILE: &str = "test_batch.bin";

/// Parses the records of one file already in memory, appending to `split`; the error is the reason
/// only (the caller names the file).
pub fn parse_records(bytes: &[u8], split: &mut Split) -> std::result::Result<(), String> {
    if bytes.is_empty() {
        return Err(format!(
            "empty file: expected records of {RECORD} bytes (1 label + {PIXELS} pixels)"
        ));
    }
    if bytes.len() % RECORD != 0 {
        return Err(format!(
            "truncated or not a CIFAR-10 binary file: {} bytes is not a whole number of {RECORD}-byte \
             records (1 label + {PIXELS} pixels); {} whole records and {} bytes left over",
            bytes.len(),
            bytes.len() / RECORD,
            bytes.len() % RECORD
        ));
    }
    let records = bytes.len() / RECORD;
    split.labels.reserve(records);
    split.pixels.reserve(records * PIXELS);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] as usize >= CLASSES {
            return Err(format!(
                "record {i} (byte offset {}) has label {}: expected 0..{CLASSES} — corrupt, or the \
                 CIFAR-100 format (2 label bytes per record)?",
                i * RECORD,
                rec[0]
            ));
        }
        split.labels.push(rec[0]);
        split.pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

fn empty_split() -> Split {
    Split {
        pixels: Vec::new(),
        labels: Vec::new(),
        features: PIXELS,
        classes: CLASSES,
        shape: [3, 32, 32],
    }
}

/// Reads CIFAR-10 binary files into one split, in the order given.
///
/// # Errors
/// [`Error::File`] naming the file: unreadable, empty, not a whole number of records, or a label out of
/// range.
pub fn load_files(paths: &[PathBuf]) -> Result<Split> {
    let mut split = empty_split();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        parse_records(&bytes, &mut split).map_err(|reason| Error::file(path, reason))?;
    }
    Ok(split)
}

/// The folder holding the files: `dir` itself, or the `cifar-10-batches-bin` folder the official
/// archive unpacks to, inside it.
fn batches_dir(dir: &Path) -> Result<PathBuf> {
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if d.join(TEST_FILE).is_file() {
            return Ok(d);
        }
    }
    Err(Error::file(
        dir.join(TEST_FILE),
        "not found (nor in cifar-10-batches-bin/ inside it): point --data-dir at the folder of the \
         CIFAR-10 binary version (data_batch_1.bin … data_batch_5.bin, test_batch.bin)",
    ))
}

/// Loads the training split (all five batches) and the test split from `dir`.
///
/// # Errors
/// [`Error::File`] naming a missing or corrupt file.
pub fn load(dir: &Path) -> Result<(Split, Split)> {
    let d = batches_dir(dir)?;
    let train: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| d.join(f)).collect();
    if let Some(missing) = train.iter().find(|p| !p.is_file()) {
        return Err(Error::file(
            missing,
            "not found: the CIFAR-10 training set is data_batch_1.bin … data_batch_5.bin",
        ));
    }
    Ok((load_files(&train)?, load_files(&[d.join(TEST_FILE)])?))
}
