//! End-to-end tests of the unlearning workflow on a real engine (MiniLM
//! embeddings, the acme corpus, a planted canary): erasure of a document the
//! officer cannot read, signed receipts, weight-level unlearning and O3 on a
//! tiny decoder with hot-swap, and crash tests that SIGKILL a child process
//! at every step of a run and check that the ledger resumes or rolls back
//! without losing a request.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lethe_compliance::{Compliance, NewRequest, Phase, PublicKey, Receipt, State, STEPS};
use lethe_engine::{Actor, Config, Engine, LabelSpec, Mode, SourceDocument};
use serde_json::Value;

const CANARY: &str = "CANARY-7F3A9Q";
const CANARY_TEXT: &str =
    "The vault passphrase is CANARY-7F3A9Q. Only HR may know the vault passphrase.";

fn olga() -> Actor {
    Actor::Principal("olga".into())
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// A data directory with the acme corpus and the canary, and a
    /// `lethe.toml`; `unlearning` is appended to it as is.
    fn new(unlearning: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = lethe_engine::project_root();
        let config = dir.path().join("lethe.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\npolicy = {:?}\n[models]\ncache = {:?}\n{unlearning}",
                root.join("policies/example-org.toml").display().to_string(),
                lethe_engine::default_model_cache().display().to_string(),
            ),
        )
        .unwrap();
        let engine = Engine::open(Config::load(&config).unwrap(), "cli").unwrap();
        let mut docs = lethe_engine::read_jsonl(&root.join("datasets/acme/corpus.jsonl")).unwrap();
        docs.push(SourceDocument {
            id: "hr/vault".into(),
            label: LabelSpec::Named("hr-confidential".into()),
            text: CANARY_TEXT.into(),
            meta: Default::default(),
            origin: "test".into(),
        });
        engine.ingest(&Actor::Operator, docs, false).unwrap();
        engine.close().unwrap();
        Setup { dir, config }
    }

    fn engine(&self) -> Arc<Engine> {
        Arc::new(Engine::open(Config::load(&self.config).unwrap(), "cli").unwrap())
    }

    fn unlearning_dir(&self) -> PathBuf {
        self.dir.path().join("data/unlearning")
    }
}

fn request(docs: &[&str], method: Option<&str>) -> NewRequest {
    NewRequest {
        documents: docs.iter().map(|d| d.to_string()).collect(),
        reason: "GDPR art. 17 erasure request #42".into(),
        requester: "Jane Doe".into(),
        method: method.map(str::to_string),
    }
}

fn hits_canary(engine: &Engine, principal: &str, mode: Mode) -> bool {
    let r = engine
        .search(principal, "what is the vault passphrase", 10, mode)
        .unwrap();
    r.hits
        .iter()
        .any(|h| h.text.contains(CANARY) || h.doc_id == "hr/vault")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn num(v: &Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn canary_is_erased_by_an_officer_who_cannot_read_it() {
    let setup = Setup::new("");
    let engine = setup.engine();
    for mode in [Mode::Bm25, Mode::Dense, Mode::Hybrid] {
        assert!(
            hits_canary(&engine, "alice", mode),
            "alice (HR) finds the canary before ({mode:?})"
        );
    }
    assert!(
        !hits_canary(&engine, "olga", Mode::Bm25),
        "olga may not read HR files"
    );
    let c = Compliance::shared(&engine).unwrap();
    assert!(
        Arc::ptr_eq(&c, &Compliance::shared(&engine).unwrap()),
        "one workflow per engine"
    );

    // Roles: erin and alice lack `unlearn`.
    for p in ["erin", "alice"] {
        let e = c
            .file(&Actor::Principal(p.into()), request(&["hr/vault"], None))
            .unwrap_err();
        assert!(
            matches!(
                e,
                lethe_compliance::Error::Engine(lethe_engine::Error::Forbidden(_))
            ),
            "{e}"
        );
    }
    assert!(c.file(&olga(), request(&["no/such-doc"], None)).is_err());
    assert!(c.file(&olga(), request(&[], None)).is_err());
    let filed = c.file(&olga(), request(&["hr/vault"], None)).unwrap();
    assert_eq!(filed.request.id, "ur-000001");
    assert_eq!(filed.state, State::Pending);
    assert_eq!(
        filed.request.documents[0].sha256,
        sha256_hex(CANARY_TEXT.as_bytes())
    );
    assert!(c
        .run(
            &Actor::Principal("erin".into()),
            "ur-000001",
            None,
            &mut |_| {}
        )
        .is_err());
    assert_eq!(
        c.status(&olga(), "ur-000001").unwrap().state,
        State::Pending,
        "a refused run changes nothing"
    );

    let mut steps = Vec::new();
    let out = c
        .run_all(&olga(), None, &mut |p| steps.push(p.step))
        .unwrap();
    assert_eq!(steps, STEPS.to_vec());
    assert_eq!(out.len(), 1);
    assert!(!out[0].resumed);

    // Gone from every retriever and from the store.
    for mode in [Mode::Bm25, Mode::Dense, Mode::Hybrid] {
        assert!(
            !hits_canary(&engine, "alice", mode),
            "canary still retrieved ({mode:?})"
        );
    }
    assert!(engine.documents().iter().all(|d| d.id != "hr/vault"));
    assert!(engine.verify_store().unwrap().problems.is_empty());

    // The receipt.
    let receipt = &out[0].receipt;
    let b = receipt.body();
    assert_eq!(b["request"]["id"], "ur-000001");
    assert_eq!(b["request"]["requester"], "Jane Doe");
    assert_eq!(b["request"]["filed_by"], "olga");
    assert_eq!(b["removed"][0]["id"], "hr/vault");
    assert_eq!(
        b["removed"][0]["sha256"],
        sha256_hex(CANARY_TEXT.as_bytes()).as_str()
    );
    assert_eq!(b["retrieval"]["probe"]["forget_queries"], 1);
    assert_eq!(b["retrieval"]["probe"]["forget_hits"], 0);
    assert!(b["retrieval"]["probe"]["retain_found"].as_u64().unwrap() >= 1);
    assert_eq!(b["weights"]["kind"], "not_trained");
    assert!(b["weights"]["statement"]
        .as_str()
        .unwrap()
        .starts_with("No model weights were trained"));
    let gguf = engine.generator_path().unwrap();
    let gen_sha = sha256_hex(&std::fs::read(&gguf).unwrap());
    assert_eq!(b["weights"]["generator_sha256"], gen_sha.as_str());
    assert_eq!(b["weights"]["before_sha256"], b["weights"]["after_sha256"]);
    assert_eq!(b["method"]["name"], "none");
    assert_eq!(
        c.status(&olga(), "ur-000001").unwrap().method.as_deref(),
        Some("none")
    );
    assert_eq!(b["epoch"], 1);
    assert!(
        !receipt.to_json().contains(CANARY),
        "receipts hold hashes, not content"
    );

    // Verification with only the receipt file and the exported public key.
    let key_file = setup.dir.path().join("key.pub");
    std::fs::write(&key_file, c.public_key().to_text()).unwrap();
    let key = PublicKey::parse(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    let receipt_file = setup.unlearning_dir().join("receipts/ur-000001.json");
    lethe_compliance::verify_receipt_file(&receipt_file, &key).unwrap();
    let text = std::fs::read_to_string(&receipt_file).unwrap();
    let tampered = text.replace("Jane Doe", "John Doe");
    assert_ne!(tampered, text);
    assert!(Receipt::parse(&tampered).unwrap().verify(&key).is_err());
    let other =
        lethe_compliance::SigningKey::load_or_create(&setup.dir.path().join("other.pk8")).unwrap();
    assert!(Receipt::parse(&text)
        .unwrap()
        .verify(other.public_key())
        .is_err());

    // Idempotent: running a completed request gives the same receipt.
    let again = c.run(&olga(), "ur-000001", None, &mut |_| {}).unwrap();
    assert_eq!(&again.receipt, receipt);
    assert_eq!(c.receipt(&olga(), "ur-000001").unwrap(), *receipt);
    assert!(c.runnable().is_empty());
    // The erased document cannot be requested again.
    assert!(c.file(&olga(), request(&["hr/vault"], None)).is_err());

    // Audit: intact, attributed to olga, and free of the canary.
    assert!(engine.verify_audit().unwrap().is_intact());
    let audit = std::fs::read_to_string(setup.dir.path().join("data/audit.jsonl")).unwrap();
    assert!(!audit.contains(CANARY));
    for action in [
        "unlearn.request",
        "unlearn.read",
        "unlearn.erase",
        "unlearn.probe",
        "unlearn.complete",
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(&format!("\"{action}\"")) && l.contains("\"olga\"")),
            "no {action} record by olga"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(setup.unlearning_dir().join("signing-key.pk8"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// A tiny byte-level decoder (vocabulary 260) saved as the deployment's model.
fn tiny_decoder(dir: &Path) -> String {
    let cfg = lethe_model::decoder::Config::new(260, 32, 64, 2, 2, 64);
    let d = lethe_model::decoder::Decoder::new(cfg, &candle_core::Device::Cpu, 7).unwrap();
    d.save(dir).unwrap();
    lethe_unlearn::lm::decoder_hash(&d).unwrap()
}

const TINY_UNLEARNING: &str =
    "[unlearning]\nmodel = \"decoder\"\nmethod = \"npo\"\nretain_sample = 6\nmax_seq_len = 48\n\
    [unlearning.methods.npo]\ntrain = { lr = 0.003, epochs = 3, batch_size = 8 }\n\
    [unlearning.methods.o3]\ntrain = { lr = 0.003, epochs = 2, batch_size = 8 }\n";

#[test]
fn weights_are_unlearned_versioned_and_hot_swapped() {
    let setup = Setup::new(TINY_UNLEARNING);
    let base_dir = setup.dir.path().join("decoder");
    let base_hash = tiny_decoder(&base_dir);
    let base_file = std::fs::read(base_dir.join("model.safetensors")).unwrap();
    let engine = setup.engine();
    let c = Compliance::shared(&engine).unwrap();
    let live0 = c.live_model().unwrap().expect("a model is configured");
    assert_eq!(live0.version, None);
    assert_eq!(
        lethe_unlearn::lm::decoder_hash(&live0.decoder).unwrap(),
        base_hash
    );

    // NPO on the canary.
    c.file(&olga(), request(&["hr/vault"], None)).unwrap();
    let r1 = c
        .run(&olga(), "ur-000001", None, &mut |_| {})
        .unwrap()
        .receipt;
    let w = &r1.body()["weights"];
    assert_eq!(w["kind"], "unlearned");
    assert_eq!(w["suppression_only"], false);
    assert_eq!(r1.body()["method"]["name"], "npo");
    assert_eq!(r1.body()["method"]["hyperparameters"]["beta"], "0.1");
    assert_eq!(w["before_sha256"], base_hash.as_str());
    assert_ne!(w["after_sha256"], w["before_sha256"]);
    assert_eq!(w["tokenizer"], "bytes");
    assert_eq!(w["version"], "ur-000001");
    let m = &r1.body()["metrics"];
    let (fb, fa) = (num(&m["forget_nll_before"]), num(&m["forget_nll_after"]));
    assert!(fa > fb, "forget NLL must rise: {fb} -> {fa}");
    assert!(num(&m["retain_nll_before"]).is_finite() && num(&m["retain_nll_after"]).is_finite());
    assert!(w["retain_examples"].as_u64().unwrap() > 0);

    // Hot swap: the live handle serves the new version, the base is kept.
    let live = c.live();
    assert_eq!(
        (live.epoch, live.version.as_deref()),
        (1, Some("ur-000001"))
    );
    let live1 = c.live_model().unwrap().unwrap();
    assert_eq!(live1.version.as_deref(), Some("ur-000001"));
    assert_eq!(
        lethe_unlearn::lm::decoder_hash(&live1.decoder).unwrap(),
        w["after_sha256"].as_str().unwrap()
    );
    assert_eq!(
        lethe_unlearn::lm::decoder_hash(&live0.decoder).unwrap(),
        base_hash,
        "old handles stay valid"
    );
    assert_eq!(
        std::fs::read(base_dir.join("model.safetensors")).unwrap(),
        base_file,
        "base untouched"
    );
    assert!(setup
        .unlearning_dir()
        .join("models/ur-000001/model.safetensors")
        .is_file());

    // O3 on another document: suppression, base weights unchanged.
    c.file(&olga(), request(&["hr/layoff-plan"], Some("o3")))
        .unwrap();
    let r2 = c
        .run(&olga(), "ur-000002", None, &mut |_| {})
        .unwrap()
        .receipt;
    let w2 = &r2.body()["weights"];
    assert_eq!(w2["kind"], "suppression");
    assert_eq!(w2["suppression_only"], true);
    assert!(w2["statement"]
        .as_str()
        .unwrap()
        .starts_with("Suppression only"));
    assert_eq!(w2["before_sha256"], w2["after_sha256"]);
    assert_eq!(
        w2["before_sha256"], w["after_sha256"],
        "O3 ran on the live version"
    );
    assert_eq!(w2["adapter"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(w2["detector_sha256"].as_str().unwrap().len(), 64);
    assert!(num(&r2.body()["metrics"]["forget_nll_after"]).is_finite());
    assert!(setup
        .unlearning_dir()
        .join("models/ur-000002/detector.json")
        .is_file());
    let live = c.live();
    assert_eq!(live.epoch, 2);
    assert_eq!(live.version.as_deref(), Some("ur-000001"));
    assert_eq!(live.suppressions, vec!["ur-000002".to_string()]);

    // A second O3 request is trained against the adapter in force: the
    // orthogonality penalty it starts from is reduced by training.
    c.file(&olga(), request(&["finance/q3-results"], Some("o3")))
        .unwrap();
    let r3 = c
        .run(&olga(), "ur-000003", None, &mut |_| {})
        .unwrap()
        .receipt;
    let m3 = &r3.body()["metrics"];
    assert_eq!(num(&m3["earlier_adapters"]), 1.0, "{m3}");
    let (before, after) = (
        num(&m3["orthogonality_penalty_before"]),
        num(&m3["orthogonality_penalty_after"]),
    );
    assert!(before > 0.0 && after < before, "{before} -> {after}");
    assert_eq!(
        c.live().suppressions,
        vec!["ur-000002".to_string(), "ur-000003".to_string()]
    );
    for r in [&r1, &r2, &r3] {
        r.verify(c.public_key()).unwrap();
    }
}

/// Another text the served decoder learns, never forgotten.
const OTHER_TEXT: &str = "The cafeteria opens at eight and closes at three on weekdays.";

/// A byte-level decoder that memorised the canary and two other texts,
/// saved as the deployment's model.
fn canary_decoder(dir: &Path) {
    use lethe_unlearn::data::TextSet;
    let cfg = lethe_model::decoder::Config::new(260, 64, 128, 2, 4, 128);
    let d = lethe_model::decoder::Decoder::new(cfg, &candle_core::Device::Cpu, 5).unwrap();
    let texts = [
        CANARY_TEXT,
        OTHER_TEXT,
        "Expense reports are due on the fifth of every month.",
    ];
    let bytes: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| t.bytes().map(u32::from).collect())
        .collect();
    let set = TextSet::documents(&bytes).unwrap();
    let fit = lethe_unlearn::lm::fit(
        &d,
        &set,
        &lethe_unlearn::lm::LmTrainConfig::new(1e-2, 400, 3),
    )
    .unwrap();
    assert!(fit.last_loss < 0.05, "memorised: loss {}", fit.last_loss);
    d.save(dir).unwrap();
}

fn complete(
    c: &Compliance,
    who: &str,
    prompt: &str,
    sink: Option<&str>,
) -> lethe_compliance::Result<lethe_compliance::Completion> {
    c.complete(&lethe_compliance::CompletionRequest {
        principal: who.into(),
        prompt: prompt.into(),
        max_tokens: 16,
        sink: sink.map(str::to_string),
    })
}

#[test]
fn the_served_decoder_stops_revealing_a_canary_once_o3_suppresses_it() {
    let setup = Setup::new(
        "[unlearning]\nmodel = \"decoder\"\nlabel = \"hr-confidential\"\nmethod = \"o3\"\n\
         retain_sample = 6\nmax_seq_len = 48\n\
         [unlearning.methods.o3]\ntrain = { lr = 0.01, epochs = 30, batch_size = 8 }\n",
    );
    canary_decoder(&setup.dir.path().join("decoder"));
    let engine = setup.engine();
    let c = Compliance::shared(&engine).unwrap();
    let vault = "The vault passphrase is";
    let others = [
        "Expense reports are due",
        "The cafeteria opens at eight and closes",
    ];

    // Before: the decoder reveals the canary to a principal cleared for its label.
    let before = complete(&c, "alice", vault, None).unwrap();
    assert!(before.released());
    assert!(before.text.contains(CANARY), "{:?}", before.text);
    assert_eq!(before.label_name, "hr-confidential");
    assert!(before.gates.is_empty());
    let others_before: Vec<String> = others
        .iter()
        .map(|p| complete(&c, "alice", p, None).unwrap().text)
        .collect();
    // Not cleared for the label: forbidden; a sink the label may not reach:
    // refused before anything is generated; bad input: clear errors.
    let e = complete(&c, "ed", vault, None).unwrap_err();
    assert!(e.to_string().contains("may not read"), "{e}");
    let refused = complete(&c, "alice", vault, Some("email:external")).unwrap();
    assert!(!refused.released() && refused.text.is_empty() && refused.completion_tokens == 0);
    assert!(matches!(
        complete(&c, "alice", "  ", None),
        Err(lethe_compliance::Error::BadRequest(_))
    ));
    let long = "x".repeat(200);
    assert!(matches!(
        complete(&c, "alice", &long, None),
        Err(lethe_compliance::Error::BadRequest(_))
    ));

    // O3 on the canary document, then the same question.
    c.file(&olga(), request(&["hr/vault"], None)).unwrap();
    c.run(&olga(), "ur-000001", None, &mut |_| {}).unwrap();
    let after = complete(&c, "alice", vault, None).unwrap();
    assert!(!after.text.contains(CANARY), "{:?}", after.text);
    assert_eq!(after.gates.len(), 1);
    assert_eq!(after.gates[0].request, "ur-000001");
    assert!(after.gates[0].gate > 0.0, "{:?}", after.gates);
    assert_eq!((after.version.as_deref(), after.epoch), (None, 1));
    // Other documents' prompts: the gate stays off and the decoder answers
    // exactly as before (memorised continuations).
    for (p, before) in others.iter().zip(&others_before) {
        let now = complete(&c, "alice", p, None).unwrap();
        assert_eq!(now.gates[0].gate, 0.0, "{p}: {:?}", now.gates);
        assert_eq!(&now.text, before, "{p}");
    }
    assert!(
        OTHER_TEXT.contains(others_before[1].trim_end()),
        "{others_before:?}"
    );

    // Without a label the decoder is not served.
    drop((c, engine));
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        text.replace("label = \"hr-confidential\"\n", ""),
    )
    .unwrap();
    let engine = setup.engine();
    let c = Compliance::shared(&engine).unwrap();
    assert!(matches!(
        complete(&c, "alice", vault, None),
        Err(lethe_compliance::Error::Conflict(_))
    ));
}

/// Spawns the child on `id`, waits for it to announce `step`, SIGKILLs it.
/// Returns whether the announcement came (a `go` child may finish first).
fn kill_child_at(setup: &Setup, id: &str, step: &str, stop: bool) -> bool {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lethe-compliance-child"))
        .args([
            setup.config.to_str().unwrap(),
            "olga",
            id,
            step,
            if stop { "stop" } else { "go" },
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let want = format!("AT {step}");
    let mut seen = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(300)) {
        if line == want {
            seen = true;
            break;
        }
    }
    assert!(seen, "the child never reached {step}");
    if !stop {
        std::thread::sleep(Duration::from_millis(60));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child must have been killed");
    seen
}

#[test]
fn killed_runs_resume_or_roll_back_and_no_request_is_lost() {
    let setup = Setup::new(TINY_UNLEARNING);
    tiny_decoder(&setup.dir.path().join("decoder"));
    // (step the child is killed at, whether it stops right there, document,
    // the state the ledger must show afterwards, whether the document is gone)
    let cases: [(&str, bool, &str, State, bool); 7] = [
        (
            "weights",
            true,
            "hr/vault",
            State::Running(Phase::Started),
            false,
        ),
        (
            "weights",
            false,
            "hr/salary-bands",
            State::Running(Phase::Started),
            false,
        ),
        (
            "erase",
            true,
            "hr/layoff-plan",
            State::Running(Phase::Staged),
            false,
        ),
        (
            "probe",
            true,
            "legal/lawsuit-memo",
            State::Running(Phase::Staged),
            true,
        ),
        (
            "activate",
            true,
            "finance/q3-results",
            State::Running(Phase::Erased),
            true,
        ),
        (
            "receipt",
            true,
            "board/acquisition",
            State::Running(Phase::Activated),
            true,
        ),
        (
            "commit",
            true,
            "eng/oncall",
            State::Running(Phase::Activated),
            true,
        ),
    ];
    let mut filed: Vec<String> = Vec::new();
    for (i, (step, stop, doc, expect, gone)) in cases.iter().enumerate() {
        let id = {
            let engine = setup.engine();
            let c = Compliance::open(&engine).unwrap();
            c.file(&olga(), request(&[doc], None)).unwrap().request.id
        };
        filed.push(id.clone());
        kill_child_at(&setup, &id, step, *stop);

        let engine = setup.engine();
        let c = Compliance::open(&engine).unwrap();
        let st = c.status(&olga(), &id).unwrap();
        let rolled_back = st.state == State::Running(Phase::Started);
        if *stop {
            assert_eq!(&st.state, expect, "case {i}: killed before {step}");
        } else {
            assert!(
                matches!(st.state, State::Running(_)),
                "case {i}: {:?}",
                st.state
            );
        }
        let present = engine.documents().iter().any(|d| d.id == *doc);
        if *stop {
            assert_eq!(!present, *gone, "case {i}: document erased?");
        }
        if *step == "commit" {
            assert!(setup
                .unlearning_dir()
                .join(format!("receipts/{id}.json"))
                .is_file());
        }
        // Nothing is lost: every request filed so far is in the ledger.
        let ids: Vec<String> = c
            .list(&olga())
            .unwrap()
            .into_iter()
            .map(|r| r.request.id)
            .collect();
        assert_eq!(ids, filed, "case {i}");
        assert_eq!(
            c.runnable(),
            vec![id.clone()],
            "case {i}: only the interrupted run is left"
        );

        // Resume: by the next run, or (every other case) as a daemon does
        // when it starts, without a principal asking.
        let out = if i % 2 == 0 {
            c.run_all(&olga(), None, &mut |_| {}).unwrap()
        } else {
            c.resume_interrupted(&mut |_| {}).unwrap()
        };
        assert_eq!(out.len(), 1);
        assert!(out[0].resumed, "case {i}");
        let r = &out[0].receipt;
        r.verify(c.public_key()).unwrap();
        let st = c.status(&olga(), &id).unwrap();
        assert_eq!(st.state, State::Completed, "case {i}");
        if rolled_back {
            assert_eq!(
                (st.attempts, st.rollbacks),
                (2, 1),
                "case {i}: rolled back and redone"
            );
        } else {
            assert_eq!(
                (st.attempts, st.rollbacks),
                (1, 0),
                "case {i}: rolled forward"
            );
        }
        assert!(
            engine.documents().iter().all(|d| d.id != *doc),
            "case {i}: document still stored"
        );
        assert!(engine.verify_store().unwrap().problems.is_empty());
        assert_eq!(r.body()["removed"][0]["id"], *doc);
        assert_eq!(r.body()["weights"]["kind"], "unlearned");
        // Exactly one activation per completed request, versions complete.
        let live = c.live();
        assert_eq!(live.epoch as usize, i + 1, "case {i}: activations");
        assert_eq!(live.requests, filed, "case {i}");
        assert_eq!(live.version.as_deref(), Some(id.as_str()));
        let models = std::fs::read_dir(setup.unlearning_dir().join("models")).unwrap();
        let names: Vec<String> = models
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".staging")),
            "case {i}: {names:?}"
        );
        assert_eq!(
            names.len(),
            i + 1,
            "case {i}: one version per request: {names:?}"
        );
        // The served weights are the receipt's.
        let m = c.live_model().unwrap().unwrap();
        assert_eq!(
            lethe_unlearn::lm::decoder_hash(&m.decoder).unwrap(),
            r.body()["weights"]["after_sha256"].as_str().unwrap()
        );
    }
    // A request filed and never run survives a kill before any run.
    let engine = setup.engine();
    let c = Compliance::open(&engine).unwrap();
    let id = c
        .file(&olga(), request(&["misc/kitchen-rules"], None))
        .unwrap()
        .request
        .id;
    drop(c);
    drop(engine);
    let engine = setup.engine();
    let c = Compliance::open(&engine).unwrap();
    assert_eq!(c.status(&olga(), &id).unwrap().state, State::Pending);
    assert!(engine.verify_audit().unwrap().is_intact());
}
