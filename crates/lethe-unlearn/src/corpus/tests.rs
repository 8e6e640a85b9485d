//! The generated corpus is deterministic, its domains are disjoint, and its
//! examples have the documented shape.

use std::collections::HashSet;

use super::*;

fn config(seed: u64) -> CorpusConfig {
    CorpusConfig {
        domains: 3,
        entities_per_domain: 5,
        relations_per_domain: 2,
        values_per_relation: 3,
        value_pool: 6,
        seed,
    }
}

#[test]
fn generation_is_deterministic_per_seed() {
    let a = FactCorpus::generate(config(1)).unwrap();
    let b = FactCorpus::generate(config(1)).unwrap();
    let c = FactCorpus::generate(config(2)).unwrap();
    assert_eq!(a.facts(), b.facts());
    assert_eq!(a.vocab(), b.vocab());
    assert_ne!(a.facts(), c.facts());
}

#[test]
fn domains_have_disjoint_entities_and_relations() {
    let c = FactCorpus::generate(config(1)).unwrap();
    assert_eq!(c.facts().len(), 3 * 5 * 2);
    let words = |d: usize| -> HashSet<u32> {
        c.facts_of(&[d])
            .iter()
            .flat_map(|f| [f.entity, f.relation])
            .collect()
    };
    for a in 0..3 {
        for b in a + 1..3 {
            assert!(
                words(a).is_disjoint(&words(b)),
                "domains {a} and {b} share words"
            );
        }
    }
    for f in c.facts() {
        assert!(f.candidates.contains(&f.value));
        assert_eq!(f.candidates.len(), 3);
    }
    let n = c.value_answers().len();
    assert!((3..=6).contains(&n), "{n} distinct values");
    assert!((c.chance_accuracy() - 1.0 / 3.0).abs() < 1e-12);
}

#[test]
fn qa_examples_use_both_templates() {
    let c = FactCorpus::generate(config(1)).unwrap();
    let qa = c.qa(&[1]);
    assert_eq!(qa.len(), 2 * 5 * 2);
    let f = c.facts_of(&[1])[0];
    let first = &qa.examples()[0];
    assert_eq!(first.ids(), &[BOS, f.entity, f.relation, f.value]);
    assert_eq!(first.prompt_len(), 3);
    let second = &qa.examples()[10];
    assert_eq!(second.answer(), &[f.value]);
    assert_eq!(c.vocab().decode(&second.ids()[..2]), "<bos> what");
    assert_eq!(c.vocab().id("unknown"), Some(UNKNOWN));
    assert_eq!(c.refusal(), vec![UNKNOWN]);
}

#[test]
fn bad_configs_are_errors() {
    let mut bad = config(0);
    bad.domains = 1;
    assert!(FactCorpus::generate(bad).is_err());
    let mut bad = config(0);
    bad.value_pool = 2;
    assert!(FactCorpus::generate(bad).is_err());
}
