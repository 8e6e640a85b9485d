//! The model's ChatML chat template, as its GGUF file describes it.
//!
//! SmolLM2-Instruct was tuned on ChatML turns:
//! `<|im_start|>{role}\n{content}<|im_end|>\n`, and a prompt for the model's
//! answer ends with the assistant header `<|im_start|>assistant\n`. Its
//! `tokenizer.chat_template` also inserts a default system message
//! ("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
//! when the conversation does not start with one; this module reads that text
//! from the template instead of hard-coding it.
//!
//! Message contents are encoded with [`Tokenizer::encode_plain`], so text that
//! happens to spell `<|im_end|>` stays text and cannot end a turn early; the
//! control tokens come only from the template.

use candle_core::quantized::gguf_file;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Who speaks in a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role name as written in the template.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said (plain text; special-token text is kept literal).
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Message {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message (an earlier answer of the model).
    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// A ChatML template bound to a tokenizer's control-token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    default_system: Option<String>,
    im_start: u32,
    im_end: u32,
}

impl ChatTemplate {
    /// A ChatML template with an optional default system prompt (inserted
    /// when the conversation does not start with a system message).
    ///
    /// Errors if the tokenizer lacks `<|im_start|>` or `<|im_end|>`.
    pub fn chatml(default_system: Option<String>, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| Error::Format(format!("the vocabulary has no {t} token")))
        };
        Ok(ChatTemplate {
            default_system,
            im_start: id(IM_START)?,
            im_end: id(IM_END)?,
        })
    }

    /// Reads `tokenizer.chat_template` from GGUF metadata. The template must
    /// be ChatML; its default system prompt, if it inserts one, is kept.
    pub fn from_gguf(content: &gguf_file::Content, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .ok_or_else(|| Error::Format("GGUF metadata has no tokenizer.chat_template".into()))?
            .to_string()
            .map_err(|e| Error::Format(format!("tokenizer.chat_template: {e}")))?;
        ChatTemplate::from_template_text(template, tokenizer)
    }

    /// Interprets the text of a Jinja ChatML template (see [`Self::from_gguf`]).
    pub fn from_template_text(template: &str, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        // Jinja string literals may spell a newline as `\n`.
        let t = template.replace("\\n", "\n");
        if !t.contains(IM_START) || !t.contains(IM_END) {
            return Err(Error::Format(
                "the chat template is not ChatML (no <|im_start|>/<|im_end|>)".into(),
            ));
        }
        let marker = format!("{IM_START}system\n");
        let default_system = t.find(&marker).and_then(|p| {
            let rest = &t[p + marker.len()..];
            rest.find(IM_END).map(|e| rest[..e].to_string())
        });
        ChatTemplate::chatml(default_system, tokenizer)
    }

    /// The system prompt inserted when a conversation has none.
    pub fn default_system(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// The token that ends a turn (`<|im_end|>`); generation stops on it.
    pub fn end_of_turn(&self) -> u32 {
        self.im_end
    }

    /// The messages the template actually renders: the default system
    /// message first when the conversation does not start with a system
    /// message.
    fn effective<'a>(&'a self, messages: &'a [Message]) -> Result<Vec<(Role, &'a str)>> {
        let first = messages
            .first()
            .ok_or_else(|| Error::InvalidArgument("a chat needs at least one message".into()))?;
        let mut out = Vec::with_capacity(messages.len() + 1);
        if first.role != Role::System {
            if let Some(sys) = &self.default_system {
                out.push((Role::System, sys.as_str()));
            }
        }
        out.extend(messages.iter().map(|m| (m.role, m.content.as_str())));
        Ok(out)
    }

    /// The prompt as text, ending with the assistant header
    /// `<|im_start|>assistant\n`.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let mut s = String::new();
        for (role, content) in self.effective(messages)? {
            s.push_str(IM_START);
            s.push_str(role.as_str());
            s.push('\n');
            s.push_str(content);
            s.push_str(IM_END);
            s.push('\n');
        }
        s.push_str(IM_START);
        s.push_str("assistant\n");
        Ok(s)
    }

    /// The prompt as token ids, ending with the assistant header. Control
    /// tokens come only from the template; contents are encoded as plain
    /// text.
    pub fn encode(&self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        let newline = tokenizer.encode_plain("\n")?;
        let mut ids = Vec::new();
        for (role, content) in self.effective(messages)? {
            ids.push(self.im_start);
            ids.extend(tokenizer.encode_plain(&format!("{}\n{content}", role.as_str()))?);
            ids.push(self.im_end);
            ids.extend_from_slice(&newline);
        }
        ids.push(self.im_start);
        ids.extend(tokenizer.encode_plain("assistant\n")?);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests;
