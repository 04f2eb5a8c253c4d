//! Converts the Tux Paint stamps (Debian `tuxpaint-stamps-default`, /usr/share/tuxpaint/stamps) into
//! ALBEF annotation files: the one set of real image-caption pairs obtainable on these machines.
//!
//! Each stamp is an image plus a `.txt` whose first line is an English caption (later lines are
//! translations). `symbols/` (letters, signs, money) is left out: its captions describe glyphs, not
//! scenes. Only PNG stamps are used, since the `image` crate cannot rasterise SVG; they are composited
//! on white (stamps are cut-outs with transparent backgrounds) and written as RGB PNGs.

use super::image::load_rgb;
use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What [`prepare`] found and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub train: PathBuf,
    pub val: PathBuf,
    pub test: PathBuf,
    /// Image-caption pairs written, and how they were split.
    pub pairs: usize,
    pub train_pairs: usize,
    pub val_pairs: usize,
    pub test_pairs: usize,
    /// Distinct caption texts among the pairs (some stamps share one, e.g. "A flower.").
    pub distinct_captions: usize,
    /// SVG stamps outside `symbols/`, which cannot be decoded.
    pub skipped_svg: usize,
    /// PNGs without a caption: no `.txt` beside them (e.g. the `_mirror` variants) or an empty first line.
    pub skipped_no_caption: usize,
    /// Stamp images (PNG or SVG) under the top-level `symbols/`.
    pub skipped_symbols: usize,
    /// PNGs that failed to decode.
    pub unreadable: Vec<PathBuf>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs ({} distinct captions): {} train, {} val, {} test; skipped {} SVG, {} without caption, \
            {} in symbols/, {} unreadable",
            self.pairs,
            self.distinct_captions,
            self.train_pairs,
            self.val_pairs,
            self.test_pairs,
            self.skipped_svg,
            self.skipped_no_caption,
            self.skipped_symbols,
            self.unreadable.len()
        )
    }
}

/// Converts the stamp tree `src` into `out`: `images/<category path>/<name>.png` (composited on white)
/// and `train.json`, `val.json`, `test.json`. Image paths in the files are relative to `out`, which is
/// where [`crate::data::annotations`] resolves them by default, so the folder can be moved.
///
/// The split is by image, 80/10/10, from a seeded shuffle of the sorted stamp list. Training entries get
/// `image_id` = their index; val/test are retrieval files with one caption per image. Captions are
/// stored as written ("A seahorse."): cleaning happens when the files are loaded.
pub fn prepare(src: &Path, out: &Path, seed: u64) -> Result<Summary> {
    ensure!(
        src.is_dir(),
        "Tux Paint stamp folder {} does not exist (apt-get install tuxpaint-stamps-default)",
        src.display()
    );
    let mut files = vec![];
    walk(src, src, &mut files)?;
    let (mut skipped_svg, mut skipped_no_caption, mut skipped_symbols) = (0, 0, 0);
    let mut unreadable = vec![];
    let mut pairs: Vec<(String, String)> = vec![];
    for rel in files {
        let ext = rel.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        if ext != "png" && ext != "svg" {
            continue;
        }
        if rel.components().next().is_some_and(|c| c.as_os_str() == "symbols") {
            skipped_symbols += 1;
            continue;
        }
        if ext == "svg" {
            skipped_svg += 1;
            continue;
        }
        let Some(caption) = read_caption(&src.join(&rel).with_extension("txt"))? else {
            skipped_no_caption += 1;
            continue;
        };
        let img = match load_rgb(&src.join(&rel)) {
            Ok(img) => img,
            Err(_) => {
                unreadable.push(src.join(&rel));
                continue;
            }
        };
        let out_rel = Path::new("images").join(&rel).with_extension("png");
        let dest = out.join(&out_rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        img.save(&dest).with_context(|| format!("cannot write {}", dest.display()))?;
        let out_rel = out_rel.to_str().with_context(|| format!("stamp path {} is not valid UTF-8", rel.display()))?;
        pairs.push((out_rel.replace('\\', "/"), caption));
    }
    ensure!(!pairs.is_empty(), "no captioned PNG stamps found under {}", src.display());
    let distinct_captions = pairs.iter().map(|(_, c)| c.as_str()).collect::<HashSet<_>>().len();
    pairs.shuffle(&mut crate::rng::stream(seed, "tuxpaint-split", "", 0));
    let n = pairs.len();
    let n_eval = (n as f64 * 0.1).round() as usize;
    let (test, rest) = pairs.split_at(n_eval);
    let (val, train) = rest.split_at(n_eval);
    let summary = Summary {
        train: out.join("train.json"),
        val: out.join("val.json"),
        test: out.join("test.json"),
        pairs: n,
        train_pairs: train.len(),
        val_pairs: val.len(),
        test_pairs: test.len(),
        distinct_captions,
        skipped_svg,
        skipped_no_caption,
        skipped_symbols,
        unreadable,
    };
    let train_json: Vec<_> =
        train.iter().enumerate().map(|(i, (img, cap))| json!({"image": img, "caption": cap, "image_id": i})).collect();
    write_json(&summary.train, &train_json)?;
    for (file, part) in [(&summary.val, val), (&summary.test, test)] {
        let entries: Vec<_> = part.iter().map(|(img, cap)| json!({"image": img, "caption": [cap]})).collect();
        write_json(file, &entries)?;
    }
    Ok(summary)
}

/// Files under `dir`, as paths relative to `root`, in sorted order (read_dir's order is not stable).
fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(root, &path, files)?;
        } else {
            files.push(path.strip_prefix(root).expect("walk stays under root").to_path_buf());
        }
    }
    Ok(())
}

/// The first line of a stamp's `.txt`, trimmed; `None` when there is no file or the line is empty.
/// Bytes that are not UTF-8 are replaced rather than rejected (the English line is ASCII).
fn read_caption(txt: &Path) -> Result<Option<String>> {
    if !txt.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(txt).with_context(|| format!("cannot read {}", txt.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let first = text.lines().next().unwrap_or("").trim();
    Ok((!first.is_empty()).then(|| first.to_string()))
}

fn write_json(path: &Path, entries: &[serde_json::Value]) -> Result<()> {
    let text = serde_json::to_string_pretty(entries)?;
    crate::write_atomic(path, |tmp| Ok(std::fs::write(tmp, text)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CaptionStyle;
    use crate::data::annotations::{RetrievalSet, TextOptions, TrainSet};
    use ::image::{Rgba, RgbaImage};

    const TEXT: TextOptions = TextOptions { max_words: 30, style: CaptionStyle::Albef };

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("alignfuse-tux-{name}-{}", std::process::id()))
    }

    fn stamp(dir: &Path, name: &str, caption: Option<&str>) {
        std::fs::create_dir_all(dir).unwrap();
        let mut img = RgbaImage::from_pixel(3, 2, Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 1, Rgba([250, 10, 10, 255]));
        img.save(dir.join(format!("{name}.png"))).unwrap();
        if let Some(c) = caption {
            std::fs::write(dir.join(format!("{name}.txt")), c).unwrap();
        }
    }

    #[test]
    fn made_up_tree() {
        let (src, out) = (tmp("src"), tmp("out"));
        let fish = src.join("animals/fish");
        for i in 0..18 {
            stamp(&fish, &format!("fish{i:02}"), Some(&format!("A fish number {i}.\nfr.utf8=Un poisson.\n")));
        }
        stamp(&fish, "fish00_mirror", None);
        stamp(&src.join("plants"), "blank", Some("\nde.utf8=Leer"));
        stamp(&src.join("symbols/letters"), "a", Some("The letter A."));
        std::fs::write(fish.join("drawn.svg"), "<svg/>").unwrap();
        std::fs::write(fish.join("drawn.txt"), "A drawing.").unwrap();
        std::fs::write(fish.join("broken.png"), "not a png").unwrap();
        std::fs::write(fish.join("broken.txt"), "Broken.").unwrap();
        std::fs::write(fish.join("fish00.ogg"), "sound").unwrap();
        let s = prepare(&src, &out, 1).unwrap();
        assert_eq!((s.pairs, s.train_pairs, s.val_pairs, s.test_pairs), (18, 14, 2, 2));
        assert_eq!((s.skipped_svg, s.skipped_no_caption, s.skipped_symbols), (1, 2, 1));
        assert_eq!(s.unreadable, [fish.join("broken.png")]);
        assert_eq!(s.distinct_captions, 18);
        let train = TrainSet::load(std::slice::from_ref(&s.train), None, TEXT, true).unwrap();
        assert_eq!(train.len(), 14);
        assert!(train.entries.iter().all(|e| e.captions[0].starts_with("a fish number")));
        let val = RetrievalSet::load(&s.val, None, TEXT).unwrap();
        let img = load_rgb(&val.images[0]).unwrap();
        assert_eq!(img.as_raw()[..6], [255, 255, 255, 255, 255, 255], "transparent background is white");
        assert_eq!(img.get_pixel(1, 1).0, [250, 10, 10]);
        let first = std::fs::read_to_string(&s.train).unwrap();
        let again = prepare(&src, &tmp("out2"), 1).unwrap();
        assert_eq!(std::fs::read_to_string(&again.train).unwrap(), first, "deterministic in seed");
        assert!(format!("{s}").contains("18 pairs"));
        assert!(prepare(&src.join("nope"), &out, 1).is_err());
        for d in [src, out, tmp("out2")] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn real_stamps_when_installed() {
        let src = Path::new("/usr/share/tuxpaint/stamps");
        if !src.is_dir() {
            eprintln!(
                "skipped: {} not found (apt-get install -y --no-install-recommends tuxpaint-stamps-default)",
                src.display()
            );
            return;
        }
        let out = tmp("real");
        let s = prepare(src, &out, 42).unwrap();
        eprintln!("Tux Paint stamps: {s}");
        assert_eq!(s.pairs, 538, "{s}");
        assert_eq!(s.distinct_captions, 498, "{s}");
        assert!(s.unreadable.is_empty(), "{s}");
        let train = TrainSet::load(std::slice::from_ref(&s.train), None, TEXT, true).unwrap();
        assert!(
            train.entries.iter().any(|e| e.captions[0] == "a seahorse")
                || RetrievalSet::load(&s.val, None, TEXT)
                    .unwrap()
                    .texts
                    .iter()
                    .chain(&RetrievalSet::load(&s.test, None, TEXT).unwrap().texts)
                    .any(|t| t == "a seahorse")
        );
        std::fs::remove_dir_all(out).unwrap();
    }
}
