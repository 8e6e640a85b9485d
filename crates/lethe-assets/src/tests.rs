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
