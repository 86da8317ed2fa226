//! Debian packages the tests need (a registry server, busybox), installed
//! by the tests themselves on first use, so `cargo test` on a fresh
//! machine needs nothing done by hand. One install at a time across test
//! processes (a lock file), `apt-get update` only when an install fails.

use std::process::Command;

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Makes sure every package in `packages` is installed, or panics saying
/// why it cannot be.
pub fn require(packages: &[&str]) {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return;
    }
    // Serialize with other test processes doing the same.
    let lock = std::fs::File::create("/tmp/hangar-tests-apt.lock").expect("apt lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|held| {
            let missing: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
            if !missing.is_empty() {
                install(&missing);
            }
            drop(held);
        })
        .expect("locking the apt lock file");
}

fn install(packages: &[&str]) {
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(packages);
    let first = apt(&args);
    if first.as_ref().is_ok_and(|o| o.status.success()) {
        return;
    }
    let _ = apt(&["update"]);
    match apt(&args) {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "these tests need the Debian packages {packages:?}, and apt-get could not install them (as root, with the Debian mirror reachable): {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("these tests need the Debian packages {packages:?}; apt-get: {e}"),
    }
}
