//! Tests of the cache logic that need no network: unpacking a local wheel,
//! refusing a wrong hash, and idempotence.

use super::*;

#[test]
fn unknown_asset_names_the_known_ones() {
    let err = Asset::by_name("gpt-5").unwrap_err().to_string();
    assert!(err.contains("smollm2-135m-instruct"), "{err}");
}

#[test]
fn incomplete_marker_means_not_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path());
    let asset = Asset::ALL_MINILM_L6_V2;
    let dir = cache.dir(asset);
    fs::create_dir_all(&dir).unwrap();
    for m in asset.members {
        fs::write(dir.join(m), b"x").unwrap();
    }
    assert!(!cache.is_complete(asset), "no marker yet");
    fs::write(dir.join(".complete"), "0000").unwrap();
    assert!(!cache.is_complete(asset), "marker with the wrong hash");
    fs::write(dir.join(".complete"), asset.sha256).unwrap();
    assert!(cache.is_complete(asset));
    fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(!cache.is_complete(asset), "a member is missing");
}

#[test]
fn sha256_of_a_known_string() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("abc");
    fs::write(&p, b"abc").unwrap();
    assert_eq!(
        sha256_file(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// A one-member wheel in `downloads`, and the asset that names it.
fn local_wheel(downloads: &Path) -> Asset {
    use std::io::Write as _;
    fs::create_dir_all(downloads).unwrap();
    let path = downloads.join("toy-1.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
    zip.start_file("toy/data/a.bin", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(&[7; 4096]).unwrap();
    zip.finish().unwrap();
    let sha = sha256_file(&path).unwrap();
    Asset {
        name: "toy",
        package: "toy",
        version: "1.0",
        wheel: "toy-1.0-py3-none-any.whl",
        sha256: Box::leak(sha.into_boxed_str()),
        strip_prefix: "toy/data/",
        members: &["a.bin"],
        pip_args: &[],
    }
}

#[test]
fn a_downloaded_wheel_is_unpacked_once_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path());
    let asset = local_wheel(&tmp.path().join(".downloads"));
    let dir = cache.ensure(asset).unwrap();
    assert_eq!(fs::read(dir.join("a.bin")).unwrap(), [7; 4096]);
    assert!(cache.is_complete(asset));
    assert!(!tmp.path().join(".downloads").join(asset.wheel).exists());
    // Complete: no wheel needed any more.
    assert_eq!(cache.ensure(asset).unwrap(), dir);
}

#[test]
fn parallel_callers_share_one_fetch() {
    // Without the lock, the first caller to finish removes the wheel (or the
    // staging folder) under the others: they fail with "not found".
    for _ in 0..5 {
        let tmp = tempfile::tempdir().unwrap();
        let asset = local_wheel(&tmp.path().join(".downloads"));
        let results: Vec<Result<PathBuf>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Cache::new(tmp.path()).ensure(asset)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let dir = r.unwrap();
            assert_eq!(fs::read(dir.join("a.bin")).unwrap(), [7; 4096]);
        }
    }
}
