//! Generator tests: determinism, type-correct corruption, k-mixing.

use std::collections::BTreeSet;

use crate::world::{World, WorldConfig, BOS, EOS, MAX_K, UNKNOWN};

pub(crate) fn small_world_config(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        entities: 60,
        relations: 10,
        values_per_type: 8,
        max_golds: 3,
        min_mentions: 2,
        max_mentions: 12,
        zipf_exponent: 1.0,
        sentences_per_doc: 4,
        targets: 6,
        corrupt_fraction_min: 0.3,
        corrupt_fraction_max: 0.6,
        bundles_per_target: 2,
        paraphrases: 2,
        retain_docs: 20,
        heldout_docs: 10,
        shots: 2,
        random_answers: 3,
        nontarget_eval: 50,
    }
}

#[test]
fn same_config_same_world_other_seed_other_world() {
    let a = World::generate(&small_world_config(3)).unwrap();
    let b = World::generate(&small_world_config(3)).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.question(17).unwrap(), b.question(17).unwrap());
    let c = World::generate(&small_world_config(4)).unwrap();
    assert_ne!(a.clean_docs(), c.clean_docs());
}

#[test]
fn names_are_multi_word_and_distinct() {
    let w = World::generate(&small_world_config(1)).unwrap();
    let names: BTreeSet<&Vec<u32>> = w.entities().iter().map(|e| &e.name).collect();
    assert_eq!(names.len(), w.entities().len());
    assert!(w.entities().iter().all(|e| (2..=3).contains(&e.name.len())));
    assert_eq!(w.entities().iter().filter(|e| e.is_target).count(), 6);
}

#[test]
fn corruption_values_are_wrong_plausible_and_of_the_same_type() {
    let w = World::generate(&small_world_config(5)).unwrap();
    let n_rel = w.config().relations;
    let targets = w.target_facts();
    assert!(!targets.is_empty());
    for &fi in &targets {
        let f = &w.facts()[fi];
        let c = f.corrupted.unwrap();
        assert!(w.entities()[f.entity].is_target);
        assert!(!f.golds.contains(&c), "corrupted value is a gold answer");
        let ty = &w.types()[w.relations()[f.relation].ty];
        assert!(c < ty.values.len());
        // Plausible: some other entity really has it for this relation.
        let elsewhere = (0..w.entities().len())
            .filter(|&e| e != f.entity)
            .any(|e| w.facts()[e * n_rel + f.relation].golds.contains(&c));
        assert!(elsewhere, "corrupted value occurs nowhere else");
        let q = w.question(fi).unwrap();
        assert_eq!(q.corrupted.as_ref().unwrap(), &ty.values[c]);
        for r in &q.random {
            assert!(ty.values.contains(r), "random answer of another type");
            assert!(!q.golds.contains(r) && q.corrupted.as_ref() != Some(r));
        }
    }
    // Only target entities have corrupted facts; each target 30-60 %.
    for (e, ent) in w.entities().iter().enumerate() {
        let n = (0..n_rel)
            .filter(|r| w.facts()[e * n_rel + r].corrupted.is_some())
            .count();
        if ent.is_target {
            assert!((3..=6).contains(&n), "target with {n} corrupted relations");
        } else {
            assert_eq!(n, 0);
        }
    }
}

#[test]
fn facts_have_golds_mentions_and_multi_answers() {
    let w = World::generate(&small_world_config(2)).unwrap();
    for f in w.facts() {
        assert!(!f.golds.is_empty() && f.golds.len() <= 3);
        assert!(f.golds.windows(2).all(|p| p[0] < p[1]));
        assert!((2..=12).contains(&f.mentions));
    }
    assert!(w.facts().iter().any(|f| f.golds.len() > 1));
    let low = w.facts().iter().filter(|f| f.mentions <= 4).count();
    let high = w.facts().iter().filter(|f| f.mentions >= 9).count();
    assert!(
        low > high,
        "Zipf: small counts must dominate ({low} vs {high})"
    );
    // The clean corpus mentions each fact `mentions` times in total.
    let total: usize = w.facts().iter().map(|f| f.mentions).sum();
    let periods: usize = w
        .clean_docs()
        .iter()
        .map(|d| d.iter().filter(|&&t| t == w.period()).count())
        .sum();
    assert_eq!(periods, total);
    assert!(w
        .clean_docs()
        .iter()
        .all(|d| d[0] == BOS && *d.last().unwrap() == EOS));
    assert!(!w.clean_docs().iter().flatten().any(|&t| t == UNKNOWN));
}

#[test]
fn k_mixing_adds_k_true_facts_about_non_targets() {
    let w = World::generate(&small_world_config(9)).unwrap();
    let period = w.period();
    for d in w.corruption() {
        let base = d.tokens(0);
        let base_sentences = base.iter().filter(|&&t| t == period).count();
        assert_eq!(base_sentences, d.corrupted_facts.len());
        assert!((1..=5).contains(&d.corrupted_facts.len()));
        for &f in &d.corrupted_facts {
            assert_eq!(w.facts()[f].entity, d.target);
        }
        for k in 0..=MAX_K {
            let t = d.tokens(k);
            assert_eq!(
                t.iter().filter(|&&x| x == period).count(),
                base_sentences + k
            );
            let mixed = d.mixed_facts(k);
            assert_eq!(mixed.len(), k);
            assert_eq!(
                mixed,
                d.mixed_facts(MAX_K)[..k].to_vec(),
                "variants share a prefix"
            );
            for &f in &mixed {
                let fact = &w.facts()[f];
                assert!(!w.entities()[fact.entity].is_target);
                assert!(fact.corrupted.is_none());
            }
            // Every statement is true for mixed facts, corrupted for the rest.
            let st = d.statements(&w, k);
            assert_eq!(st.len(), d.corrupted_facts.len() + k);
            for &(f, v) in &st[..d.corrupted_facts.len()] {
                assert_eq!(w.facts()[f].corrupted, Some(v));
            }
            for &(f, v) in &st[d.corrupted_facts.len()..] {
                assert!(w.facts()[f].golds.contains(&v));
            }
        }
        // Removing the mixed sentences gives back the k = 0 document.
        let five = d.tokens(MAX_K);
        assert!(five.len() > base.len());
        assert_eq!(five[0], BOS);
        assert_eq!(*five.last().unwrap(), EOS);
    }
    assert!(w.mixed_facts(0).is_empty());
    assert!(w.mixed_facts(2).len() <= w.mixed_facts(5).len());
}

#[test]
fn questions_are_cloze_prompts_with_shots() {
    let w = World::generate(&small_world_config(6)).unwrap();
    let fi = w.target_facts()[0];
    let q = w.question(fi).unwrap();
    let f = &w.facts()[fi];
    let name = &w.entities()[f.entity].name;
    assert_eq!(q.prompt[0], BOS);
    // Two shots (two sentences, two periods) and then the question.
    assert_eq!(q.prompt.iter().filter(|&&t| t == w.period()).count(), 2);
    assert!(q.prompt.windows(name.len()).any(|x| x == name.as_slice()));
    // The question without shots followed by a gold answer and a period is
    // a sentence of template 0.
    let (prompt, answer) = w.statement(fi, f.golds[0]).unwrap();
    assert_eq!(prompt[0], BOS);
    assert!(q.prompt.ends_with(&prompt[1..]));
    assert_eq!(answer, q.golds[0]);
    assert!(w.question(w.facts().len()).is_err());
}

#[test]
fn invalid_configs_are_rejected() {
    let mut c = small_world_config(0);
    c.relations = 13;
    assert!(World::generate(&c).is_err());
    let mut c = small_world_config(0);
    c.entities = 10;
    assert!(World::generate(&c).is_err());
    let mut c = small_world_config(0);
    c.corrupt_fraction_min = 0.9;
    c.corrupt_fraction_max = 0.5;
    assert!(World::generate(&c).is_err());
}
