//! Splitting documents into retrieval chunks.
//!
//! Chunks are packed from whole sentences up to a word budget (the embedder
//! reads at most ~256 word pieces, about 180 words), so a chunk rarely cuts
//! a sentence; a single sentence longer than the budget is split between
//! words. Chunking is a pure function of the text and the config, which is
//! what makes chunk ids (`doc#index`) stable: ingesting the same text again
//! yields the same chunks.

use serde::{Deserialize, Serialize};

/// How documents are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkConfig {
    /// Most words in one chunk.
    pub max_words: usize,
}

impl ChunkConfig {
    /// 120 words: well inside all-MiniLM-L6-v2's 256-token window.
    pub const DEFAULT: ChunkConfig = ChunkConfig { max_words: 120 };
}

/// Splits `text` into chunks. Whitespace inside a chunk is normalised to
/// single spaces; empty text gives no chunks.
pub fn chunk_text(text: &str, config: ChunkConfig) -> Vec<String> {
    let max = config.max_words.max(1);
    let mut chunks = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for paragraph in text.split("\n\n") {
        for sentence in sentences(paragraph) {
            let words: Vec<&str> = sentence.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            if current.len() + words.len() > max && !current.is_empty() {
                chunks.push(current.join(" "));
                current.clear();
            }
            if words.len() > max {
                for piece in words.chunks(max) {
                    if current.len() + piece.len() > max && !current.is_empty() {
                        chunks.push(current.join(" "));
                        current.clear();
                    }
                    current.extend_from_slice(piece);
                }
            } else {
                current.extend_from_slice(&words);
            }
        }
        // Paragraph breaks are preferred chunk boundaries once a chunk is
        // at least half full.
        if current.len() >= max / 2 {
            chunks.push(current.join(" "));
            current.clear();
        }
    }
    if !current.is_empty() {
        chunks.push(current.join(" "));
    }
    chunks
}

/// Sentences: split after `.`, `!` or `?` followed by whitespace, and at
/// line breaks.
fn sentences(paragraph: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = paragraph.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let end_of_sentence = matches!(b, b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_some_and(|n| n.is_ascii_whitespace());
        if end_of_sentence || b == b'\n' {
            out.push(&paragraph[start..=i]);
            start = i + 1;
        }
    }
    if start < paragraph.len() {
        out.push(&paragraph[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_chunk() {
        assert_eq!(
            chunk_text("Hello  world.\nSecond line", ChunkConfig::DEFAULT),
            ["Hello world. Second line"]
        );
        assert!(chunk_text("   \n\n  ", ChunkConfig::DEFAULT).is_empty());
    }

    #[test]
    fn chunks_respect_the_budget_and_keep_every_word() {
        let text: String = (0..50)
            .map(|i| format!("Sentence number {i} has exactly seven words. "))
            .collect();
        let cfg = ChunkConfig { max_words: 20 };
        let chunks = chunk_text(&text, cfg);
        assert!(chunks.iter().all(|c| c.split_whitespace().count() <= 20));
        // Whole sentences: 7-word sentences pack two per 20-word chunk.
        assert!(chunks.iter().all(|c| c.ends_with('.')), "{chunks:?}");
        let rejoined: Vec<&str> = chunks.iter().flat_map(|c| c.split_whitespace()).collect();
        let original: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(rejoined, original);
    }

    #[test]
    fn long_sentences_are_split_between_words() {
        let text = vec!["word"; 45].join(" ");
        let chunks = chunk_text(&text, ChunkConfig { max_words: 20 });
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|c| c.split_whitespace().count())
            .collect();
        assert_eq!(sizes, [20, 20, 5]);
    }

    #[test]
    fn chunking_is_deterministic() {
        let text = "A. B! C? D\n\nE. F.";
        assert_eq!(
            chunk_text(text, ChunkConfig::DEFAULT),
            chunk_text(text, ChunkConfig::DEFAULT)
        );
    }
}
