//! Exclusive use of an export's file (and of a daemon's data dir), with
//! open file description locks as qemu takes them on its images: two
//! writers on one file corrupt it silently, so the second must refuse.
//!
//! OFD locks belong to the open file, not the process: they conflict
//! between two opens in one process too (two exports on one path), and they
//! go away when the file closes, including on kill -9, so a crashed daemon
//! leaves nothing stale behind.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// What the lock lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody else may lock the file (a writer).
    Exclusive,
    /// Other readers may lock it too; writers may not.
    Shared,
}

/// Takes a whole-file OFD lock on `file`, or fails at once with an error
/// naming the processes that have `path` open.
pub fn lock(file: &File, path: &Path, mode: LockMode) -> io::Result<()> {
    // SAFETY: a zeroed flock is a valid value; the fields we rely on are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match mode {
        LockMode::Exclusive => libc::F_WRLCK,
        LockMode::Shared => libc::F_RDLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, however large the file grows
    fl.l_pid = 0; // OFD locks require 0
                  // SAFETY: the fd is open for the lifetime of `file`; fl is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(io::Error::new(
            e.kind(),
            format!("lock {}: {e}", path.display()),
        ));
    }
    let holders = holders(file);
    let who = if holders.is_empty() {
        "another process".to_string()
    } else {
        holders
            .iter()
            .map(|(pid, name)| format!("{name} (pid {pid})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{} is in use by {who}: two writers would corrupt it{}",
            path.display(),
            match mode {
                LockMode::Exclusive => "",
                LockMode::Shared => " (read-only exports may add ',shared' to skip the lock)",
            }
        ),
    ))
}

/// Other processes with the same file open (pid, command name), found
/// through /proc: OFD locks do not record an owner pid.
fn holders(file: &File) -> Vec<(u32, String)> {
    let Ok(me) = file.metadata() else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let this_fd = (pid == own).then(|| file.as_raw_fd().to_string());
        let open_here = fds.flatten().any(|fd| {
            this_fd.as_deref() != fd.file_name().to_str()
                && std::fs::metadata(fd.path())
                    .is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino())
        });
        if open_here {
            let name = std::fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            let name = if pid == own {
                format!("this {name} (another export on the same file)")
            } else {
                name
            };
            found.push((pid, name));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let a = File::create(&path).unwrap();
        lock(&a, &path, LockMode::Exclusive).unwrap();
        let b = File::open(&path).unwrap();
        let e = lock(&b, &path, LockMode::Shared).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("in use by"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(a);
        lock(&b, &path, LockMode::Shared).expect("the lock went with the first file");
    }

    #[test]
    fn readers_share_and_exclude_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap();
        let a = File::open(&path).unwrap();
        let b = File::open(&path).unwrap();
        lock(&a, &path, LockMode::Shared).unwrap();
        lock(&b, &path, LockMode::Shared).unwrap();
        let c = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(lock(&c, &path, LockMode::Exclusive).is_err());
    }
}
