//! Policy parsing, validation messages with positions, and decisions on the
//! shipped example organisation.

use std::path::PathBuf;

use super::*;

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn example() -> Policy {
    Policy::load(&policies_dir().join("example-org.toml")).expect("example policy is valid")
}

/// Loads a test policy that must be invalid and returns its problems as
/// `line: message` strings.
fn problems(name: &str) -> Vec<String> {
    let err =
        Policy::load(&policies_dir().join("tests").join(name)).expect_err("policy must be invalid");
    let problems = err.problems();
    assert!(!problems.is_empty(), "{err}");
    for p in problems {
        assert!(p.file.ends_with(name), "{p}");
    }
    problems
        .iter()
        .map(|p| format!("{}: {}", p.line, p.message))
        .collect()
}

#[test]
fn example_policy_is_valid_and_complete() {
    let p = example();
    assert_eq!(p.organisation(), "Acme Analytics");
    for dept in ["hr", "finance", "engineering", "legal", "comms"] {
        assert!(p.groups().contains_key(dept), "{dept}");
    }
    assert!(p.labels().len() >= 5);
    assert!(p.sinks().contains_key("email:external"));
    assert_eq!(p.default_label().map(|(n, _)| n), Some("internal"));
}

#[test]
fn reading_follows_nested_groups() {
    let p = example();
    let hr = p.label("hr-confidential").unwrap();
    assert!(p.may_read("alice", hr));
    assert!(p.may_read("hank", hr));
    assert!(!p.may_read("erin", hr));
    assert!(!p.may_read("support-bot", hr));
    // staff contains groups; frank is in finance, hence staff.
    let internal = p.label("internal").unwrap();
    assert!(p.may_read("frank", internal));
    assert!(p.may_read("olga", internal));
    assert!(!p.may_read("support-bot", internal));
    // Two clauses: executives AND (finance OR legal).
    let board = p.label("board-only").unwrap();
    assert!(p.may_read("fiona", board));
    assert!(p.may_read("lena", board));
    assert!(
        !p.may_read("carol", board),
        "carol is an executive but in neither finance nor legal"
    );
    assert!(
        !p.may_read("frank", board),
        "frank is in finance but not an executive"
    );
    // Unknown principals read nothing.
    assert!(!p.may_read("mallory", p.label("public-web").unwrap()));
    assert!(p.clearance("mallory").is_err());
}

#[test]
fn flows_to_sinks_with_reasons() {
    let p = example();
    let support = SinkRef::Named("app:support-bot".into());
    // Public trusted data may go to customers.
    let public = p.label("public-web").unwrap();
    assert!(p.check_flow(public, &support).is_empty());
    // Untrusted web scrapes may not: the sink requires `trusted`.
    let scrape = p.label("web-scrape").unwrap();
    let v = p.check_flow(scrape, &support);
    assert!(
        matches!(&v[..], [Violation::Integrity { missing }] if missing == &["trusted".to_string()]),
        "{v:?}"
    );
    // HR data to the public: a readers clause blocks `*`, and the tag is denied.
    let hr = p.label("hr-confidential").unwrap();
    let v = p.check_flow(hr, &support);
    assert!(v
        .iter()
        .any(|x| matches!(x, Violation::Readers { blocked, .. } if blocked == &["*".to_string()])));
    assert!(v
        .iter()
        .any(|x| matches!(x, Violation::Tag { tag } if tag.as_str() == "purpose:hr")));
    // Internal data to the intranet (audience staff) is fine.
    let intranet = SinkRef::Named("app:intranet".into());
    assert!(p
        .check_flow(p.label("internal").unwrap(), &intranet)
        .is_empty());
    // Engineering data to the intranet: everyone in staff but engineering and executives is blocked.
    let v = p.check_flow(p.label("engineering-internal").unwrap(), &intranet);
    match &v[..] {
        [Violation::Readers { blocked, .. }] => {
            assert!(blocked.contains(&"frank".to_string()));
            assert!(blocked.contains(&"hank".to_string()));
            assert!(!blocked.contains(&"erin".to_string()));
            assert!(!blocked.contains(&"carol".to_string()));
        }
        other => panic!("{other:?}"),
    }
    // Licence tags: only cc-by / public-domain may go to external email.
    let licensed = p.label("vendor-licensed").unwrap();
    let v = p.check_flow(licensed, &SinkRef::Named("email:external".into()));
    assert!(v
        .iter()
        .any(|x| matches!(x, Violation::Tag { tag } if tag.as_str() == "licence:analyst-report")));
    // A principal reading its own answer.
    assert!(p
        .check_flow(hr, &SinkRef::Principal("alice".into()))
        .is_empty());
    assert!(!p
        .check_flow(hr, &SinkRef::Principal("erin".into()))
        .is_empty());
    // An undeclared sink accepts nothing.
    let v = p.check_flow(public, &SinkRef::Named("app:gone".into()));
    assert!(matches!(&v[..], [Violation::UnknownSink { .. }]));
}

#[test]
fn sink_resolution_respects_callers() {
    let p = example();
    assert_eq!(
        p.resolve_sink("erin", None).unwrap(),
        SinkRef::Principal("erin".into())
    );
    assert_eq!(
        p.resolve_sink("support-bot", Some("app:support-bot"))
            .unwrap(),
        SinkRef::Named("app:support-bot".into())
    );
    assert!(matches!(
        p.resolve_sink("erin", Some("app:support-bot")),
        Err(LookupError::SinkNotAllowed { .. })
    ));
    assert!(matches!(
        p.resolve_sink("erin", Some("principal:alice")),
        Err(LookupError::SinkNotAllowed { .. })
    ));
    assert_eq!(
        p.resolve_sink("erin", Some("principal:erin")).unwrap(),
        SinkRef::Principal("erin".into())
    );
    assert!(matches!(
        p.resolve_sink("erin", Some("fax:x")),
        Err(LookupError::UnknownSink(_))
    ));
    assert!(matches!(
        p.resolve_sink("mallory", None),
        Err(LookupError::UnknownPrincipal(_))
    ));
}

#[test]
fn declassification_needs_authority() {
    let p = example();
    let hr = p.label("hr-confidential").unwrap();
    let public = Label {
        readers: Readers::public(),
        integrity: Integrity::trusted(),
        tags: Default::default(),
    };
    let sink = SinkRef::Named("email:external".into());
    assert!(p.check_declassify("alice", hr, &public, &sink).is_empty());
    let reasons = p.check_declassify("hank", hr, &public, &sink);
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    // wes may drop the staff clause, but only towards the sinks his rule names.
    let internal = p.label("internal").unwrap();
    assert!(p
        .check_declassify("wes", internal, &public, &sink)
        .is_empty());
    assert!(!p
        .check_declassify(
            "wes",
            internal,
            &public,
            &SinkRef::Named("app:intranet".into())
        )
        .is_empty());
    // Nobody may add endorsements without a rule.
    let scrape = p.label("web-scrape").unwrap();
    let endorsed = Label {
        integrity: Integrity::trusted(),
        ..scrape.clone()
    };
    assert!(!p
        .check_declassify("olga", scrape, &endorsed, &sink)
        .is_empty());
}

#[test]
fn roles() {
    let p = example();
    assert!(p.has_role("olga", Role::Admin));
    assert!(p.has_role("alice", Role::Ingest));
    assert!(!p.has_role("ed", Role::Ingest));
    assert!(!p.has_role("mallory", Role::Ingest));
}

#[test]
fn check_label_finds_unknown_readers() {
    let p = example();
    let ok = p.label("internal").unwrap().clone();
    assert!(p.check_label(&ok).is_ok());
    let bad = Label {
        readers: Readers::any_of([Reader::new("ghost").unwrap()]).unwrap(),
        ..ok
    };
    assert!(matches!(p.check_label(&bad), Err(LookupError::UnknownReaders(s)) if s == "ghost"));
}

#[test]
fn unknown_member_is_reported_at_its_line() {
    assert_eq!(
        problems("unknown-member.toml"),
        ["5: group \"hr\" lists unknown member \"bobby\" (not a principal or group)"]
    );
}

#[test]
fn group_cycle_is_reported() {
    let p = problems("group-cycle.toml");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("group membership cycle: a -> b -> c -> a"),
        "{p:?}"
    );
}

#[test]
fn missing_readers_are_reported() {
    let p = problems("missing-reader.toml");
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("5: ") && p[0].contains("unknown reader \"mallory\""),
        "{p:?}"
    );
    assert!(
        p[1].starts_with("9: ") && p[1].contains("unknown reader \"eve\""),
        "{p:?}"
    );
}

#[test]
fn syntax_and_unknown_fields_are_reported_with_positions() {
    let p = problems("syntax-error.toml");
    assert_eq!(p.len(), 1, "{p:?}");
    // The unclosed array on line 2 is noticed where the parser gives up.
    assert!(
        ["2: ", "3: ", "4: "].iter().any(|l| p[0].starts_with(l)),
        "{p:?}"
    );
    let p = problems("unknown-field.toml");
    assert!(p[0].starts_with("2: ") && p[0].contains("rolez"), "{p:?}");
}

#[test]
fn all_problems_are_reported_together() {
    let p = problems("many-problems.toml");
    let joined = p.join("\n");
    assert!(joined.contains("unknown role \"superuser\""), "{joined}");
    assert!(joined.contains("both a principal and a group"), "{joined}");
    assert!(joined.contains("no readers"), "{joined}");
    assert!(
        joined.contains("unknown endorsement \"trustworthy\""),
        "{joined}"
    );
    assert!(joined.contains("default label \"nope\""), "{joined}");
}

#[test]
fn strict_policy_has_no_default_label() {
    let p = Policy::load(&policies_dir().join("tests/strict.toml")).unwrap();
    assert!(p.default_label().is_none());
}

#[test]
fn io_error_is_not_a_panic() {
    let err = Policy::load(&policies_dir().join("does-not-exist.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }));
}

#[test]
fn binary_garbage_is_a_problem_not_a_panic() {
    let garbage = "\u{0}\u{1}\u{2}[[[=";
    let err = Policy::from_toml(garbage, "garbage.toml").unwrap_err();
    assert!(!err.problems().is_empty());
}
