//! The JSON shapes of labels, sources and refusal reasons on the wire.

use lethe_engine::label::{Label, Policy, Violation};
use serde_json::{json, Value};

/// A label as JSON: its policy name when it is exactly a named label, a
/// readable rendering, and the structured parts.
pub(crate) fn label(label: &Label, policy: &Policy) -> Value {
    let name = policy
        .labels()
        .iter()
        .find(|(_, l)| *l == label)
        .map(|(n, _)| n.clone());
    let readers: Value = if label.readers.is_public() {
        json!("public")
    } else {
        Value::Array(
            label
                .readers
                .clauses()
                .iter()
                .map(|c| Value::Array(c.readers().iter().map(|r| json!(r.as_str())).collect()))
                .collect(),
        )
    };
    json!({
        "name": name,
        "display": label.to_string(),
        "readers": readers,
        "integrity": label.integrity.endorsements(),
        "tags": label.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
    })
}

/// A retrieved source: ids, label and whether the released answer was
/// generated from it (and carries its label); never text.
pub(crate) fn source(s: &lethe_engine::Source, used: bool, policy: &Policy) -> Value {
    json!({
        "id": s.doc_id,
        "chunk": s.chunk_id,
        "label": label(&s.label, policy),
        "used": used,
    })
}

/// Every retrieved source of an outcome, marked used or not.
pub(crate) fn sources(outcome: &lethe_engine::AnswerOutcome, policy: &Policy) -> Vec<Value> {
    outcome
        .sources
        .iter()
        .enumerate()
        .map(|(i, s)| source(s, outcome.answer.label_sources.contains(&i), policy))
        .collect()
}

/// A refusal reason.
pub(crate) fn violation(v: &Violation) -> Value {
    match v {
        Violation::Readers { clause, blocked } => json!({
            "kind": "readers",
            "clause": clause.readers().iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "blocked_readers": blocked,
            "message": v.to_string(),
        }),
        Violation::Integrity { missing } => json!({
            "kind": "integrity",
            "missing_endorsements": missing,
            "message": v.to_string(),
        }),
        Violation::Tag { tag } => {
            json!({"kind": "tag", "tag": tag.as_str(), "message": v.to_string()})
        }
        Violation::UnknownSink { sink } => {
            json!({"kind": "unknown_sink", "sink": sink, "message": v.to_string()})
        }
    }
}

/// A header-safe rendering: visible ASCII kept, everything else percent-encoded.
pub(crate) fn header_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
