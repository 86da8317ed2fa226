//! Images through the real binary: pulled from a real registry (Debian's
//! docker-registry on loopback) with images the tests build from busybox,
//! imported from archives, recorded as `image_ref`, removed and pruned;
//! and every way a pull can fail, each leaving nothing behind.

mod common;

use common::Hangar;
use common::registry::{Registry, TestImage};
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `hangar images <args> --json` against `h`'s flyd: (exit code, output).
fn images_cli(h: &Hangar, args: &[&str]) -> (i32, Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .arg("images")
        .args(args)
        .arg("--data-dir")
        .arg(&h.data_dir)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["names"].as_array().unwrap().clone())
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// A create that does not launch (registry images run once the sandbox
/// does), answering (status, body).
async fn create(h: &Hangar, app: &str, image: &str) -> (u16, Value) {
    let body = serde_json::json!({"config": {"image": image}, "skip_launch": true});
    h.post(&format!("/v1/apps/{app}/machines"), &body.to_string())
        .await
}

/// What the store holds besides its index: blob digests, unpacked roots,
/// and anything left in its staging directory.
fn store(h: &Hangar) -> (Vec<String>, Vec<String>, Vec<String>) {
    let list = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let dir = h.data_dir.join("images");
    (
        list(&dir.join("blobs/sha256")),
        list(&dir.join("rootfs")),
        list(&dir.join("tmp")),
    )
}

#[tokio::test]
async fn images_no_machine_uses_are_collected_on_their_own() {
    let registry = Registry::start();
    let kept = TestImage::busybox("kept");
    kept.push(&registry.addr, "tools/busybox:kept", None).await;
    let dropped = TestImage::busybox("dropped");
    dropped
        .push(&registry.addr, "tools/busybox:dropped", None)
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let h = Hangar::start_with(
        &tmp.path().join("data"),
        Some("[flaps.rate_limits]\nenabled = false\n[flyd.images]\ncollect_unused_after_s = 2\n"),
    )
    .await;
    h.create_app("gc").await;
    let name = |tag: &str| format!("{}/tools/busybox:{tag}", registry.addr);
    let (status, _) = create(&h, "gc", &name("kept")).await;
    assert_eq!(status, 200);
    let (status, machine) = create(&h, "gc", &name("dropped")).await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().unwrap();
    let started = std::time::Instant::now();
    let (status, body) = h
        .delete(&format!("/v1/apps/gc/machines/{id}?force=true"))
        .await;
    assert_eq!(status, 200, "{body}");

    // Unused for two seconds, it goes; the one a machine uses stays.
    let listed = || names(&images_cli(&h, &["ls"]).1["images"]);
    common::eventually("the unused image is collected", || async {
        !listed().contains(&name("dropped"))
    })
    .await;
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "collected after {:?}",
        started.elapsed()
    );
    assert!(listed().contains(&name("kept")), "{:?}", listed());
}

#[tokio::test]
async fn images_are_pulled_once_recorded_and_collected() {
    let registry = Registry::start();
    let image = TestImage::busybox("v1");
    let digest = image.push(&registry.addr, "tools/busybox:v1", None).await;
    let h = Hangar::start().await;
    h.create_app("pulls").await;
    let name = format!("{}/tools/busybox:v1", registry.addr);

    let (status, machine) = create(&h, "pulls", &name).await;
    assert_eq!(status, 200, "{machine}\n{}", h.log());
    assert_eq!(
        machine["image_ref"],
        serde_json::json!({
            "registry": registry.addr, "repository": "tools/busybox", "tag": "v1",
            "digest": digest, "labels": {"test.label": "v1"},
        })
    );
    let id = machine["id"].as_str().unwrap().to_string();
    // A second machine of the same image pulls nothing more.
    let (status, second) = create(&h, "pulls", &name).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["image_ref"]["digest"], digest);

    // Stored once: two layers, a config; unpacked once, owned by the
    // machines' id range, never by the host's root.
    let (blobs, roots, tmp) = store(&h);
    assert_eq!(blobs.len(), 3, "{blobs:?}");
    assert_eq!(roots, [digest.strip_prefix("sha256:").unwrap()]);
    assert!(tmp.is_empty(), "{tmp:?}");
    let root = h.data_dir.join("images/rootfs").join(&roots[0]);
    assert_eq!(std::fs::read(root.join("etc/image")).unwrap(), b"v1");
    let busybox = std::fs::metadata(root.join("bin/busybox")).unwrap();
    assert_eq!(busybox.uid(), 1_000_000_000);
    assert_eq!(busybox.mode() & 0o777, 0o755);

    let (code, listed, err) = images_cli(&h, &["ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(names(&listed["images"]).contains(&name), "{listed}");

    // In use: not removable, not pruned.
    let (code, _, err) = images_cli(&h, &["rm", &name]);
    assert_eq!(code, 1);
    assert!(err.contains("is used by machine"), "{err}");
    let (code, pruned, err) = images_cli(&h, &["prune"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pruned["removed"], serde_json::json!([]));

    // An update to another image records its digest.
    let v2 = TestImage::busybox("v2");
    let digest2 = v2.push(&registry.addr, "tools/busybox:v2", None).await;
    let update = serde_json::json!({
        "config": {"image": format!("{}/tools/busybox:v2", registry.addr)},
        "skip_launch": true,
    });
    let (status, updated) = h
        .post(
            &format!("/v1/apps/pulls/machines/{id}"),
            &update.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["image_ref"]["digest"], digest2);
    assert_eq!(updated["image_ref"]["tag"], "v2");

    // Once no machine uses v1, it goes, with the blobs only it had.
    let second_id = second["id"].as_str().unwrap();
    let (status, body) = h
        .delete(&format!("/v1/apps/pulls/machines/{second_id}?force=true"))
        .await;
    assert_eq!(status, 200, "{body}");
    let (code, _, err) = images_cli(&h, &["rm", &name]);
    assert_eq!(code, 0, "{err}");
    let (_, roots, _) = store(&h);
    assert_eq!(roots, [digest2.strip_prefix("sha256:").unwrap()]);
    let (code, listed, _) = images_cli(&h, &["ls"]);
    assert_eq!(code, 0);
    assert!(!names(&listed["images"]).contains(&name), "{listed}");

    // Destroyed, the last machine frees v2 for prune; the store is empty.
    let (status, body) = h
        .delete(&format!("/v1/apps/pulls/machines/{id}?force=true"))
        .await;
    assert_eq!(status, 200, "{body}");
    let (code, pruned, err) = images_cli(&h, &["prune"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 1, "{pruned}");
    assert_eq!(store(&h), (vec![], vec![], vec![]));
}

#[tokio::test]
async fn pulls_that_fail_say_why_and_leave_nothing() {
    let registry = Registry::start();
    let image = TestImage::busybox("bad");
    let digest = image.push(&registry.addr, "tools/broken:v1", None).await;
    let h = Hangar::start().await;
    h.create_app("fails").await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // The registry's copy of the second layer, corrupted.
    let layer = common::registry::sha256(&image.layers[1]);
    std::fs::write(registry.blob_file(&layer), b"not the layer").unwrap();

    let cases = [
        ("NOT a/Reference", 400, "is not a valid reference"),
        (
            &*format!("{}/tools/none:v1", registry.addr),
            422,
            "was not found",
        ),
        (&*format!("{closed}/tools/busybox:v1"), 502, "unreachable"),
        (
            &*format!("{}/tools/broken:v1", registry.addr),
            502,
            "arrived with digest",
        ),
    ];
    for (image, status, says) in cases {
        let (got, body) = create(&h, "fails", image).await;
        assert_eq!(got, status, "{image}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{image}: {error}");
        // Nothing recorded, nothing stored, nothing staged.
        let (_, machines) = h.get("/v1/apps/fails/machines").await;
        assert_eq!(machines, serde_json::json!([]), "{image}");
        assert_eq!(store(&h), (vec![], vec![], vec![]), "{image}");
    }
    // The image itself is fine once the registry's copy is: the failure
    // was not remembered.
    std::fs::write(registry.blob_file(&layer), &image.layers[1]).unwrap();
    let name = format!("{}/tools/broken:v1", registry.addr);
    let (status, body) = create(&h, "fails", &name).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["image_ref"]["digest"], digest);
}

#[tokio::test]
async fn registry_credentials_come_from_config() {
    let registry = Registry::start_with(Some(("deploy", "s3cret")));
    let image = TestImage::busybox("private");
    image
        .push(&registry.addr, "team/app:v1", Some(("deploy", "s3cret")))
        .await;
    let name = format!("{}/team/app:v1", registry.addr);

    // Without credentials: refused, and said so.
    let h = Hangar::start().await;
    h.create_app("private").await;
    let (status, body) = create(&h, "private", &name).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("refused access"),
        "{body}"
    );
    drop(h);

    // With them in [flyd.images.registries]: pulled.
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "[flaps.rate_limits]\nenabled = false\n[flyd.images.registries.\"{}\"]\nusername = \"deploy\"\npassword = \"s3cret\"\n",
        registry.addr
    );
    let h = Hangar::start_with(&tmp.path().join("data"), Some(&config)).await;
    h.create_app("private").await;
    let (status, body) = create(&h, "private", &name).await;
    assert_eq!(status, 200, "{body}\n{}", h.log());
    assert_eq!(body["image_ref"]["repository"], "team/app");
}

#[tokio::test]
async fn archives_import_without_a_registry() {
    let image = TestImage::busybox("imported");
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci.tar");
    image.oci_archive(&oci, "example.com/team/oci:v1");
    let docker = tmp.path().join("docker.tar");
    image.docker_archive(&docker, "team/saved:v2");
    let h = Hangar::start().await;
    h.create_app("imports").await;

    let (code, out, err) = images_cli(&h, &["import", oci.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(names(&out["images"]), ["example.com/team/oci:v1"]);
    let (code, out, err) = images_cli(&h, &["import", docker.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(names(&out["images"]), ["docker.io/team/saved:v2"]);

    // Named as imported, found here: no registry is asked (neither
    // example.com nor docker.io is reachable from these tests).
    for image in ["example.com/team/oci:v1", "team/saved:v2"] {
        let (status, body) = create(&h, "imports", image).await;
        assert_eq!(status, 200, "{image}: {body}\n{}", h.log());
    }
    let (_, roots, tmp_left) = store(&h);
    assert_eq!(roots.len(), 2, "one root per image");
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
    let root = h.data_dir.join("images/rootfs").join(&roots[0]);
    assert_eq!(std::fs::read(root.join("etc/image")).unwrap(), b"imported");

    // An archive whose blob is not what its name says is refused whole.
    let mut bytes = std::fs::read(&oci).unwrap();
    let marker = bytes
        .windows(8)
        .position(|w| w == b"imported")
        .expect("the marker layer's content");
    bytes[marker..marker + 8].copy_from_slice(b"tampered");
    let bad = tmp.path().join("bad.tar");
    std::fs::write(&bad, bytes).unwrap();
    let (before_blobs, before_roots, _) = store(&h);
    let (code, _, err) = images_cli(&h, &["import", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("arrived with digest"), "{err}");
    assert_eq!(store(&h), (before_blobs, before_roots, vec![]));

    // Not an archive at all, and an archive of something else.
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, b"no tar here").unwrap();
    let (code, _, err) = images_cli(&h, &["import", junk.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a readable tar archive"), "{err}");
    let other = tmp.path().join("other.tar");
    let notes = common::registry::layer(&[("notes.txt", b"hello", 0o644)], &[]);
    std::fs::write(&other, notes).unwrap();
    let (code, _, err) = images_cli(&h, &["import", other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("neither an OCI image layout"), "{err}");
    assert_eq!(store(&h).2, Vec::<String>::new(), "nothing staged is left");
}

#[tokio::test]
async fn a_pull_cut_short_by_a_crash_leaves_nothing() {
    use std::os::unix::process::ExitStatusExt;
    let registry = Registry::start();
    let image = TestImage::busybox("crash");
    let digest = image.push(&registry.addr, "tools/crash:v1", None).await;
    let name = format!("{}/tools/crash:v1", registry.addr);
    let body = serde_json::json!({"config": {"image": name}, "skip_launch": true}).to_string();
    // Blobs stored, nothing unpacked; one layer of two applied; the root in
    // place but not in the index.
    for point in ["fetched", "unpacking", "unpacked"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let config =
            format!("[flyd]\ncrash_at = \"image/{point}\"\n[flaps.rate_limits]\nenabled = false\n");
        let mut h = Hangar::start_with(&dir, Some(&config)).await;
        h.create_app("crash").await;
        let op = h
            .try_call(
                reqwest::Method::POST,
                "/v1/apps/crash/machines",
                Some(&body),
            )
            .await;
        assert!(
            op.is_err(),
            "{point}: the call should have died with the server: {op:?}"
        );
        assert_eq!(h.wait_exit().signal(), Some(9), "{point}:\n{}", h.log());
        drop(h);

        // Started again: no machine, and the store holds nothing of it.
        let h = Hangar::start_in(&dir).await;
        let (_, machines) = h.get("/v1/apps/crash/machines").await;
        assert_eq!(machines, serde_json::json!([]), "{point}");
        assert_eq!(store(&h), (vec![], vec![], vec![]), "{point}");
        // And the image can be had.
        let (status, machine) = create(&h, "crash", &name).await;
        assert_eq!(status, 200, "{point}: {machine}");
        assert_eq!(machine["image_ref"]["digest"], digest);
    }
}

/// A tmpfs of `mb` megabytes at `path`, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &Path, mb: u32) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "these tests run as root and mount a tmpfs"
        );
        Self(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_pull_onto_a_full_disk_says_so_and_leaves_nothing() {
    // 24 MB of bytes no compressor shrinks, in one layer.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..24 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut image = TestImage::busybox("big");
    image
        .layers
        .push(common::registry::layer(&[("big.bin", &noise, 0o644)], &[]));
    let diff_ids: Vec<String> = image
        .layers
        .iter()
        .map(|l| common::registry::sha256(l))
        .collect();
    image.config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    let registry = Registry::start();
    image.push(&registry.addr, "tools/big:v1", None).await;

    // A data dir with room for Hangar, not for the image.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _disk = SmallDisk::mount(&data, 16);
    let h = Hangar::start_in(&data).await;
    h.create_app("full").await;
    let (status, body) = create(&h, "full", &format!("{}/tools/big:v1", registry.addr)).await;
    assert_eq!(status, 507, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("disk full"),
        "{body}"
    );
    let (_, machines) = h.get("/v1/apps/full/machines").await;
    assert_eq!(machines, serde_json::json!([]));
    assert_eq!(store(&h), (vec![], vec![], vec![]));
    // Hangar goes on: a small image still fits.
    TestImage::busybox("small")
        .push(&registry.addr, "tools/small:v1", None)
        .await;
    let (status, body) = create(&h, "full", &format!("{}/tools/small:v1", registry.addr)).await;
    assert_eq!(status, 200, "{body}");
    drop(h);
}
