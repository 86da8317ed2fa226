//! A real OCI registry for the tests: Debian's `docker-registry`
//! (distribution 2.8) on a loopback port, storing in a temp dir, with
//! optional basic auth; and images the tests build from busybox and push
//! to it with `oci-client`.

use super::packages;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Where it stores blobs (`docker/registry/v2/...`).
    pub storage: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// A registry open to anyone.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A registry that asks for `user`/`password` (basic auth) when given.
    pub fn start_with(auth: Option<(&str, &str)>) -> Self {
        packages::require(&["docker-registry"]);
        let tmp = tempfile::tempdir().unwrap();
        let storage = tmp.path().join("data");
        let mut config = format!(
            "version: 0.1\nlog: {{level: info, accesslog: {{disabled: true}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: 127.0.0.1:0, secret: test-only}}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let hash = bcrypt::hash(password, 4).unwrap();
            let htpasswd = tmp.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd: {{realm: hangar-tests, path: {}}}\n",
                htpasswd.display()
            ));
        }
        let config_path = tmp.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting docker-registry");
        // It logs `listening on 127.0.0.1:<port>` once bound.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(at) = line.split("listening on ").nth(1) {
                    let addr = at.split(['"', ' ']).next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let addr = rx
            .recv_timeout(super::WAIT)
            .expect("docker-registry did not say where it listens");
        Self {
            child,
            addr,
            storage,
            _tmp: tmp,
        }
    }

    /// The registry's copy of blob `digest`, to corrupt it.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// An image built by a test: its layers (uncompressed tars) and config.
pub struct TestImage {
    pub layers: Vec<Vec<u8>>,
    pub config: serde_json::Value,
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A tar of `files` (path, bytes, mode) and `links` (path, target).
pub fn layer(files: &[(&str, &[u8], u32)], links: &[(&str, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, bytes, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_size(bytes.len() as u64);
        h.set_mtime(0);
        tar.append_data(&mut h, path, *bytes).unwrap();
    }
    for (path, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, path, target).unwrap();
    }
    tar.into_inner().unwrap()
}

impl TestImage {
    /// busybox (from Debian's busybox-static) with its shell and httpd, and
    /// a file saying which image this is.
    pub fn busybox(label: &str) -> Self {
        packages::require(&["busybox-static"]);
        let busybox = std::fs::read("/bin/busybox").expect("busybox-static's /bin/busybox");
        let base = layer(
            &[("bin/busybox", &busybox, 0o755)],
            &[
                ("bin/sh", "busybox"),
                ("bin/httpd", "busybox"),
                ("bin/cat", "busybox"),
            ],
        );
        let marker = layer(&[("etc/image", label.as_bytes(), 0o644)], &[]);
        Self::of(
            vec![base, marker],
            serde_json::json!({
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["httpd -f -p 8080"],
                "Env": ["PATH=/bin", format!("IMAGE={label}")],
                "WorkingDir": "/",
                "StopSignal": "SIGTERM",
                "Labels": {"test.label": label},
            }),
        )
    }

    /// An image of `layers` with the container config `config`.
    pub fn of(layers: Vec<Vec<u8>>, config: serde_json::Value) -> Self {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        Self { layers, config }
    }

    pub fn config_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.config).unwrap()
    }

    /// Pushes the image to `registry` as `name` (`repo:tag`); returns the
    /// manifest's digest.
    pub async fn push(&self, registry: &str, name: &str, auth: Option<(&str, &str)>) -> String {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let reference: Reference = format!("{registry}/{name}").parse().unwrap();
        let auth = match auth {
            Some((u, p)) => RegistryAuth::Basic(u.into(), p.into()),
            None => RegistryAuth::Anonymous,
        };
        let layers: Vec<ImageLayer> = self
            .layers
            .iter()
            .map(|l| ImageLayer::oci_v1(l.clone(), None))
            .collect();
        let config = Config::oci_v1(self.config_bytes(), None);
        client
            .push(&reference, &layers, config, &auth, None)
            .await
            .expect("pushing a test image");
        client
            .fetch_manifest_digest(&reference, &auth)
            .await
            .expect("the pushed image's digest")
    }

    /// Writes the image as an OCI image layout archive named `name`.
    pub fn oci_archive(&self, path: &Path, name: &str) {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |path: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(bytes.len() as u64);
            tar.append_data(&mut h, path, bytes).unwrap();
        };
        let config = self.config_bytes();
        let mut layers = Vec::new();
        for l in &self.layers {
            add(&format!("blobs/sha256/{}", &sha256(l)[7..]), l);
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(l), "size": l.len(),
            }));
        }
        add(&format!("blobs/sha256/{}", &sha256(&config)[7..]), &config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        add(
            &format!("blobs/sha256/{}", &sha256(&manifest)[7..]),
            &manifest,
        );
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(&manifest), "size": manifest.len(),
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": "v1"},
            }],
        }))
        .unwrap();
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("index.json", &index);
        std::fs::write(path, tar.into_inner().unwrap()).unwrap();
    }

    /// Writes the image as an older `docker save` archive tagged `name`,
    /// with a second copy of its first layer as a symlink, as docker
    /// writes a layer two images share.
    pub fn docker_archive(&self, path: &Path, name: &str) {
        let mut tar = tar::Builder::new(Vec::new());
        let config = self.config_bytes();
        let config_name = format!("{}.json", &sha256(&config)[7..]);
        let mut layer_paths = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("layer{i}/layer.tar");
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(l.len() as u64);
            tar.append_data(&mut h, &p, &l[..]).unwrap();
            layer_paths.push(p);
        }
        // The first layer again, as a link.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        tar.append_link(&mut h, "again/layer.tar", "../layer0/layer.tar")
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(config.len() as u64);
        tar.append_data(&mut h, &config_name, &config[..]).unwrap();
        let mut layers = layer_paths.clone();
        layers[0] = "again/layer.tar".into();
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": config_name, "RepoTags": [name], "Layers": layers,
        }]))
        .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(manifest.len() as u64);
        tar.append_data(&mut h, "manifest.json", &manifest[..])
            .unwrap();
        std::fs::write(path, tar.into_inner().unwrap()).unwrap();
    }
}
