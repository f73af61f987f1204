//! File output shared by the library and the binary.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes to a temporary file beside `path`, then renames it over `path`: a reader never sees a partial
/// file and an existing one survives a failed write.
///
/// # Errors
/// [`Error::File`] naming the path when writing or renaming fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, e)
    })
}
