//! Tamper tests: every kind of change to the log is detected and located.

use super::*;

fn event(i: usize) -> Event {
    Event {
        action: "search".into(),
        principal: Some(format!("p{i}")),
        via: "test".into(),
        details: serde_json::json!({"query_hash": format!("{i:04}"), "hits": [i, i + 1]}),
    }
}

fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    for i in 0..n {
        let rec = log.append(event(i)).unwrap();
        assert_eq!(rec.seq, i as u64 + 1);
    }
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn kinds(path: &Path) -> Vec<(usize, FindingKind)> {
    verify(path)
        .unwrap()
        .findings
        .into_iter()
        .map(|f| (f.line, f.kind))
        .collect()
}

#[test]
fn intact_log_verifies() {
    let (_d, path) = log_with(10);
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 10);
    assert!(report.is_intact(), "{:?}", report.findings);
}

#[test]
fn modified_record_is_found() {
    let (_d, path) = log_with(6);
    let mut l = lines(&path);
    l[2] = l[2].replace("\"p2\"", "\"mallory\"");
    write_lines(&path, &l);
    assert_eq!(kinds(&path), [(3, FindingKind::Modified { seq: 3 })]);
}

#[test]
fn modified_record_with_recomputed_hash_breaks_the_next_link() {
    let (_d, path) = log_with(6);
    let mut l = lines(&path);
    let mut rec: Record = serde_json::from_str(&l[2]).unwrap();
    rec.event.principal = Some("mallory".into());
    rec.hash = record_hash(rec.seq, rec.ts_ms, &rec.event, &rec.prev);
    l[2] = serde_json::to_string(&rec).unwrap();
    write_lines(&path, &l);
    assert_eq!(
        kinds(&path),
        [(
            4,
            FindingKind::ChainBroken {
                expected_seq: 4,
                found_seq: 4,
                cause: ChainCause::PreviousModified
            }
        )]
    );
}

#[test]
fn removed_record_is_found() {
    let (_d, path) = log_with(6);
    let mut l = lines(&path);
    l.remove(2);
    write_lines(&path, &l);
    assert_eq!(
        kinds(&path),
        [(
            3,
            FindingKind::ChainBroken {
                expected_seq: 3,
                found_seq: 4,
                cause: ChainCause::Removed
            }
        )]
    );
}

#[test]
fn inserted_record_is_found() {
    let (_d, path) = log_with(6);
    let mut l = lines(&path);
    let copy = l[3].clone();
    l.insert(4, copy);
    write_lines(&path, &l);
    let k = kinds(&path);
    assert_eq!(k.len(), 1, "{k:?}");
    assert!(
        matches!(
            k[0],
            (
                5,
                FindingKind::ChainBroken {
                    cause: ChainCause::Inserted,
                    ..
                }
            )
        ),
        "{k:?}"
    );
}

#[test]
fn reordered_records_are_found() {
    let (_d, path) = log_with(6);
    let mut l = lines(&path);
    l.swap(2, 3);
    write_lines(&path, &l);
    let k = kinds(&path);
    assert!(!k.is_empty());
    assert!(
        k.iter()
            .all(|(line, _)| *line == 3 || *line == 4 || *line == 5),
        "{k:?}"
    );
    assert!(
        k.iter().any(|(_, f)| matches!(
            f,
            FindingKind::ChainBroken {
                cause: ChainCause::Reordered,
                ..
            }
        )),
        "{k:?}"
    );
}

#[test]
fn truncated_tail_is_found_through_the_head() {
    let (_d, path) = log_with(6);
    let mut l = lines(&path);
    l.truncate(4);
    write_lines(&path, &l);
    assert_eq!(
        kinds(&path),
        [(
            0,
            FindingKind::Truncated {
                head_seq: 6,
                log_seq: 4
            }
        )]
    );
    // And appending refuses to paper over it.
    let log = AuditLog::open(&path).unwrap();
    assert!(matches!(log.append(event(9)), Err(Error::Damaged(_))));
}

#[test]
fn torn_last_line_is_cut_and_the_log_continues() {
    let (_d, path) = log_with(3);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"seq\":4,\"ts_ms\":1,\"eve");
    fs::write(&path, &bytes).unwrap();
    let log = AuditLog::open(&path).unwrap();
    let rec = log.append(event(3)).unwrap();
    assert_eq!(rec.seq, 4);
    assert!(verify(&path).unwrap().is_intact());
}

#[test]
fn record_written_before_a_lost_head_update_is_adopted() {
    let (_d, path) = log_with(3);
    let head_before = fs::read(head_path(&path)).unwrap();
    let log = AuditLog::open(&path).unwrap();
    log.append(event(3)).unwrap();
    // Simulate a crash after the record was written but before the head moved.
    fs::write(head_path(&path), head_before).unwrap();
    assert!(
        verify(&path).unwrap().is_intact(),
        "one unacknowledged record is a crash, not tampering"
    );
    let rec = log.append(event(4)).unwrap();
    assert_eq!(rec.seq, 5);
    assert!(verify(&path).unwrap().is_intact());
}

#[test]
fn garbage_line_is_malformed() {
    let (_d, path) = log_with(3);
    let mut l = lines(&path);
    l[1] = "not json at all".into();
    write_lines(&path, &l);
    let k = kinds(&path);
    assert!(matches!(k[0], (2, FindingKind::Malformed(_))), "{k:?}");
}

#[test]
fn concurrent_appends_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = std::sync::Arc::new(AuditLog::open(&path).unwrap());
    // A second handle on the same file behaves like a second process.
    let other = std::sync::Arc::new(AuditLog::open(&path).unwrap());
    let mut threads = Vec::new();
    for t in 0..4 {
        let l = if t % 2 == 0 {
            log.clone()
        } else {
            other.clone()
        };
        threads.push(std::thread::spawn(move || {
            for i in 0..25 {
                l.append(event(t * 100 + i)).unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 100);
    assert!(report.is_intact(), "{:?}", report.findings);
}
