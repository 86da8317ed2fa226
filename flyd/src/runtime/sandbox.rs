//! [`Sandboxes`]: what isolates a machine that runs an image. Each is an
//! OCI container that runc runs (under the machine's pilot) from a bundle
//! made here:
//!
//! - its root: an overlay of the image's unpacked root (shared, read-only
//!   below) and an upper layer in the machine's directory, made anew at
//!   every start, as a Fly machine's root file system is;
//! - its `config.json`: the command and environment, the image's working
//!   directory and user; its own mount, PID, UTS (hostname = machine id),
//!   IPC, cgroup, network and user namespaces (the network made by the
//!   hook [`Network`] gives runc), the user namespace mapping the
//!   machine's ids to the unprivileged range the image was unpacked with;
//!   no new privileges, a small capability set and a seccomp profile that
//!   refuses what containers have no business doing; a cgroup with the
//!   guest's memory, CPU and a pids limit;
//! - Hangar's binary, read-only at [`HANGAR_MOUNT`], with its loader and
//!   libraries at [`LIB_MOUNT`]: the sandbox's PID 1 is `hangar init`
//!   (crate::init), which runs the command; the built-in image runs it too.
//!
//! Paths, under `<mounts_dir>/<instance>`: the root's mount point, because
//! the machine's root user (an unprivileged id on the host) must be able to
//! walk to it: the way there is open to the machines' root group alone
//! (mode 0710). The bundle and runc's state hold the machine's
//! environment, secrets included: they live in `private/`, a memory file
//! system of flyd's own (mode 0700), so no secret is ever written to disk.

use super::network::{Network, NetworkConfig};
use super::{Launch, NoSandboxes, find_on_path};
use crate::images::builtin::{HANGAR_MOUNT, loaded_libraries, own_interpreter};
use crate::images::{IDS_PER_MACHINE, IdShift};
use crate::pilot::SandboxSpec;
use serde::Deserialize;
use serde_json::json;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where a machine sees the loader and libraries of Hangar's binary, so it
/// runs whatever the image's own libc (or none).
pub const LIB_MOUNT: &str = "/.hangar/lib";

/// The `[flyd.sandbox]` config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// The OCI runtime's binary; unset means `runc` on the PATH.
    pub runc: Option<PathBuf>,
    /// Where machines' roots are mounted (a directory of this host's own
    /// below it, walkable by the machines' ids).
    pub mounts_dir: PathBuf,
    /// Most processes (and threads) one machine may have.
    pub pids_max: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            runc: None,
            mounts_dir: PathBuf::from("/run/hangar"),
            pids_max: 4096,
        }
    }
}

/// What a sandboxed launch needs beyond [`Launch`]: the image's root and
/// how to run in it.
#[derive(Debug, Clone)]
pub struct LaunchImage {
    /// The image's unpacked root (the overlay's lower layer).
    pub root: PathBuf,
    /// The working directory (the image's, or `/`).
    pub cwd: String,
    /// The image's `User` (`uid[:gid]` or names from its `/etc/passwd`).
    pub user: String,
    pub cpus: u64,
    /// `shared` CPUs get a share of a core's time, bursting to `cpus`;
    /// `performance` ones a full core's weight each.
    pub shared_cpu: bool,
    /// Whether it is the built-in image (which can run without a sandbox,
    /// Hangar's binary being its only program).
    pub builtin: bool,
    /// The machine's address, in its network namespace.
    pub address: Ipv4Addr,
}

/// The host's sandboxes.
#[derive(Debug)]
pub struct Sandboxes {
    runc: PathBuf,
    /// runc's `--root`, in `private`.
    state: PathBuf,
    /// Each machine's bundle (`<id>/config.json`), in `private`.
    bundles: PathBuf,
    /// The memory file system of bundles and runc's state.
    private: PathBuf,
    /// This instance's mount points: `<mounts_dir>/<instance>`.
    mounts: PathBuf,
    /// Hangar's binary, bound under `mounts`.
    exe: PathBuf,
    /// Its loader and libraries, copied under `mounts`.
    lib: PathBuf,
    /// The loader's file name in `lib`.
    loader: String,
    /// `/hangar-<host id>`: the machines' cgroups are below it.
    cgroup_parent: String,
    ids: IdShift,
    network: Network,
    pids_max: u32,
    /// Open files a machine's processes may have: what flyd may (a user
    /// namespace cannot raise it).
    nofile: u64,
}

impl Sandboxes {
    /// Checks that this host can make sandboxes (root, runc, overlayfs,
    /// nftables) and prepares what they share; or says why it cannot.
    pub fn setup(
        config: &SandboxConfig,
        network: &NetworkConfig,
        data_dir: &Path,
        exe: &Path,
        host_id: &str,
        ids: IdShift,
    ) -> Result<Self, NoSandboxes> {
        if !nix::unistd::geteuid().is_root() {
            return Err("sandboxes need root (user namespaces, cgroups, overlay mounts)".into());
        }
        let runc = match &config.runc {
            Some(path) => path.clone(),
            None => find_on_path("runc")
                .ok_or("runc is not installed (apt-get install runc), or set flyd.sandbox.runc")?,
        };
        let version = std::process::Command::new(&runc)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", runc.display()))?;
        if !version.status.success() {
            return Err(format!("{} --version failed", runc.display()).into());
        }
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems
            .lines()
            .any(|l| l.trim_end().ends_with("overlay"))
        {
            return Err("the kernel has no overlay file system".into());
        }
        let fail = |what: &str, e: io::Error| format!("{what}: {e}");
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| fail("resolving the data dir", e))?;
        let instance = &crate::images::blobs::digest_of(data_dir.as_os_str().as_encoded_bytes())
            ["sha256:".len()..][..16];
        let mounts = config.mounts_dir.join(instance);
        // The network first: a block that overlaps the host's routes fails
        // it before anything is mounted.
        let network = Network::setup(network, instance, exe)?;
        let (bound, lib, loader, private) = match share(config, &mounts, exe, ids.base) {
            Ok(shared) => shared,
            Err(e) => {
                // Undone, unless machines run on it (flyd restarted).
                let _ = crate::mounts::remove_mount(&mounts.join("hangar"));
                let _ = std::fs::remove_dir_all(mounts.join("lib"));
                let containers = std::fs::read_dir(mounts.join("private/runc"))
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                if !containers {
                    let _ = crate::mounts::remove_mount(&mounts.join("private"));
                    network.remove();
                }
                return Err(e.into());
            }
        };
        let (state, bundles) = (private.join("runc"), private.join("bundles"));
        Ok(Self {
            runc,
            state,
            bundles,
            private,
            mounts,
            exe: bound,
            lib,
            loader,
            cgroup_parent: format!("/hangar-{host_id}"),
            ids,
            network,
            pids_max: config.pids_max,
            nofile: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(_, hard)| hard.min(65536))
                .unwrap_or(1024),
        })
    }

    /// The block machines' addresses come from.
    pub fn network_block(&self) -> hangar_api::AddrBlock {
        self.network.block()
    }

    fn mount_point(&self, id: &str) -> PathBuf {
        self.mounts.join("roots").join(id)
    }

    /// Makes machine `id`'s root and bundle in `machine_dir` (after
    /// removing what an earlier run left), for pilot to run.
    pub fn prepare(
        &self,
        id: &str,
        machine_dir: &Path,
        launch: &Launch,
        image: &LaunchImage,
    ) -> Result<SandboxSpec, String> {
        self.remove(id)?;
        // Before anything is mounted: an image naming a user it does not
        // have fails here, leaving nothing.
        let (uid, gid) = resolve_user(&image.root, &image.user)?;
        let prepared = self.prepare_root(id, machine_dir, launch, image, uid, gid);
        if prepared.is_err() {
            let _ = self.remove(id);
        }
        prepared
    }

    /// [`Sandboxes::prepare`]'s root and bundle.
    fn prepare_root(
        &self,
        id: &str,
        machine_dir: &Path,
        launch: &Launch,
        image: &LaunchImage,
        uid: u32,
        gid: u32,
    ) -> Result<SandboxSpec, String> {
        let fail = |what: &str, e: io::Error| format!("{what} of machine {id}: {e}");
        // A fresh upper layer: what the last run wrote is gone, as on Fly.
        let (upper, work) = (machine_dir.join("upper"), machine_dir.join("work"));
        for dir in [&upper, &work] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(fail("clearing the root's upper layer", e));
                }
                _ => {}
            }
            std::fs::create_dir_all(dir).map_err(|e| fail("making the root's upper layer", e))?;
        }
        // The root directory is the upper layer's: the machine's root owns
        // it, and every user of the machine walks it (whatever our umask).
        chown(&upper, self.ids.base).map_err(|e| fail("owning the root", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| fail("opening the root", e))?;
        }
        let target = self.mount_point(id);
        machines_dir(&target, self.ids.base)
            .map_err(|e| fail("making the root's mount point", e))?;
        // overlayfs splits its options at ',' and its lower layers at ':'.
        let paths = [image.root.as_path(), upper.as_path(), work.as_path()];
        if let Some(bad) = paths
            .iter()
            .find(|p| p.to_string_lossy().contains([',', ':']))
        {
            return Err(format!(
                "{} cannot be an overlay layer: move the data dir to a path without ',' or ':'",
                bad.display()
            ));
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            image.root.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| format!("mounting the root of machine {id}: {e}"))?;

        let hook = self.network.hook(id, image.address)?;
        // Earlier versions kept it, secrets and all, on disk.
        let _ = std::fs::remove_dir_all(machine_dir.join("bundle"));
        let bundle = self.bundles.join(id);
        std::fs::create_dir_all(&bundle).map_err(|e| fail("making the bundle", e))?;
        let config = self.config(id, launch, image, (&target, hook), uid, gid);
        // Checked against the runtime spec's types before runc sees it.
        serde_json::from_value::<oci_spec::runtime::Spec>(config.clone())
            .map_err(|e| format!("the sandbox config of machine {id} is not a valid spec: {e}"))?;
        let path = bundle.join("config.json");
        let _ = std::fs::remove_file(&path);
        crate::images::private_file(&path)
            .and_then(|mut file| io::Write::write_all(&mut file, config.to_string().as_bytes()))
            .map_err(|e| fail("writing the bundle", e))?;
        Ok(SandboxSpec {
            runc: self.runc.clone(),
            state: self.state.clone(),
            bundle,
            container: id.to_string(),
            root: target,
            freezer: self.freezer(id),
        })
    }

    /// The container's freezer file, where this host has one.
    fn freezer(&self, id: &str) -> Option<PathBuf> {
        let path = format!("{}/{id}", self.cgroup_parent);
        let v1 = PathBuf::from(format!("/sys/fs/cgroup/freezer{path}/freezer.state"));
        let v2 = PathBuf::from(format!("/sys/fs/cgroup{path}/cgroup.freeze"));
        if Path::new("/sys/fs/cgroup/freezer").is_dir() {
            Some(v1)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
            Some(v2)
        } else {
            None
        }
    }

    /// The OCI runtime config of machine `id`.
    fn config(
        &self,
        id: &str,
        launch: &Launch,
        image: &LaunchImage,
        (root, network_hook): (&Path, serde_json::Value),
        uid: u32,
        gid: u32,
    ) -> serde_json::Value {
        const PERIOD: u64 = 100_000;
        let memory = (launch.memory_mb * 1024 * 1024) as i64;
        let cpus = image.cpus.max(1);
        // Shared CPUs weigh a sixteenth of a core each (Fly's shared-cpu
        // baseline), performance ones a core each; both may use up to
        // `cpus` cores when the host has them free.
        let shares = if image.shared_cpu {
            64 * cpus
        } else {
            1024 * cpus
        };
        let env: Vec<String> = launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // PID 1 is Hangar's init, run by its own loader, whatever libc the
        // image has; it runs the command.
        let loader = format!("{LIB_MOUNT}/{}", self.loader);
        let mut args: Vec<&str> = vec![&loader, "--library-path", LIB_MOUNT, HANGAR_MOUNT];
        args.extend(["init", "--"]);
        args.extend(launch.argv.iter().map(String::as_str));
        let mapping = json!([{"containerID": 0, "hostID": self.ids.base, "size": IDS_PER_MACHINE}]);
        let caps = CAPABILITIES.to_vec();
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": uid, "gid": gid},
                "args": args,
                "env": env,
                "cwd": if image.cwd.is_empty() { "/" } else { &image.cwd },
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": self.nofile, "soft": self.nofile}],
                "noNewPrivileges": true,
            },
            "root": {"path": root, "readonly": false},
            "hostname": id,
            "hooks": {"createRuntime": [network_hook]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": HANGAR_MOUNT, "type": "bind", "source": self.exe,
                 "options": ["bind", "ro", "nosuid", "nodev"]},
                {"destination": LIB_MOUNT, "type": "bind", "source": self.lib,
                 "options": ["bind", "ro", "nosuid", "nodev"]},
            ],
            "linux": {
                "uidMappings": mapping,
                "gidMappings": mapping,
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                    {"type": "mount"}, {"type": "cgroup"}, {"type": "user"},
                    {"type": "network"},
                ],
                "cgroupsPath": format!("{}/{id}", self.cgroup_parent),
                "resources": {
                    "devices": [{"allow": false, "access": "rwm"}],
                    "memory": {"limit": memory, "swap": memory},
                    "cpu": {"shares": shares, "quota": (cpus * PERIOD) as i64, "period": PERIOD},
                    "pids": {"limit": i64::from(self.pids_max)},
                },
                "seccomp": seccomp(),
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                ],
                "readonlyPaths": [
                    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                ],
            },
        })
    }

    /// Removes what machine `id`'s sandbox left: its container (killed,
    /// if it runs), cgroup, network (which goes with the container) and
    /// root mount. Nothing there is fine.
    pub fn remove(&self, id: &str) -> Result<(), String> {
        if self.state.join(id).exists() {
            let out = std::process::Command::new(&self.runc)
                .arg("--root")
                .arg(&self.state)
                .args(["delete", "--force", id])
                .output()
                .map_err(|e| format!("{}: {e}", self.runc.display()))?;
            if !out.status.success() && self.state.join(id).exists() {
                return Err(format!(
                    "removing the container of machine {id}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        crate::mounts::remove_mount(&self.mount_point(id))
            .map_err(|e| format!("the root of machine {id}: {e}"))?;
        match std::fs::remove_dir_all(self.bundles.join(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(format!("removing the bundle of machine {id}: {e}"))
            }
            _ => Ok(()),
        }
    }

    /// Unbinds Hangar's binary and removes this instance's mount
    /// directory if no machine's root is left in it, and the machines'
    /// bridge and filter if no container is. Running containers keep their
    /// own mounts of the binary.
    pub fn shutdown(&self) {
        if self.machines().is_empty() {
            self.network.remove();
            let _ = crate::mounts::remove_mount(&self.private);
        }
        let _ = nix::mount::umount2(&self.exe, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.exe);
        let _ = std::fs::remove_dir_all(&self.lib);
        let _ = std::fs::remove_dir(self.mounts.join("roots"));
        let _ = std::fs::remove_dir(&self.mounts);
    }

    /// The machines that have something here (a container or a mount).
    pub fn machines(&self) -> Vec<String> {
        let mut ids: Vec<String> = [&self.state, &self.bundles, &self.mounts.join("roots")]
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Docker's default capabilities, less `NET_RAW` and `MKNOD`.
const CAPABILITIES: [&str; 12] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The seccomp profile: everything is allowed but what Docker's default
/// profile refuses a container without extra capabilities (kernel
/// modules, keyrings, clocks, mounts, namespaces, BPF, perf, reboot,
/// io_uring...), which fails with EPERM. Namespaces cannot be made with
/// `clone` either (its flags are checked); `clone3`, whose flags seccomp
/// cannot see, reports ENOSYS so that libc falls back to `clone`.
fn seccomp() -> serde_json::Value {
    const REFUSED: &[&str] = &[
        "acct",
        "add_key",
        "bpf",
        "clock_adjtime",
        "clock_settime",
        "create_module",
        "delete_module",
        "finit_module",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "get_kernel_syms",
        "init_module",
        "io_uring_enter",
        "io_uring_register",
        "io_uring_setup",
        "ioperm",
        "iopl",
        "kcmp",
        "kexec_file_load",
        "kexec_load",
        "keyctl",
        "lookup_dcookie",
        "mount",
        "mount_setattr",
        "move_mount",
        "name_to_handle_at",
        "nfsservctl",
        "open_by_handle_at",
        "open_tree",
        "perf_event_open",
        "pivot_root",
        "query_module",
        "quotactl",
        "reboot",
        "request_key",
        "setns",
        "settimeofday",
        "swapoff",
        "swapon",
        "_sysctl",
        "sysfs",
        "umount",
        "umount2",
        "unshare",
        "uselib",
        "userfaultfd",
        "ustat",
        "vm86",
        "vm86old",
    ];
    // CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
    const NAMESPACE_FLAGS: [u64; 7] = [
        0x0002_0000,
        0x0200_0000,
        0x0400_0000,
        0x0800_0000,
        0x1000_0000,
        0x2000_0000,
        0x4000_0000,
    ];
    let arches: &[&str] = match std::env::consts::ARCH {
        "aarch64" => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    };
    let mut syscalls = vec![
        json!({"names": REFUSED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}),
    ];
    for flag in NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches, "syscalls": syscalls})
}

/// Copies Hangar's loader and libraries into `dir` (anew), for machines to
/// see at [`LIB_MOUNT`]; returns the dir and the loader's file name.
fn copy_libraries(dir: &Path, ids_base: u32) -> Result<(PathBuf, String), String> {
    let fail = |e: io::Error| format!("copying Hangar's libraries to {}: {e}", dir.display());
    let _ = std::fs::remove_dir_all(dir);
    machines_dir(dir, ids_base).map_err(fail)?;
    let libraries = loaded_libraries().map_err(|e| e.to_string())?;
    for lib in &libraries {
        let name = lib.file_name().expect("libraries have names");
        std::fs::copy(lib, dir.join(name)).map_err(fail)?;
    }
    let loader = own_interpreter()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| dir.join(name).is_file())
        .ok_or("Hangar's binary has no dynamic loader among its libraries")?;
    Ok((dir.to_path_buf(), loader))
}

/// What every machine of the instance at `mounts` shares: the way to
/// their roots, Hangar's binary bound beside them and its libraries, and
/// the memory file system of their bundles and runc's state. Returns the
/// binary's and the libraries' paths, the loader's name and the private
/// dir.
fn share(
    config: &SandboxConfig,
    mounts: &Path,
    exe: &Path,
    ids_base: u32,
) -> Result<(PathBuf, PathBuf, String, PathBuf), String> {
    let fail = |what: &str, e: io::Error| format!("{what}: {e}");
    walkable_dir(&config.mounts_dir).map_err(|e| fail("making the mounts dir", e))?;
    for dir in [mounts, &mounts.join("roots")] {
        machines_dir(dir, ids_base).map_err(|e| fail("making the mounts dir", e))?;
    }
    let private = mounts.join("private");
    memory_dir(&private).map_err(|e| fail("mounting the bundles' memory file system", e))?;
    for dir in [private.join("runc"), private.join("bundles")] {
        std::fs::create_dir_all(dir).map_err(|e| fail("making the bundles' dirs", e))?;
    }
    // Hangar's binary where every machine's user can reach it: bound (not
    // copied) beside the mount points.
    let bound = mounts.join("hangar");
    let _ = nix::mount::umount2(&bound, nix::mount::MntFlags::MNT_DETACH);
    std::fs::write(&bound, b"").map_err(|e| fail("making the binary's mount point", e))?;
    nix::mount::mount(
        Some(exe),
        &bound,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} at {}: {e}", exe.display(), bound.display()))?;
    let (lib, loader) = copy_libraries(&mounts.join("lib"), ids_base)?;
    Ok((bound, lib, loader, private))
}

/// The most the bundles' memory file system holds (it takes only what its
/// files use).
const PRIVATE_SIZE: &str = "size=256m";

/// `path`, a memory file system only root may enter (mounted there unless
/// it is already: flyd restarted while machines ran).
fn memory_dir(path: &Path) -> io::Result<()> {
    dir_with_mode(path, 0o700)?;
    let on_tmpfs = nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if !on_tmpfs {
        use nix::mount::MsFlags;
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(format!("mode=0700,{PRIVATE_SIZE}").as_str()),
        )
        .map_err(io::Error::from)?;
    }
    Ok(())
}

/// A directory only root may change, that anyone may walk through (not
/// list): the shared parent of every instance's mounts. (Its parents must
/// be made so first: the mode of those `create` makes is cut by the umask.)
fn walkable_dir(path: &Path) -> io::Result<()> {
    dir_with_mode(path, 0o711)
}

/// A directory on the way to the machines' roots: root's, walkable by the
/// machines' root group (`ids_base` on the host, which runc's mounts need)
/// and by no one else, so no host user reaches into a machine's files.
fn machines_dir(path: &Path, ids_base: u32) -> io::Result<()> {
    dir_with_mode(path, 0o710)?;
    rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(ids_base)))
        .map_err(io::Error::from)
}

fn dir_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn chown(path: &Path, id: u32) -> io::Result<()> {
    rustix::fs::chown(
        path,
        Some(rustix::fs::Uid::from_raw(id)),
        Some(rustix::fs::Gid::from_raw(id)),
    )
    .map_err(io::Error::from)
}

/// The uid and gid an image's `User` names (`uid`, `uid:gid`, `name`,
/// `name:group`; names from the image's own `/etc/passwd` and
/// `/etc/group`, read inside its root).
fn resolve_user(root: &Path, user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (who, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = read_in_root(root, file)?;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name)).then(|| {
                let id = fields.get(2)?.parse().ok()?;
                let gid = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((id, gid))
            })?
        })
    };
    let (uid, primary) = match who.parse::<u32>() {
        Ok(uid) => (uid, lookup_by_id(root, uid).unwrap_or(uid)),
        Err(_) => lookup("etc/passwd", who)
            .ok_or_else(|| format!("the image's user {who:?} is not in its /etc/passwd"))?,
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("etc/group", g)
                    .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?
                    .0
            }
        },
    };
    if uid >= IDS_PER_MACHINE || gid >= IDS_PER_MACHINE {
        return Err(format!(
            "the image's user {user:?} is outside the {IDS_PER_MACHINE} ids a machine has"
        ));
    }
    Ok((uid, gid))
}

/// The primary gid of `uid` in the image's `/etc/passwd`.
fn lookup_by_id(root: &Path, uid: u32) -> Option<u32> {
    let text = read_in_root(root, "etc/passwd")?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == uid).then(|| fields.get(3)?.parse().ok())?
    })
}

/// A small file of the image, its path resolved inside the image's root
/// (an image's `/etc/passwd` may be a symlink anywhere).
fn read_in_root(root: &Path, path: &str) -> Option<String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let fd = rustix::fs::openat2(
        &dir,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let mut text = String::new();
    io::Read::read_to_string(
        &mut io::Read::take(std::fs::File::from(fd), 1 << 20),
        &mut text,
    )
    .ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_inside_the_image() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let r = root.path();
        assert_eq!(resolve_user(r, ""), Ok((0, 0)));
        assert_eq!(resolve_user(r, "app"), Ok((1000, 1001)));
        assert_eq!(resolve_user(r, "1000"), Ok((1000, 1001)));
        assert_eq!(resolve_user(r, "app:staff"), Ok((1000, 50)));
        assert_eq!(resolve_user(r, "7:8"), Ok((7, 8)));
        assert!(
            resolve_user(r, "ghost")
                .unwrap_err()
                .contains("not in its /etc/passwd")
        );
        assert!(resolve_user(r, "70000").unwrap_err().contains("outside"));

        // An /etc/passwd that is a symlink out of the image is read inside.
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("etc/passwd")).unwrap();
        assert!(
            resolve_user(r, "root")
                .unwrap_err()
                .contains("not in its /etc/passwd")
        );
    }

    #[test]
    fn the_seccomp_profile_is_a_valid_spec() {
        let profile = seccomp();
        serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(profile).unwrap();
    }
}
