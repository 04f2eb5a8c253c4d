//! ALBEF-format annotation files: a JSON list of `{"image": path, "caption": str | [str], "image_id"?}`.
//!
//! Training files become a [`TrainSet`] (one entry per JSON entry; a caption list yields one caption per
//! epoch, like ALBEF's `pretrain_dataset`). Evaluation files become a [`RetrievalSet`] that keeps every
//! caption with its image, like ALBEF's `re_eval_dataset`. Captions are cleaned by
//! [`pre_caption`] once, at load time, character for character the reference functions, because the
//! tokenizer sees their output: a different cleaning gives different token ids than the PyTorch code.
//! Every error names the file and the entry index.

use crate::config::CaptionStyle;
use anyhow::{bail, Context, Result};
use rand::Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How captions are cleaned while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextOptions {
    pub max_words: usize,
    pub style: CaptionStyle,
}

/// One training pair source: an image and its cleaned captions.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainEntry {
    pub image: PathBuf,
    pub captions: Vec<String>,
    /// Identifies the image across entries (several entries may show the same image): used to mask
    /// same-image pairs as ITM negatives and as multi-positive ITC targets.
    pub image_id: u64,
}

/// The concatenated training annotation files.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSet {
    pub entries: Vec<TrainEntry>,
    /// Number of distinct image ids (ids are `0..num_images`).
    pub num_images: usize,
}

/// One JSON entry, checked: the image path as written (still relative) and the raw captions.
pub(super) struct RawEntry {
    pub image: String,
    pub captions: Vec<String>,
    pub image_id: Option<String>,
}

impl TrainSet {
    /// Reads and concatenates `files`. Relative image paths are resolved against `image_root`, or else
    /// against each file's own directory. With `check_images`, a missing image file is an error here;
    /// without (training with `on_bad_image = "skip"`), the loader skips and reports it instead.
    ///
    /// Image ids are dense, `0..num_images` in order of first appearance (ALBEF's `re_train_dataset`
    /// numbers them the same way): entries with the same `"image_id"` (number or string; `5` and `"5"`
    /// are the same id) share an id, and entries without one share an id when their image paths match.
    pub fn load(files: &[PathBuf], image_root: Option<&Path>, text: TextOptions, check_images: bool) -> Result<Self> {
        let mut entries = Vec::new();
        let mut ids: HashMap<String, u64> = HashMap::new();
        for file in files {
            for (index, raw) in read_entries(file)?.into_iter().enumerate() {
                let at = || format!("{}: entry {index}", file.display());
                let image = resolve(file, image_root, &raw.image);
                if check_images && !image.is_file() {
                    bail!("{}: image file {} does not exist", at(), image.display());
                }
                let captions = clean_captions(&raw.captions, text).with_context(at)?;
                let key = match raw.image_id {
                    Some(id) => format!("id:{id}"),
                    None => format!("path:{}", image.display()),
                };
                let next = ids.len() as u64;
                let image_id = *ids.entry(key).or_insert(next);
                entries.push(TrainEntry { image, captions, image_id });
            }
        }
        Ok(TrainSet { entries, num_images: ids.len() })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caption entry `index` uses in `epoch`: one of its list, drawn from `(seed, epoch, index)` so
    /// that it does not depend on the order samples are loaded in.
    pub fn caption(&self, index: usize, seed: u64, epoch: usize) -> &str {
        let captions = &self.entries[index].captions;
        if captions.len() == 1 {
            return &captions[0];
        }
        let mut rng = crate::rng::stream(seed, "caption", &epoch.to_string(), index as u64);
        &captions[rng.random_range(0..captions.len())]
    }
}

/// An evaluation set in the layout of ALBEF's `re_eval_dataset`: every caption of every image, flat.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalSet {
    pub images: Vec<PathBuf>,
    /// Cleaned captions, grouped by image in file order.
    pub texts: Vec<String>,
    /// For each image, the indices of its captions in `texts`.
    pub img2txt: Vec<Vec<usize>>,
    /// For each caption, the index of its image in `images`.
    pub txt2img: Vec<usize>,
}

impl RetrievalSet {
    /// Reads one retrieval annotation file. Every image must exist and appear only once (a repeated
    /// image would split its ground-truth captions and make recall ill-defined). `"image_id"` keys are
    /// accepted and ignored: the entry index identifies the image.
    pub fn load(file: &Path, image_root: Option<&Path>, text: TextOptions) -> Result<Self> {
        let mut set = RetrievalSet { images: vec![], texts: vec![], img2txt: vec![], txt2img: vec![] };
        let mut seen: HashMap<PathBuf, usize> = HashMap::new();
        for (index, raw) in read_entries(file)?.into_iter().enumerate() {
            let at = || format!("{}: entry {index}", file.display());
            let image = resolve(file, image_root, &raw.image);
            if let Some(first) = seen.insert(image.clone(), index) {
                bail!("{}: image {} already appears in entry {first}; a retrieval set lists each image once with all its captions",
                    at(), raw.image);
            }
            if !image.is_file() {
                bail!("{}: image file {} does not exist", at(), image.display());
            }
            let captions = clean_captions(&raw.captions, text).with_context(at)?;
            let img = set.images.len();
            set.img2txt.push((set.texts.len()..set.texts.len() + captions.len()).collect());
            set.txt2img.extend(std::iter::repeat_n(img, captions.len()));
            set.texts.extend(captions);
            set.images.push(image);
        }
        Ok(set)
    }
}

/// Parses and type-checks one annotation file.
/// The entries of a JSON list, or of JSON Lines (one object per line; blank lines are skipped), with or
/// without a UTF-8 byte-order mark. Errors name the entry index (JSON) or the line (JSON Lines).
pub(super) fn read_entries(file: &Path) -> Result<Vec<RawEntry>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read annotation file {}", file.display()))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return read_json_lines(file, bytes);
    }
    let value: Value = serde_json::from_slice(bytes)
        .with_context(|| format!("annotation file {} is not valid JSON", file.display()))?;
    let Value::Array(items) = value else {
        bail!(
            "annotation file {} must hold a JSON list of {{\"image\", \"caption\"}} objects, found {}",
            file.display(),
            kind(&value)
        );
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| parse_entry(item).with_context(|| format!("{}: entry {index}", file.display())))
        .collect()
}

fn read_json_lines(file: &Path, bytes: &[u8]) -> Result<Vec<RawEntry>> {
    let text =
        std::str::from_utf8(bytes).with_context(|| format!("annotation file {} is not UTF-8", file.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let at = || format!("{}:{}", file.display(), i + 1);
            let item: Value = serde_json::from_str(line).with_context(|| {
                format!("{}: not a JSON object (JSON Lines: one {{\"image\", \"caption\"}} object per line)", at())
            })?;
            parse_entry(&item).with_context(at)
        })
        .collect()
}

fn parse_entry(item: &Value) -> Result<RawEntry> {
    let Value::Object(map) = item else { bail!("expected an object, found {}", kind(item)) };
    let image = match map.get("image") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => bail!("\"image\" is empty"),
        Some(other) => bail!("\"image\" must be a string path, found {}", kind(other)),
        None => bail!("missing key \"image\""),
    };
    let captions = match map.get("caption") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.is_empty() => bail!("\"caption\" is an empty list"),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Value::String(s) => Ok(s.clone()),
                other => bail!("\"caption\"[{i}] must be a string, found {}", kind(other)),
            })
            .collect::<Result<_>>()?,
        Some(other) => bail!("\"caption\" must be a string or a list of strings, found {}", kind(other)),
        None => bail!("missing key \"caption\""),
    };
    let image_id = match map.get("image_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        Some(other) => bail!("\"image_id\" must be an integer or a string, found {other}"),
    };
    Ok(RawEntry { image, captions, image_id })
}

fn clean_captions(raw: &[String], text: TextOptions) -> Result<Vec<String>> {
    raw.iter()
        .enumerate()
        .map(|(i, c)| {
            let clean = pre_caption(c, text.max_words, text.style);
            if clean.trim().is_empty() {
                bail!("caption {i} ({c:?}) is empty after cleaning");
            }
            Ok(clean)
        })
        .collect()
}

/// `path` as written in `file`: absolute paths stay, relative ones join `root` or the file's directory.
pub(super) fn resolve(file: &Path, root: Option<&Path>, path: &str) -> PathBuf {
    let base = root.map(Path::to_path_buf).unwrap_or_else(|| file.parent().map(Path::to_path_buf).unwrap_or_default());
    base.join(path)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Cleans a caption as the reference code does before tokenising, then keeps at most `max_words` words.
///
/// ALBEF: lowercase; delete `, . ' ! ? " ( ) * # : ; ~`; `-` and `/` become spaces; `<person>` becomes
/// `person`. BLIP: lowercase; `. ! " ( ) * # : ; ~` become spaces (commas, apostrophes, question marks,
/// hyphens and slashes stay). Both then replace every run of two or more whitespace characters by one
/// space, strip a trailing newline and then leading/trailing spaces, split on single spaces and keep the
/// first `max_words` pieces. Like the reference, a lone tab or newline inside the text is not a run
/// and stays (the tokenizer splits on it anyway).
pub fn pre_caption(caption: &str, max_words: usize, style: CaptionStyle) -> String {
    let lower = caption.to_lowercase();
    let mut text = String::with_capacity(lower.len());
    match style {
        CaptionStyle::Albef => {
            for c in lower.chars() {
                match c {
                    ',' | '.' | '\'' | '!' | '?' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~' => {}
                    '-' | '/' => text.push(' '),
                    _ => text.push(c),
                }
            }
            text = text.replace("<person>", "person");
        }
        CaptionStyle::Blip => {
            for c in lower.chars() {
                match c {
                    '.' | '!' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~' => text.push(' '),
                    _ => text.push(c),
                }
            }
        }
    }
    let collapsed = collapse_whitespace_runs(&text);
    let stripped = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = stripped.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        stripped.to_string()
    }
}

/// Python's `re.sub(r"\s{2,}", " ", text)`: runs of at least two whitespace characters become one space.
fn collapse_whitespace_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.chars() {
        if is_python_space(c) {
            run.push(c);
            continue;
        }
        flush_run(&mut out, &mut run);
        out.push(c);
    }
    flush_run(&mut out, &mut run);
    out
}

fn flush_run(out: &mut String, run: &mut String) {
    if run.chars().nth(1).is_some() {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// Python's `\s` for str patterns: Unicode whitespace plus the ASCII separators U+001C..U+001F, which
/// Python counts as whitespace and Unicode does not.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: TextOptions = TextOptions { max_words: 30, style: CaptionStyle::Albef };

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("alignfuse-ann-{name}-{}", std::process::id()));
            std::fs::create_dir_all(dir.join("img")).unwrap();
            for name in ["a.png", "b.png", "c.png"] {
                std::fs::write(dir.join("img").join(name), b"").unwrap();
            }
            Dir(dir)
        }
        fn file(&self, name: &str, json: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, json).unwrap();
            path
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn train_set_ids_captions_and_paths() {
        let dir = Dir::new("train");
        let f = dir.file(
            "train.json",
            r#"[
            {"image": "img/a.png", "caption": "A Dog."},
            {"image": "img/b.png", "caption": ["One cat!", "Two cats?"], "image_id": "coco_7"},
            {"image": "img/c.png", "caption": "x", "image_id": "coco_7"},
            {"image": "img/a.png", "caption": "again"},
            {"image": "img/b.png", "caption": "num", "image_id": 5},
            {"image": "img/c.png", "caption": "str", "image_id": "5"}
        ]"#,
        );
        let set = TrainSet::load(&[f.clone(), f], None, TEXT, true).unwrap();
        assert_eq!(set.len(), 12);
        assert_eq!(set.entries[0].image, dir.0.join("img/a.png"));
        assert_eq!(set.entries[0].captions, ["a dog"]);
        assert_eq!(set.entries[1].captions, ["one cat", "two cats"]);
        let ids: Vec<u64> = set.entries.iter().map(|e| e.image_id).collect();
        assert_eq!(ids, [0, 1, 1, 0, 2, 2, 0, 1, 1, 0, 2, 2]);
        assert_eq!(set.num_images, 3);
        let root = dir.0.join("img");
        let f2 = dir.file("rooted.json", r#"[{"image": "a.png", "caption": "a"}]"#);
        assert_eq!(TrainSet::load(&[f2], Some(&root), TEXT, true).unwrap().entries[0].image, root.join("a.png"));
    }

    #[test]
    fn caption_choice_depends_on_seed_epoch_index_only() {
        let dir = Dir::new("choice");
        let f = dir.file(
            "t.json",
            r#"[{"image": "img/a.png", "caption": ["c0", "c1", "c2", "c3"]},
            {"image": "img/b.png", "caption": ["only"]}]"#,
        );
        let set = TrainSet::load(&[f], None, TEXT, true).unwrap();
        assert_eq!(set.caption(0, 1, 2), set.caption(0, 1, 2));
        let picks: std::collections::HashSet<&str> = (0..40).map(|e| set.caption(0, 1, e)).collect();
        assert_eq!(picks.len(), 4, "every caption gets used over the epochs");
        assert_eq!(set.caption(1, 1, 3), "only");
    }

    #[test]
    fn retrieval_set_layout() {
        let dir = Dir::new("ret");
        let f = dir.file(
            "test.json",
            r#"[
            {"image": "img/a.png", "caption": ["First one.", "Second-one"]},
            {"image": "img/b.png", "caption": "Only (one)", "image_id": 3},
            {"image": "img/c.png", "caption": ["x", "y", "z"]}
        ]"#,
        );
        let set = RetrievalSet::load(&f, None, TEXT).unwrap();
        assert_eq!(set.images.len(), 3);
        assert_eq!(set.texts, ["first one", "second one", "only one", "x", "y", "z"]);
        assert_eq!(set.img2txt, vec![vec![0, 1], vec![2], vec![3, 4, 5]]);
        assert_eq!(set.txt2img, [0, 0, 1, 2, 2, 2]);
    }

    /// JSON Lines and a byte-order mark (what editors and `jq -c` write) read like the JSON list.
    #[test]
    fn json_lines_and_byte_order_mark() {
        let dir = Dir::new("jsonl");
        let list = dir.file("list.json", "[{\"image\": \"img/a.png\", \"caption\": \"A dog.\"}, {\"image\": \"img/b.png\", \"caption\": [\"x\", \"y\"]}]");
        let lines = "\u{feff}{\"image\": \"img/a.png\", \"caption\": \"A dog.\"}\n\n{\"image\": \"img/b.png\", \"caption\": [\"x\", \"y\"]}\n";
        let jsonl = dir.file("lines.jsonl", lines);
        let bom = dir.file("bom.json", &format!("\u{feff}{}", std::fs::read_to_string(&list).unwrap()));
        let want = TrainSet::load(std::slice::from_ref(&list), None, TEXT, true).unwrap();
        assert_eq!(TrainSet::load(std::slice::from_ref(&jsonl), None, TEXT, true).unwrap(), want);
        assert_eq!(TrainSet::load(&[bom], None, TEXT, true).unwrap(), want);
        let (a, b) = (RetrievalSet::load(&list, None, TEXT).unwrap(), RetrievalSet::load(&jsonl, None, TEXT).unwrap());
        assert_eq!((a.texts, a.txt2img), (b.texts, b.txt2img));
        let bad =
            dir.file("bad.jsonl", "{\"image\": \"img/a.png\", \"caption\": \"c\"}\n\n{\"image\": \"img/a.png\"}\n");
        let err = err_of(TrainSet::load(&[bad], None, TEXT, true));
        assert!(err.contains("bad.jsonl:3") && err.contains("missing key \"caption\""), "{err}");
        let torn = dir.file("torn.jsonl", "{\"image\": \"img/a.png\", \"caption\": \"c\"}\n{\"image\": \"img/b");
        let err = err_of(TrainSet::load(&[torn], None, TEXT, true));
        assert!(err.contains("torn.jsonl:2") && err.contains("JSON Lines"), "{err}");
    }

    #[test]
    fn errors_name_file_entry_and_problem() {
        let dir = Dir::new("err");
        let cases = [
            ("\"text\"", "must hold a JSON list"),
            ("[{\"image\": \"img/a.png\", \"caption\": \"ok\"}, 3]", "entry 1: expected an object, found a number"),
            ("[{\"caption\": \"c\"}]", "entry 0: missing key \"image\""),
            ("[{\"image\": \"img/a.png\"}]", "entry 0: missing key \"caption\""),
            ("[{\"image\": 4, \"caption\": \"c\"}]", "\"image\" must be a string path, found a number"),
            ("[{\"image\": \"img/a.png\", \"caption\": 4}]", "\"caption\" must be a string or a list of strings"),
            ("[{\"image\": \"img/a.png\", \"caption\": [\"ok\", 4]}]", "\"caption\"[1] must be a string"),
            ("[{\"image\": \"img/a.png\", \"caption\": []}]", "empty list"),
            ("[{\"image\": \"img/a.png\", \"caption\": \"...\"}]", "caption 0 (\"...\") is empty after cleaning"),
            (
                "[{\"image\": \"img/a.png\", \"caption\": \"c\", \"image_id\": 1.5}]",
                "\"image_id\" must be an integer or a string",
            ),
            ("[{\"image\": \"img/zzz.png\", \"caption\": \"c\"}]", "zzz.png does not exist"),
            ("[{\"image\": \"img/a.png\", \"caption\": \"c\"},", "not valid JSON"),
        ];
        for (json, want) in cases {
            let f = dir.file("bad.json", json);
            let err = err_of(TrainSet::load(&[f], None, TEXT, true));
            assert!(err.contains("bad.json") && err.contains(want), "{json}: {err}");
        }
        let f = dir.file("missing.json", "[{\"image\": \"img/zzz.png\", \"caption\": \"c\"}]");
        assert!(TrainSet::load(&[f], None, TEXT, false).is_ok(), "missing images left to the loader");
        let f = dir.file("dup.json", "[{\"image\": \"img/a.png\", \"caption\": \"c\"}, {\"image\": \"img/b.png\", \"caption\": \"c\"}, {\"image\": \"img/a.png\", \"caption\": \"d\"}]");
        let err = err_of(RetrievalSet::load(&f, None, TEXT));
        assert!(err.contains("dup.json: entry 2") && err.contains("already appears in entry 0"), "{err}");
        let err = err_of(TrainSet::load(&[dir.0.join("nope.json")], None, TEXT, true));
        assert!(err.contains("nope.json"), "{err}");
    }
}

#[cfg(test)]
mod caption_tests {
    use super::*;
    use CaptionStyle::{Albef, Blip};

    fn albef(s: &str) -> String {
        pre_caption(s, 30, Albef)
    }
    fn blip(s: &str) -> String {
        pre_caption(s, 30, Blip)
    }

    #[test]
    fn albef_cases() {
        let cases = [
            ("A seahorse.", "a seahorse"),
            ("A hoverfly resembles a honeybee drone.", "a hoverfly resembles a honeybee drone"),
            ("Two dogs, playing!", "two dogs playing"),
            ("The man's hat?", "the mans hat"),
            ("\"Quoted\" (text) *bold* #tag: a; b~", "quoted text bold tag a b"),
            ("well-known black/white cat", "well known black white cat"),
            ("a - b", "a b"),
            ("<person> rides a bike", "person rides a bike"),
            ("<PERSON> waves", "person waves"),
            ("  lots   of    spaces  ", "lots of spaces"),
            ("ends with newline\n", "ends with newline"),
            ("ends with space and newline \n", "ends with space and newline"),
            ("tab\tinside", "tab\tinside"),
            ("two\t\ttabs", "two tabs"),
            ("line\n\nbreaks", "line breaks"),
            ("...", ""),
            ("", ""),
            ("ÉCOLE Über", "école über"),
            ("no-brackets [mask] <b>", "no brackets [mask] <b>"),
            ("nbsp\u{a0}\u{a0}run", "nbsp run"),
            ("file\u{1c}\u{1d}sep", "file sep"),
        ];
        for (input, want) in cases {
            assert_eq!(albef(input), want, "input {input:?}");
        }
    }

    #[test]
    fn blip_cases() {
        let cases = [
            ("A seahorse.", "a seahorse"),
            ("Two dogs, playing!", "two dogs, playing"),
            ("The man's hat?", "the man's hat?"),
            ("well-known black/white cat", "well-known black/white cat"),
            ("a.b", "a b"),
            ("(x) \"y\" *z* #w: v; u~", "x y z w v u"),
            ("<person> waves", "<person> waves"),
            ("  many   spaces.  ", "many spaces"),
            ("tab\tinside", "tab\tinside"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(blip(input), want, "input {input:?}");
        }
    }

    #[test]
    fn truncates_to_max_words() {
        assert_eq!(pre_caption("one two three four", 2, Albef), "one two");
        assert_eq!(pre_caption("one two three", 3, Albef), "one two three");
        assert_eq!(pre_caption("One, two. Three!", 2, Blip), "one, two");
        assert_eq!(pre_caption("a b", 0, Albef), "");
        // A lone tab does not split words, exactly like Python's `split(' ')`.
        assert_eq!(pre_caption("a\tb c", 1, Albef), "a\tb");
    }

    #[test]
    fn cleaning_is_idempotent() {
        for s in ["A (very) well-known; dog.", "x  y", "a/b/c", "<person>'s ball"] {
            for style in [Albef, Blip] {
                let once = pre_caption(s, 30, style);
                assert_eq!(pre_caption(&once, 30, style), once, "{s:?} {style:?}");
            }
        }
    }
}
