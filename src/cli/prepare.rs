//! `alignfuse prepare`: a WordPiece vocabulary from captions, or the Tux Paint stamps as annotations.

use super::{PrepareArgs, PrepareWhat};
use crate::config::CaptionStyle;
use crate::data::annotations::{TextOptions, TrainSet};
use anyhow::Result;

pub fn run(args: PrepareArgs) -> Result<()> {
    match args.what {
        PrepareWhat::Vocab { ann, size, out, overwrite } => {
            crate::refuse_existing([out.as_path()], overwrite)?;
            let set =
                TrainSet::load(&ann, None, TextOptions { max_words: usize::MAX, style: CaptionStyle::Albef }, false)?;
            let captions: Vec<&str> = set.entries.iter().flat_map(|e| e.captions.iter().map(String::as_str)).collect();
            crate::data::tokenizer::train_wordpiece(&captions, size, &out)?;
            println!("wrote {} from {} captions", out.display(), captions.len());
        }
        PrepareWhat::Shards { ann, image_root, out, per_shard } => {
            let w = crate::data::shards::write(&ann, image_root.as_deref(), &out, per_shard)?;
            println!("wrote {} samples in {} shards to {}", w.samples, w.shards.len(), out.display());
            println!("train from them with (in [data]):");
            println!("  train_shards = \"{}/{{00000..{:05}}}.tar\"", out.display(), w.shards.len() - 1);
            println!("  train_num_samples = {}", w.samples);
            let vocab = ann[0].parent().unwrap_or(std::path::Path::new(".")).join("vocab.txt");
            if vocab.is_file() {
                println!("  vocab = \"{}\"", vocab.display());
            }
        }
        PrepareWhat::Tuxpaint { src, out, seed, overwrite } => {
            let files = ["train.json", "val.json", "test.json"].map(|f| out.join(f));
            crate::refuse_existing(files.iter().map(|f| f.as_path()), overwrite)?;
            let s = crate::data::tuxpaint::prepare(&src, &out, seed)?;
            println!(
                "{} image-caption pairs ({} distinct captions): {} train, {} val, {} test",
                s.pairs, s.distinct_captions, s.train_pairs, s.val_pairs, s.test_pairs
            );
            println!("wrote {}, {}, {}", s.train.display(), s.val.display(), s.test.display());
            println!(
                "skipped: {} SVG stamps (not decodable), {} without a caption, {} under symbols/, {} unreadable",
                s.skipped_svg,
                s.skipped_no_caption,
                s.skipped_symbols,
                s.unreadable.len()
            );
            for p in &s.unreadable {
                println!("  unreadable: {}", p.display());
            }
        }
    }
    Ok(())
}
