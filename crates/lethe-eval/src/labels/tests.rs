//! A small run of the benchmark with the real generator.

use std::sync::Arc;

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

fn policy() -> Policy {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/example-org.toml");
    Policy::load(&root).unwrap()
}

#[test]
fn small_benchmark_is_sound_and_permissive_labels_stay_below_conservative() {
    let config = LabelsConfig {
        spec: Spec {
            seed: 11,
            k: 3,
            single: 1,
            two_hop: 1,
            conflict: 0,
            injection: 1,
        },
        lambda: 0.5,
        max_tokens: 20,
        max_scored: 16,
        min_alignment: Some(0.5),
        utility: lethe_rag::Utility::default(),
        knnlm: KnnEvalConfig {
            label_items: 2,
            ..KnnEvalConfig::default()
        },
    };
    let mut calls = 0;
    let report = run(&llm(), &policy(), &config, |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert_eq!(report.items.len(), 9);
    let knn = report.knnlm.as_ref().expect("the kNN-LM part ran");
    assert!(knn.tokens > 0 && knn.entries > 0);
    assert!(knn.knnlm_ppl.is_finite() && knn.lm_ppl.is_finite());
    // Held-out answers restate codes only the datastore knows.
    assert!(knn.knnlm_ppl < knn.lm_ppl, "{}", report.markdown());
    assert_eq!(knn.items.len(), 2);
    assert_eq!(knn.soundness_violations, 0, "{}", report.markdown());
    assert_eq!(
        report.summary["knnlm_ppl"],
        serde_json::json!(knn.knnlm_ppl)
    );
    assert_eq!(calls, 9);
    assert_eq!(
        report.summary["soundness_violations"],
        0,
        "{}",
        report.markdown()
    );
    for r in &report.items {
        if r.propagator == "conservative" {
            assert!(!r.below_conservative);
            assert_eq!(r.label_sources.len(), 3);
        }
        assert!(r.leaked_facts.is_empty(), "{r:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    report.write(dir.path()).unwrap();
    let svg = std::fs::read_to_string(dir.path().join("labels.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("minimal label exact"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("labels.json")).unwrap())
            .unwrap();
    for key in [
        "more_permissive_than_conservative",
        "more_permissive_than_introspection",
        "minimal_label_exact_match",
        "soundness_violations",
        "answer_quality_delta_points",
    ] {
        assert!(!json["summary"][key].is_null(), "{key}");
    }
    assert!(std::fs::read_to_string(dir.path().join("labels.md"))
        .unwrap()
        .contains("| permissive |"));
}

#[test]
fn f1_and_tokens() {
    assert_eq!(
        f1("The code is amber-falcon-42.", "amber-falcon-42"),
        2.0 * 0.25 / 1.25
    );
    assert_eq!(f1("", "amber-falcon-42"), 0.0);
    assert_eq!(f1("amber-falcon-42", "amber-falcon-42"), 1.0);
}
