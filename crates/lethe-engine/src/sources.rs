//! Reading documents to ingest: JSON Lines files and folders of text or
//! Markdown files, each document with its label.
//!
//! Reading never stops at the first bad document: every problem in the input
//! is collected with its place (`file:line` or the file path) and reported
//! together, and nothing is ingested unless the whole input is good.
//!
//! Labels come from, in order of precedence:
//! * JSONL: the `label` field, a policy label name or an inline label
//!   `{readers, integrity, tags}` in the policy-file syntax;
//! * folders: a sidecar file `<file>.label` next to the document, else the
//!   nearest `.lethe-label` file in the document's folder or above; each holds
//!   a label name;
//! * otherwise the document is unlabeled: the policy's default label applies,
//!   or ingest refuses it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lethe_label::{Clause, Integrity, Label, Reader, Readers, Tag};
use serde::Deserialize;

use crate::{Error, Result};

/// How a document's label is given.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSpec {
    /// A label defined in the policy.
    Named(String),
    /// A label spelled out in the input.
    Inline(Label),
    /// No label: the policy's default applies, if it names one.
    Unlabeled,
}

/// A document read from an input, not yet checked against the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDocument {
    /// Its id.
    pub id: String,
    /// Its label.
    pub label: LabelSpec,
    /// Its text.
    pub text: String,
    /// Metadata (title, source path, ...).
    pub meta: BTreeMap<String, String>,
    /// Where it came from, for messages (`file:line` or a path).
    pub origin: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDoc {
    id: String,
    text: String,
    #[serde(default)]
    label: Option<JsonLabel>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonLabel {
    Name(String),
    Inline(InlineLabel),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InlineLabel {
    readers: serde_json::Value,
    #[serde(default)]
    integrity: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

fn inline_label(l: InlineLabel) -> std::result::Result<Label, String> {
    let readers = match &l.readers {
        serde_json::Value::String(s) if s == "public" => Readers::public(),
        serde_json::Value::Array(items)
            if !items.is_empty() && items.iter().all(|i| i.is_array()) =>
        {
            let mut clauses = Vec::new();
            for item in items {
                clauses.push(clause(item)?);
            }
            Readers::from_clauses(clauses)
        }
        v @ serde_json::Value::Array(_) => Readers::from_clauses([clause(v)?]),
        other => {
            return Err(format!(
                "readers must be \"public\", a list or a list of lists, not {other}"
            ))
        }
    };
    Ok(Label {
        readers,
        integrity: Integrity::endorsed_by(l.integrity).map_err(|e| e.to_string())?,
        tags: l
            .tags
            .into_iter()
            .map(Tag::new)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| e.to_string())?,
    })
}

fn clause(v: &serde_json::Value) -> std::result::Result<Clause, String> {
    let names = v.as_array().ok_or("expected a list of reader names")?;
    let mut readers = Vec::new();
    for n in names {
        let n = n.as_str().ok_or("reader names must be strings")?;
        readers.push(Reader::new(n).map_err(|e| e.to_string())?);
    }
    Clause::new(readers).map_err(|e| e.to_string())
}

/// Reads one document from its JSON form (a JSONL line or an HTTP request
/// body item): `{"id", "text", "label"?, "title"?, "source"?, "meta"?}`.
/// Errors are prefixed with `origin`.
pub fn document_from_json(
    value: serde_json::Value,
    origin: &str,
) -> std::result::Result<SourceDocument, String> {
    let d: JsonDoc = serde_json::from_value(value).map_err(|e| format!("{origin}: {e}"))?;
    let label = match d.label {
        None => LabelSpec::Unlabeled,
        Some(JsonLabel::Name(n)) => LabelSpec::Named(n),
        Some(JsonLabel::Inline(l)) => {
            LabelSpec::Inline(inline_label(l).map_err(|e| format!("{origin}: label: {e}"))?)
        }
    };
    let mut meta = d.meta;
    if let Some(t) = d.title {
        meta.insert("title".into(), t);
    }
    if let Some(s) = d.source {
        meta.insert("source".into(), s);
    }
    Ok(SourceDocument {
        id: d.id,
        label,
        text: d.text,
        meta,
        origin: origin.to_string(),
    })
}

/// Reads a JSON Lines file: one document per line (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<SourceDocument>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::BadRequest(format!("{}: not UTF-8 text (binary file?)", path.display()))
    })?;
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        match serde_json::from_str::<serde_json::Value>(line)
            .map_err(|e| format!("{origin}: {e}"))
            .and_then(|v| document_from_json(v, &origin))
        {
            Ok(d) => docs.push(d),
            Err(e) => problems.push(e),
        }
    }
    if docs.is_empty() && problems.is_empty() {
        problems.push(format!("{}: no documents in the file", path.display()));
    }
    finish(docs, problems)
}

/// Reads every `.txt`, `.md` and `.markdown` file below `root` (sorted, hidden
/// files skipped). Ids are paths relative to `root`.
pub fn read_folder(root: &Path) -> Result<Vec<SourceDocument>> {
    let mut files = Vec::new();
    collect(root, &mut files).map_err(|e| Error::Io {
        path: root.display().to_string(),
        source: e,
    })?;
    files.sort();
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        let origin = file.display().to_string();
        let rel = file.strip_prefix(root).unwrap_or(&file);
        let id = rel.to_string_lossy().replace('\\', "/");
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{origin}: {e}"));
                continue;
            }
        };
        if bytes.contains(&0) {
            problems.push(format!("{origin}: binary file (contains NUL bytes)"));
            continue;
        }
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                problems.push(format!("{origin}: not UTF-8 text (binary file?)"));
                continue;
            }
        };
        if text.trim().is_empty() {
            problems.push(format!("{origin}: empty file"));
            continue;
        }
        let label = match folder_label(root, &file) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{origin}: {e}"));
                continue;
            }
        };
        let mut meta = BTreeMap::new();
        meta.insert("path".to_string(), id.clone());
        if let Some(title) = title_of(&text) {
            meta.insert("title".to_string(), title);
        }
        docs.push(SourceDocument {
            id,
            label,
            text,
            meta,
            origin,
        });
    }
    if docs.is_empty() && problems.is_empty() {
        problems.push(format!("{}: no .txt or .md files found", root.display()));
    }
    finish(docs, problems)
}

fn finish(docs: Vec<SourceDocument>, problems: Vec<String>) -> Result<Vec<SourceDocument>> {
    if problems.is_empty() {
        Ok(docs)
    } else {
        Err(Error::BadRequest(problems.join("\n")))
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("txt" | "md" | "markdown")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn folder_label(root: &Path, file: &Path) -> std::result::Result<LabelSpec, String> {
    let mut sidecar = file.as_os_str().to_owned();
    sidecar.push(".label");
    if let Some(name) = read_label_file(Path::new(&sidecar))? {
        return Ok(LabelSpec::Named(name));
    }
    let mut dir = file.parent();
    while let Some(d) = dir {
        if let Some(name) = read_label_file(&d.join(".lethe-label"))? {
            return Ok(LabelSpec::Named(name));
        }
        if d == root {
            break;
        }
        dir = d.parent();
    }
    Ok(LabelSpec::Unlabeled)
}

fn read_label_file(path: &Path) -> std::result::Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let name = s.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                Err(format!("{}: expected one label name", path.display()))
            } else {
                Ok(Some(name.to_string()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn title_of(text: &str) -> Option<String> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let t = line.trim().trim_start_matches('#').trim();
    (!t.is_empty()).then(|| t.chars().take(120).collect())
}
