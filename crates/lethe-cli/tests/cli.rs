//! End-to-end tests of the `lethe` binary in fresh temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn lethe(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["--data-dir"])
        .arg(data)
        .args(["--policy"])
        .arg(root().join("policies/example-org.toml"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn policy_check_reports_positions_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ok = lethe(
        dir.path(),
        &[
            "policy",
            "check",
            root().join("policies/example-org.toml").to_str().unwrap(),
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("ok (12 principals"), "{}", text(&ok));
    let bad = root().join("policies/tests/missing-reader.toml");
    let out = lethe(dir.path(), &["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("missing-reader.toml:5:"), "{t}");
    assert!(t.contains("missing-reader.toml:9:"), "{t}");
}

#[test]
fn ingest_search_delete_and_audit_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let corpus = root().join("datasets/acme/corpus.jsonl");
    let out = lethe(&data, &["ingest", corpus.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ingested 27 documents"));

    let out = lethe(
        &data,
        &["search", "--as", "ed", "--json", "-k", "10", "salary bands"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["label"].as_str().unwrap())
        .collect();
    assert!(!labels.is_empty());
    assert!(!labels.contains(&"hr-confidential"), "{labels:?}");

    // Ingesting the same ids again is refused, and nothing changes.
    let out = lethe(&data, &["ingest", corpus.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("already stored"), "{}", text(&out));

    // A principal without the delete role may not delete.
    let out = lethe(&data, &["doc", "delete", "--as", "ed", "hr/salary-bands"]);
    assert_eq!(out.status.code(), Some(1));
    let out = lethe(&data, &["doc", "delete", "hr/salary-bands"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lethe(
        &data,
        &[
            "search",
            "--as",
            "alice",
            "--json",
            "-k",
            "27",
            "salary bands",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["doc"] != "hr/salary-bands"));

    let out = lethe(&data, &["store", "verify"]);
    assert!(out.status.success(), "{}", text(&out));

    // The audit log verifies, then a tampered copy does not.
    let out = lethe(&data, &["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = data.join("audit.jsonl");
    let content = std::fs::read_to_string(&log).unwrap();
    std::fs::write(
        &log,
        content.replacen("\"principal\":\"alice\"", "\"principal\":\"mallory\"", 1),
    )
    .unwrap();
    let out = lethe(&data, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("was modified"), "{}", text(&out));
}

#[test]
fn keys_are_printed_once_and_stored_as_digests() {
    let dir = tempfile::tempdir().unwrap();
    let out = lethe(
        dir.path(),
        &["keys", "create", "--principal", "support-bot"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("lethe_"));
    let stored = std::fs::read_to_string(dir.path().join("keys/keys.json")).unwrap();
    assert!(!stored.contains(key.rsplit_once('_').unwrap().1));
    let out = lethe(dir.path(), &["keys", "create", "--principal", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    let out = lethe(dir.path(), &["keys", "list"]);
    assert!(text(&out).contains("support-bot"));
}

#[test]
fn a_protected_release_verifies_until_a_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let rel = dir.path().join("rel");
    let rel_s = rel.to_str().unwrap();
    let out = lethe(
        dir.path(),
        &[
            "protect",
            "--builtin",
            "digits",
            "-o",
            rel_s,
            "--method",
            "code",
            "--rho",
            "0.25",
            "--quiet",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "lethe protect audit --builtin digits --release {rel_s}"
        )),
        "{}",
        text(&out)
    );
    let ok = lethe(dir.path(), &["protect", "verify", rel_s]);
    assert!(ok.status.success(), "{}", text(&ok));
    // A reader that closes the pipe at once (`| head -c 10`) is no crash.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["protect", "verify", "--json", rel_s])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&closed.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(closed.status.code(), Some(101), "{err}");
    assert!(
        text(&ok).contains("1797 files listed, 0 changed"),
        "{}",
        text(&ok)
    );

    let png = std::fs::read_dir(rel.join("0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let mut bytes = std::fs::read(&png).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&png, bytes).unwrap();
    let bad = lethe(dir.path(), &["protect", "verify", rel_s]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains("changed: 0/"), "{}", text(&bad));
}

#[test]
fn protect_errors_are_said_once_and_a_missing_config_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexist.npy");
    let out = lethe(
        dir.path(),
        &[
            "protect",
            "-i",
            missing.to_str().unwrap(),
            "-o",
            dir.path().join("o").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes off a terminal: {err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["--config", "nope.toml", "protect", "--builtin", "digits"])
        .args(["--dry-run", "-o"])
        .arg(dir.path().join("o2"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("configuration file nope.toml not found"),
        "{}",
        text(&out)
    );
}
