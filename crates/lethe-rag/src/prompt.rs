//! The conversation the model sees: instructions, numbered sources, question.
//!
//! Small models answer best when the context comes first and the question
//! last, with a short instruction to stay within the context. Sources are
//! numbered so answers can cite them. Nothing here is trusted: a document
//! that says "ignore previous instructions" is just more context, and the
//! only documents the model ever sees are ones the caller may read anyway.

use lethe_model::chat::Message;

use crate::Source;

/// The system instruction.
pub const SYSTEM: &str = "You are a careful assistant. Answer the question using only the numbered context \
documents. Answer in one or two sentences. If the context does not contain the answer, say that you do not know.";

/// Builds the conversation for a question and its sources (possibly none).
pub fn messages(question: &str, sources: &[Source]) -> Vec<Message> {
    let mut user = String::new();
    if sources.is_empty() {
        user.push_str("Context: (no documents)\n\n");
    } else {
        user.push_str("Context:\n");
        for (i, s) in sources.iter().enumerate() {
            user.push_str(&format!("[{}] {}\n", i + 1, s.text.trim()));
        }
        user.push('\n');
    }
    user.push_str("Question: ");
    user.push_str(question.trim());
    vec![Message::system(SYSTEM), Message::user(user)]
}
