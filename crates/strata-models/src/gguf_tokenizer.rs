//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built as a
//! [`tokenizers::Tokenizer`] that encodes and decodes exactly like the one transformers builds
//! for the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, transformers 5.24:
//! `integrations/gguf/gguf_tokenizer_mapping.py` and the tokenizer classes it hands off to).
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE (as transformers' `GPT2Tokenizer`). Tokens are spelled in GPT-2's
//!   byte alphabet; a token using any other character is respelled from its UTF-8 bytes. Merges
//!   come from `tokenizer.ggml.merges`. The pre-tokenizer is `ByteLevel` with its built-in GPT-2
//!   regex, unless `tokenizer.ggml.pre` names a split regex transformers knows (`llama-bpe`,
//!   `qwen2`, `tekken`, ...), which then runs first and `ByteLevel` only maps bytes.
//! - `llama`: SentencePiece-style BPE (as transformers' `LlamaTokenizer`): `▁` for spaces, a
//!   `Metaspace` pre-tokenizer that prepends `▁` to the first section, byte fallback to the
//!   `<0xNN>` tokens, no unknown token. Merges come from the file or, when it has none (the
//!   usual case), are derived from the token scores the way transformers' `generate_merges`
//!   does. Architecture `phi3` prepends `▁` with a normalizer instead.
//!
//! Added tokens, as transformers adds them: the tokenizer class's default special tokens
//! (`<|endoftext|>` for `gpt2`; `<unk>`, `<s>`, `</s>` for `llama`), every token of type 3
//! (control) as a special token (for `gpt2` only when spelled in the byte alphabet), every token
//! of type 4 (user-defined) that is in the vocabulary as a plain added token, and the tokens
//! named by `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` as special tokens. None of them
//! is normalized. The post-processor prepends BOS when `tokenizer.ggml.add_bos_token` is set
//! (default: true for `llama`, false otherwise) and appends EOS when `add_eos_token` is set.
//! `tokenizer.ggml.add_space_prefix` is ignored, as transformers ignores it.
//!
//! One deliberate difference: transformers adds a default or named special token that is not in
//! the vocabulary at all (`<|endoftext|>` in a Llama 3 vocabulary) under a new id past the end of
//! the model's embedding table; strata does not add such a token, so that text is tokenized as
//! plain text (as llama.cpp does) and every id stays inside the vocabulary.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::{GgufError, Metadata};

/// `tokenizer.ggml.model`: `gpt2` or `llama`.
pub const KEY_MODEL: &str = "tokenizer.ggml.model";
/// `tokenizer.ggml.pre`: which split regex a `gpt2` vocabulary was trained with.
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
/// `tokenizer.ggml.tokens`: the vocabulary, by id.
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// `tokenizer.ggml.scores`: one score per token (SentencePiece vocabularies).
pub const KEY_SCORES: &str = "tokenizer.ggml.scores";
/// `tokenizer.ggml.token_type`: one [`TokenType`] per token.
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// `tokenizer.ggml.merges`: BPE merges, `"left right"`, best first.
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// `tokenizer.ggml.bos_token_id`.
pub const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
/// `tokenizer.ggml.eos_token_id`.
pub const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
/// `tokenizer.ggml.unknown_token_id`.
pub const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
/// `tokenizer.ggml.padding_token_id`.
pub const KEY_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
/// `tokenizer.ggml.add_bos_token`.
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// `tokenizer.ggml.add_eos_token`.
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";

/// A token's type in `tokenizer.ggml.token_type`, as llama.cpp numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// An ordinary token (1).
    Normal = 1,
    /// The unknown token (2).
    Unknown = 2,
    /// A control token such as `<s>` or `<|im_start|>` (3).
    Control = 3,
    /// A user-defined token, matched whole in text (4).
    UserDefined = 4,
    /// A placeholder (5).
    Unused = 5,
    /// A byte-fallback token `<0xNN>` (6).
    Byte = 6,
}

impl TokenType {
    /// The type for a `token_type` value.
    pub fn from_id(id: i64) -> Option<TokenType> {
        Some(match id {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

/// The split regex transformers puts before the byte-level mapping for a `tokenizer.ggml.pre`
/// value (`GGUF_PRE_TOKENIZER_SPLITS`), or `None` for GPT-2's own.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const TEKKEN: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const QWEN2: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const QWEN35: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
        r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    const GPT4O: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's byte alphabet: the printable character standing for each byte value.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_unprintable = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next_unprintable).expect("256..324 are valid scalar values");
            next_unprintable += 1;
            c
        };
    }
    table
}

/// Builds the tokenizer that `meta`'s `tokenizer.ggml.*` keys describe (see the module docs).
pub fn tokenizer_from_gguf(meta: &Metadata) -> Result<Tokenizer, GgufError> {
    let builder = Builder::new(meta)?;
    builder.build()
}

/// The vocabulary kind, with what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `gpt2`: byte-level BPE.
    ByteLevel,
    /// `llama`: SentencePiece BPE with `Metaspace`.
    SentencePiece,
    /// `llama` under architecture `phi3`: the prefix space comes from a normalizer.
    SentencePiecePhi3,
}

struct Builder<'a> {
    meta: &'a Metadata,
    kind: Kind,
    tokens: &'a [String],
    token_types: Vec<i64>,
}

impl<'a> Builder<'a> {
    fn new(meta: &'a Metadata) -> Result<Builder<'a>, GgufError> {
        let model = meta.get_str(KEY_MODEL)?;
        let architecture = meta.opt_str("general.architecture")?.unwrap_or_default();
        let kind = match (model, architecture) {
            ("gpt2", _) => Kind::ByteLevel,
            ("llama", "gemma" | "gemma2" | "gemma3") => {
                return Err(error(
                    meta,
                    format!("the SentencePiece vocabulary of architecture {architecture:?} is not supported yet"),
                ));
            }
            ("llama", "phi3") => Kind::SentencePiecePhi3,
            ("llama", _) => Kind::SentencePiece,
            (other, _) => {
                return Err(error(
                    meta,
                    format!("{KEY_MODEL} {other:?} is not supported (strata builds \"gpt2\" and \"llama\")"),
                ));
            }
        };
        let tokens = meta.get_str_array(KEY_TOKENS)?;
        if u32::try_from(tokens.len()).is_err() {
            return Err(error(meta, format!("{} tokens do not fit u32 ids", tokens.len())));
        }
        let token_types = meta.opt_int_array(KEY_TOKEN_TYPE)?.unwrap_or_default();
        Ok(Builder { meta, kind, tokens, token_types })
    }

    fn build(&self) -> Result<Tokenizer, GgufError> {
        let mut tokenizer = match self.kind {
            Kind::ByteLevel => self.byte_level()?,
            Kind::SentencePiece | Kind::SentencePiecePhi3 => self.sentencepiece()?,
        };
        self.add_tokens(&mut tokenizer)?;
        self.set_post_processor(&mut tokenizer)?;
        Ok(tokenizer)
    }

    /// The tokens with their types, paired as far as both lists go (as Python's `zip`).
    fn typed_tokens(&self, wanted: TokenType) -> impl Iterator<Item = &'a str> + '_ {
        self.tokens
            .iter()
            .zip(&self.token_types)
            .filter(move |&(_, &t)| t == wanted as i64)
            .map(|(token, _)| token.as_str())
    }

    fn merges(&self) -> Result<Option<Merges>, GgufError> {
        let Some(merges) = self.meta.opt_str_array(KEY_MERGES)? else { return Ok(None) };
        merges
            .iter()
            .map(|m| {
                let mut parts = m.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_owned(), b.to_owned())),
                    _ => Err(error(self.meta, format!("merge {m:?} is not two tokens separated by one space"))),
                }
            })
            .collect::<Result<Merges, _>>()
            .map(Some)
    }

    /// The file's merges or, when it has none, the ones its tokens and scores imply (for
    /// either vocabulary kind, as transformers' `get_merges`).
    fn merges_or_derived(&self) -> Result<Merges, GgufError> {
        match self.merges()? {
            Some(merges) => Ok(merges),
            None => Ok(merges_from_scores(self.tokens, self.meta.get_f32_array(KEY_SCORES)?)),
        }
    }

    fn added_error(&self, e: impl std::fmt::Display) -> GgufError {
        error(self.meta, format!("cannot add tokens: {e}"))
    }

    fn bpe_error(&self, e: impl std::fmt::Display) -> GgufError {
        error(self.meta, format!("cannot build the BPE model: {e}"))
    }

    fn byte_level(&self) -> Result<Tokenizer, GgufError> {
        let alphabet = byte_alphabet();
        let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| {
                let spelled = if token.chars().all(|c| in_alphabet.contains(&c)) {
                    token.clone()
                } else {
                    token.bytes().map(|b| alphabet[b as usize]).collect()
                };
                (spelled, id as u32)
            })
            .collect();
        let merges = self.merges_or_derived()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
            .build()
            .map_err(|e| self.bpe_error(e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = self.meta.opt_str(KEY_PRE)?.unwrap_or_default();
        let pre_tokenizer: PreTokenizerWrapper = match pre_tokenizer_split(pre) {
            Some(regex) => {
                let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| error(self.meta, format!("the split regex for {KEY_PRE} {pre:?}: {e}")))?;
                PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            None => ByteLevel::new(false, true, true).into(),
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tokenizer)
    }

    fn sentencepiece(&self) -> Result<Tokenizer, GgufError> {
        // Python's `{token: index for index, token in enumerate(tokens)}`: a repeated token keeps
        // its last id.
        let vocab: Vocab = self.tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let merges = self.merges_or_derived()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| self.bpe_error(e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        if self.kind == Kind::SentencePiecePhi3 {
            let replace = Replace::new(" ", "\u{2581}").map_err(|e| error(self.meta, e.to_string()))?;
            let normalizer: NormalizerWrapper =
                NormalizerSequence::new(vec![Prepend::new("\u{2581}".to_owned()).into(), replace.into()]).into();
            tokenizer.with_normalizer(Some(normalizer)).map_err(|e| error(self.meta, e.to_string()))?;
        } else {
            tokenizer.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', PrependScheme::First, false)));
        }
        let replace = Replace::new("\u{2581}", " ").map_err(|e| error(self.meta, e.to_string()))?;
        let decoders: Vec<DecoderWrapper> =
            vec![replace.into(), ByteFallback::new().into(), Fuse::new().into(), Strip::new(' ', 1, 0).into()];
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }

    /// Whether `content` is a key of the model's vocabulary or already an added token.
    fn known(tokenizer: &Tokenizer, content: &str) -> bool {
        tokenizer.token_to_id(content).is_some()
    }

    fn add_tokens(&self, tokenizer: &mut Tokenizer) -> Result<(), GgufError> {
        let special = |content: &str| AddedToken::from(content, true).normalized(false);

        // 1. The defaults of the tokenizer class transformers instantiates.
        let defaults: &[&str] = match self.kind {
            Kind::ByteLevel => &["<|endoftext|>"],
            Kind::SentencePiece | Kind::SentencePiecePhi3 => &["<unk>", "<s>", "</s>"],
        };
        let defaults: Vec<AddedToken> =
            defaults.iter().filter(|t| Self::known(tokenizer, t)).map(|t| special(t)).collect();
        tokenizer.add_special_tokens(defaults).map_err(|e| self.added_error(e))?;

        // 2. Control tokens, as special tokens. In a byte-level vocabulary a control token
        // spelled outside the byte alphabet is a llama.cpp mislabel that transformers skips.
        let in_alphabet: HashSet<char> = byte_alphabet().into_iter().collect();
        let control: Vec<AddedToken> = self
            .typed_tokens(TokenType::Control)
            .filter(|t| self.kind != Kind::ByteLevel || t.chars().all(|c| in_alphabet.contains(&c)))
            .map(special)
            .collect();
        tokenizer.add_special_tokens(control).map_err(|e| self.added_error(e))?;

        // 3. User-defined tokens that the vocabulary holds under their own spelling, as plain
        // added tokens matched whole.
        let user: Vec<AddedToken> = self
            .typed_tokens(TokenType::UserDefined)
            .filter(|t| Self::known(tokenizer, t))
            .map(|t| AddedToken::from(t, false).normalized(false))
            .collect();
        tokenizer.add_tokens(user).map_err(|e| self.added_error(e))?;

        // 4. The named special tokens, unless already added (as anything).
        let added: HashSet<String> = tokenizer.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
        let mut named = Vec::new();
        for key in [KEY_BOS_ID, KEY_EOS_ID, KEY_UNK_ID, KEY_PAD_ID] {
            if let Some(content) = self.named_token(key)?
                && !added.contains(content)
                && Self::known(tokenizer, content)
            {
                named.push(special(content));
            }
        }
        tokenizer.add_tokens(named).map_err(|e| self.added_error(e))?;
        Ok(())
    }

    /// The token that `key` (`tokenizer.ggml.bos_token_id`, ...) names, if the key is present.
    fn named_token(&self, key: &str) -> Result<Option<&'a str>, GgufError> {
        let Some(id) = self.meta.opt_u32(key)? else { return Ok(None) };
        match self.tokens.get(id as usize) {
            Some(token) => Ok(Some(token)),
            None => Err(error(self.meta, format!("{key} {id} is past the {} tokens", self.tokens.len()))),
        }
    }

    /// The id the tokenizer gives `content`, or the GGUF id when the content is not a token of
    /// the built tokenizer (a name respelled in a byte-level vocabulary).
    fn special_id(&self, tokenizer: &Tokenizer, key: &str, content: &str) -> Result<u32, GgufError> {
        match tokenizer.token_to_id(content) {
            Some(id) => Ok(id),
            None => self.meta.get_u32(key),
        }
    }

    fn set_post_processor(&self, tokenizer: &mut Tokenizer) -> Result<(), GgufError> {
        let default_bos = matches!(self.kind, Kind::SentencePiece | Kind::SentencePiecePhi3);
        let bos = self.named_token(KEY_BOS_ID)?;
        let eos = self.named_token(KEY_EOS_ID)?;
        let add_bos = self.meta.opt_bool(KEY_ADD_BOS)?.unwrap_or(default_bos) && bos.is_some();
        let add_eos = self.meta.opt_bool(KEY_ADD_EOS)?.unwrap_or(false) && eos.is_some();

        let mut special_tokens = Vec::new();
        let mut bos_piece = None;
        let mut eos_piece = None;
        if let (true, Some(content)) = (add_bos, bos) {
            let id = self.special_id(tokenizer, KEY_BOS_ID, content)?;
            let piece = template_key(content, "bos");
            special_tokens.push(
                SpecialToken::new(piece.clone(), vec![id], vec![content.to_owned()])
                    .map_err(|e| error(self.meta, format!("the BOS template token: {e}")))?,
            );
            bos_piece = Some(piece);
        }
        if let (true, Some(content)) = (add_eos, eos) {
            let id = self.special_id(tokenizer, KEY_EOS_ID, content)?;
            let piece = template_key(content, "eos");
            special_tokens.push(
                SpecialToken::new(piece.clone(), vec![id], vec![content.to_owned()])
                    .map_err(|e| error(self.meta, format!("the EOS template token: {e}")))?,
            );
            eos_piece = Some(piece);
        }
        // transformers: single = "[bos:0] $A:0 [eos:0]", pair = single + " [bos:1] $B:1 [eos:1]".
        let sequence = |name: &str, type_id: u32| {
            let mut out = Vec::new();
            out.extend(bos_piece.iter().map(|bos| format!("{bos}:{type_id}")));
            out.push(format!("{name}:{type_id}"));
            out.extend(eos_piece.iter().map(|eos| format!("{eos}:{type_id}")));
            out
        };
        let single = sequence("$A", 0);
        let pair = [sequence("$A", 0), sequence("$B", 1)].concat();
        let processor = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| error(self.meta, format!("the post-processor template: {e}")))?
            .special_tokens(special_tokens)
            .build()
            .map_err(|e| error(self.meta, format!("the post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(processor));
        Ok(())
    }
}

/// The name a special token goes by in the post-processor's template: its content, as
/// transformers writes it, unless the template syntax cannot carry it (a `:`, whitespace or a
/// leading `$`), in which case a fixed name stands in. The name never reaches the encoding.
fn template_key(content: &str, fallback: &str) -> String {
    let plain = !content.is_empty()
        && !content.starts_with('$')
        && !content.contains(':')
        && !content.chars().any(char::is_whitespace);
    if plain { content.to_owned() } else { fallback.to_owned() }
}

/// BPE merges recovered from a SentencePiece vocabulary's scores, as transformers'
/// `generate_merges(vocab, vocab_scores)` does: every split of every token into two tokens of
/// the vocabulary is a merge, ranked by the merged token's score (highest first), then by the
/// lengths of the left and right parts (longest first), then by the ids of the parts.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Merges {
    // Python's dicts: a repeated token keeps its first position, its last id and its last score.
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token, id as u32);
    }
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        if score_of.insert(token, score).is_none() {
            order.push(token);
        }
    }

    struct Candidate<'t> {
        left: &'t str,
        right: &'t str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut candidates = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<(u32, u32, Candidate<'_>)> = Vec::new();
        let total_chars = token.chars().count();
        for (left_chars, (split, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                let right_chars = total_chars - left_chars;
                local.push((l, r, Candidate { left, right, score, left_chars, right_chars }));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        candidates.extend(local.into_iter().map(|(_, _, c)| c));
    }
    // Python's `sorted(..., key=(score, len(left), len(right)), reverse=True)` is stable: equal
    // keys keep their order.
    candidates.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(b.left_chars.cmp(&a.left_chars)).then(b.right_chars.cmp(&a.right_chars))
    });
    candidates.into_iter().map(|c| (c.left.to_owned(), c.right.to_owned())).collect()
}

fn error(meta: &Metadata, what: String) -> GgufError {
    GgufError::Tokenizer { path: meta.path().to_owned(), what }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::GgufWriter;
    use crate::gguf::{MetaValue, parse_header};

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let a = byte_alphabet();
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], '\u{120}');
        assert_eq!(a[b'\n' as usize], '\u{10a}');
        assert_eq!(a[0], '\u{100}');
        assert_eq!(a[0xAD], '\u{143}');
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 256);
        let library: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(a.iter().copied().collect::<HashSet<_>>(), library);
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merges_follow_scores_then_lengths_then_ids() {
        // "ab" (score -1) beats "abc" (-2); "abc" splits as a+bc and ab+c, both ranked by the
        // merged score, the longer left part first.
        let tokens = strings(&["a", "b", "c", "ab", "bc", "abc"]);
        let scores = [-10.0, -11.0, -12.0, -1.0, -3.0, -2.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(pairs, [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]);
    }

    /// Metadata of a tiny vocabulary with `extra` keys, through the writer and the parser.
    fn metadata(model: &str, extra: &[(&str, MetaValue)]) -> Metadata {
        let mut w = GgufWriter::new();
        w.set_metadata("general.architecture", "llama");
        w.set_metadata(KEY_MODEL, model);
        w.set_metadata(KEY_TOKENS, vec!["a", "b", "ab", "<s>"]);
        w.set_metadata(KEY_TOKEN_TYPE, vec![1i32, 1, 1, 3]);
        for (k, v) in extra {
            w.set_metadata(*k, v.clone());
        }
        parse_header(&w.to_bytes()).unwrap().metadata().clone()
    }

    fn tokenizer_error(meta: &Metadata) -> String {
        match tokenizer_from_gguf(meta) {
            Ok(_) => panic!("built a tokenizer from bad metadata"),
            Err(GgufError::Tokenizer { what, .. }) => what,
            Err(other) => other.to_string(),
        }
    }

    #[test]
    fn merges_come_from_the_scores_when_the_file_has_none() {
        let scores: MetaValue = vec![-1.0f32, -2.0, 0.0, 0.0].into();
        for model in ["gpt2", "llama"] {
            let meta = metadata(model, &[(KEY_SCORES, scores.clone())]);
            let tokenizer = tokenizer_from_gguf(&meta).unwrap();
            assert_eq!(tokenizer.encode("ab", false).unwrap().get_ids(), [2], "{model}");
            // Without scores either, there is nothing to build merges from.
            let message = tokenizer_error(&metadata(model, &[]));
            assert!(message.contains(KEY_SCORES), "{model}: {message}");
        }
    }

    #[test]
    fn bad_tokenizer_metadata_is_an_error() {
        let merges = |m: Vec<&str>| (KEY_MERGES, MetaValue::from(m));
        let cases: Vec<(Metadata, &str)> = vec![
            (metadata("t5", &[]), "\"t5\" is not supported"),
            (metadata("llama", &[("general.architecture", "gemma2".into())]), "gemma2"),
            (metadata("gpt2", &[merges(vec!["a b c"])]), "not two tokens"),
            (metadata("gpt2", &[merges(vec!["a x"])]), "BPE"),
            (metadata("gpt2", &[merges(vec!["a b"]), (KEY_BOS_ID, 9u32.into())]), "past the 4 tokens"),
            (metadata("gpt2", &[merges(vec!["a b"]), (KEY_ADD_BOS, 1u8.into())]), KEY_ADD_BOS),
            (metadata("gpt2", &[(KEY_TOKENS, 5u32.into())]), KEY_TOKENS),
        ];
        for (meta, expected) in cases {
            let message = tokenizer_error(&meta);
            assert!(message.contains(expected), "expected {expected:?} in {message:?}");
        }
    }

    #[test]
    fn add_bos_and_add_eos_shape_the_template() {
        let base = [(KEY_MERGES, MetaValue::from(vec!["a b"])), (KEY_BOS_ID, 3u32.into()), (KEY_EOS_ID, 3u32.into())];
        let encode = |extra: &[(&str, MetaValue)]| {
            let mut keys = base.to_vec();
            keys.extend_from_slice(extra);
            let tokenizer = tokenizer_from_gguf(&metadata("gpt2", &keys)).unwrap();
            tokenizer.encode("ab", true).unwrap().get_ids().to_vec()
        };
        assert_eq!(encode(&[]), [2]);
        assert_eq!(encode(&[(KEY_ADD_BOS, true.into())]), [3, 2]);
        assert_eq!(encode(&[(KEY_ADD_EOS, true.into())]), [2, 3]);
        assert_eq!(encode(&[(KEY_ADD_BOS, true.into()), (KEY_ADD_EOS, true.into())]), [3, 2, 3]);
        // "<s>" is a control token: matched whole in text, skipped when decoding special tokens.
        let tokenizer = tokenizer_from_gguf(&metadata("gpt2", &base)).unwrap();
        assert_eq!(tokenizer.encode("a<s>b", false).unwrap().get_ids(), [0, 3, 1]);
        assert_eq!(tokenizer.decode(&[0, 3, 1], true).unwrap(), "ab");
    }

    #[test]
    fn template_keys_avoid_template_syntax() {
        assert_eq!(template_key("<s>", "bos"), "<s>");
        assert_eq!(template_key("<bos:1>", "bos"), "bos");
        assert_eq!(template_key("$A", "bos"), "bos");
        assert_eq!(template_key("a b", "eos"), "eos");
    }
}
