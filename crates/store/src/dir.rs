//! A private directory: made with mode 0700 when missing; refused when it is a symbolic link,
//! not a directory, owned by another user, or writable by others.

use crate::StoreError;
use std::path::Path;

/// Makes `dir` (and missing parents) if needed, and checks that only this user can change
/// what is in it.
///
/// # Errors
///
/// [`StoreError::UnsafeDir`] saying what is wrong, or [`StoreError::Io`].
pub fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    let unsafe_dir = |reason: String| StoreError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(unsafe_dir(
                "it is a symbolic link; give the real path".into(),
            ));
        }
        Ok(m) if !m.is_dir() => return Err(unsafe_dir("it is not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(dir)?,
        Err(e) => return Err(StoreError::io(dir, e)),
    }
    check_owner_and_mode(dir).map_err(unsafe_dir)
}

#[cfg(unix)]
fn create(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io(dir, e))
}

#[cfg(not(unix))]
fn create(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))
}

#[cfg(unix)]
fn check_owner_and_mode(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(format!(
            "it is owned by uid {}, not by this process's uid {me}",
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "its mode {:o} lets other users write to it; make it 0700 (chmod 700)",
            m.mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner_and_mode(_dir: &Path) -> Result<(), String> {
    // The directory's ACL is inherited from the user's profile; nothing more is checked.
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_private_and_refused_when_others_may_write() {
        let base = std::env::temp_dir().join(format!("eb-store-dir-{}", std::process::id()));
        let dir = base.join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("other users write") && e.contains("chmod 700"),
            "{e}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let file = base.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(
            ensure_private_dir(&file)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}

/// Reads the regular file at `path` whole. Anything else is refused without waiting: a named
/// pipe (opening or reading one would block until another process writes), a device, a
/// directory.
///
/// # Errors
///
/// The file cannot be opened or read, or is not a regular file
/// (`ErrorKind::InvalidInput`, saying so).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens the regular file at `path` for reading, refusing anything else without waiting (see
/// [`read_regular`]).
///
/// # Errors
///
/// As [`read_regular`].
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    // Opening a pipe for reading blocks until it has a writer, unless non-blocking (which
    // changes nothing for a regular file).
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, nix::libc::O_NONBLOCK);
    let file = open.open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}
