//! Files both runtimes write: atomically (a reader never sees half of one), for this user
//! only, never through a link found in their place.

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

/// Writes a file atomically: temp file, fsync, rename. Readable by this user only: the working
/// dir holds passwords.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    // A new file, never one found there (nor what a link there points to).
    match std::fs::remove_file(&tmp) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
