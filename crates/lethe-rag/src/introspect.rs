//! The introspection baseline: ask the model which documents it used.
//!
//! The comparator of the permissive-propagation paper: after answering, the
//! model is shown the numbered documents, the question and its own answer,
//! with one worked example, and asked for `{"used": [numbers]}`. The label
//! is the join of the named documents' labels. A reply that does not parse,
//! or names a document that does not exist, falls back to every document
//! (the conservative label). To keep the released answer sound, it is
//! regenerated from the named documents only, exactly like the permissive
//! propagator's restricted regeneration.

use lethe_model::chat::Message;
use lethe_model::generate::{GenerateConfig, Llm, Sampling};

use crate::permissive::{full_mask, Mask};
use crate::{Result, Source};

const SYSTEM: &str =
    "You audit answers. Given numbered documents, a question and an answer, reply only with JSON \
listing the numbers of the documents the answer relies on, like {\"used\": [2]}.";

const EXAMPLE_USER: &str = "Documents:\n[1] The Lisbon office opens at 8:00.\n[2] The cafeteria serves fish on Tuesdays.\n\
[3] The Lisbon office closes at 19:00.\n\nQuestion: When does the Lisbon office open?\nAnswer: It opens at 8:00.";

const EXAMPLE_REPLY: &str = "{\"used\": [1]}";

/// Asks the model which sources the answer used. Returns the mask and
/// whether the reply parsed.
pub(crate) fn used_sources(
    llm: &Llm,
    question: &str,
    sources: &[Source],
    answer: &str,
) -> Result<(Mask, bool)> {
    let n = sources.len().min(64);
    let mut docs = String::from("Documents:\n");
    for (i, s) in sources.iter().take(n).enumerate() {
        docs.push_str(&format!("[{}] {}\n", i + 1, s.text.trim()));
    }
    let user = format!(
        "{docs}\nQuestion: {}\nAnswer: {}",
        question.trim(),
        answer.trim()
    );
    let messages = vec![
        Message::system(SYSTEM),
        Message::user(EXAMPLE_USER),
        Message::assistant(EXAMPLE_REPLY),
        Message::user(user),
    ];
    let config = GenerateConfig {
        max_tokens: 24,
        sampling: Sampling::Greedy,
        ..GenerateConfig::default()
    };
    let reply = llm.chat(&messages, &config, |_| std::ops::ControlFlow::Continue(()))?;
    Ok(match parse_used(&reply.text, n) {
        Some(mask) => (mask, true),
        None => (full_mask(n), false),
    })
}

/// Parses `{"used": [1, 3]}` (1-based) into a mask; `None` if malformed or
/// out of range.
pub(crate) fn parse_used(reply: &str, n: usize) -> Option<Mask> {
    let start = reply.find('{')?;
    let end = reply[start..].find('}')? + start;
    let v: serde_json::Value = serde_json::from_str(&reply[start..=end]).ok()?;
    let used = v.get("used")?.as_array()?;
    let mut mask = 0;
    for x in used {
        let i = x.as_u64()? as usize;
        if i == 0 || i > n {
            return None;
        }
        mask |= 1 << (i - 1);
    }
    Some(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_or_fall_back() {
        assert_eq!(parse_used("{\"used\": [1, 3]}", 3), Some(0b101));
        assert_eq!(parse_used("Sure! {\"used\": []} done", 3), Some(0));
        assert_eq!(parse_used("{\"used\": [4]}", 3), None);
        assert_eq!(parse_used("{\"used\": [0]}", 3), None);
        assert_eq!(parse_used("I used the first one", 3), None);
        assert_eq!(parse_used("{\"used\": \"1\"}", 3), None);
    }
}
