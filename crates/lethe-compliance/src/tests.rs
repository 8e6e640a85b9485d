//! Unit tests: receipts (tampering, keys, canonical form), the ledger
//! (replay, torn tails, corruption, illegal transitions) and method
//! configuration.

use std::io::Write;

use serde_json::{json, Value};

use crate::ledger::{Event, Ledger, Phase, Request, State};
use crate::receipt::{canonical, signable, PublicKey, Receipt, SigningKey, RECEIPT_FORMAT};
use crate::Error;

fn key(dir: &std::path::Path) -> SigningKey {
    SigningKey::load_or_create(&dir.join("k.pk8")).unwrap()
}

fn body(k: &SigningKey) -> Value {
    signable(json!({
        "format": RECEIPT_FORMAT,
        "key_id": k.public_key().key_id(),
        "request": {"id": "ur-000001", "documents": ["hr/vault", "hr/salaries"], "reason": "GDPR art. 17", "filed_at": 1_700_000_000u64},
        "removed": [{"id": "hr/vault", "sha256": "ab".repeat(32), "chunks": 1}],
        "weights": {"kind": "unlearned", "suppression_only": false, "before_sha256": "00", "after_sha256": "11", "mask": null},
        "metrics": {"forget_nll_after": 7.25, "retain_nll_after": 1.5},
        "epoch": 3,
    }))
}

/// Every leaf of `v` as a JSON pointer.
fn leaves(v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| leaves(x, format!("{path}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| leaves(x, format!("{path}/{i}"), out)),
        _ => out.push(path),
    }
}

fn flip(v: &mut Value) {
    *v = match v.take() {
        Value::Null => json!("x"),
        Value::Bool(b) => Value::Bool(!b),
        Value::Number(n) => json!(n.as_u64().map_or(1, |x| x + 1)),
        Value::String(s) => Value::String(format!("{s}x")),
        other => other,
    };
}

#[test]
fn receipt_round_trips_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path());
    let r = k.sign(body(&k)).unwrap();
    let parsed = Receipt::parse(&r.to_json()).unwrap();
    assert_eq!(parsed, r);
    parsed.verify(k.public_key()).unwrap();
    assert_eq!(parsed.request_id(), Some("ur-000001"));
    // Measurements are strings in the signed form.
    assert_eq!(parsed.body()["metrics"]["forget_nll_after"], json!("7.25"));
}

#[test]
fn flipping_any_signed_field_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path());
    let r = k.sign(body(&k)).unwrap();
    let file: Value = serde_json::from_str(&r.to_json()).unwrap();
    let mut paths = Vec::new();
    leaves(&file["receipt"], String::new(), &mut paths);
    assert!(paths.len() >= 15, "{paths:?}");
    for p in &paths {
        let mut t = file.clone();
        flip(t["receipt"].pointer_mut(p).unwrap());
        let tampered = Receipt::parse(&t.to_string()).unwrap();
        assert!(
            matches!(
                tampered.verify(k.public_key()),
                Err(Error::VerificationFailed(_))
            ),
            "flipping {p} still verifies"
        );
    }
    // Added and removed fields, and a changed signature.
    let mut added = file.clone();
    added["receipt"]["extra"] = json!(1);
    assert!(Receipt::parse(&added.to_string())
        .unwrap()
        .verify(k.public_key())
        .is_err());
    let mut removed = file.clone();
    removed["receipt"].as_object_mut().unwrap().remove("epoch");
    assert!(Receipt::parse(&removed.to_string())
        .unwrap()
        .verify(k.public_key())
        .is_err());
    let mut sig = file.clone();
    let mut s = sig["signature"]["value"].as_str().unwrap().to_string();
    s.replace_range(0..2, if &s[0..2] == "00" { "01" } else { "00" });
    sig["signature"]["value"] = json!(s);
    assert!(Receipt::parse(&sig.to_string())
        .unwrap()
        .verify(k.public_key())
        .is_err());
}

#[test]
fn another_key_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(dir.path());
    let other = SigningKey::load_or_create(&dir.path().join("other.pk8")).unwrap();
    assert_ne!(k.public_key(), other.public_key());
    let r = k.sign(body(&k)).unwrap();
    assert!(matches!(
        r.verify(other.public_key()),
        Err(Error::VerificationFailed(_))
    ));
    // Signed by the other key but naming the first key's id: still refused.
    let forged = other.sign(body(&k)).unwrap();
    assert!(forged.verify(k.public_key()).is_err());
    assert!(
        forged.verify(other.public_key()).is_err(),
        "the body names another key"
    );
}

#[test]
fn signing_key_is_private_stable_and_exportable() {
    let dir = tempfile::tempdir().unwrap();
    let a = key(dir.path());
    let b = key(dir.path());
    assert_eq!(a.public_key(), b.public_key(), "the key is generated once");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("k.pk8");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SigningKey::load_or_create(&path),
            Err(Error::BadKey(_))
        ));
    }
    let text = a.public_key().to_text();
    assert!(text.starts_with("ed25519:") && text.len() == 8 + 64);
    assert_eq!(
        &PublicKey::parse(&format!("  {text}\n")).unwrap(),
        a.public_key()
    );
    assert!(PublicKey::parse("ed25519:abcd").is_err());
    assert!(PublicKey::parse("not hex").is_err());
}

#[test]
fn canonical_form_sorts_keys_and_refuses_floats() {
    let mut out = Vec::new();
    canonical(
        &json!({"b": [1, "x\"y"], "a": {"d": null, "c": true}}),
        &mut out,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"a":{"c":true,"d":null},"b":[1,"x\"y"]}"#
    );
    let mut out = Vec::new();
    assert!(canonical(&json!({"x": 0.5}), &mut out).is_err());
}

fn request(id: &str) -> Request {
    Request {
        id: id.into(),
        documents: vec![crate::DocumentRef {
            id: "d1".into(),
            sha256: "aa".into(),
            chunks: 1,
            label: "internal".into(),
        }],
        reason: "r".into(),
        requester: "q".into(),
        filed_by: "olga".into(),
        via: "cli".into(),
        filed_at: 1,
        method: None,
    }
}

fn started(id: &str) -> Event {
    Event::Started {
        id: id.into(),
        method: "npo".into(),
        attempt: 1,
        at: 2,
    }
}

#[test]
fn ledger_replays_and_cuts_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.log");
    {
        let mut l = Ledger::open(&path).unwrap();
        assert_eq!(l.next_id(), "ur-000001");
        l.append(Event::Filed {
            request: request("ur-000001"),
        })
        .unwrap();
        l.append(Event::Filed {
            request: request("ur-000002"),
        })
        .unwrap();
        l.append(started("ur-000002")).unwrap();
    }
    let good_len = std::fs::metadata(&path).unwrap().len();
    // A crash in the middle of an append leaves a partial frame.
    let frame = lethe_durable::frame(br#"{"event":"failed","id":"ur-000002","error":"x","at":3}"#);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&frame[..frame.len() - 5]).unwrap();
    drop(f);
    let mut l = Ledger::open(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        good_len,
        "torn record cut off"
    );
    assert_eq!(l.get("ur-000001").unwrap().state, State::Pending);
    assert_eq!(
        l.get("ur-000002").unwrap().state,
        State::Running(Phase::Started)
    );
    assert_eq!(l.next_id(), "ur-000003");
    // Appending after the repair works and survives another reopen.
    l.append(Event::RolledBack {
        id: "ur-000002".into(),
        reason: "test".into(),
        at: 4,
    })
    .unwrap();
    drop(l);
    let l = Ledger::open(&path).unwrap();
    let r = l.get("ur-000002").unwrap();
    assert_eq!((r.state.clone(), r.rollbacks), (State::Pending, 1));
    assert_eq!(l.all().count(), 2);
}

#[test]
fn ledger_refuses_corruption_and_illegal_transitions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.log");
    {
        let mut l = Ledger::open(&path).unwrap();
        l.append(Event::Filed {
            request: request("ur-000001"),
        })
        .unwrap();
        // Illegal: completing a pending request, filing twice, events for unknown ids.
        let before = std::fs::metadata(&path).unwrap().len();
        assert!(l
            .append(Event::Completed {
                id: "ur-000001".into(),
                receipt_sha256: "x".into(),
                at: 1
            })
            .is_err());
        assert!(l
            .append(Event::Filed {
                request: request("ur-000001")
            })
            .is_err());
        assert!(l.append(started("ur-000009")).is_err());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            before,
            "nothing written for refused events"
        );
        l.append(started("ur-000001")).unwrap();
    }
    // Flip a byte inside the second record: corruption, not a crash.
    let mut bytes = std::fs::read(&path).unwrap();
    let frames = lethe_durable::read_frames(&bytes);
    let second_start = 8 + frames.records[0].len() + 8;
    bytes[second_start + 3] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(Ledger::open(&path), Err(Error::Corrupt(_))));
}

#[test]
fn method_overrides_merge_and_typos_are_refused() {
    let over: toml::Value = toml::from_str("beta = 0.5\n[train]\nlr = 0.01\nepochs = 2\n").unwrap();
    let v = crate::weights::method_config("npo", Some(&over), vec![1, 2]).unwrap();
    assert_eq!(v["beta"], json!(0.5));
    assert_eq!(v["train"]["lr"], json!(0.01));
    assert_eq!(v["train"]["batch_size"], json!(4), "defaults kept");
    let cfg: lethe_unlearn::lm::LmMethodConfig = serde_json::from_value(v).unwrap();
    assert!(matches!(cfg, lethe_unlearn::lm::LmMethodConfig::Npo(_)));
    let typo: toml::Value = toml::from_str("betta = 0.5\n").unwrap();
    let v = crate::weights::method_config("npo", Some(&typo), vec![1]).unwrap();
    assert!(serde_json::from_value::<lethe_unlearn::lm::LmMethodConfig>(v).is_err());
    assert!(crate::weights::method_config("retrain", None, vec![1]).is_err());
    for m in crate::METHODS {
        let v = crate::weights::method_config(m, None, vec![7, 8]).unwrap();
        if m == "o3" {
            let mut v = v;
            v.as_object_mut().unwrap().remove("method");
            serde_json::from_value::<lethe_unlearn::o3::O3Config>(v)
                .unwrap()
                .validate()
                .unwrap();
        } else {
            let c: lethe_unlearn::lm::LmMethodConfig = serde_json::from_value(v).unwrap();
            c.method().validate().unwrap();
        }
    }
}
