//! Parsing and validating policy files, with `file:line:column` problems.
//!
//! Parsing never stops at the first problem: every check runs and all
//! problems are reported together, each at the place in the file it concerns,
//! so one `lethe policy check` run shows everything to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{Audience, DeclassifyRule, Policy, Principal, Role, Sink};
use crate::label::{Clause, Integrity, Label, Reader, Readers, Tag, TRUSTED};

/// One problem in a policy file, at a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file name as given.
    pub file: String,
    /// 1-based line (0 when the problem concerns the whole file).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid policy.
    #[error("{}", .problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

impl PolicyError {
    /// The problems, empty for an I/O error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            PolicyError::Io { .. } => &[],
            PolicyError::Invalid { problems } => problems,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    organisation: Option<RawOrganisation>,
    #[serde(default)]
    principals: BTreeMap<String, Spanned<RawPrincipal>>,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<RawGroup>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<RawLabel>>,
    #[serde(default)]
    sinks: BTreeMap<String, Spanned<RawSink>>,
    #[serde(default)]
    declassify: Vec<Spanned<RawDeclassify>>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrganisation {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    roles: Vec<Spanned<String>>,
    #[serde(default)]
    description: String,
}

fn default_kind() -> String {
    "human".to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    members: Vec<Spanned<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    readers: Spanned<toml::Value>,
    #[serde(default)]
    integrity: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    audience: Spanned<toml::Value>,
    #[serde(default)]
    callers: Vec<Spanned<String>>,
    #[serde(default)]
    requires_integrity: Vec<Spanned<String>>,
    #[serde(default)]
    deny_tags: Vec<Spanned<String>>,
    #[serde(default)]
    allow_tags: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeclassify {
    principals: Vec<Spanned<String>>,
    #[serde(default)]
    readers: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    endorse: Vec<Spanned<String>>,
    #[serde(default)]
    sinks: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    label: Option<Spanned<String>>,
}

/// Collects problems with their positions.
struct Checker<'a> {
    file: &'a str,
    source: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.source, span.start);
        self.problems.push(Problem {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        });
    }
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    (line, column)
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let source = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Policy::from_toml(&source, &path.display().to_string())
    }

    /// Parses and validates a policy from TOML text; `file` names it in problems.
    pub fn from_toml(source: &str, file: &str) -> Result<Policy, PolicyError> {
        let mut ck = Checker {
            file,
            source,
            problems: Vec::new(),
        };
        let raw: RawPolicy = match toml::from_str(source) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                ck.at(span, e.message().to_string());
                return Err(PolicyError::Invalid {
                    problems: ck.problems,
                });
            }
        };
        let policy = build(raw, &mut ck);
        if ck.problems.is_empty() {
            Ok(policy)
        } else {
            ck.problems.sort_by_key(|p| (p.line, p.column));
            Err(PolicyError::Invalid {
                problems: ck.problems,
            })
        }
    }
}

fn build(raw: RawPolicy, ck: &mut Checker<'_>) -> Policy {
    // Names: principals and groups share one namespace.
    let mut principals = BTreeMap::new();
    for (name, p) in &raw.principals {
        let span = p.span();
        check_name(ck, span.clone(), name, "principal");
        let mut roles = BTreeSet::new();
        for r in &p.get_ref().roles {
            match Role::from_name(r.get_ref()) {
                Some(role) => {
                    roles.insert(role);
                }
                None => ck.at(
                    r.span(),
                    format!(
                        "unknown role {:?}; roles are {}",
                        r.get_ref(),
                        Role::ALL.map(Role::name).join(", ")
                    ),
                ),
            }
        }
        principals.insert(
            name.clone(),
            Principal {
                name: name.clone(),
                kind: p.get_ref().kind.clone(),
                roles,
                description: p.get_ref().description.clone(),
            },
        );
    }
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, g) in &raw.groups {
        check_name(ck, g.span(), name, "group");
        if principals.contains_key(name) {
            ck.at(
                g.span(),
                format!("{name:?} is both a principal and a group; names must be unique"),
            );
        }
        let mut members = BTreeSet::new();
        for m in &g.get_ref().members {
            let mname = m.get_ref();
            if !raw.principals.contains_key(mname) && !raw.groups.contains_key(mname) {
                ck.at(
                    m.span(),
                    format!(
                        "group {name:?} lists unknown member {mname:?} (not a principal or group)"
                    ),
                );
            }
            members.insert(mname.clone());
        }
        groups.insert(name.clone(), members);
    }
    check_group_cycles(ck, &raw.groups, &groups);

    let knows = |n: &str| raw.principals.contains_key(n) || raw.groups.contains_key(n);

    let mut labels = BTreeMap::new();
    for (name, l) in &raw.labels {
        check_name(ck, l.span(), name, "label");
        let readers = parse_readers(ck, &l.get_ref().readers, &knows, &format!("label {name:?}"));
        let integrity = parse_endorsements(ck, &l.get_ref().integrity, &knows);
        let tags = parse_tags(ck, &l.get_ref().tags);
        labels.insert(
            name.clone(),
            Label {
                readers,
                integrity,
                tags,
            },
        );
    }

    let mut sinks = BTreeMap::new();
    for (name, s) in &raw.sinks {
        check_name(ck, s.span(), name, "sink");
        if raw.principals.contains_key(name) {
            ck.at(
                s.span(),
                format!("sink {name:?} has a principal's name; sinks and principals must differ"),
            );
        }
        let raw_sink = s.get_ref();
        let audience = match raw_sink.audience.get_ref() {
            toml::Value::String(v) if v == "public" => Audience::Public,
            _ => {
                let readers = parse_reader_list(
                    ck,
                    &raw_sink.audience,
                    &knows,
                    &format!("sink {name:?} audience"),
                );
                if readers.is_empty() {
                    ck.at(
                        raw_sink.audience.span(),
                        format!(
                            "sink {name:?} has an empty audience; use \"public\" or name readers"
                        ),
                    );
                }
                Audience::Readers(readers)
            }
        };
        let callers = raw_sink
            .callers
            .iter()
            .filter_map(|c| known_reader(ck, c, &knows, &format!("sink {name:?} callers")))
            .collect();
        let mut allow_tags = BTreeMap::new();
        for (k, vals) in &raw_sink.allow_tags {
            allow_tags.insert(k.clone(), vals.iter().cloned().collect());
        }
        sinks.insert(
            name.clone(),
            Sink {
                name: name.clone(),
                audience,
                callers,
                requires_integrity: parse_endorsements(ck, &raw_sink.requires_integrity, &knows),
                deny_tags: parse_tags(ck, &raw_sink.deny_tags),
                allow_tags,
            },
        );
    }

    let mut declassify = Vec::new();
    for rule in &raw.declassify {
        let r = rule.get_ref();
        if r.principals.is_empty() {
            ck.at(rule.span(), "declassify rule names no principals");
        }
        let who = r
            .principals
            .iter()
            .filter_map(|p| known_reader(ck, p, &knows, "declassify principals"))
            .collect();
        let readers = r
            .readers
            .iter()
            .filter_map(|p| known_reader(ck, p, &knows, "declassify readers"))
            .collect();
        for s in &r.sinks {
            if !raw.sinks.contains_key(s.get_ref()) {
                ck.at(
                    s.span(),
                    format!("declassify rule names unknown sink {:?}", s.get_ref()),
                );
            }
        }
        declassify.push(DeclassifyRule {
            principals: who,
            readers,
            tags: parse_tags(ck, &r.tags),
            endorse: parse_endorsements(ck, &r.endorse, &knows)
                .endorsements()
                .clone(),
            sinks: r.sinks.iter().map(|s| s.get_ref().clone()).collect(),
        });
    }

    let default_label = raw.defaults.and_then(|d| d.label).and_then(|l| {
        if raw.labels.contains_key(l.get_ref()) {
            Some(l.into_inner())
        } else {
            ck.at(
                l.span(),
                format!(
                    "default label {:?} is not defined under [labels]",
                    l.get_ref()
                ),
            );
            None
        }
    });

    let memberships = memberships(&principals, &groups);
    Policy {
        organisation: raw.organisation.map(|o| o.name).unwrap_or_default(),
        principals,
        groups,
        labels,
        sinks,
        declassify,
        default_label,
        memberships,
    }
}

fn check_name(ck: &mut Checker<'_>, span: Range<usize>, name: &str, what: &str) {
    if name == "public" {
        ck.at(
            span,
            format!("`public` is reserved and cannot name a {what}"),
        );
    } else if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        ck.at(
            span,
            format!("{what} name {name:?} is empty or contains whitespace"),
        );
    }
}

fn known_reader(
    ck: &mut Checker<'_>,
    name: &Spanned<String>,
    knows: &dyn Fn(&str) -> bool,
    context: &str,
) -> Option<Reader> {
    let n = name.get_ref();
    if n == "public" {
        ck.at(
            name.span(),
            format!("{context}: `public` is not a reader; it is a whole label"),
        );
        return None;
    }
    if !knows(n) {
        ck.at(
            name.span(),
            format!("{context}: unknown reader {n:?} (not a principal or group)"),
        );
        return None;
    }
    match Reader::new(n.clone()) {
        Ok(r) => Some(r),
        Err(e) => {
            ck.at(name.span(), format!("{context}: {e}"));
            None
        }
    }
}

/// `readers = "public"`, `readers = ["a", "b"]` (one clause: a or b), or
/// `readers = [["a", "b"], ["c"]]` (all clauses must hold).
fn parse_readers(
    ck: &mut Checker<'_>,
    value: &Spanned<toml::Value>,
    knows: &dyn Fn(&str) -> bool,
    context: &str,
) -> Readers {
    let span = value.span();
    match value.get_ref() {
        toml::Value::String(s) if s == "public" => Readers::public(),
        toml::Value::Array(items) if items.iter().all(|v| v.is_array()) && !items.is_empty() => {
            let mut clauses = Vec::new();
            for item in items {
                let names = strings_of(ck, span.clone(), item, context);
                let readers: Vec<Reader> = names
                    .into_iter()
                    .filter_map(|n| check_reader_name(ck, span.clone(), n, knows, context))
                    .collect();
                match Clause::new(readers) {
                    Ok(c) => clauses.push(c),
                    Err(_) => ck.at(span.clone(), format!("{context}: empty reader clause")),
                }
            }
            Readers::from_clauses(clauses)
        }
        _ => {
            let readers = parse_reader_list(ck, value, knows, context);
            match Readers::any_of(readers) {
                Ok(r) => r,
                Err(_) => {
                    ck.at(
                        span,
                        format!(
                            "{context}: no readers; write readers = \"public\" for public data"
                        ),
                    );
                    Readers::public()
                }
            }
        }
    }
}

fn parse_reader_list(
    ck: &mut Checker<'_>,
    value: &Spanned<toml::Value>,
    knows: &dyn Fn(&str) -> bool,
    context: &str,
) -> BTreeSet<Reader> {
    let span = value.span();
    strings_of(ck, span.clone(), value.get_ref(), context)
        .into_iter()
        .filter_map(|n| check_reader_name(ck, span.clone(), n, knows, context))
        .collect()
}

fn strings_of(
    ck: &mut Checker<'_>,
    span: Range<usize>,
    value: &toml::Value,
    context: &str,
) -> Vec<String> {
    match value {
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                match item.as_str() {
                    Some(s) => out.push(s.to_string()),
                    None => ck.at(
                        span.clone(),
                        format!("{context}: expected a reader name, found {item}"),
                    ),
                }
            }
            out
        }
        other => {
            ck.at(
                span,
                format!("{context}: expected \"public\", a list of readers, or a list of lists; found {other}"),
            );
            Vec::new()
        }
    }
}

fn check_reader_name(
    ck: &mut Checker<'_>,
    span: Range<usize>,
    name: String,
    knows: &dyn Fn(&str) -> bool,
    context: &str,
) -> Option<Reader> {
    if name == "public" {
        ck.at(
            span,
            format!("{context}: `public` cannot be mixed with readers"),
        );
        return None;
    }
    if !knows(&name) {
        ck.at(
            span,
            format!("{context}: unknown reader {name:?} (not a principal or group)"),
        );
        return None;
    }
    match Reader::new(name) {
        Ok(r) => Some(r),
        Err(e) => {
            ck.at(span, format!("{context}: {e}"));
            None
        }
    }
}

fn parse_endorsements(
    ck: &mut Checker<'_>,
    names: &[Spanned<String>],
    knows: &dyn Fn(&str) -> bool,
) -> Integrity {
    let mut ok = Vec::new();
    for n in names {
        let v = n.get_ref();
        if v != TRUSTED && !knows(v) {
            ck.at(
                n.span(),
                format!(
                    "unknown endorsement {v:?}: use \"{TRUSTED}\" or a principal or group name"
                ),
            );
        } else {
            ok.push(v.clone());
        }
    }
    Integrity::endorsed_by(ok).unwrap_or_else(|e| {
        if let Some(n) = names.first() {
            ck.at(n.span(), e.to_string());
        }
        Integrity::untrusted()
    })
}

fn parse_tags(ck: &mut Checker<'_>, names: &[Spanned<String>]) -> BTreeSet<Tag> {
    let mut out = BTreeSet::new();
    for n in names {
        match Tag::new(n.get_ref().clone()) {
            Ok(t) => {
                out.insert(t);
            }
            Err(e) => ck.at(n.span(), e.to_string()),
        }
    }
    out
}

fn check_group_cycles(
    ck: &mut Checker<'_>,
    raw: &BTreeMap<String, Spanned<RawGroup>>,
    groups: &BTreeMap<String, BTreeSet<String>>,
) {
    // Iterative DFS with colours; report each cycle once, at its first group.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&str, Colour> =
        groups.keys().map(|g| (g.as_str(), Colour::White)).collect();
    for start in groups.keys() {
        if colour[start.as_str()] != Colour::White {
            continue;
        }
        let mut stack: Vec<(&str, Vec<&str>)> = vec![(start.as_str(), children(groups, start))];
        let mut path: Vec<&str> = vec![start.as_str()];
        colour.insert(start.as_str(), Colour::Grey);
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(child) => match colour[child] {
                    Colour::White => {
                        colour.insert(child, Colour::Grey);
                        path.push(child);
                        stack.push((child, children(groups, child)));
                    }
                    Colour::Grey => {
                        let from = path.iter().position(|g| *g == child).unwrap_or(0);
                        let mut cycle: Vec<&str> = path[from..].to_vec();
                        cycle.push(child);
                        let span = raw.get(child).map(|g| g.span()).unwrap_or(0..0);
                        ck.at(
                            span,
                            format!("group membership cycle: {}", cycle.join(" -> ")),
                        );
                    }
                    Colour::Black => {}
                },
                None => {
                    colour.insert(node, Colour::Black);
                    path.pop();
                    stack.pop();
                }
            }
        }
    }
}

fn children<'a>(groups: &'a BTreeMap<String, BTreeSet<String>>, g: &str) -> Vec<&'a str> {
    groups
        .get(g)
        .map(|m| {
            m.iter()
                .filter(|x| groups.contains_key(*x))
                .map(String::as_str)
                .collect()
        })
        .unwrap_or_default()
}

/// principal -> itself and every group containing it, transitively.
fn memberships(
    principals: &BTreeMap<String, Principal>,
    groups: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (g, members) in groups {
        for m in members {
            parents.entry(m.as_str()).or_default().push(g.as_str());
        }
    }
    principals
        .keys()
        .map(|p| {
            let mut seen: BTreeSet<String> = BTreeSet::new();
            let mut todo = vec![p.as_str()];
            while let Some(x) = todo.pop() {
                if seen.insert(x.to_string()) {
                    if let Some(ps) = parents.get(x) {
                        todo.extend(ps.iter().copied());
                    }
                }
            }
            (p.clone(), seen)
        })
        .collect()
}
