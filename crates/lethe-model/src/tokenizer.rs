//! The SmolLM2 tokenizer, rebuilt from the GGUF file's own metadata.
//!
//! Neither the `tokenizers` crate nor candle reads a GGUF vocabulary, and the
//! model ships no `tokenizer.json`, so this module rebuilds the byte-level BPE
//! tokenizer from `tokenizer.ggml.{tokens,merges,token_type}`: GPT-2 style
//! byte-level BPE with the `smollm` pre-tokenizer (every digit is its own
//! pre-token, then the GPT-2 byte-level regex without a prefix space), a
//! byte-level decoder, and the control tokens (ids 0-16 in SmolLM2, among them
//! `<|im_start|>` and `<|im_end|>`) as special added tokens.
//!
//! Two encoders share one vocabulary: [`Tokenizer::encode`] turns the text of a
//! special token into that token (what a chat template needs), while
//! [`Tokenizer::encode_plain`] treats such text as ordinary characters, so that
//! a document or user message containing `<|im_end|>` cannot break out of its
//! message.
//!
//! Every token also has its exact byte string ([`Tokenizer::token_bytes`]),
//! which streaming generation uses to emit text only at UTF-8 boundaries.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper};

use crate::{Error, Result};

/// GGUF token type of a normal vocabulary entry.
const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF token type of a control (special) token such as `<|im_start|>`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of a user-defined added token (matched verbatim, not special).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The special token ids a model needs to know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence (`<|im_start|>` in SmolLM2).
    pub bos: u32,
    /// End of sequence (`<|im_end|>` in SmolLM2); generation stops on it.
    pub eos: u32,
    /// Padding token, when the file names one.
    pub pad: Option<u32>,
    /// Unknown token, when the file names one.
    pub unknown: Option<u32>,
}

/// A byte-level BPE tokenizer built from GGUF metadata.
///
/// Cheap to share: all methods take `&self` and the type is `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    /// Recognises the text of special tokens as those tokens.
    with_special: tokenizers::Tokenizer,
    /// Treats the text of special tokens as ordinary characters.
    plain: tokenizers::Tokenizer,
    /// Exact bytes every token decodes to (special tokens: their literal text).
    bytes: Vec<Vec<u8>>,
    /// Whether each token is a control (special) token.
    special: Vec<bool>,
    /// Token string to id.
    ids: HashMap<String, u32>,
    special_ids: SpecialTokens,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.bytes.len())
            .field("special_ids", &self.special_ids)
            .finish_non_exhaustive()
    }
}

fn md<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| Error::Format(format!("GGUF metadata has no {key}")))
}

fn md_u32(content: &gguf_file::Content, key: &str) -> Result<Option<u32>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_u32()
            .map(Some)
            .map_err(|e| Error::Format(format!("GGUF metadata {key}: {e}"))),
    }
}

fn md_strings(content: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let list = md(content, key)?
        .to_vec()
        .map_err(|e| Error::Format(format!("GGUF metadata {key}: {e}")))?;
    list.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| Error::Format(format!("GGUF metadata {key}: {e}")))
        })
        .collect()
}

/// GPT-2's reversible map from bytes to printable characters, inverted:
/// character -> byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        if let Some(c) = char::from_u32(c) {
            map.insert(c, b as u8);
        }
    }
    map
}

impl Tokenizer {
    /// Builds the tokenizer from already parsed GGUF metadata.
    ///
    /// Requires `tokenizer.ggml.model == "gpt2"` (byte-level BPE), the token
    /// list, the merges and the BOS/EOS ids; token types are optional (without
    /// them no token is treated as special).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
        let model = md(content, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| Error::Format(format!("tokenizer.ggml.model: {e}")))?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF tokenizer model {model:?} (only byte-level BPE \"gpt2\" is supported)"
            )));
        }
        let tokens = md_strings(content, "tokenizer.ggml.tokens")?;
        let merges = md_strings(content, "tokenizer.ggml.merges")?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(v) => {
                let list = v
                    .to_vec()
                    .map_err(|e| Error::Format(format!("tokenizer.ggml.token_type: {e}")))?;
                list.iter()
                    .map(|t| {
                        t.to_i32()
                            .map_err(|e| Error::Format(format!("tokenizer.ggml.token_type: {e}")))
                    })
                    .collect::<Result<_>>()?
            }
        };
        if types.len() != tokens.len() {
            return Err(Error::Format(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let bos = md_u32(content, "tokenizer.ggml.bos_token_id")?.ok_or_else(|| {
            Error::Format("GGUF metadata has no tokenizer.ggml.bos_token_id".into())
        })?;
        let eos = md_u32(content, "tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
            Error::Format("GGUF metadata has no tokenizer.ggml.eos_token_id".into())
        })?;
        let pad = md_u32(content, "tokenizer.ggml.padding_token_id")?;
        let unknown = md_u32(content, "tokenizer.ggml.unknown_token_id")?;
        Tokenizer::from_parts(
            tokens,
            &merges,
            &types,
            SpecialTokens {
                bos,
                eos,
                pad,
                unknown,
            },
        )
    }

    /// Reads the metadata of a GGUF file and builds its tokenizer.
    pub fn from_gguf_file(path: &Path) -> Result<Tokenizer> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        Tokenizer::from_gguf(&content)
    }

    fn from_parts(
        tokens: Vec<String>,
        merges: &[String],
        types: &[i32],
        special_ids: SpecialTokens,
    ) -> Result<Tokenizer> {
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Format("empty token list".into()));
        }
        for (name, id) in [
            ("bos", Some(special_ids.bos)),
            ("eos", Some(special_ids.eos)),
            ("pad", special_ids.pad),
            ("unknown", special_ids.unknown),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(Error::Format(format!(
                        "{name} token id {id} outside the vocabulary of {n}"
                    )));
                }
            }
        }
        let merges = merges
            .iter()
            .map(|m| {
                let mut parts = m.splitn(2, ' ');
                match (parts.next(), parts.next()) {
                    (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                        Ok((a.to_string(), b.to_string()))
                    }
                    _ => Err(Error::Format(format!("malformed BPE merge {m:?}"))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;

        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))));
        tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        let special: Vec<bool> = types.iter().map(|&t| t == TOKEN_TYPE_CONTROL).collect();
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false))
            .collect();
        tok.add_special_tokens(control)
            .map_err(|e| Error::Tokenizer(format!("adding control tokens: {e}")))?;
        tok.add_tokens(user)
            .map_err(|e| Error::Tokenizer(format!("adding user-defined tokens: {e}")))?;
        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);

        let to_byte = unicode_to_byte();
        let bytes = tokens
            .iter()
            .zip(types)
            .map(|(t, &ty)| {
                if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                    return t.as_bytes().to_vec();
                }
                t.chars()
                    .map(|c| to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    // A token outside the byte alphabet decodes to its own text,
                    // which is what the byte-level decoder does with it too.
                    .unwrap_or_else(|| t.as_bytes().to_vec())
            })
            .collect();
        let ids = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Ok(Tokenizer {
            with_special: tok,
            plain,
            bytes,
            special,
            ids,
            special_ids,
        })
    }

    /// Encodes text; the literal text of a special token (`<|im_start|>`)
    /// becomes that token. No BOS is added (SmolLM2 adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .with_special
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text, treating the text of special tokens as ordinary
    /// characters (for untrusted content placed inside a template).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; with `skip_special` the control tokens are left
    /// out. Invalid UTF-8 (a multi-byte character cut between tokens) becomes
    /// U+FFFD. Unknown ids are an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.with_special
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The exact bytes a token stands for (a special token: its literal
    /// text), or `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(Vec::as_slice)
    }

    /// Whether `id` is a control (special) token such as `<|im_end|>`.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of a token given its vocabulary string (byte-level form, e.g.
    /// `"Ġthe"`, or a special token's text).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// The special token ids.
    pub fn special_tokens(&self) -> SpecialTokens {
        self.special_ids
    }

    /// Errors with [`Error::InvalidArgument`] if any id is outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.bytes.len()) {
            None => Ok(()),
            Some(id) => Err(Error::InvalidArgument(format!(
                "token id {id} is outside the vocabulary of {}",
                self.bytes.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
