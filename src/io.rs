//! File output shared by the library and the binary.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes to a temporary file beside `path`, syncs it, then renames it over `path`: a reader never sees
/// a partial file, an existing one survives a failed write or a crash, and no temporary file is left
/// behind on an error.
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
    // The bytes reach the disk before the rename makes them the file: after a crash or power loss the
    // path holds the old file or the whole new one, never an empty or partial one.
    let written = (|| {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, e)
    })?;
    // The rename itself is durable once the directory is synced (best effort: not every platform can
    // open a directory).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
