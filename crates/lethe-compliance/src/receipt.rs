//! Signed unlearning receipts: Ed25519 over a canonical JSON body.
//!
//! A receipt file is `{"receipt": BODY, "signature": {"algorithm":
//! "ed25519", "key_id": ID, "value": HEX}}`. The signature covers
//! `lethe-unlearning-receipt-v1\0` followed by the *canonical* form of
//! BODY: object keys sorted by bytes, no whitespace, strings escaped as
//! serde_json escapes them, and no floating-point numbers at all (the
//! workflow writes measurements as decimal strings), so that parsing and
//! re-serialising a receipt reproduces the signed bytes exactly. Any
//! change to any field of BODY (value, key, added or removed field) fails
//! verification; so does a signature by another key.
//!
//! The signing key is generated on first use and stored as PKCS#8 under the
//! data directory with mode 0600; verification needs only the receipt and
//! the public key ([`PublicKey::to_text`]: `ed25519:<64 hex digits>`).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde_json::Value;

use crate::{Error, Result};

/// Domain separation prefix of the signed message.
const DOMAIN: &[u8] = b"lethe-unlearning-receipt-v1\0";
/// The body's `format` field.
pub const RECEIPT_FORMAT: &str = "lethe-unlearning-receipt/1";

/// An Ed25519 public key that verifies receipts.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_text())
    }
}

impl PublicKey {
    /// `ed25519:<hex>`, the form `lethe unlearn public-key` prints.
    pub fn to_text(&self) -> String {
        format!("ed25519:{}", hex::encode(self.0))
    }

    /// Parses [`PublicKey::to_text`]'s form (a bare 64-digit hex string is
    /// accepted too); surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let t = text.trim();
        let h = t.strip_prefix("ed25519:").unwrap_or(t);
        let bytes = hex::decode(h).map_err(|e| Error::BadKey(format!("not hex: {e}")))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            Error::BadKey(format!("{} bytes, an Ed25519 public key has 32", b.len()))
        })?;
        Ok(PublicKey(arr))
    }

    /// Short id of the key: the first 16 hex digits of its SHA-256.
    pub fn key_id(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex::encode(&d.as_ref()[..8])
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The workflow's signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads the PKCS#8 key at `path`, or generates one there (mode 0600,
    /// written atomically) when the file does not exist. A key file that
    /// others may read is refused.
    pub fn load_or_create(path: &Path) -> Result<SigningKey> {
        if !path.exists() {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| Error::BadKey("generating an Ed25519 key failed".into()))?;
            write_private(path, pkcs8.as_ref())?;
            tracing::info!(path = %path.display(), "generated the receipt signing key");
        }
        check_private(path)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|e| Error::BadKey(format!("{}: {e}", path.display())))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(SigningKey {
            pair,
            public: PublicKey(public),
        })
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `body` (which must be an object with no floating-point
    /// numbers) into a receipt.
    pub fn sign(&self, body: Value) -> Result<Receipt> {
        let msg = message(&body)?;
        let sig = self.pair.sign(&msg);
        Ok(Receipt {
            body,
            key_id: self.public.key_id(),
            signature: sig.as_ref().to_vec(),
        })
    }
}

/// A signed receipt.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    body: Value,
    key_id: String,
    signature: Vec<u8>,
}

impl Receipt {
    /// The signed body.
    pub fn body(&self) -> &Value {
        &self.body
    }

    /// The request id the receipt is for.
    pub fn request_id(&self) -> Option<&str> {
        self.body.pointer("/request/id").and_then(Value::as_str)
    }

    /// The id of the key that signed it (as the file states it).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The file form (pretty JSON; key order is irrelevant to the signature).
    pub fn to_json(&self) -> String {
        let v = serde_json::json!({
            "receipt": self.body,
            "signature": {
                "algorithm": "ed25519",
                "key_id": self.key_id,
                "value": hex::encode(&self.signature),
            }
        });
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses the file form (does not verify).
    pub fn parse(text: &str) -> Result<Receipt> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::BadReceipt(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::BadReceipt("not a JSON object".into()))?;
        if obj.len() != 2 {
            return Err(Error::BadReceipt(
                "expected exactly `receipt` and `signature`".into(),
            ));
        }
        let body = obj
            .get("receipt")
            .filter(|b| b.is_object())
            .ok_or_else(|| Error::BadReceipt("missing `receipt` object".into()))?
            .clone();
        let sig = obj
            .get("signature")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::BadReceipt("missing `signature` object".into()))?;
        if sig.get("algorithm").and_then(Value::as_str) != Some("ed25519") {
            return Err(Error::BadReceipt(
                "signature algorithm is not ed25519".into(),
            ));
        }
        let key_id = sig
            .get("key_id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::BadReceipt("missing signature key_id".into()))?
            .to_string();
        let value = sig
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::BadReceipt("missing signature value".into()))?;
        let signature = hex::decode(value)
            .map_err(|e| Error::BadReceipt(format!("signature is not hex: {e}")))?;
        Ok(Receipt {
            body,
            key_id,
            signature,
        })
    }

    /// Checks the signature against `key` and that the body names that key
    /// and this receipt format. Any modified field fails.
    pub fn verify(&self, key: &PublicKey) -> Result<()> {
        let msg = message(&self.body)?;
        signature::UnparsedPublicKey::new(&signature::ED25519, key.as_bytes())
            .verify(&msg, &self.signature)
            .map_err(|_| {
                Error::VerificationFailed(
                    "the signature does not match this receipt and key".into(),
                )
            })?;
        if self.body.get("key_id").and_then(Value::as_str) != Some(key.key_id().as_str()) {
            return Err(Error::VerificationFailed(
                "the receipt names another signing key".into(),
            ));
        }
        if self.body.get("format").and_then(Value::as_str) != Some(RECEIPT_FORMAT) {
            return Err(Error::VerificationFailed(format!(
                "the receipt format is not {RECEIPT_FORMAT}"
            )));
        }
        Ok(())
    }
}

/// Reads and verifies a receipt file with a public key.
pub fn verify_receipt_file(path: &Path, key: &PublicKey) -> Result<Receipt> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let r = Receipt::parse(&text)?;
    r.verify(key)?;
    Ok(r)
}

/// The signed message of a body.
fn message(body: &Value) -> Result<Vec<u8>> {
    if !body.is_object() {
        return Err(Error::BadReceipt(
            "the receipt body is not an object".into(),
        ));
    }
    let mut out = DOMAIN.to_vec();
    canonical(body, &mut out)?;
    Ok(out)
}

/// Canonical JSON (see the module docs).
pub(crate) fn canonical(v: &Value, out: &mut Vec<u8>) -> Result<()> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(Error::BadReceipt(format!(
                    "the receipt holds the non-integer number {n}; measurements must be strings"
                )));
            }
        }
        Value::String(s) => {
            out.extend_from_slice(serde_json::to_string(s).unwrap_or_default().as_bytes())
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out)?;
            }
            out.push(b']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
                out.push(b':');
                canonical(&m[k], out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Replaces every non-integer number in `v` by its shortest decimal string
/// (so that a body can be signed canonically).
pub(crate) fn signable(v: Value) -> Value {
    match v {
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => {
            Value::String(n.as_f64().map(fmt_f64).unwrap_or_else(|| n.to_string()))
        }
        Value::Array(a) => Value::Array(a.into_iter().map(signable).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, signable(v))).collect()),
        other => other,
    }
}

/// A measurement as a decimal string (shortest round-trip form).
pub(crate) fn fmt_f64(x: f64) -> String {
    format!("{x}")
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".signing-key.tmp-{}", std::process::id()));
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        lethe_durable::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

fn check_private(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::BadKey(format!(
                "{} is readable by others (mode {:o}); run `chmod 600` on it",
                path.display(),
                mode & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
