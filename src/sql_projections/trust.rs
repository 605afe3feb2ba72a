//! Whether a projection file may be run. Its statements run as pgfold's
//! database role, so whoever can change the file, or put a file beside it, can
//! run SQL as that role. Like ssh's `StrictModes` and sudo with its sudoers
//! files, pgfold refuses a file or directory that group or others may write, or
//! that a user other than pgfold's own (the effective uid) or root owns.
//!
//! What is judged is what is opened: symlinks are resolved first, the file is
//! checked through its open handle, and errors name the resolved path when it
//! differs from the configured one.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};

/// Checks `daemon.projections_dir`, as reading it opens it.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let (real, shown) = resolve(dir, "daemon.projections_dir ")?;
    let meta = std::fs::metadata(&real).map_err(|e| anyhow!("{shown}: cannot read it: {e}"))?;
    check(&meta, &shown)
}

/// Opens the projection file at `path` once it is trusted: the file as opened,
/// and the directory it really lives in.
pub fn open(path: &Path) -> anyhow::Result<File> {
    let (real, shown) = resolve(path, "")?;
    let file = File::open(&real).map_err(|e| anyhow!("{shown}: cannot read it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| anyhow!("{shown}: cannot read it: {e}"))?;
    check(&meta, &shown)?;
    if let Some(parent) = real.parent() {
        let shown = format!("{}, the directory of {shown}", parent.display());
        let meta =
            std::fs::metadata(parent).map_err(|e| anyhow!("{shown}: cannot read it: {e}"))?;
        check(&meta, &shown)?;
    }
    Ok(file)
}

/// The path with every symlink resolved, and how to name it in errors.
fn resolve(path: &Path, what: &str) -> anyhow::Result<(PathBuf, String)> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| anyhow!("{what}{}: cannot read it: {e}", path.display()))?;
    let given = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let shown = if real == given {
        format!("{what}{}", path.display())
    } else {
        format!("{what}{} (opened as {})", path.display(), real.display())
    };
    Ok((real, shown))
}

fn check(meta: &Metadata, shown: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let owner = meta.uid();
    if owner != euid && owner != 0 {
        bail!(
            "{shown}: owned by uid {owner}, neither pgfold's user (uid {euid}) nor root; \
             pgfold runs projection files as its database role, so only those may own them"
        );
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        bail!(
            "{shown}: writable by group or others (mode {:04o}); pgfold runs projection \
             files as its database role, so only their owner may write them (chmod go-w)",
            mode & 0o7777
        );
    }
    Ok(())
}
