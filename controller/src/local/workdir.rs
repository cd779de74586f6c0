//! The working dir holds passwords, keys and data, and `local up` may run as root: it must be
//! the user's alone before anything is written there. A dir owned by someone else, under a
//! parent someone else could swap it in, or holding anything someone else made (a link
//! planted to make the runtime overwrite another file, or to read a password back) is
//! refused, naming the path to fix.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use super::{LocalError, io};

/// How deep the check walks into the working dir (the runtime's own tree is 4 levels).
const MAX_DEPTH: usize = 8;

/// Creates `dir` (and any missing parent) if needed, checks that it and everything in it is
/// this user's, and closes it to everyone else (0700). Returns its canonical path.
pub(super) fn claim(dir: &Path) -> Result<PathBuf, LocalError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let dir = dir.canonicalize().map_err(io("resolving", dir))?;
    let me = nix::unistd::geteuid().as_raw();
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::symlink_metadata(ancestor).map_err(io("checking", ancestor))?;
        let writable_by_others = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
        if meta.uid() != me && meta.uid() != 0 && writable_by_others {
            return Err(unsafe_path(
                ancestor,
                meta.uid(),
                "a parent that another user can write to (they could swap the dir)",
            ));
        }
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(io("checking", &dir))?;
    if meta.uid() != me {
        return Err(unsafe_path(&dir, meta.uid(), "owned by another user"));
    }
    // A dir from an older version, or one the user made, may be open to others: its files
    // (made before the umask) stay out of their reach behind a 0700 dir, and nobody else can
    // add anything from here on.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("restricting to its owner", &dir))?;
    check_tree(&dir, me, 0)?;
    std::fs::create_dir_all(dir.join("logs")).map_err(io("creating", &dir))?;
    Ok(dir)
}

/// Every entry under `dir`, links included and not followed, is owned by `me`.
fn check_tree(dir: &Path, me: u32, depth: usize) -> Result<(), LocalError> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let entry = entry.map_err(io("reading", dir))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io("checking", &path))?;
        if meta.uid() != me {
            return Err(unsafe_path(&path, meta.uid(), "made by another user"));
        }
        if meta.is_dir() {
            check_tree(&path, me, depth + 1)?;
        }
    }
    Ok(())
}

fn unsafe_path(path: &Path, owner: u32, why: &'static str) -> LocalError {
    LocalError::UnsafeDir {
        path: path.to_owned(),
        owner,
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_dir_is_claimed_and_closed() {
        let base = tempfile::tempdir().unwrap();
        let dir = claim(&base.path().join("a/b")).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(dir.join("logs").is_dir());
    }
}
