//! Store tests: label-filtered retrieval against brute force, exact
//! deletion, bad input, persistence, and crash safety under `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lethe_label::{Clause, Integrity, Label, Reader, Readers};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bm25::Bm25;
use crate::*;

/// A deterministic embedder for tests: signed feature hashing of words into
/// 64 dimensions. Not semantic, but a real function of the text, so dense
/// search results can be recomputed by brute force.
struct HashEmbedder;

const DIM: usize = 64;

fn hash_embed(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; DIM];
    for w in text.split_whitespace() {
        let w = w
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        let mut h: u64 = 0xcbf29ce484222325;
        for b in w.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[(h % DIM as u64) as usize] += sign;
    }
    v[0] += 0.01; // never the zero vector
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

impl Embedder for HashEmbedder {
    fn dim(&self) -> usize {
        DIM
    }
    fn embed(&self, texts: &[&str]) -> std::result::Result<Vec<Vec<f32>>, String> {
        Ok(texts.iter().map(|t| hash_embed(t)).collect())
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        chunking: ChunkConfig { max_words: 30 },
        ..StoreConfig::new(DIM)
    }
}

fn reader(n: &str) -> Reader {
    Reader::new(n).unwrap()
}

/// Labels over principals p0..p5 and groups; the test's own read rule
/// treats a "holder" as the set of names it has.
fn labels() -> Vec<Label> {
    let l = |clauses: &[&[&str]]| Label {
        readers: Readers::from_clauses(
            clauses
                .iter()
                .map(|c| Clause::new(c.iter().map(|n| reader(n))).unwrap()),
        ),
        integrity: Integrity::trusted(),
        tags: Default::default(),
    };
    vec![
        Label {
            readers: Readers::public(),
            integrity: Integrity::trusted(),
            tags: Default::default(),
        },
        l(&[&["hr"]]),
        l(&[&["finance", "exec"]]),
        l(&[&["eng"]]),
        l(&[&["exec"], &["legal"]]),
        l(&[&["p3"]]),
        l(&[&["hr", "eng"]]),
    ]
}

const WORDS: &[&str] = &[
    "salary",
    "budget",
    "review",
    "deploy",
    "server",
    "contract",
    "merger",
    "holiday",
    "policy",
    "customer",
    "invoice",
    "audit",
    "release",
    "kernel",
    "lawsuit",
    "hiring",
    "bonus",
    "outage",
    "roadmap",
    "vendor",
    "privacy",
    "office",
    "travel",
    "laptop",
    "password",
    "quarterly",
    "forecast",
    "incident",
    "patent",
    "training",
];

fn random_text(rng: &mut StdRng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        s.push(if i % 9 == 8 { '.' } else { ' ' });
        if i % 9 == 8 {
            s.push(' ');
        }
    }
    s
}

fn corpus(rng: &mut StdRng, n: usize, prefix: &str) -> Vec<NewDocument> {
    let labels = labels();
    (0..n)
        .map(|i| {
            let words = rng.random_range(5..90);
            NewDocument {
                id: format!("{prefix}{i}"),
                label: labels[rng.random_range(0..labels.len())].clone(),
                label_name: None,
                text: random_text(rng, words),
                meta: BTreeMap::new(),
            }
        })
        .collect()
}

fn holder_reads(holder: &BTreeSet<&str>, label: &Label) -> bool {
    label
        .readers
        .clauses()
        .iter()
        .all(|c| c.readers().iter().any(|r| holder.contains(r.as_str())))
}

fn random_holder(rng: &mut StdRng) -> BTreeSet<&'static str> {
    let names = [
        "p0", "p1", "p2", "p3", "hr", "finance", "exec", "eng", "legal",
    ];
    names
        .iter()
        .copied()
        .filter(|_| rng.random_bool(0.35))
        .collect()
}

/// Brute-force BM25: a fresh index holding only the readable chunks, scored
/// with tantivy's own statistics.
fn bm25_reference(
    store: &Store,
    readable: &BTreeSet<u64>,
    query: &str,
    k: usize,
) -> Vec<(u64, f32)> {
    let mut reference = Bm25::in_ram().unwrap();
    for (key, chunk) in &store.chunks {
        if readable.contains(key) {
            reference
                .add_chunk(&chunk.doc_id, *key, 0, &chunk.text)
                .unwrap();
        }
    }
    reference.commit(1).unwrap();
    let mut hits = reference.search_with_index_statistics(query, k).unwrap();
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    hits
}

#[test]
fn filtered_retrieval_equals_brute_force_over_the_readable_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config()).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for batch in 0..4 {
        store
            .ingest(
                corpus(&mut rng, 60, &format!("b{batch}-")),
                OnDuplicate::Reject,
                &HashEmbedder,
            )
            .unwrap();
    }
    // Deletions leave tombstones that must not disturb statistics or results.
    let victims: Vec<String> = store.docs.keys().take(15).cloned().collect();
    store
        .delete(&victims.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    assert!(store.labels().len() >= 5);

    let mut checked = 0;
    for _ in 0..60 {
        let holder = random_holder(&mut rng);
        let readable = store.readable(&|l| holder_reads(&holder, l));
        let readable_keys: BTreeSet<u64> = store
            .chunks
            .iter()
            .filter(|(_, c)| {
                holder_reads(
                    &holder,
                    &store.labels[store.docs[&*c.doc_id].label_id as usize],
                )
            })
            .map(|(k, _)| *k)
            .collect();
        let query = format!(
            "{} {}",
            WORDS[rng.random_range(0..WORDS.len())],
            WORDS[rng.random_range(0..WORDS.len())]
        );
        let k = rng.random_range(1..15);
        let qv = hash_embed(&query);

        // BM25.
        let hits = store
            .search(
                &SearchQuery {
                    text: &query,
                    vector: None,
                    k,
                    mode: SearchMode::Bm25,
                },
                &readable,
            )
            .unwrap();
        for h in &hits {
            assert!(
                holder_reads(&holder, &h.label),
                "BM25 returned an unreadable chunk"
            );
        }
        let reference = bm25_reference(&store, &readable_keys, &query, k);
        assert_eq!(hits.len(), reference.len(), "query {query:?} k {k}");
        for (h, (key, score)) in hits.iter().zip(&reference) {
            assert!(
                (h.score - score).abs() <= 1e-4 * score.abs().max(1.0),
                "{} vs {score}",
                h.score
            );
            // Keys agree except where scores tie.
            if h.key != *key {
                assert!(
                    (h.score - score).abs() <= 1e-4,
                    "ranking differs beyond ties"
                );
            }
        }

        // Dense.
        let hits = store
            .search(
                &SearchQuery {
                    text: &query,
                    vector: Some(&qv),
                    k,
                    mode: SearchMode::Dense,
                },
                &readable,
            )
            .unwrap();
        let mut brute: Vec<(u64, f32)> = readable_keys
            .iter()
            .map(|key| {
                let v = hash_embed(&store.chunks[key].text);
                (*key, v.iter().zip(&qv).map(|(a, b)| a * b).sum::<f32>())
            })
            .collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        brute.truncate(k);
        assert_eq!(hits.len(), brute.len());
        for (h, (key, score)) in hits.iter().zip(&brute) {
            assert!(
                holder_reads(&holder, &h.label),
                "dense returned an unreadable chunk"
            );
            assert!((h.score - score).abs() < 1e-4, "{} vs {score}", h.score);
            if h.key != *key {
                assert!(
                    (h.score - score).abs() < 1e-5,
                    "dense ranking differs beyond ties"
                );
            }
        }

        // Hybrid: only readable chunks, never more than k.
        let hits = store
            .search(
                &SearchQuery {
                    text: &query,
                    vector: Some(&qv),
                    k,
                    mode: SearchMode::Hybrid,
                },
                &readable,
            )
            .unwrap();
        assert!(hits.len() <= k);
        assert!(hits.iter().all(|h| holder_reads(&holder, &h.label)));
        if !readable_keys.is_empty() {
            assert_eq!(
                hits.len(),
                k.min(readable_keys.len()).min(hits.len().max(1))
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 60);
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn bm25_scores_do_not_depend_on_unreadable_documents() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config()).unwrap();
    let public = labels()[0].clone();
    let secret = labels()[1].clone();
    let doc = |id: &str, label: &Label, text: &str| NewDocument {
        id: id.into(),
        label: label.clone(),
        label_name: None,
        text: text.into(),
        meta: BTreeMap::new(),
    };
    store
        .ingest(
            vec![
                doc("pub1", &public, "the merger was announced"),
                doc("pub2", &public, "a quiet day at the office"),
            ],
            OnDuplicate::Reject,
            &HashEmbedder,
        )
        .unwrap();
    let outsider: BTreeSet<&str> = ["p0"].into();
    let q = SearchQuery {
        text: "merger",
        vector: None,
        k: 5,
        mode: SearchMode::Bm25,
    };
    let before = store
        .search(&q, &store.readable(&|l| holder_reads(&outsider, l)))
        .unwrap();
    // Many secret documents about the merger: an outsider's scores must not move.
    let secrets: Vec<NewDocument> = (0..20)
        .map(|i| doc(&format!("s{i}"), &secret, "merger merger layoffs"))
        .collect();
    store
        .ingest(secrets, OnDuplicate::Reject, &HashEmbedder)
        .unwrap();
    let after = store
        .search(&q, &store.readable(&|l| holder_reads(&outsider, l)))
        .unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(
        before, after,
        "an outsider's BM25 scores changed when secret documents were added"
    );
}

fn files_contain(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn delete_removes_text_terms_and_vectors_from_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config()).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    store
        .ingest(
            corpus(&mut rng, 30, "d"),
            OnDuplicate::Reject,
            &HashEmbedder,
        )
        .unwrap();
    let marker = "zanzibarquux";
    let secret = NewDocument {
        id: "victim".into(),
        label: labels()[1].clone(),
        label_name: Some("hr".into()),
        text: format!("The {marker} payroll file. It lists every salary."),
        meta: BTreeMap::new(),
    };
    store
        .ingest(vec![secret], OnDuplicate::Reject, &HashEmbedder)
        .unwrap();
    store.compact().unwrap();
    let victim_vec = hash_embed(&format!(
        "The {marker} payroll file. It lists every salary."
    ));
    let vec_bytes: Vec<u8> = victim_vec[..8]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert!(
        !files_contain(dir.path(), marker.as_bytes()).is_empty(),
        "precondition: the marker is on disk"
    );
    assert!(
        !files_contain(dir.path(), &vec_bytes).is_empty(),
        "precondition: the vector is on disk"
    );

    let report = store.delete(&["victim"]).unwrap();
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].chunks, 1);
    let all = store.readable(&|_| true);
    let hits = store
        .search(
            &SearchQuery {
                text: marker,
                vector: Some(&victim_vec),
                k: 50,
                mode: SearchMode::Hybrid,
            },
            &all,
        )
        .unwrap();
    assert!(hits.iter().all(|h| h.doc_id != "victim"));
    assert!(store.document("victim").is_none());
    // Nothing on disk holds the text (the stemmed term or the raw word) or the vector.
    assert_eq!(
        files_contain(dir.path(), marker.as_bytes()),
        Vec::<String>::new()
    );
    assert_eq!(files_contain(dir.path(), &vec_bytes), Vec::<String>::new());
    assert!(store.verify().unwrap().problems.is_empty());
    // And it stays gone after a reopen.
    drop(store);
    let store = Store::open(dir.path(), config()).unwrap();
    assert!(store.document("victim").is_none());
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config()).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    store
        .ingest(
            corpus(&mut rng, 5, "ok"),
            OnDuplicate::Reject,
            &HashEmbedder,
        )
        .unwrap();
    let seq = store.seq();
    let wal_len = std::fs::metadata(dir.path().join("wal.log")).unwrap().len();
    let good = |id: &str| NewDocument {
        id: id.into(),
        label: labels()[0].clone(),
        label_name: None,
        text: "fine text".into(),
        meta: BTreeMap::new(),
    };
    let with_text = |text: &str| NewDocument {
        text: text.into(),
        ..good("new")
    };
    let cases: Vec<(Vec<NewDocument>, &str)> = vec![
        (vec![good("a"), good("a")], "twice"),
        (vec![good("a"), good("ok1")], "already stored"),
        (vec![good("")], "empty"),
        (vec![good("x#1")], "'#'"),
        (vec![with_text("   \n ")], "no text"),
        (
            vec![with_text("PK\u{3}\u{4}\u{0}\u{0}binary\u{1}\u{2}")],
            "binary",
        ),
        (vec![], "nothing"),
    ];
    for (docs, expect) in cases {
        let err = store
            .ingest(docs, OnDuplicate::Reject, &HashEmbedder)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{err:?} should mention {expect:?}");
    }
    assert!(matches!(
        store.delete(&["nope"]),
        Err(Error::UnknownDocument(_))
    ));
    assert!(matches!(
        store.delete(&["ok1", "nope"]),
        Err(Error::UnknownDocument(_))
    ));
    assert!(
        store.document("ok1").is_some(),
        "a failed batch delete removes nothing"
    );
    struct Broken;
    impl Embedder for Broken {
        fn dim(&self) -> usize {
            DIM
        }
        fn embed(&self, texts: &[&str]) -> std::result::Result<Vec<Vec<f32>>, String> {
            Ok(texts.iter().map(|_| vec![f32::NAN; DIM]).collect())
        }
    }
    assert!(matches!(
        store.ingest(vec![good("n")], OnDuplicate::Reject, &Broken),
        Err(Error::Embedding(_))
    ));
    assert_eq!(store.seq(), seq);
    assert_eq!(
        std::fs::metadata(dir.path().join("wal.log")).unwrap().len(),
        wal_len
    );
    assert_eq!(store.len(), 5);
    let all = store.readable(&|_| true);
    assert!(store
        .search(
            &SearchQuery {
                text: "x",
                vector: None,
                k: 3,
                mode: SearchMode::Dense
            },
            &all
        )
        .is_err());
    assert!(store
        .search(
            &SearchQuery {
                text: "x",
                vector: Some(&[1.0; 3]),
                k: 3,
                mode: SearchMode::Dense
            },
            &all
        )
        .is_err());
}

#[test]
fn replace_updates_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config()).unwrap();
    let doc = |text: &str| NewDocument {
        id: "d".into(),
        label: labels()[0].clone(),
        label_name: None,
        text: text.into(),
        meta: BTreeMap::new(),
    };
    store
        .ingest(
            vec![doc("old words here")],
            OnDuplicate::Reject,
            &HashEmbedder,
        )
        .unwrap();
    let r = store
        .ingest(
            vec![doc("entirely new content")],
            OnDuplicate::Replace,
            &HashEmbedder,
        )
        .unwrap();
    assert_eq!(r.replaced, ["d"]);
    let all = store.readable(&|_| true);
    let q = |t: &'static str| SearchQuery {
        text: t,
        vector: None,
        k: 5,
        mode: SearchMode::Bm25,
    };
    assert!(store.search(&q("old"), &all).unwrap().is_empty());
    assert_eq!(store.search(&q("entirely"), &all).unwrap().len(), 1);
    assert_eq!(store.chunk_count(), 1);
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn store_survives_reopen_with_and_without_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let all_query = |store: &Store| {
        let all = store.readable(&|_| true);
        let v = hash_embed("budget salary");
        store
            .search(
                &SearchQuery {
                    text: "budget salary",
                    vector: Some(&v),
                    k: 10,
                    mode: SearchMode::Hybrid,
                },
                &all,
            )
            .unwrap()
    };
    let before = {
        let mut store = Store::open(dir.path(), config()).unwrap();
        store
            .ingest(
                corpus(&mut rng, 40, "a"),
                OnDuplicate::Reject,
                &HashEmbedder,
            )
            .unwrap();
        store.compact().unwrap();
        store
            .ingest(
                corpus(&mut rng, 40, "b"),
                OnDuplicate::Reject,
                &HashEmbedder,
            )
            .unwrap();
        all_query(&store)
        // Dropped without close: the log holds the second batch.
    };
    let store = Store::open(dir.path(), config()).unwrap();
    assert_eq!(store.len(), 80);
    assert_eq!(all_query(&store), before);
    assert!(store.verify().unwrap().problems.is_empty());
    store.close().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    assert_eq!(all_query(&store), before);
    // Losing the derived indexes entirely is recoverable from the table.
    drop(store);
    std::fs::remove_dir_all(dir.path().join("bm25")).unwrap();
    std::fs::remove_dir_all(dir.path().join("vectors")).unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    assert_eq!(all_query(&store), before);
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn damaged_files_are_typed_errors_and_torn_log_tails_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    {
        let mut store = Store::open(dir.path(), config()).unwrap();
        store
            .ingest(
                corpus(&mut rng, 10, "a"),
                OnDuplicate::Reject,
                &HashEmbedder,
            )
            .unwrap();
        store.compact().unwrap();
        store
            .ingest(
                corpus(&mut rng, 10, "b"),
                OnDuplicate::Reject,
                &HashEmbedder,
            )
            .unwrap();
    }
    // A torn append: half a record at the end of the log.
    let wal = dir.path().join("wal.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    let whole = bytes.clone();
    bytes.extend_from_slice(&whole[..whole.len() / 2]);
    std::fs::write(&wal, &bytes).unwrap();
    {
        let store = Store::open(dir.path(), config()).unwrap();
        assert_eq!(store.len(), 20);
        assert!(store.verify().unwrap().problems.is_empty());
    }
    assert_eq!(std::fs::read(&wal).unwrap(), whole, "the torn tail was cut");
    // A flipped byte in the middle of the log is corruption.
    let mut bad = whole.clone();
    bad[10] ^= 0x55;
    bad.extend_from_slice(&whole);
    std::fs::write(&wal, &bad).unwrap();
    assert!(matches!(
        Store::open(dir.path(), config()),
        Err(Error::DataCorruption(_))
    ));
    std::fs::write(&wal, &whole).unwrap();
    // A damaged snapshot is corruption too.
    let snap = dir.path().join("snapshot.bin");
    let good = std::fs::read(&snap).unwrap();
    let mut damaged = good.clone();
    damaged[5] ^= 1;
    std::fs::write(&snap, &damaged).unwrap();
    assert!(matches!(
        Store::open(dir.path(), config()),
        Err(Error::DataCorruption(_))
    ));
    std::fs::write(&snap, &good).unwrap();
    // Another dimension is incompatible.
    assert!(matches!(
        Store::open(dir.path(), StoreConfig::new(32)),
        Err(Error::IncompatibleFormat(_))
    ));
    let store = Store::open(dir.path(), config()).unwrap();
    assert!(matches!(
        Store::open(dir.path(), config()),
        Err(Error::Locked(_))
    ));
    drop(store);
}

const CRASH_DIR: &str = "LETHE_STORE_CRASH_DIR";

/// Entry point of the child process of the crash test: when started with
/// `LETHE_STORE_CRASH_DIR` set, ingests and deletes forever (until killed),
/// writing each acknowledged operation to `acks.log`. Without the variable
/// (a normal test run) it returns at once.
#[test]
fn crash_child_entry() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let round: u64 = std::env::var("LETHE_STORE_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(round);
    let mut store = Store::open(&dir.join("store"), config()).unwrap();
    let mut acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("acks.log"))
        .unwrap();
    use std::io::Write;
    for i in 0.. {
        if i % 5 == 4 && !store.is_empty() {
            let victim = store
                .docs
                .keys()
                .nth(rng.random_range(0..store.len()))
                .unwrap()
                .clone();
            store.delete(&[&victim]).unwrap();
            writeln!(acks, "del {victim}").unwrap();
        } else {
            let n = rng.random_range(1..6);
            let docs = corpus(&mut rng, n, &format!("r{round}i{i}-"));
            let ids: Vec<String> = docs.iter().map(|d| d.id.clone()).collect();
            store
                .ingest(docs, OnDuplicate::Reject, &HashEmbedder)
                .unwrap();
            writeln!(acks, "add {}", ids.join(" ")).unwrap();
        }
        acks.sync_data().unwrap();
        if i % 7 == 6 {
            store.compact().unwrap();
        }
    }
}

#[test]
fn kill_9_during_ingest_and_delete_leaves_a_consistent_store() {
    let rounds = if std::env::var("LETHE_TEST_SIZE").as_deref() == Ok("full") {
        25
    } else {
        8
    };
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(99);
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for round in 0..rounds {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "tests::crash_child_entry",
                "--test-threads",
                "1",
                "-q",
            ])
            .env(CRASH_DIR, dir.path())
            .env("LETHE_STORE_CRASH_ROUND", round.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(150..700)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = Store::open(&dir.path().join("store"), config()).unwrap();
        let report = store.verify().unwrap();
        assert!(
            report.problems.is_empty(),
            "round {round}: {:?}",
            report.problems
        );
        // Every acknowledged operation is durable; at most the one in flight
        // when the child died may additionally have landed.
        let acks = std::fs::read_to_string(dir.path().join("acks.log")).unwrap_or_default();
        for line in acks.lines() {
            match line.split_once(' ') {
                Some(("add", ids)) => expected.extend(ids.split(' ').map(String::from)),
                Some(("del", id)) => {
                    expected.remove(id);
                }
                _ => {}
            }
        }
        std::fs::write(dir.path().join("acks.log"), "").unwrap();
        let stored: BTreeSet<String> = store.docs.keys().cloned().collect();
        let missing: Vec<&String> = expected.difference(&stored).collect();
        let extra: Vec<&String> = stored.difference(&expected).collect();
        // An unacknowledged in-flight operation may have committed: at most
        // one batch of extra documents (all from one ingest) or one delete.
        assert!(
            missing.len() <= 1,
            "round {round}: acknowledged documents lost: {missing:?}"
        );
        if let Some(first) = extra.first() {
            let batch = first.split('-').next().unwrap();
            assert!(
                extra.iter().all(|e| e.starts_with(batch)),
                "round {round}: extras from several batches: {extra:?}"
            );
        }
        // Adopt what actually survived as the new truth.
        expected = stored;
    }
    assert!(!expected.is_empty(), "the child made progress");
}
