//! End-to-end engine tests on the Acme corpus with the real embedder.

use super::*;

fn root() -> PathBuf {
    project_root()
}

fn engine(dir: &Path, policy: &str) -> Engine {
    let config = Config::new(dir.to_path_buf(), root().join("policies").join(policy));
    Engine::open(config, "test").unwrap()
}

fn acme() -> Vec<SourceDocument> {
    read_jsonl(&root().join("datasets/acme/corpus.jsonl")).unwrap()
}

#[test]
fn principals_see_only_what_they_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "example-org.toml");
    let report = e.ingest(&Actor::Operator, acme(), false).unwrap();
    assert_eq!(report.documents.len(), 27);
    let policy = e.policy();
    let queries = [
        "salary bands for engineers",
        "quarterly revenue",
        "how do I reset my password",
        "lawsuit risk",
    ];
    for principal in [
        "alice",
        "ed",
        "frank",
        "lena",
        "support-bot",
        "carol",
        "wes",
    ] {
        for q in queries {
            for mode in [Mode::Bm25, Mode::Dense, Mode::Hybrid] {
                let r = e.search(principal, q, 5, mode).unwrap();
                for h in &r.hits {
                    assert!(
                        policy.may_read(principal, &h.label),
                        "{principal} got {} ({q}, {mode:?})",
                        h.chunk_id
                    );
                }
                assert!(r.readable_chunks <= r.total_chunks);
            }
        }
    }
    // Alice (HR) finds the salary bands; Ed (engineering) never does.
    let top = |p: &str, q: &str| {
        e.search(p, q, 3, Mode::Hybrid)
            .unwrap()
            .hits
            .into_iter()
            .map(|h| h.doc_id)
            .collect::<Vec<_>>()
    };
    assert!(top("alice", "salary bands for engineers").contains(&"hr/salary-bands".to_string()));
    assert!(!top("ed", "salary bands for engineers").contains(&"hr/salary-bands".to_string()));
    // Dense retrieval is semantic: a paraphrase with no shared keyword finds the article.
    let dense = e
        .search(
            "support-bot",
            "I forgot my login credentials",
            1,
            Mode::Dense,
        )
        .unwrap();
    assert_eq!(dense.hits[0].doc_id, "support/reset-password");
    // Unlabeled documents received the policy default.
    let kitchen = e
        .documents()
        .into_iter()
        .find(|d| d.id == "misc/kitchen-rules")
        .unwrap();
    assert_eq!(kitchen.label_name.as_deref(), Some("internal"));
    // Unknown principals are refused, not served public data.
    assert!(matches!(
        e.search("mallory", "pricing", 3, Mode::Bm25),
        Err(Error::Forbidden(_))
    ));
    let audit = e.verify_audit().unwrap();
    assert!(audit.is_intact());
    assert!(audit.records > 80);
}

#[test]
fn unlabeled_data_fails_closed_without_a_default_label() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "tests/strict.toml");
    let docs = vec![
        SourceDocument {
            id: "a".into(),
            label: LabelSpec::Named("team".into()),
            text: "labelled".into(),
            meta: Default::default(),
            origin: "t:1".into(),
        },
        SourceDocument {
            id: "b".into(),
            label: LabelSpec::Unlabeled,
            text: "no label".into(),
            meta: Default::default(),
            origin: "t:2".into(),
        },
        SourceDocument {
            id: "c".into(),
            label: LabelSpec::Named("top-secret".into()),
            text: "unknown label".into(),
            meta: Default::default(),
            origin: "t:3".into(),
        },
    ];
    let err = e
        .ingest(&Actor::Operator, docs, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("t:2") && err.contains("no label"), "{err}");
    assert!(
        err.contains("t:3") && err.contains("unknown label \"top-secret\""),
        "{err}"
    );
    assert!(
        e.documents().is_empty(),
        "nothing is ingested when any document is bad"
    );
}

#[test]
fn roles_gate_ingest_delete_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "tests/strict.toml");
    let doc = |id: &str| SourceDocument {
        id: id.into(),
        label: LabelSpec::Named("team".into()),
        text: format!("document {id} about the quarterly plan"),
        meta: Default::default(),
        origin: "t".into(),
    };
    let alice = Actor::Principal("alice".into());
    let bob = Actor::Principal("bob".into());
    e.ingest(&bob, vec![doc("x")], false).unwrap();
    assert!(matches!(e.delete(&bob, &["x"]), Err(Error::Forbidden(_))));
    assert!(matches!(
        e.delete(&alice, &["nope"]),
        Err(Error::NotFound(_))
    ));
    e.delete(&alice, &["x"]).unwrap();
    assert!(matches!(
        e.create_key(&alice, "bob"),
        Err(Error::Forbidden(_))
    ));
    let key = e.create_key(&Actor::Operator, "bob").unwrap();
    assert_eq!(e.authenticate(&key.key).unwrap(), "bob");
    assert!(matches!(
        e.create_key(&Actor::Operator, "mallory"),
        Err(Error::NotFound(_))
    ));
    // The audit log names who did what, and never the key.
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(log.contains("\"action\":\"delete\""));
    assert!(log.contains("\"action\":\"key.create\""));
    assert!(!log.contains(&key.key));
    assert!(
        !log.contains("quarterly plan"),
        "document text must not reach the audit log"
    );
}

#[test]
fn folders_take_labels_from_sidecars_and_folder_rules() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("team/sub")).unwrap();
    std::fs::write(src.join("team/.lethe-label"), "team\n").unwrap();
    std::fs::write(src.join("team/a.md"), "# Plan\nThe plan for next year.").unwrap();
    std::fs::write(src.join("team/sub/b.txt"), "Sub folder file.").unwrap();
    std::fs::write(src.join("team/sub/c.txt"), "Only alice.").unwrap();
    std::fs::write(src.join("team/sub/c.txt.label"), "alice-only").unwrap();
    std::fs::write(src.join("ignored.pdf"), [0u8, 1, 2]).unwrap();
    let docs = read_folder(&src).unwrap();
    let labels: Vec<(String, LabelSpec)> = docs
        .iter()
        .map(|d| (d.id.clone(), d.label.clone()))
        .collect();
    assert_eq!(
        labels,
        [
            ("team/a.md".to_string(), LabelSpec::Named("team".into())),
            (
                "team/sub/b.txt".to_string(),
                LabelSpec::Named("team".into())
            ),
            (
                "team/sub/c.txt".to_string(),
                LabelSpec::Named("alice-only".into())
            ),
        ]
    );
    assert_eq!(docs[0].meta.get("title").map(String::as_str), Some("Plan"));
    // Empty and binary files are errors, reported together.
    std::fs::write(src.join("team/empty.md"), "  \n").unwrap();
    std::fs::write(src.join("team/bin.txt"), [b'a', 0, b'b']).unwrap();
    let err = read_folder(&src).unwrap_err().to_string();
    assert!(err.contains("empty.md: empty file"), "{err}");
    assert!(err.contains("bin.txt: binary file"), "{err}");
}

#[test]
fn jsonl_problems_are_reported_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("docs.jsonl");
    std::fs::write(
        &p,
        concat!(
            "{\"id\": \"a\", \"text\": \"fine\", \"label\": \"internal\"}\n",
            "{\"id\": \"b\", \"txt\": \"typo\"}\n",
            "not json\n",
            "{\"id\": \"c\", \"text\": \"x\", \"label\": {\"readers\": [[\"hr\"], [\"legal\"]], \"tags\": [\"purpose:hr\"]}}\n",
            "{\"id\": \"d\", \"text\": \"x\", \"label\": {\"readers\": 5}}\n",
        ),
    )
    .unwrap();
    let err = read_jsonl(&p).unwrap_err().to_string();
    assert!(err.contains("docs.jsonl:2"), "{err}");
    assert!(err.contains("docs.jsonl:3"), "{err}");
    assert!(err.contains("docs.jsonl:5"), "{err}");
    assert!(
        !err.contains("docs.jsonl:1:") && !err.contains("docs.jsonl:4:"),
        "{err}"
    );
    std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
    assert!(read_jsonl(&p)
        .unwrap_err()
        .to_string()
        .contains("not UTF-8"));
}

#[test]
fn knnlm_mode_answers_within_clearance_and_forgets_deleted_documents() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(
        dir.path().join("data"),
        root().join("policies").join("example-org.toml"),
    );
    config.knnlm.enabled = true;
    config.knnlm.max_doc_tokens = 128;
    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        concat!(
            r#"{"id": "hr/vault", "text": "The access code of the Zubrowka vault is amber-falcon-42. The Zubrowka vault opens at night.", "label": "hr-confidential"}"#,
            "\n",
            r#"{"id": "web/weather", "text": "The weather in Lisbon is sunny and warm in July, with little rain.", "label": "public-web"}"#,
            "\n"
        ),
    )
    .unwrap();
    let e = Engine::open(config.clone(), "test").unwrap();
    e.ingest(&Actor::Operator, read_jsonl(&corpus).unwrap(), false)
        .unwrap();
    let ask = |e: &Engine, principal: &str, propagator: Propagator| {
        e.answer(
            &AnswerRequest {
                principal: principal.into(),
                query: "What is the access code of the Zubrowka vault?".into(),
                sink: None,
                k: 5,
                mode: Mode::Hybrid,
                propagator,
                generation: GenerateConfig {
                    max_tokens: 20,
                    ..GenerateConfig::default()
                },
                generator: Generator::KnnLm,
            },
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap()
    };
    // Alice (hr) gets the code, labelled hr-confidential.
    let a = ask(
        &e,
        "alice",
        Propagator::Permissive(PermissiveConfig::default()),
    );
    let text = a.answer.text.clone().unwrap_or_default();
    assert!(text.contains("amber-falcon-42"), "{a:?}");
    assert!(a
        .answer
        .label
        .flows_to(e.policy().label("hr-confidential").unwrap()));
    assert!(!a.answer.label.readers.is_public(), "{a:?}");
    assert!(a.sources.iter().any(|s| s.doc_id == "hr/vault"));
    // Ed (engineering) never sees the code nor the document.
    let b = ask(&e, "ed", Propagator::Conservative);
    assert!(
        !b.answer
            .text
            .clone()
            .unwrap_or_default()
            .contains("amber-falcon-42"),
        "{b:?}"
    );
    assert!(b.sources.iter().all(|s| s.doc_id != "hr/vault"), "{b:?}");
    // Introspection does not apply to the kNN-LM.
    let err = e
        .answer(
            &AnswerRequest {
                principal: "alice".into(),
                query: "hello".into(),
                sink: None,
                k: 5,
                mode: Mode::Hybrid,
                propagator: Propagator::Introspection,
                generation: GenerateConfig::default(),
                generator: Generator::KnnLm,
            },
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err}");
    // Deleting the document removes its entries, in memory and on disk.
    e.delete(&Actor::Operator, &["hr/vault"]).unwrap();
    let c = ask(&e, "alice", Propagator::Conservative);
    assert!(
        !c.answer
            .text
            .clone()
            .unwrap_or_default()
            .contains("amber-falcon-42"),
        "{c:?}"
    );
    assert!(c.sources.iter().all(|s| s.doc_id != "hr/vault"));
    e.close().unwrap();
    let (ds, _) = lethe_knnlm::Datastore::load(&dir.path().join("data/knnlm")).unwrap();
    assert!(!ds.contains("hr/vault"));
    assert!(ds.contains("web/weather"));
}

#[test]
fn a_stale_datastore_is_reconciled_before_use() {
    // Simulates a crash between the store's delete and the datastore's save:
    // the datastore on disk still holds a document the store has dropped.
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(
        dir.path().join("data"),
        root().join("policies").join("example-org.toml"),
    );
    config.knnlm.enabled = true;
    config.knnlm.max_doc_tokens = 64;
    let docs = || {
        acme()
            .into_iter()
            .filter(|d| d.id == "web/about" || d.id == "web/pricing")
            .collect::<Vec<_>>()
    };
    let e = Engine::open(config.clone(), "test").unwrap();
    e.ingest(&Actor::Operator, docs(), false).unwrap();
    let knn_dir = dir.path().join("data/knnlm");
    let saved = dir.path().join("saved-knnlm");
    std::fs::create_dir_all(&saved).unwrap();
    for f in std::fs::read_dir(&knn_dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), saved.join(f.file_name())).unwrap();
    }
    e.delete(&Actor::Operator, &["web/about"]).unwrap();
    e.close().unwrap();
    // Put the pre-delete datastore back, as if its save never happened.
    for f in std::fs::read_dir(&saved).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), knn_dir.join(f.file_name())).unwrap();
    }
    assert!(lethe_knnlm::Datastore::load(&knn_dir)
        .unwrap()
        .0
        .contains("web/about"));
    // Reopened with kNN-LM disabled (no model needed): a delete of another
    // document loads the datastore, which drops the stale entries first.
    config.knnlm.enabled = false;
    let e = Engine::open(config, "test").unwrap();
    e.delete(&Actor::Operator, &["web/pricing"]).unwrap();
    let (ds, _) = lethe_knnlm::Datastore::load(&knn_dir).unwrap();
    assert!(!ds.contains("web/about"));
    assert!(!ds.contains("web/pricing"));
    assert!(ds.is_empty());
}
