//! kNN-LM with the real SmolLM2: the datastore, label-restricted search,
//! exact deletion, perplexity, and the permissive answer label.

use std::ops::ControlFlow;
use std::sync::OnceLock;

use lethe_label::{Integrity, Label, Reader, Readers, Violation};
use lethe_model::generate::Llm;
use lethe_model::gguf_llama::LoadOptions;

use crate::*;

fn llm() -> &'static Llm {
    static LLM: OnceLock<Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        let dir = lethe_assets::Cache::from_env()
            .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)
            .unwrap();
        let device = lethe_model::DeviceSpec::Cpu.open().unwrap();
        Llm::load(
            &dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
            &device,
            &LoadOptions::default(),
        )
        .unwrap()
    })
}

fn label(r: &str) -> Label {
    Label {
        readers: if r.is_empty() {
            Readers::public()
        } else {
            Readers::any_of([Reader::new(r).unwrap()]).unwrap()
        },
        integrity: Integrity::trusted(),
        tags: Default::default(),
    }
}

const VAULT: &str =
    "The access code of the Zubrowka vault is amber-falcon-42. The Zubrowka vault opens at night.";
const WEATHER: &str = "The weather in Lisbon is sunny and warm in July, with little rain.";

fn store() -> Datastore {
    let mut ds = Datastore::new(llm().model.config().d_model, 256).unwrap();
    let (secret, public) = (label("hr"), label(""));
    ds.add_documents(
        llm(),
        &[
            DocText {
                id: "vault",
                label: &secret,
                text: VAULT,
                version: "v1",
            },
            DocText {
                id: "weather",
                label: &public,
                text: WEATHER,
                version: "v1",
            },
        ],
    )
    .unwrap();
    ds
}

#[test]
fn datastore_entries_search_restriction_and_exact_deletion() {
    let mut ds = store();
    let vault_tokens = llm().tokenizer.encode_plain(VAULT).unwrap().len();
    assert_eq!(ds.entries_of("vault").len(), vault_tokens - 2);
    assert!(ds
        .entries_of("vault")
        .iter()
        .all(|e| ds.labels()[e.label as usize] == label("hr")));
    // Restricted search never returns entries of other labels.
    let public_only = ds.allowed(&|l| l.readers.is_public());
    let q = llm()
        .model
        .final_hidden_batch(&[&llm().tokenizer.encode_plain(VAULT).unwrap()])
        .unwrap()[0][5]
        .clone();
    let all = ds.neighbours(&q, 8, &ds.allowed(&|_| true)).unwrap();
    assert!(all.iter().any(|n| &*n.entry.doc == "vault"));
    let restricted = ds.neighbours(&q, 8, &public_only).unwrap();
    assert!(!restricted.is_empty());
    assert!(restricted.iter().all(|n| &*n.entry.doc == "weather"));
    // Save, load, same neighbours.
    let dir = tempfile::tempdir().unwrap();
    ds.save(dir.path(), 7).unwrap();
    let (loaded, generation) = Datastore::load(dir.path()).unwrap();
    assert_eq!(generation, 7);
    assert_eq!(
        loaded
            .neighbours(&q, 8, &loaded.allowed(&|_| true))
            .unwrap(),
        all
    );
    // Deletion erases every entry of the document.
    let removed = ds.remove_document("vault");
    assert_eq!(removed, vault_tokens - 2);
    assert!(!ds.contains("vault"));
    assert_eq!(ds.version("vault"), None);
    assert_eq!(ds.version("weather"), Some("v1"));
    let after = ds.neighbours(&q, 64, &ds.allowed(&|_| true)).unwrap();
    assert!(after.iter().all(|n| &*n.entry.doc != "vault"));
    ds.save(dir.path(), 8).unwrap();
    let (reloaded, _) = Datastore::load(dir.path()).unwrap();
    assert_eq!(reloaded.len(), ds.len());
    // A damaged sidecar is an error, not a panic.
    let p = dir.path().join("entries.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[3] ^= 0xff;
    std::fs::write(&p, bytes).unwrap();
    assert!(Datastore::load(dir.path()).is_err());
}

#[test]
fn datastore_lowers_perplexity_of_text_from_its_domain() {
    let ds = store();
    let all = ds.allowed(&|_| true);
    // Held-out text repeating the stored facts in another sentence.
    let held_out = "Remember that the Zubrowka vault uses the access code amber-falcon-42, and it opens at night.";
    let p = perplexity(llm(), &ds, held_out, &all, &KnnConfig::default()).unwrap();
    assert!(p.knn < p.lm, "kNN-LM {} vs LM {}", p.knn, p.lm);
    // Without access to the vault entries, no help on that fact.
    let none = perplexity(llm(), &ds, held_out, &[], &KnnConfig::default()).unwrap();
    assert!((none.knn - none.lm).abs() < 1e-6 * none.lm.max(1.0));
}

#[test]
fn permissive_knn_label_and_deletion() {
    let mut ds = store();
    let q = "What is the access code of the Zubrowka vault?";
    let cfg = KnnConfig {
        max_tokens: 24,
        ..KnnConfig::default()
    };
    let all = ds.allowed(&|_| true);
    let g = generate(llm(), &ds, q, &all, &cfg, |_| ControlFlow::Continue(())).unwrap();
    assert!(g.text.contains("amber-falcon-42"), "{}", g.text);
    // The answer's label: the hr label carried the code.
    let model_label = label("");
    let open = |_: &Label| Vec::new();
    let req = KnnRequest {
        question: q,
        caller_allowed: &all,
        model_label: &model_label,
        flow_check: &open,
        config: &cfg,
        permissive: true,
    };
    let a = answer(llm(), &ds, &req, |_| ControlFlow::Continue(())).unwrap();
    assert!(
        a.text.as_deref().unwrap_or("").contains("amber-falcon-42"),
        "{a:?}"
    );
    assert!(
        a.label
            .readers
            .clauses()
            .iter()
            .any(|c| c.readers().iter().any(|r| r.as_str() == "hr")),
        "{a:?}"
    );
    // Towards a public sink the answer is refused, never released.
    let public_sink = |l: &Label| -> Vec<Violation> {
        l.readers
            .clauses()
            .iter()
            .map(|c| Violation::Readers {
                clause: c.clone(),
                blocked: vec!["*".into()],
            })
            .collect()
    };
    let req = KnnRequest {
        flow_check: &public_sink,
        ..req
    };
    let r = answer(llm(), &ds, &req, |_| ControlFlow::Continue(())).unwrap();
    assert!(
        r.text.is_none() || !r.text.as_deref().unwrap().contains("amber-falcon-42"),
        "{r:?}"
    );
    if let Some(t) = &r.text {
        assert!(
            r.label.readers.is_public(),
            "released text must carry a label that flows: {t}"
        );
    }
    // After deletion the code is gone.
    ds.remove_document("vault");
    let g = generate(llm(), &ds, q, &ds.allowed(&|_| true), &cfg, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(!g.text.contains("amber-falcon-42"), "{}", g.text);
}

#[test]
fn permissive_label_is_lower_than_conservative_when_only_public_entries_carry() {
    let ds = store();
    let q = "What is the weather like in Lisbon in July?";
    let cfg = KnnConfig {
        max_tokens: 20,
        ..KnnConfig::default()
    };
    let all = ds.allowed(&|_| true);
    let model_label = label("");
    let public_sink = |l: &Label| -> Vec<Violation> {
        l.readers
            .clauses()
            .iter()
            .map(|c| Violation::Readers {
                clause: c.clone(),
                blocked: vec!["*".into()],
            })
            .collect()
    };
    let conservative = KnnRequest {
        question: q,
        caller_allowed: &all,
        model_label: &model_label,
        flow_check: &public_sink,
        config: &cfg,
        permissive: false,
    };
    let c = answer(llm(), &ds, &conservative, |_| ControlFlow::Continue(())).unwrap();
    // Vault entries were among the neighbours, so the conservative label is hr.
    assert!(!c.label.readers.is_public(), "{c:?}");
    assert!(c.text.is_none(), "{c:?}");
    assert_eq!(c.utility_passes, 0);
    let permissive = KnnRequest {
        permissive: true,
        ..conservative
    };
    let p = answer(llm(), &ds, &permissive, |_| ControlFlow::Continue(())).unwrap();
    assert!(p.label.readers.is_public(), "{p:?}");
    let text = p.text.as_deref().expect("released to the public sink");
    assert!(
        text.to_lowercase().contains("sunny") || text.to_lowercase().contains("warm"),
        "{p:?}"
    );
    assert!(p.sources.iter().all(|(d, _)| &**d == "weather"), "{p:?}");
}
