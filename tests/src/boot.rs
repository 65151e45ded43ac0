//! A systemd 252 booted as PID 1 of namespaces of the test's own, to run the packaged unit the
//! way a host would (issue 14.1).
//!
//! Isolation matters more than anywhere else here: a systemd boot runs tmpfiles, sysctl,
//! module loading and timers, and a mount namespace alone does not keep it off the host's
//! files (it once emptied the host's /tmp). So its root is an overlay whose writable layer is
//! a tmpfs (nothing it writes or deletes reaches the host's disk), /proc/sys and sysfs are
//! read-only, every `.wants` directory and generator of the image is taken out of its view (it
//! starts journald and what the test asks for, nothing else), and it has its own pid, network
//! (only `lo`), uts, ipc and cgroup namespaces, a cgroup2 of its own below a test cgroup, and a
//! bpffs of its own (its pins die with it). The binary under test is at /usr/local/bin/agentseg
//! (the probe beside it) and the repository, read-only, at /src.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{CgroupTree, agentseg_bin, probe_bin};

/// Runs as PID 1 of the new namespaces, builds the root and becomes systemd.
const INSIDE: &str = r#"set -eu
S="$1"; BIN="$2"; PROBE="$3"; SRC="$4"
mount -t tmpfs -o mode=0755 boot "$S"
mkdir "$S/upper" "$S/work" "$S/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$S/root"
R="$S/root"
# No unit, generator or timer of the image's runs: only what the test starts.
rm -rf "$R"/usr/lib/systemd/system/*.wants "$R"/etc/systemd/system/*.wants \
       "$R"/usr/lib/systemd/system-generators/* "$R"/etc/systemd/system-generators \
       "$R"/usr/lib/systemd/system/tmp.mount
mkdir -p "$R/oldroot" "$R/usr/local/bin" "$R/etc/agentseg/policies" "$R/var/log/journal"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in sys sysrq-trigger irq bus; do
  if [ -e "$R/proc/$p" ]; then
    mount --bind "$R/proc/$p" "$R/proc/$p"; mount -o remount,bind,ro "$R/proc/$p"
  fi
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t bpf -o mode=0700 bpf "$R/sys/fs/bpf"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  name=${n%%:*}; rest=${n#*:}; mknod -m 666 "$R/dev/$name" c "${rest%%:*}" "${rest#*:}"
done
mkdir "$R/dev/shm" "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mkdir -p "$R/src"; mount --bind "$SRC" "$R/src"; mount -o remount,bind,ro "$R/src"
touch "$R/usr/local/bin/agentseg" "$R/usr/local/bin/agentseg-probe"
mount --bind "$BIN" "$R/usr/local/bin/agentseg"
mount --bind "$PROBE" "$R/usr/local/bin/agentseg-probe"
cat > "$R/etc/systemd/system/agentseg-boot.target" <<T
[Unit]
Description=agentseg boot test
Wants=systemd-journald.socket systemd-journald-dev-log.socket
AllowIsolate=yes
T
cd "$R"; pivot_root . oldroot; umount -l /oldroot; rmdir /oldroot
export container=agentseg-test
exec /lib/systemd/systemd --system --unit=agentseg-boot.target --log-target=journal
"#;

/// A booted systemd; dropping it kills the whole namespace and removes its cgroups.
pub struct Booted {
    launcher: Child,
    pid1: u32,
    _scratch: tempfile::TempDir,
    /// Declared last: removed after the launcher is gone.
    _tree: CgroupTree,
}

impl Booted {
    /// Boot and wait until systemd answers and journald runs.
    pub fn boot() -> Self {
        let tree = CgroupTree::create();
        let scratch = tempfile::tempdir().expect("scratch dir");
        let script = scratch.path().join("inside.sh");
        std::fs::write(&script, INSIDE).expect("write script");
        let mnt = scratch.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mnt");
        let procs = tree.path.join("cgroup.procs");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--pid",
            "--fork",
            "--uts",
            "--ipc",
            "--net",
            "--cgroup",
            "--kill-child",
            "--",
            "sh",
        ])
        .arg(&script)
        .arg(&mnt)
        .arg(agentseg_bin())
        .arg(probe_bin())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        let procs_c = std::ffi::CString::new(procs.to_str().expect("utf8")).expect("path");
        // SAFETY: after fork, before exec: only async-signal-safe calls (libc open, write and
        // close, on a path built before the fork).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let launcher = cmd.spawn().expect("unshare");
        let mut booted = Self {
            pid1: 0,
            launcher,
            _scratch: scratch,
            _tree: tree,
        };
        let children = format!("/proc/{0}/task/{0}/children", booted.launcher.id());
        let start = Instant::now();
        while booted.pid1 == 0 {
            booted.pid1 = std::fs::read_to_string(&children)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            if let Ok(Some(status)) = booted.launcher.try_wait() {
                panic!("the namespaces' PID 1 exited while setting up: {status}");
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no PID 1");
            std::thread::sleep(Duration::from_millis(20));
        }
        loop {
            let out = booted.exec(&["systemctl", "is-active", "systemd-journald.socket"]);
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "systemd did not come up within 30 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        booted
    }

    /// The container's root, as seen from the host.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1))
    }

    /// Write a file inside the container (parents created).
    pub fn write(&self, path: &str, text: &str) {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    pub fn remove(&self, path: &str) {
        let _ = std::fs::remove_file(self.root().join(path.trim_start_matches('/')));
    }

    /// A command run inside every namespace of the container, at its root.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid1.to_string(),
            "-m",
            "-p",
            "-n",
            "-u",
            "-i",
            "-r",
            "-w",
            "--",
        ])
        .args(args)
        .stdin(Stdio::null());
        cmd
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("nsenter")
    }

    /// `systemctl ARGS`: whether it succeeded, and what it said.
    pub fn systemctl(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["timeout", "30", "systemctl"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The journal of one unit since `cursor_time` (journalctl's `--since` syntax).
    pub fn journal(&self, unit: &str, since: &str) -> String {
        let out = self.exec(&[
            "journalctl",
            "-u",
            unit,
            "-o",
            "cat",
            "--no-pager",
            "--since",
            since,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether a path exists inside the container.
    pub fn exists(&self, path: &str) -> bool {
        Path::new(&self.root())
            .join(path.trim_start_matches('/'))
            .exists()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // unshare --kill-child: its death SIGKILLs PID 1, which takes the namespace with it.
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}
