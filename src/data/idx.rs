//! The IDX format (LeCun's MNIST files, also Fashion-MNIST): a big-endian header — two zero bytes, a
//! type code (0x08 = unsigned byte), the number of dimensions — then one u32 per dimension, then the data.
//! Files ending in `.gz` are decompressed on the fly.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// An IDX file of unsigned bytes: its dimensions and its values in row-major order.
#[derive(Clone, Debug)]
pub struct IdxU8 {
    /// The dimensions from the header (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
    /// The values, `dims.iter().product()` of them.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes (plain or gzip, told apart by the gzip magic, not the name).
///
/// # Errors
/// [`Error::File`] naming the file when it cannot be read, is not gzip or IDX (bad magic), holds another
/// element type, or is truncated or has trailing bytes.
pub fn read_idx_u8(path: &Path) -> Result<IdxU8> {
    let raw = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::file(path, format!("corrupt or truncated gzip data: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx_u8(&bytes).map_err(|reason| Error::file(path, reason))
}

/// Parses IDX bytes already in memory; the error is the reason only (the caller names the file).
pub fn parse_idx_u8(bytes: &[u8]) -> std::result::Result<IdxU8, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "truncated IDX header: {} bytes, need at least 4",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "bad IDX magic {:02x}{:02x}{:02x}{:02x}: expected 0000 then a type code and a rank \
             (0x00000803 for images, 0x00000801 for labels)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not supported: expected 0x08 (unsigned byte)",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    if rank == 0 {
        return Err("IDX rank 0: expected at least one dimension".into());
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!(
            "truncated IDX header: {} bytes, a rank-{rank} header needs {header}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("IDX dimensions {dims:?} overflow"))?;
    let body = bytes.len() - header;
    if body < count {
        return Err(format!(
            "truncated: dimensions {dims:?} need {count} bytes of data, the file has {body}"
        ));
    }
    if body > count {
        return Err(format!(
            "{} trailing bytes after the {count} the dimensions {dims:?} call for",
            body - count
        ));
    }
    Ok(IdxU8 {
        dims,
        data: bytes[header..].to_vec(),
    })
}
