//! The pipeline with the real SmolLM2: refusal before generation, release
//! with the joined label, and the model reading its context.

use std::sync::Arc;

use lethe_label::{Integrity, Label, Reader, Readers, Violation};
use lethe_model::generate::{GenerateConfig, Llm};
use lethe_model::gguf_llama::LoadOptions;

use super::*;

fn llm() -> Arc<Llm> {
    let dir = lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)
        .unwrap();
    let device = lethe_model::DeviceSpec::Cpu.open().unwrap();
    Arc::new(
        Llm::load(
            &dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
            &device,
            &LoadOptions::default(),
        )
        .unwrap(),
    )
}

fn label(readers: &[&str]) -> Label {
    Label {
        readers: if readers.is_empty() {
            Readers::public()
        } else {
            Readers::any_of(readers.iter().map(|r| Reader::new(*r).unwrap())).unwrap()
        },
        integrity: Integrity::trusted(),
        tags: Default::default(),
    }
}

fn source(id: &str, l: Label, text: &str) -> Source {
    Source {
        chunk_id: format!("{id}#0"),
        doc_id: id.into(),
        label: l,
        label_name: None,
        text: text.into(),
    }
}

fn config() -> AnswerConfig {
    AnswerConfig {
        generation: GenerateConfig {
            max_tokens: 40,
            ..GenerateConfig::default()
        },
        model_label: label(&[]),
        propagator: Propagator::Conservative,
    }
}

#[test]
fn conservative_pipeline_releases_with_the_join_and_refuses_before_generating() {
    let llm = llm();
    let sources = vec![
        source(
            "office",
            label(&["staff"]),
            "The access code for the Zubrowka office is 4471.",
        ),
        source("menu", label(&[]), "The canteen serves soup on Fridays."),
    ];
    // Released: the sink accepts anything readable by staff.
    let mut streamed = String::new();
    let mut released = None;
    let a = answer(
        &llm,
        "What is the access code for the Zubrowka office?",
        &sources,
        &config(),
        &|l: &Label| {
            if l.readers.flows_to(&label(&["staff"]).readers) {
                vec![]
            } else {
                vec![Violation::Tag {
                    tag: lethe_label::Tag::new("x").unwrap(),
                }]
            }
        },
        |e| {
            match e {
                StreamEvent::Released { label: l } => {
                    assert!(streamed.is_empty(), "the release comes before any text");
                    released = Some(l.clone());
                }
                StreamEvent::Text(t) => streamed.push_str(t),
            }
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(a.decision, Decision::Released);
    let text = a.text.unwrap();
    assert!(text.contains("4471"), "{text}");
    assert_eq!(streamed.trim(), text);
    assert_eq!(released.as_ref(), Some(&a.label));
    assert_eq!(
        a.label.readers,
        label(&["staff"]).readers,
        "join of staff and public"
    );
    assert_eq!(a.prompt_sha256.len(), 64);

    // Refused: the model is never run, nothing is streamed.
    let mut called = false;
    let refused = answer(
        &llm,
        "What is the access code?",
        &sources,
        &config(),
        &|l: &Label| {
            if l.readers.is_public() {
                vec![]
            } else {
                vec![Violation::Readers {
                    clause: l.readers.clauses().iter().next().unwrap().clone(),
                    blocked: vec!["*".into()],
                }]
            }
        },
        |_| {
            called = true;
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert!(matches!(refused.decision, Decision::Refused(ref v) if v.len() == 1));
    assert!(refused.text.is_none());
    assert!(!called);
    assert_eq!(refused.completion_tokens, 0);
}

#[test]
fn empty_question_is_an_error() {
    let llm = llm();
    assert!(answer(&llm, "  ", &[], &config(), &|_| vec![], |_| {
        std::ops::ControlFlow::Continue(())
    })
    .is_err());
}

fn label_of(readers: &[&str]) -> Label {
    label(readers)
}

#[test]
fn permissive_label_lets_an_answer_flow_where_conservative_is_blocked() {
    let llm = llm();
    let sources = vec![
        source(
            "hr",
            label_of(&["hr"]),
            "Salary bands for 2026: engineers earn 58,000 to 75,000 euros.",
        ),
        source(
            "office",
            label_of(&[]),
            "The access code for the Zubrowka office is 4471.",
        ),
        source(
            "fin",
            label_of(&["finance"]),
            "Third-quarter revenue was 11.2 million euros.",
        ),
    ];
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
    let q = "What is the access code for the Zubrowka office?";
    let run = |p: Propagator| {
        let cfg = AnswerConfig {
            propagator: p,
            ..config()
        };
        answer(&llm, q, &sources, &cfg, &public_sink, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
    };
    // Conservative: the join includes hr and finance: refused, nothing generated.
    let c = run(Propagator::Conservative);
    assert!(matches!(c.decision, Decision::Refused(_)));
    assert_eq!(c.cost.generations, 0);
    // Permissive with the sink-directed shortcut: one scoring pass on the
    // public source, then a regeneration from it alone.
    let p = run(Propagator::Permissive(PermissiveConfig::default()));
    assert_eq!(p.decision, Decision::Released, "{:?}", p.trace);
    assert!(p.label.readers.is_public());
    assert_eq!(p.label_sources, vec![1]);
    assert_eq!(p.trace.route, "sink-directed");
    assert!(p.text.as_deref().unwrap().contains("4471"), "{:?}", p.text);
    assert_eq!(
        p.cost.generations, 2,
        "full answer, then the restricted regeneration"
    );
    assert!(p.trace.full_answer.is_some());
    // The full context's utility comes from the generation itself: one
    // context scored. The regeneration reused the checked full-context
    // answer, and is exactly what greedy decoding from the public source
    // alone says: the released text read nothing above its label.
    assert_eq!(p.cost.scored_contexts, 1, "{:?}", p.cost);
    assert!(p.cost.reused_tokens > 0, "{:?}", p.cost);
    let alone = answer(&llm, q, &sources[1..2], &config(), &|_| vec![], |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(p.text, alone.text);
    assert_eq!(p.completion_tokens, alone.completion_tokens);
    // Exhaustive search (no shortcuts) finds the same minimal context.
    let exhaustive = PermissiveConfig {
        sink_directed: false,
        total_order_shortcut: false,
        exhaustive: true,
        ..PermissiveConfig::default()
    };
    // The default search without the sink shortcut: leave-one-out.
    let loo = run(Propagator::Permissive(PermissiveConfig {
        sink_directed: false,
        ..PermissiveConfig::default()
    }));
    assert_eq!(loo.label_sources, vec![1], "{:?}", loo.trace);
    assert!(loo.cost.score_batches <= 3, "{:?}", loo.cost);
    let e = run(Propagator::Permissive(exhaustive));
    assert_eq!(e.trace.route, "search");
    assert_eq!(e.label_sources, vec![1], "{:?}", e.trace);
    assert!(e.trace.minimal.contains(&vec![1]));
    assert!(e.cost.scored_contexts >= 3);
    // A budget too small for the search falls back to conservative.
    let tiny = PermissiveConfig {
        max_scored: 1,
        ..exhaustive
    };
    let f = run(Propagator::Permissive(tiny));
    assert_eq!(f.trace.route, "budget-exhausted");
    assert!(matches!(f.decision, Decision::Refused(_)));
}

#[test]
fn introspection_parses_or_falls_back_to_conservative() {
    let llm = llm();
    let sources = vec![
        source(
            "office",
            label_of(&[]),
            "The access code for the Zubrowka office is 4471.",
        ),
        source(
            "hr",
            label_of(&["hr"]),
            "Salary bands for 2026: engineers earn 58,000 to 75,000 euros.",
        ),
    ];
    let cfg = AnswerConfig {
        propagator: Propagator::Introspection,
        ..config()
    };
    let a = answer(
        &llm,
        "What is the access code for the Zubrowka office?",
        &sources,
        &cfg,
        &|_| vec![],
        |_| std::ops::ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(a.trace.route, "introspection");
    let parsed = a.trace.introspection_parsed.unwrap();
    if !parsed {
        assert_eq!(
            a.label_sources,
            vec![0, 1],
            "an unparsable reply falls back to every source"
        );
    }
    // Whatever it chose, the answer was generated from exactly those sources.
    assert_eq!(
        a.label,
        permissive::mask_label(
            &label_of(&[]),
            &sources,
            a.label_sources.iter().fold(0, |m, i| m | (1 << i))
        )
    );
}
