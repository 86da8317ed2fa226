//! Host capacity: what this host can schedule, and what its machines
//! reserve. Each live machine reserves its `guest.cpus` and
//! `guest.memory_mb` (defaults: 1 shared vCPU, 256 MB, Fly's
//! shared-cpu-1x) from create until destroy; a create that does not fit
//! answers 503 `insufficient_capacity`. The figures are published to the
//! RIB's host row, where flaps places machines.
//!
//! Schedulable capacity is the host's CPUs times `cpu_overcommit` (shared
//! vCPUs per core, 16 by default, as shared CPUs are time-sliced) and its
//! memory times `memory_overcommit` (1.0 by default). Where cgroup v2 is
//! writable, a machine's memory is also limited to its reservation (see
//! [`crate::cgroup`]); elsewhere flyd says so at start.

use crate::config::FlydConfig;
use hangar_api::machine::MachineConfig;
use hangar_catalog::HostCapacity;
use hangar_catalog::lock::Guarded;
use std::time::Duration;

/// What one machine reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Guest {
    pub cpus: u64,
    pub memory_mb: u64,
}

impl Guest {
    /// The reservation of a machine with `config`.
    pub fn of(config: &MachineConfig) -> Self {
        let (cpus, memory_mb) = config.reservation();
        Self { cpus, memory_mb }
    }
}

/// This host's capacity and current reservations.
pub struct Capacity {
    cpus: u64,
    memory_mb: u64,
    reserved: Guarded<Guest>,
}

fn detect_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

impl Capacity {
    /// Capacity from the config (or what the host has), with `reserved`
    /// already taken by existing machines.
    pub fn new(cfg: &FlydConfig, reserved: Guest) -> Self {
        let cpus = cfg.cpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u64)
                .unwrap_or(1)
        });
        let memory_mb = cfg.memory_mb.unwrap_or_else(detect_memory_mb);
        Self {
            cpus: cpus * cfg.cpu_overcommit,
            memory_mb: (memory_mb as f64 * cfg.memory_overcommit) as u64,
            reserved: Guarded::new("flyd.capacity", Duration::from_secs(1), reserved),
        }
    }

    /// Reserves `guest`, or says why it does not fit.
    pub fn reserve(&self, guest: Guest) -> Result<(), String> {
        let (cpus, memory_mb) = (self.cpus, self.memory_mb);
        self.reserved
            .with("reserve", |r| {
                if r.cpus + guest.cpus > cpus || r.memory_mb + guest.memory_mb > memory_mb {
                    return Err(format!(
                        "host has {} of {cpus} vCPUs and {} of {memory_mb} MB free; the machine needs {} vCPUs and {} MB",
                        cpus.saturating_sub(r.cpus),
                        memory_mb.saturating_sub(r.memory_mb),
                        guest.cpus,
                        guest.memory_mb
                    ));
                }
                r.cpus += guest.cpus;
                r.memory_mb += guest.memory_mb;
                Ok(())
            })
            .map_err(|e| e.to_string())?
    }

    /// Returns a reservation.
    pub fn release(&self, guest: Guest) {
        let _ = self.reserved.with("release", |r| {
            r.cpus = r.cpus.saturating_sub(guest.cpus);
            r.memory_mb = r.memory_mb.saturating_sub(guest.memory_mb);
        });
    }

    /// The figures the RIB's host row carries.
    pub fn snapshot(&self) -> HostCapacity {
        let reserved = self.reserved.with("snapshot", |r| *r).unwrap_or_default();
        HostCapacity {
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            cpus_reserved: reserved.cpus,
            memory_mb_reserved: reserved.memory_mb,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_or_are_refused_and_release() {
        let cfg = FlydConfig {
            cpus: Some(2),
            memory_mb: Some(1024),
            cpu_overcommit: 2,
            memory_overcommit: 1.0,
            ..FlydConfig::default()
        };
        let cap = Capacity::new(
            &cfg,
            Guest {
                cpus: 1,
                memory_mb: 256,
            },
        );
        let guest = Guest::of(&MachineConfig::default());
        assert_eq!(
            guest,
            Guest {
                cpus: 1,
                memory_mb: 256
            }
        );
        cap.reserve(guest).unwrap();
        cap.reserve(guest).unwrap();
        let err = cap
            .reserve(Guest {
                cpus: 1,
                memory_mb: 512,
            })
            .unwrap_err();
        assert!(err.contains("256 of 1024 MB free"), "{err}");
        assert_eq!(cap.snapshot().memory_mb_reserved, 768);
        cap.release(guest);
        cap.reserve(Guest {
            cpus: 1,
            memory_mb: 512,
        })
        .unwrap();
        let snap = cap.snapshot();
        assert_eq!(
            (snap.cpus, snap.cpus_reserved, snap.memory_mb_reserved),
            (4, 3, 1024)
        );
    }
}
