//! Text generation: greedy or sampled decoding with streaming output.
//!
//! [`Llm`] bundles what one GGUF file provides (model, tokenizer, chat
//! template), loaded with one read of the file. Generation runs the prompt
//! through a request-owned [`KvCache`], then decodes one token at a time:
//!
//! * greedy (deterministic: same prompt, same output) or sampled with
//!   temperature, top-k and top-p from a seeded RNG (same seed, same output);
//! * stops at the end-of-turn token, at extra stop tokens, at stop strings
//!   (which are cut from the text), at `max_tokens`, at the context window, or
//!   when the streaming callback asks to stop;
//! * the callback receives text pieces that are always whole UTF-8
//!   characters (a character split over two tokens arrives with the second)
//!   and never the beginning of a stop string that later completes.
//!
//! A daemon calls this from a worker thread: [`Llm`] is `Send + Sync` and
//! every call owns its own cache.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chat::{ChatTemplate, Message};
use crate::gguf_llama::{KvCache, LlamaModel, LoadOptions, TokenScore};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A language model with its tokenizer and chat template, from one GGUF file.
#[derive(Debug)]
pub struct Llm {
    /// The network.
    pub model: LlamaModel,
    /// The tokenizer rebuilt from the file's metadata.
    pub tokenizer: Tokenizer,
    /// The file's chat template.
    pub chat: ChatTemplate,
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token (ties: the lowest id).
    Greedy,
    /// Random draw from the tempered, truncated distribution.
    Sample {
        /// Softmax temperature (> 0; lower is more conservative).
        temperature: f32,
        /// Keep the smallest set of most likely tokens whose mass reaches
        /// `top_p` (1.0 keeps all).
        top_p: f32,
        /// Keep at most this many most likely tokens (`None`: no limit).
        top_k: Option<usize>,
        /// RNG seed: the same seed gives the same output.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Stop at the tokenizer's end-of-sequence token (`<|im_end|>`).
    pub stop_at_eos: bool,
    /// More tokens that end generation (not part of the output).
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation; the text is cut where the first one starts.
    pub stop_strings: Vec<String>,
    /// Divide positive logits (multiply negative ones) of recently seen
    /// tokens by this (1.0: off).
    pub repeat_penalty: f32,
    /// How many recent tokens (prompt included) the penalty looks at.
    pub repeat_last_n: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_tokens: 256,
            sampling: Sampling::Greedy,
            stop_at_eos: true,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            repeat_penalty: 1.0,
            repeat_last_n: 64,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (end of sequence/turn or one of `stop_tokens`) was produced.
    StopToken(u32),
    /// A stop string appeared in the text.
    StopString(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The streaming callback asked to stop.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text (stop token and stop string excluded).
    pub text: String,
    /// The generated tokens (stop token excluded).
    pub tokens: Vec<u32>,
    /// `log p(token)` of each generated token under the model (before any
    /// repeat penalty): the teacher-forced score of the answer, for free.
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens of prompt processed (not counting what the cache already held).
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt.
    pub prompt_secs: f64,
    /// Seconds spent generating after the prompt.
    pub generate_secs: f64,
}

impl Llm {
    /// Loads model, tokenizer and chat template from one GGUF file.
    pub fn load(path: &Path, device: &Device, options: &LoadOptions) -> Result<Llm> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let chat = ChatTemplate::from_gguf(&content, &tokenizer)?;
        let model = LlamaModel::from_gguf(&content, &mut file, device, options)?;
        if model.config().vocab_size < tokenizer.vocab_size() {
            return Err(Error::Format(format!(
                "the tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        Ok(Llm {
            model,
            tokenizer,
            chat,
        })
    }

    /// Answers a conversation: renders it with the chat template and
    /// generates the assistant's turn (stopping at `<|im_end|>`).
    pub fn chat(
        &self,
        messages: &[Message],
        config: &GenerateConfig,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let prompt = self.chat.encode(&self.tokenizer, messages)?;
        let mut config = config.clone();
        config.stop_tokens.push(self.chat.end_of_turn());
        let mut cache = self.model.new_cache();
        self.generate_with_cache(&prompt, &mut cache, &config, on_text)
    }

    /// Generates a continuation of `prompt` (token ids) with a fresh cache.
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerateConfig,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut cache = self.model.new_cache();
        self.generate_with_cache(prompt, &mut cache, config, on_text)
    }

    /// Generates after what `cache` already holds followed by `prompt` (at
    /// least one token: the last prompt token yields the first logits). The
    /// cache then holds the prompt and the generated tokens except the last
    /// one produced (it was never fed back).
    pub fn generate_with_cache(
        &self,
        prompt: &[u32],
        cache: &mut KvCache,
        config: &GenerateConfig,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("generate: empty prompt".into()));
        }
        if cache.len() + prompt.len() > cache.max_len() {
            return Err(Error::InvalidArgument(format!(
                "generate: {} tokens of context exceed the window of {}",
                cache.len() + prompt.len(),
                cache.max_len()
            )));
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = config.sampling
        {
            let ok = temperature.is_finite() && temperature >= 0.0 && top_p > 0.0 && top_p <= 1.0;
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "sampling needs temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
                )));
            }
        }
        if !(config.repeat_penalty.is_finite() && config.repeat_penalty > 0.0) {
            return Err(Error::InvalidArgument(
                "repeat_penalty must be positive".into(),
            ));
        }
        let stops = self.stop_tokens(config);
        let stop_strings: Vec<&str> = config
            .stop_strings
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let mut rng = match config.sampling {
            Sampling::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed)),
            Sampling::Greedy => None,
        };

        let started = Instant::now();
        let mut logits = self.model.forward_last(prompt, cache)?.to_vec1::<f32>()?;
        let prompt_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();

        let mut recent: Vec<u32> = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        let mut stream = TextStream::new(&stop_strings);
        let mut finish = FinishReason::MaxTokens;
        while tokens.len() < config.max_tokens {
            let lse = log_sum_exp(&logits);
            let raw = (config.repeat_penalty != 1.0).then(|| logits.clone());
            if config.repeat_penalty != 1.0 {
                let from = recent.len().saturating_sub(config.repeat_last_n);
                apply_repeat_penalty(&mut logits, &recent[from..], config.repeat_penalty);
            }
            let next = match (config.sampling, rng.as_mut()) {
                (
                    Sampling::Sample {
                        temperature,
                        top_p,
                        top_k,
                        ..
                    },
                    Some(rng),
                ) if temperature > 0.0 => sample(&logits, temperature, top_p, top_k, rng),
                _ => argmax(&logits),
            };
            if stops.contains(&next) {
                finish = FinishReason::StopToken(next);
                break;
            }
            logprobs.push(raw.as_deref().unwrap_or(&logits)[next as usize] - lse);
            tokens.push(next);
            recent.push(next);
            match stream.push(self.text_bytes(next), &mut on_text) {
                StreamState::Go => {}
                StreamState::StopString(s) => {
                    finish = FinishReason::StopString(s);
                    break;
                }
                StreamState::Cancelled => {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            if tokens.len() == config.max_tokens {
                break;
            }
            if cache.len() + 1 > cache.max_len() {
                finish = FinishReason::ContextFull;
                break;
            }
            logits = self.model.forward_last(&[next], cache)?.to_vec1::<f32>()?;
        }
        let text = stream.finish(&finish, &mut on_text);
        Ok(Generation {
            text,
            tokens,
            logprobs,
            finish,
            prompt_tokens: prompt.len(),
            prompt_secs,
            generate_secs: started.elapsed().as_secs_f64(),
        })
    }
}

impl Llm {
    /// Greedy answer to a conversation, taking as much as it can of a
    /// `draft` continuation that was checked in one teacher-forced pass.
    ///
    /// `checked[i]` is the [`score_detailed`](LlamaModel::score_detailed)
    /// entry of `draft[i]` with the rendered conversation as the prompt (so
    /// `checked[i].argmax` is what greedy decoding picks after the prompt and
    /// `draft[..i]`); score the draft followed by the end-of-turn token so
    /// that its ending is checked too. Decoding follows the draft while greedy
    /// decoding agrees with it, takes greedy's token at the first
    /// disagreement, and generates the rest normally: the result is greedy
    /// decoding of the conversation, whatever the draft said, at the cost of
    /// the tokens after the disagreement only.
    ///
    /// Returns `None` when `config` is not plain greedy decoding (sampling, a
    /// repeat penalty or stop strings), where a draft cannot be checked this
    /// way; the caller then generates from scratch.
    pub fn chat_from_draft(
        &self,
        messages: &[Message],
        draft: &[u32],
        checked: &[TokenScore],
        config: &GenerateConfig,
    ) -> Result<Option<Generation>> {
        let plain = matches!(config.sampling, Sampling::Greedy)
            && config.repeat_penalty == 1.0
            && config.stop_strings.iter().all(String::is_empty);
        if !plain {
            return Ok(None);
        }
        if checked.len() != draft.len() {
            return Err(Error::InvalidArgument(format!(
                "chat_from_draft: {} checked positions for a draft of {} tokens",
                checked.len(),
                draft.len()
            )));
        }
        let started = Instant::now();
        let prompt = self.chat.encode(&self.tokenizer, messages)?;
        let mut config = config.clone();
        config.stop_tokens.push(self.chat.end_of_turn());
        let stops = self.stop_tokens(&config);
        let mut tokens: Vec<u32> = Vec::new();
        let mut logprobs: Vec<f32> = Vec::new();
        let mut finish = None;
        for (&d, c) in draft.iter().zip(checked) {
            if tokens.len() >= config.max_tokens {
                finish = Some(FinishReason::MaxTokens);
                break;
            }
            if stops.contains(&c.argmax) {
                finish = Some(FinishReason::StopToken(c.argmax));
                break;
            }
            tokens.push(c.argmax);
            logprobs.push(c.argmax_logprob);
            if c.argmax != d {
                break;
            }
        }
        let prompt_tokens = prompt.len();
        let finish = match finish {
            Some(f) => f,
            None if tokens.len() >= config.max_tokens => FinishReason::MaxTokens,
            None => {
                // Past the checked part: decode the rest after everything
                // accepted so far.
                let cont = GenerateConfig {
                    max_tokens: config.max_tokens - tokens.len(),
                    ..config.clone()
                };
                let mut input = prompt.clone();
                input.extend_from_slice(&tokens);
                let g = self.generate(&input, &cont, |_| ControlFlow::Continue(()))?;
                tokens.extend_from_slice(&g.tokens);
                logprobs.extend_from_slice(&g.logprobs);
                g.finish
            }
        };
        let mut stream = TextStream::new(&[]);
        let mut quiet = |_: &str| ControlFlow::Continue(());
        for &t in &tokens {
            stream.push(self.text_bytes(t), &mut quiet);
        }
        let text = stream.finish(&finish, &mut quiet);
        Ok(Some(Generation {
            text,
            tokens,
            logprobs,
            finish,
            prompt_tokens,
            prompt_secs: 0.0,
            generate_secs: started.elapsed().as_secs_f64(),
        }))
    }
}

impl Llm {
    /// Every token that ends a generation under `config`: its stop tokens,
    /// and end-of-sequence when `stop_at_eos`.
    fn stop_tokens(&self, config: &GenerateConfig) -> Vec<u32> {
        let mut stops = config.stop_tokens.clone();
        if config.stop_at_eos {
            stops.push(self.tokenizer.special_tokens().eos);
        }
        stops
    }

    /// The text bytes a generated token adds (none for special tokens).
    fn text_bytes(&self, token: u32) -> &[u8] {
        if self.tokenizer.is_special(token) {
            &[]
        } else {
            self.tokenizer.token_bytes(token).unwrap_or(&[])
        }
    }
}

/// `ln Σ exp(l)`, computed stably.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

/// The most likely token (lowest id on ties).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn apply_repeat_penalty(logits: &mut [f32], recent: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::with_capacity(recent.len());
    for &t in recent {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Draws a token from softmax(logits / temperature), restricted to the top-k
/// tokens and then to the top-p nucleus.
fn sample(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    top_k: Option<usize>,
    rng: &mut StdRng,
) -> u32 {
    let n = logits.len();
    let k_limit = top_k.unwrap_or(n).clamp(1, n);
    // Candidates in decreasing logit order; grow the candidate set only as
    // far as the nucleus needs (sorting the full vocabulary per token is slow).
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |l: f32| ((l - max) / temperature).exp();
    let total: f32 = if top_p < 1.0 {
        logits.iter().map(|&l| weight(l)).sum()
    } else {
        0.0
    };
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut take = if top_p < 1.0 {
        64.min(k_limit)
    } else {
        k_limit
    };
    let chosen: Vec<(u32, f32)> = loop {
        if take < n {
            idx.select_nth_unstable_by(take - 1, by_logit);
        }
        let mut head: Vec<u32> = idx[..take].to_vec();
        head.sort_unstable_by(by_logit);
        if top_p >= 1.0 {
            break head
                .into_iter()
                .map(|t| (t, weight(logits[t as usize])))
                .collect();
        }
        let mut mass = 0.0;
        let mut out = Vec::new();
        for t in head {
            let w = weight(logits[t as usize]);
            out.push((t, w));
            mass += w;
            if mass >= top_p * total {
                break;
            }
        }
        if mass >= top_p * total || take >= k_limit {
            break out;
        }
        take = (take * 4).min(k_limit);
    };
    let sum: f32 = chosen.iter().map(|c| c.1).sum();
    let mut r = rng.random::<f32>() * sum;
    for &(t, w) in &chosen {
        r -= w;
        if r <= 0.0 {
            return t;
        }
    }
    chosen.last().map(|c| c.0).unwrap_or_else(|| argmax(logits))
}

/// What [`TextStream::push`] decided.
enum StreamState {
    Go,
    StopString(String),
    Cancelled,
}

/// Turns token bytes into text pieces at UTF-8 boundaries, holding back what
/// could be the start of a stop string.
struct TextStream<'a> {
    stops: &'a [&'a str],
    /// Bytes not yet valid UTF-8 (an incomplete character).
    pending: Vec<u8>,
    /// All decoded text.
    text: String,
    /// Bytes of `text` already given to the callback.
    emitted: usize,
    cancelled: bool,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [&'a str]) -> Self {
        TextStream {
            stops,
            pending: Vec::new(),
            text: String::new(),
            emitted: 0,
            cancelled: false,
        }
    }

    fn emit(&mut self, upto: usize, on_text: &mut impl FnMut(&str) -> ControlFlow<()>) {
        if upto > self.emitted && !self.cancelled {
            if on_text(&self.text[self.emitted..upto]).is_break() {
                self.cancelled = true;
            }
            self.emitted = upto;
        }
    }

    fn push(
        &mut self,
        bytes: &[u8],
        on_text: &mut impl FnMut(&str) -> ControlFlow<()>,
    ) -> StreamState {
        self.pending.extend_from_slice(bytes);
        // Move every complete character to `text`; invalid bytes become U+FFFD.
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.text
                        .push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        // A stop string cannot start in emitted text: we never emit a tail
        // that could begin one.
        let fresh = &self.text[self.emitted..];
        let hit = self
            .stops
            .iter()
            .filter_map(|s| fresh.find(s).map(|p| (p, *s)))
            .min_by_key(|(p, _)| *p);
        if let Some((p, s)) = hit {
            let cut = self.emitted + p;
            self.text.truncate(cut);
            self.pending.clear();
            self.emit(cut, on_text);
            return StreamState::StopString(s.to_string());
        }
        let hold = self.holdback();
        self.emit(self.text.len() - hold, on_text);
        if self.cancelled {
            StreamState::Cancelled
        } else {
            StreamState::Go
        }
    }

    /// Length of the longest suffix of the unemitted text that is a proper
    /// prefix of a stop string.
    fn holdback(&self) -> usize {
        let fresh = &self.text[self.emitted..];
        let mut best = 0;
        for s in self.stops {
            for k in (1..s.len().min(fresh.len() + 1)).rev() {
                if k <= best {
                    break;
                }
                let start = fresh.len() - k;
                if fresh.is_char_boundary(start)
                    && s.as_bytes().starts_with(&fresh.as_bytes()[start..])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    /// Flushes what was held back and returns the whole text.
    fn finish(
        mut self,
        reason: &FinishReason,
        on_text: &mut impl FnMut(&str) -> ControlFlow<()>,
    ) -> String {
        if !matches!(reason, FinishReason::StopString(_)) {
            if !self.pending.is_empty() {
                let tail = String::from_utf8_lossy(&self.pending).into_owned();
                self.text.push_str(&tail);
            }
            self.emit(self.text.len(), on_text);
        }
        self.text
    }
}

#[cfg(test)]
mod tests;
