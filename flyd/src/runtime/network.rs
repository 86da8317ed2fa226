//! [`Network`]: a network namespace of its own for every sandboxed
//! machine, so it listens on `0.0.0.0:8080` as a Fly app does and can bind
//! no other machine's address.
//!
//! - The host has one bridge per Hangar instance (`hg<instance>`) holding
//!   the block's first address, the machines' gateway. The host reaches a
//!   machine's address through it: the proxy and flyd's checks connect to
//!   it as to any address of the host's.
//! - runc makes the machine's namespace with its others (owned by the
//!   machine's user namespace, so `runc exec` can join it and sysfs can be
//!   mounted in it). Before the machine's command runs, runc runs Hangar's
//!   `createRuntime` hook ([`run_hook`]), which makes a veth pair: `eth0`
//!   inside, with the machine's address and a default route through the
//!   gateway; `hv<instance><machine>` a port of the bridge. The machine
//!   has no `CAP_NET_ADMIN` and cannot make namespaces, so it cannot change
//!   either. The namespace, and the pair with it, goes with the container.
//! - nftables (one `inet` and one `bridge` table per instance, replaced
//!   whole at every flyd start) keeps a machine from everything of the
//!   host's but its gateway: bridged frames between machines are dropped;
//!   from the bridge, the host accepts only replies to its own connections
//!   (the proxy's, the checks') and pings to the gateway; nothing from
//!   elsewhere opens a connection to a machine. With `outbound` on, what
//!   machines send beyond the host is forwarded and masqueraded, as
//!   Docker does (which needs the host's IPv4 forwarding, turned on then).
//!
//! Links and addresses are made with netlink (`rtnetlink`); the filter is
//! loaded by the `nft` tool, in one transaction.

use super::{NoSandboxes, find_on_path};
use hangar_api::AddrBlock;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The `[flyd.network]` config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The block sandboxed machines' addresses come from. Its first usable
    /// address is their gateway, on this host's bridge. It must overlap
    /// no network this host already routes.
    pub block: AddrBlock,
    /// Whether machines reach beyond this host (forwarded, masqueraded).
    pub outbound: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            // Where a Fly machine's own IPv4 address is.
            block: "172.19.0.0/16".parse().expect("an address block"),
            outbound: true,
        }
    }
}

impl NetworkConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.block.base().is_loopback() {
            return Err(format!(
                "flyd.network.block: {} is a loopback block; machines' networks need a block of their own (such as \"172.19.0.0/16\")",
                self.block
            ));
        }
        Ok(())
    }
}

/// The machines' networks on this host.
#[derive(Debug)]
pub struct Network {
    block: AddrBlock,
    gateway: Ipv4Addr,
    /// `hg<instance>`.
    bridge: String,
    /// The start of every machine's host-side link name.
    veth_prefix: String,
    /// The nftables tables' name.
    table: String,
    nft: PathBuf,
    /// Hangar's binary, which runs the hook.
    exe: PathBuf,
}

/// The name a machine's interface has inside its namespace.
const MACHINE_LINK: &str = "eth0";

/// What the hook attaches: passed as its argument, in JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct Attach {
    pub bridge: String,
    /// The host end's name.
    pub veth: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl Network {
    /// Makes (or finds) this instance's bridge and loads its filter; or
    /// says why this host cannot. `instance` is a hex name unique to this
    /// Hangar on this host; `exe` runs the hook.
    pub fn setup(config: &NetworkConfig, instance: &str, exe: &Path) -> Result<Self, NoSandboxes> {
        let nft = find_on_path("nft").ok_or("nft is not installed (apt-get install nftables)")?;
        let gateway = Ipv4Addr::from(*config.block.hosts().start());
        let network = Self {
            block: config.block,
            gateway,
            bridge: format!("hg{}", &instance[..12]),
            veth_prefix: format!("hv{}", &instance[..6]),
            table: format!("hangar_{instance}"),
            nft,
            exe: exe.to_path_buf(),
        };
        let (block, bridge) = (network.block, network.bridge.clone());
        let overlap = on_own_thread(move || {
            run(async move {
                let host = connect()?;
                if let Some(route) = check_block_is_free(&host, block, &bridge).await? {
                    return Ok(Some(route));
                }
                let index = match link_index(&host, &bridge).await? {
                    Some(index) => index,
                    None => {
                        host.link()
                            .add(LinkBridge::new(&bridge).build())
                            .execute()
                            .await
                            .map_err(|e| format!("making the bridge {bridge}: {e}"))?;
                        link_index(&host, &bridge)
                            .await?
                            .ok_or("the new bridge is gone")?
                    }
                };
                if let Err(e) = host
                    .address()
                    .add(index, IpAddr::V4(gateway), block.prefix())
                    .execute()
                    .await
                    && !already_exists(&e)
                {
                    return Err(format!("giving {bridge} the gateway {gateway}: {e}"));
                }
                // A MAC address of its own: a bridge left to itself takes
                // its ports' lowest, which changes as machines come and go,
                // and each change leaves every machine sending to the
                // gateway's last one until its neighbour entry expires.
                let [a, b, c, d] = gateway.octets();
                host.link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .address(vec![0x02, 0x47, a, b, c, d])
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| format!("bringing {bridge} up: {e}"))?;
                Ok(None)
            })
        })?;
        if let Some(route) = overlap {
            return Err(NoSandboxes::Misconfigured(format!(
                "flyd.network.block {block} overlaps {route}, which this host already routes elsewhere: pick another block (or --machine-network)",
                block = network.block
            )));
        }
        network.load_filter(config.outbound)?;
        if config.outbound {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| format!("turning on IPv4 forwarding for outbound traffic: {e}"))?;
        }
        Ok(network)
    }

    /// The block machines' addresses come from.
    pub fn block(&self) -> AddrBlock {
        self.block
    }

    /// The host-side link name of machine `id`'s veth pair: the
    /// instance's prefix and a hash of the id, in the 15 bytes a link
    /// name may have.
    fn veth(&self, id: &str) -> String {
        let hash = crate::images::blobs::digest_of(id.as_bytes());
        format!("{}{}", self.veth_prefix, &hash["sha256:".len()..][..7])
    }

    /// The OCI `createRuntime` hook that gives machine `id` its network,
    /// with `address`, as runc creates its namespaces.
    pub fn hook(&self, id: &str, address: Ipv4Addr) -> Result<serde_json::Value, String> {
        if !self.block.contains(address) || address == self.gateway {
            return Err(format!(
                "machine {id}'s address {address} is not a machine's address in {}",
                self.block
            ));
        }
        let attach = Attach {
            bridge: self.bridge.clone(),
            veth: self.veth(id),
            address,
            prefix: self.block.prefix(),
            gateway: self.gateway,
        };
        let attach = serde_json::to_string(&attach).expect("attach serializes");
        Ok(serde_json::json!({
            "path": self.exe,
            "args": ["hangar", HOOK_COMMAND, attach],
            "timeout": 10,
        }))
    }

    /// Removes the bridge and the filter (when no machine runs: a
    /// machine's veth that lingers goes with the bridge).
    pub fn remove(&self) {
        let bridge = self.bridge.clone();
        if let Err(e) =
            on_own_thread(move || run(async move { remove_link(&connect()?, &bridge).await }))
        {
            tracing::warn!(error = %e, "removing the machines' bridge");
        }
        let script = format!(
            "delete table inet {t}\ndelete table bridge {t}\n",
            t = self.table
        );
        if let Err(e) = self.nft(&script) {
            tracing::warn!(error = %e, "removing the machines' filter");
        }
    }

    /// Replaces this instance's nftables tables with the filter described
    /// in the module's doc, in one transaction.
    fn load_filter(&self, outbound: bool) -> Result<(), String> {
        let (t, br, gw, block) = (&self.table, &self.bridge, self.gateway, self.block);
        let ports = format!("{}*", self.veth_prefix);
        let outward = if outbound {
            format!("iifname \"{br}\" oifname != \"{br}\" accept")
        } else {
            format!("iifname \"{br}\" drop")
        };
        let nat = if outbound {
            format!(
                "chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {block} oifname != \"{br}\" masquerade\n  }}"
            )
        } else {
            String::new()
        };
        // Declaring a table before deleting it makes the delete succeed on
        // a first start; the whole script is one transaction.
        let script = format!(
            "table inet {t} {{}}\ndelete table inet {t}\n\
             table inet {t} {{\n\
             \x20 chain input {{\n    type filter hook input priority filter; policy accept;\n\
             \x20   iifname \"{br}\" ct state established,related accept\n\
             \x20   iifname \"{br}\" ip daddr {gw} icmp type echo-request accept\n\
             \x20   iifname \"{br}\" drop\n  }}\n\
             \x20 chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
             \x20   oifname \"{br}\" ct state established,related accept\n\
             \x20   oifname \"{br}\" drop\n\
             \x20   {outward}\n  }}\n\
             \x20 {nat}\n}}\n\
             table bridge {t} {{}}\ndelete table bridge {t}\n\
             table bridge {t} {{\n\
             \x20 chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{ports}\" oifname \"{ports}\" drop\n  }}\n}}\n"
        );
        self.nft(&script)
            .map_err(|e| format!("loading the machines' filter: {e}"))
    }

    fn nft(&self, script: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = std::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.nft.display()))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

/// The hidden command runc runs as the hook: `hangar <HOOK_COMMAND> <attach>`.
pub const HOOK_COMMAND: &str = "network-hook";

/// The hook: gives the container whose state runc writes on `state` (its
/// init's pid) the network `attach` describes (JSON). Runs as its own
/// process, in the host's namespaces.
pub fn run_hook(attach: &str, state: impl std::io::Read) -> Result<(), String> {
    #[derive(Deserialize)]
    struct State {
        pid: u32,
    }
    let attach: Attach =
        serde_json::from_str(attach).map_err(|e| format!("the hook's argument: {e}"))?;
    let state: State =
        serde_json::from_reader(state).map_err(|e| format!("the container's state: {e}"))?;
    let netns = std::fs::File::open(format!("/proc/{}/ns/net", state.pid))
        .map_err(|e| format!("the container's network namespace: {e}"))?;
    run(async move {
        let host = connect()?;
        // A start that failed may have left it (until its namespace went).
        remove_link(&host, &attach.veth).await?;
        let Attach {
            bridge,
            veth,
            address,
            prefix,
            gateway,
        } = attach;
        let bridge_index = link_index(&host, &bridge)
            .await?
            .ok_or_else(|| format!("the bridge {bridge} is gone"))?;
        // Made here, its other end in the container's namespace as it is,
        // with the MAC address its IP address implies: the host's neighbour
        // entry for the address stays right across the machine's restarts
        // (a new random one would leave the host sending to the last run's
        // until the entry expired, seconds later).
        let [a, b, c, d] = address.octets();
        let peer = LinkUnspec::new_with_name(MACHINE_LINK)
            .address(vec![0x02, 0x48, a, b, c, d])
            .setns_by_fd(netns.as_raw_fd())
            .build();
        host.link()
            .add(
                LinkVeth::new(&veth, MACHINE_LINK)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| format!("making the veth pair {veth}: {e}"))?;
        // Inside now: this process does nothing else.
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the container's network namespace: {e}"))?;
        // No IPv6 until the private network gives it an address plan:
        // without even a link-local address, nothing travels over it, so
        // no path around the filter is left untested. (These are the
        // namespace's own sysctls, as this process sees them now; `all`
        // reaches `eth0`, made before.)
        for scope in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
            match std::fs::write(&path, "1") {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("turning IPv6 off in the machine: {e}"));
                }
                _ => {}
            }
        }
        let inside = connect()?;
        let eth0 = link_index(&inside, MACHINE_LINK)
            .await?
            .ok_or("the machine's link is gone")?;
        let lo = link_index(&inside, "lo").await?.ok_or("no loopback link")?;
        inside
            .address()
            .add(eth0, IpAddr::V4(address), prefix)
            .execute()
            .await
            .map_err(|e| format!("giving the machine {address}: {e}"))?;
        for index in [lo, eth0] {
            inside
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|e| format!("bringing the machine's links up: {e}"))?;
        }
        inside
            .route()
            .add(
                rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| format!("routing through the gateway {gateway}: {e}"))
    })
}

/// Runs `work` on a thread of its own and waits for it: a thread that
/// enters a network namespace stays in it, so it must be one that ends.
fn on_own_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    std::thread::spawn(work)
        .join()
        .map_err(|_| "the network thread panicked".to_string())?
}

/// Runs netlink calls to completion on the calling thread.
fn run<T>(work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("starting a netlink runtime: {e}"))?
        .block_on(work)
}

/// A netlink connection in the calling thread's network namespace (a
/// socket stays in the namespace it was made in).
fn connect() -> Result<Handle, String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("opening netlink: {e}"))?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, String> {
    use futures_util::TryStreamExt;
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(format!("looking up {name}: {e}")),
    }
}

/// Removes the link `name`, if there is one.
async fn remove_link(handle: &Handle, name: &str) -> Result<(), String> {
    if let Some(index) = link_index(handle, name).await? {
        match handle.link().del(index).execute().await {
            Err(e) if !is_gone(&e) => return Err(format!("removing {name}: {e}")),
            _ => {}
        }
    }
    Ok(())
}

/// A route of this host (other than through `bridge`) that reaches into
/// `block`, if there is one: two networks with the same addresses would
/// take each other's traffic.
async fn check_block_is_free(
    handle: &Handle,
    block: AddrBlock,
    bridge: &str,
) -> Result<Option<AddrBlock>, String> {
    use futures_util::TryStreamExt;
    let ours = link_index(handle, bridge).await?;
    let mut routes = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|e| format!("reading the host's routes: {e}"))?
    {
        let prefix = route.header.destination_prefix_length;
        let (mut dest, mut oif) = (None, None);
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dest = Some(*ip),
                RouteAttribute::Oif(index) => oif = Some(*index),
                _ => {}
            }
        }
        // Default routes and host routes of other tables are no network.
        let Some(dest) = dest.filter(|_| (8..=30).contains(&prefix)) else {
            continue;
        };
        let Ok(theirs) = format!("{dest}/{prefix}").parse::<AddrBlock>() else {
            continue;
        };
        if theirs.overlaps(&block) && (oif.is_none() || oif != ours) {
            return Ok(Some(theirs));
        }
    }
    Ok(None)
}

fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn already_exists(e: &rtnetlink::Error) -> bool {
    netlink_errno(e) == Some(nix::libc::EEXIST)
}

fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(
        netlink_errno(e),
        Some(nix::libc::ENODEV | nix::libc::ENOENT)
    )
}
