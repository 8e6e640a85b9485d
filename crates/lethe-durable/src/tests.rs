//! Footers, frames, atomic replacement and the directory lock.

use super::*;

const MAGIC: [u8; 8] = *b"LETHTEST";

#[test]
fn seal_round_trip_and_every_kind_of_damage() {
    let sealed = seal(MAGIC, 2, b"hello world");
    let (payload, version) = unseal(&sealed, MAGIC, 1, 2).unwrap();
    assert_eq!((payload, version), (&b"hello world"[..], 2));

    let mut flipped = sealed.clone();
    flipped[3] ^= 1;
    assert!(
        matches!(unseal(&flipped, MAGIC, 1, 2), Err(SealError::Corrupt(m)) if m.contains("CRC"))
    );
    assert!(matches!(
        unseal(&sealed[1..], MAGIC, 1, 2),
        Err(SealError::Corrupt(_))
    ));
    assert!(matches!(
        unseal(&sealed[..5], MAGIC, 1, 2),
        Err(SealError::Corrupt(_))
    ));
    assert!(
        matches!(unseal(&sealed, *b"OTHERKND", 1, 2), Err(SealError::Corrupt(m)) if m.contains("magic"))
    );
    assert!(matches!(
        unseal(&sealed, MAGIC, 3, 4),
        Err(SealError::Incompatible {
            found: 2,
            oldest: 3,
            newest: 4
        })
    ));
}

#[test]
fn frames_detect_torn_and_corrupt_tails() {
    let mut log = frame(b"one");
    log.extend(frame(b"two"));
    let whole = log.len();
    log.extend(frame(b"three"));

    let f = read_frames(&log);
    assert_eq!(f.records, [&b"one"[..], b"two", b"three"]);
    assert_eq!(f.tail, Tail::Clean);

    // Every cut inside the last record is a torn tail, keeping the first two.
    for cut in whole + 1..log.len() {
        let f = read_frames(&log[..cut]);
        assert_eq!(f.records.len(), 2, "cut at {cut}");
        assert_eq!(f.valid_len, whole);
        assert_eq!(f.tail, Tail::Torn);
    }
    // A bad checksum in the middle is corruption, not a crash.
    let mut bad = log.clone();
    bad[9] ^= 0xff;
    let f = read_frames(&bad);
    assert_eq!(f.records.len(), 0);
    assert_eq!(f.tail, Tail::Corrupt);
    // A bad checksum in the very last record is what a crash can leave.
    let mut last = log.clone();
    let n = last.len();
    last[n - 1] ^= 0xff;
    assert_eq!(read_frames(&last).tail, Tail::Torn);
}

#[test]
fn atomic_write_replaces_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    atomic_write(&p, b"first").unwrap();
    atomic_write(&p, b"second version").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"second version");
    // No temporary files are left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn append_frames_appends_and_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .unwrap();
    append_frames(&mut f, &[b"a", b"bc"]).unwrap();
    let len = append_frames(&mut f, &[b"def"]).unwrap();
    let bytes = fs::read(&p).unwrap();
    assert_eq!(len as usize, bytes.len());
    assert_eq!(read_frames(&bytes).records, [&b"a"[..], b"bc", b"def"]);
}

#[test]
fn dir_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let lock = DirLock::acquire(dir.path()).unwrap();
    let err = DirLock::acquire(dir.path()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    drop(lock);
    DirLock::acquire(dir.path()).unwrap();
}
