//! Tokenizers: a thin wrapper over the `tokenizers` crate, and streaming detokenisation.

use std::path::Path;

use crate::{Error, Result};

/// A text tokenizer (from tokenizer.json).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({} tokens)", self.inner.get_vocab_size(true))
    }
}

impl Tokenizer {
    /// Loads a tokenizer.json.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built elsewhere (from GGUF metadata, say).
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Tokenizer {
        Tokenizer { inner }
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `special` adds the tokenizer's special tokens (BOS) as its
    /// post-processor says.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, special).map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(format!("cannot decode: {e}")))
    }
}

/// Turns a stream of token ids into a stream of text pieces. Tokens do not map to whole
/// characters (byte-level BPE splits UTF-8 sequences, SentencePiece drops a leading space at the
/// start of a decode), so each step decodes a short window of recent tokens twice, with and
/// without the pending ones, and emits the difference once it is complete text.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// End of the tokens already emitted.
    read: usize,
}

impl<'a> TextStream<'a> {
    /// A stream with no tokens yet.
    pub fn new(tok: &'a Tokenizer) -> TextStream<'a> {
        TextStream { tok, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds a token; returns the newly complete text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.take(false)
    }

    /// Whatever is left, complete or not.
    pub fn finish(&mut self) -> Result<String> {
        self.take(true)
    }

    fn take(&mut self, force: bool) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tok.decode(&self.ids[self.prefix..])?;
        if after.len() <= before.len() || (!force && after.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        let new = match after.get(before.len()..) {
            Some(s) if after.starts_with(&before) => s.to_string(),
            // The window re-tokenised differently: emit the whole new decode's tail by chars.
            _ => after.chars().skip(before.chars().count()).collect(),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new)
    }
}
