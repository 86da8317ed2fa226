//! `hangar bench images`: how long a host takes to pull and unpack an
//! image of a given size from a registry, and the small image the machine
//! benchmarks run with `--image`.
//!
//! It builds two images and pushes them to `--registry`:
//! - `bench/httpd:v1`: busybox's httpd serving a page on port 8080, the
//!   small image of `lifecycle --image` and `coldstart --image`;
//! - `bench/big:v1`: about `--size-mb` of gzipped layers of the host's own
//!   files (`/usr`), so it compresses as real images do.
//!
//! Then it starts a dev instance and times `--count` pulls of the big one
//! through flyd's images API (the image removed between pulls): from the
//! request until the image is stored, unpacked and indexed.

use super::lifecycle::{latency, start_dev_with_addrs};
use crate::cli::{FlydClient, answer};
use anyhow::{Context, bail};
use flate2::write::GzEncoder;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// The registry to push to and pull from (`host:port`; plain HTTP).
    #[arg(long)]
    registry: String,
    /// The big image's size, compressed, in MB.
    #[arg(long, default_value_t = 50)]
    size_mb: u64,
    /// Pulls to time.
    #[arg(long, default_value_t = 5)]
    count: usize,
    /// A static busybox, for the small image.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// The small image's name in the registry.
pub const HTTPD: &str = "bench/httpd:v1";
const BIG: &str = "bench/big:v1";

pub async fn images(args: ImagesArgs) -> anyhow::Result<()> {
    if args.count == 0 || args.size_mb == 0 {
        bail!("--count and --size-mb must be at least 1");
    }
    let busybox = std::fs::read(&args.busybox)
        .with_context(|| format!("reading {} (a static busybox)", args.busybox.display()))?;
    let httpd = vec![gzip_layer(|tar| {
        add_file(tar, "bin/busybox", &busybox, 0o755)?;
        add_link(tar, "bin/httpd", "busybox")?;
        add_link(tar, "bin/sh", "busybox")?;
        add_file(tar, "www/index.html", b"hello from httpd\n", 0o644)
    })?];
    push(
        &args.registry,
        HTTPD,
        &httpd,
        json!({"Entrypoint": ["/bin/httpd"], "Cmd": ["-f", "-p", "8080", "-h", "/www"],
               "Env": ["PATH=/bin"]}),
    )
    .await?;
    let big = host_file_layers(args.size_mb << 20)?;
    let compressed: usize = big.iter().map(Vec::len).sum();
    push(
        &args.registry,
        BIG,
        &big,
        json!({"Cmd": ["/bin/true"], "Env": ["PATH=/bin"]}),
    )
    .await?;

    let (instance, addrs, _token) = start_dev_with_addrs().await?;
    let flyd = FlydClient::new(
        addrs["flyd"].as_str().context("addrs.json has no flyd")?,
        &instance.data_dir(),
    )?;
    let image = format!("{}/{BIG}", args.registry);
    let mut samples = Vec::with_capacity(args.count);
    let mut pulled = Value::Null;
    for _ in 0..args.count {
        let gone = flyd
            .request(reqwest::Method::DELETE, "/v1/images")
            .query(&[("image", image.as_str())])
            .send()
            .await?;
        if !gone.status().is_success() && gone.status() != reqwest::StatusCode::NOT_FOUND {
            bail!("removing {image}: {}", answer(gone).await.unwrap_err());
        }
        let started = Instant::now();
        let resp = flyd
            .request(reqwest::Method::POST, "/v1/images/pull")
            .json(&json!({ "image": image }))
            .send()
            .await
            .with_context(|| format!("cannot reach flyd at {}", flyd.addr))?;
        pulled = answer(resp).await?;
        samples.push(started.elapsed());
    }
    let pull = latency(samples);
    let unpacked = du(&instance.data_dir().join("images/rootfs"));

    let mb = |bytes: f64| bytes / f64::from(1 << 20);
    println!(
        "pull + unpack of {image}: {:.1} MB compressed in {} layers, {:.1} MB unpacked ({} pulls)",
        mb(compressed as f64),
        big.len(),
        mb(unpacked as f64),
        args.count
    );
    println!("{:<24} {:>9} {:>9} {:>9}", "(ms)", "p50", "p90", "p99");
    println!(
        "{:<24} {:>9.1} {:>9.1} {:>9.1}",
        "pull + unpack", pull.p50, pull.p90, pull.p99
    );
    println!("small image for --image: {}/{HTTPD}", args.registry);
    if args.json {
        let out = json!({
            "bench": "images",
            "count": args.count,
            "compressed_bytes": compressed,
            "unpacked_bytes": unpacked,
            "layers": big.len(),
            "digest": pulled["digest"],
            "pull_ms": pull,
            "httpd_image": format!("{}/{HTTPD}", args.registry),
        });
        println!("{out}");
    }
    Ok(())
}

type Tar = tar::Builder<GzEncoder<Vec<u8>>>;

/// A gzipped layer of what `fill` writes.
fn gzip_layer(fill: impl FnOnce(&mut Tar) -> std::io::Result<()>) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::default()));
    fill(&mut tar)?;
    Ok(tar.into_inner()?.finish()?)
}

fn add_file(tar: &mut Tar, path: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_size(bytes.len() as u64);
    tar.append_data(&mut h, path, bytes)
}

fn add_link(tar: &mut Tar, path: &str, target: &str) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    tar.append_link(&mut h, path, target)
}

/// Layers of the host's files under `/usr` (each about a fifth of the
/// total), until they hold `bytes` compressed.
fn host_file_layers(bytes: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let per_layer = (bytes / 5).max(1 << 20) as usize;
    let mut files = Vec::new();
    walk(Path::new("/usr"), &mut files);
    let mut layers = Vec::new();
    let mut total = 0usize;
    let mut files = files.into_iter();
    while (total as u64) < bytes {
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::default()));
        let mut added = false;
        while tar.get_ref().get_ref().len() < per_layer
            && (total + tar.get_ref().get_ref().len()) < bytes as usize
        {
            let Some(file) = files.next() else {
                break;
            };
            let Ok(content) = std::fs::read(&file) else {
                continue;
            };
            let name = file.strip_prefix("/").unwrap_or(&file);
            add_file(&mut tar, &name.to_string_lossy(), &content, 0o644)?;
            added = true;
        }
        if !added {
            bail!(
                "the host's /usr holds less than {} MB compressed",
                bytes >> 20
            );
        }
        let layer = tar.into_inner()?.finish()?;
        total += layer.len();
        layers.push(layer);
    }
    Ok(layers)
}

/// The regular files below `dir`, in name order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&entry.path(), out),
            Ok(t) if t.is_file() => out.push(entry.path()),
            _ => {}
        }
    }
}

/// The bytes of the files below `dir`.
fn du(dir: &Path) -> u64 {
    let mut files = Vec::new();
    walk(dir, &mut files);
    files
        .iter()
        .filter_map(|f| std::fs::symlink_metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Pushes an image of gzipped `layers` with the container config `config`
/// to `registry` as `name`.
async fn push(registry: &str, name: &str, layers: &[Vec<u8>], config: Value) -> anyhow::Result<()> {
    use sha2::Digest;
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference = format!("{registry}/{name}").parse()?;
    // The diff ids are the digests of the uncompressed layers.
    let mut diff_ids = Vec::new();
    for layer in layers {
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&layer[..]), &mut tar)?;
        diff_ids.push(format!("sha256:{:x}", sha2::Sha256::digest(&tar)));
    }
    let config = json!({
        "architecture": oci_arch(), "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let layers: Vec<ImageLayer> = layers
        .iter()
        .map(|l| ImageLayer::oci_v1_gzip(l.clone(), None))
        .collect();
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    client
        .push(&reference, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .with_context(|| format!("pushing {reference}"))?;
    Ok(())
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
