//! Lattice laws (proptest) and a differential test against an independent
//! reference model of the label semantics.
//!
//! The reference model: a reader is identified with the *set of names it
//! holds* (itself and its groups). Over four names there are sixteen such
//! readers, and a confidentiality formula means the set of readers that
//! satisfy it. Monotone formulas in normal form are determined by that set,
//! so join must be intersection, meet union, and flows-to reverse inclusion.

use std::collections::BTreeSet;

use proptest::prelude::*;

use crate::{Clause, Integrity, Label, Reader, Readers, Tag};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const ENDORSERS: [&str; 3] = ["trusted", "a", "b"];
const TAGS: [&str; 3] = ["purpose:hr", "licence:cc-by", "source:web"];

fn clause_strategy() -> impl Strategy<Value = Clause> {
    proptest::sample::subsequence(NAMES.to_vec(), 1..=NAMES.len())
        .prop_map(|names| Clause::new(names.into_iter().map(|n| Reader::new(n).unwrap())).unwrap())
}

fn readers_strategy() -> impl Strategy<Value = Readers> {
    proptest::collection::vec(clause_strategy(), 0..4).prop_map(Readers::from_clauses)
}

fn label_strategy() -> impl Strategy<Value = Label> {
    (
        readers_strategy(),
        proptest::sample::subsequence(ENDORSERS.to_vec(), 0..=ENDORSERS.len()),
        proptest::sample::subsequence(TAGS.to_vec(), 0..=TAGS.len()),
    )
        .prop_map(|(readers, endorse, tags)| Label {
            readers,
            integrity: Integrity::endorsed_by(endorse).unwrap(),
            tags: tags.into_iter().map(|t| Tag::new(t).unwrap()).collect(),
        })
}

/// Reference semantics: the set of name-sets (bitmasks over NAMES) that satisfy the formula.
fn sem(r: &Readers) -> BTreeSet<u8> {
    (0u8..16)
        .filter(|holder| {
            r.clauses().iter().all(|c| {
                c.readers().iter().any(|x| {
                    holder & (1 << NAMES.iter().position(|n| *n == x.as_str()).unwrap()) != 0
                })
            })
        })
        .collect()
}

fn clearance_holds(r: &Readers, holder: u8) -> bool {
    // Through the production Clearance type, built via a policy.
    let names: Vec<&str> = NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| holder & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    let mut toml = String::from("[principals.p]\n");
    for n in NAMES {
        let members = if names.contains(&n) { "[\"p\"]" } else { "[]" };
        toml.push_str(&format!("[groups.{n}]\nmembers = {members}\n"));
    }
    let policy = crate::Policy::from_toml(&toml, "ref.toml").unwrap();
    policy.clearance("p").unwrap().may_read(r)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn join_is_associative_commutative_idempotent(a in label_strategy(), b in label_strategy(), c in label_strategy()) {
        prop_assert_eq!(a.join(&b).join(&c), a.join(&b.join(&c)));
        prop_assert_eq!(a.join(&b), b.join(&a));
        prop_assert_eq!(a.join(&a), a.clone());
    }

    #[test]
    fn meet_is_associative_commutative_idempotent(a in label_strategy(), b in label_strategy(), c in label_strategy()) {
        prop_assert_eq!(a.meet(&b).meet(&c), a.meet(&b.meet(&c)));
        prop_assert_eq!(a.meet(&b), b.meet(&a));
        prop_assert_eq!(a.meet(&a), a.clone());
    }

    #[test]
    fn absorption(a in label_strategy(), b in label_strategy()) {
        prop_assert_eq!(a.join(&a.meet(&b)), a.clone());
        prop_assert_eq!(a.meet(&a.join(&b)), a.clone());
    }

    #[test]
    fn flows_to_is_consistent_with_join(a in label_strategy(), b in label_strategy()) {
        prop_assert_eq!(a.flows_to(&b), a.join(&b) == b);
        prop_assert_eq!(a.flows_to(&b), a.meet(&b) == a);
        prop_assert!(a.flows_to(&a.join(&b)));
        prop_assert!(a.meet(&b).flows_to(&a));
    }

    #[test]
    fn flows_to_is_a_partial_order(a in label_strategy(), b in label_strategy(), c in label_strategy()) {
        prop_assert!(a.flows_to(&a));
        if a.flows_to(&b) && b.flows_to(&a) { prop_assert_eq!(&a, &b); }
        if a.flows_to(&b) && b.flows_to(&c) { prop_assert!(a.flows_to(&c)); }
    }

    #[test]
    fn differential_against_reference_semantics(a in readers_strategy(), b in readers_strategy()) {
        let (sa, sb) = (sem(&a), sem(&b));
        prop_assert_eq!(sem(&a.join(&b)), sa.intersection(&sb).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(sem(&a.meet(&b)), sa.union(&sb).copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(a.flows_to(&b), sb.is_subset(&sa));
        // Normal form is canonical: equal meaning implies equal value.
        prop_assert_eq!(sa == sb, a == b);
    }

    #[test]
    fn clearance_matches_reference(r in readers_strategy(), holder in 0u8..16) {
        prop_assert_eq!(clearance_holds(&r, holder), sem(&r).contains(&holder));
    }

    #[test]
    fn serde_round_trip(a in label_strategy()) {
        let json = serde_json_like(&a);
        prop_assert_eq!(json, a);
    }
}

fn serde_json_like(l: &Label) -> Label {
    // toml cannot hold top-level arrays; round-trip through a wrapper table.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct W {
        l: Label,
    }
    let s = toml::to_string(&W { l: l.clone() }).unwrap();
    toml::from_str::<W>(&s).unwrap().l
}

#[test]
fn display_is_readable() {
    let r = |n: &str| Reader::new(n).unwrap();
    let label = Label {
        readers: Readers::from_clauses([
            Clause::new([r("hr"), r("legal")]).unwrap(),
            Clause::new([r("finance")]).unwrap(),
        ]),
        integrity: Integrity::trusted(),
        tags: [Tag::new("purpose:hr").unwrap()].into(),
    };
    assert_eq!(
        label.to_string(),
        "{readers: finance & (hr | legal); integrity: trusted; tags: purpose:hr}"
    );
    assert_eq!(
        Label::public_trusted().to_string(),
        "{readers: public; integrity: trusted}"
    );
}

#[test]
fn bad_names_are_rejected() {
    assert!(Reader::new("").is_err());
    assert!(Reader::new("two words").is_err());
    assert!(Reader::new("public").is_err());
    assert!(Tag::new("a\tb").is_err());
    assert!(Clause::new([]).is_err());
    // Deserialising goes through the same checks.
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct W {
        l: Label,
    }
    let bad = "[l]\nreaders = [[\"\"]]\nintegrity = []\n";
    assert!(toml::from_str::<W>(bad).is_err());
}
