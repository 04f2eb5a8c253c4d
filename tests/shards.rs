//! Training from webdataset tar shards: `prepare shards` holds exactly the annotation pairs, training
//! from them runs and resumes mid-epoch bit for bit, and bad shards are named, skipped or fatal.

mod common;
use alignfuse::config::{Config, OnBadImage};
use alignfuse::data::annotations::{TextOptions, TrainSet};
use alignfuse::data::loader::{TrainData, TrainLoader};
use alignfuse::data::shards::{self, ShardSet, Source, Stream};
use alignfuse::data::synth;
use alignfuse::train::log::StepRecord;
use alignfuse::train::{train, TrainOptions};
use candle_core::Device;
use common::{micro_config, same, scratch, steps};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The micro preset's synthetic data (64 pairs) and its pairs written as 4 shards.
fn data(name: &str) -> (synth::SynthPaths, String) {
    let dir = scratch(name);
    let paths = synth::generate(&dir.join("data"), 64, 42).unwrap();
    shards::write(std::slice::from_ref(&paths.train), None, &dir.join("shards"), 20).unwrap();
    (paths, format!("{}/{{00000..00003}}.tar", dir.join("shards").display()))
}

fn shard_config(paths: &synth::SynthPaths, pattern: &str, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("data.train_shards={pattern:?}"),
        format!("data.vocab={:?}", paths.vocab.display().to_string()),
        format!("data.val_ann={:?}", paths.val.display().to_string()),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    micro_config(&sets.iter().map(String::as_str).collect::<Vec<_>>())
}

fn run(cfg: Config, out: &Path, resume: bool, max_steps: usize) -> Vec<StepRecord> {
    let opts = TrainOptions {
        out: out.to_path_buf(),
        resume: resume.then(|| "latest".into()),
        max_steps: Some(max_steps),
        label: None,
        overwrite: false,
    };
    train(cfg, &opts).unwrap();
    steps(out)
}

/// Every sample of the shards is an annotation pair: same image bytes, same cleaned captions, and pairs
/// share an image id exactly when they do in the annotation file; one pass draws each exactly once.
#[test]
fn shards_hold_exactly_the_annotation_pairs() {
    let (paths, pattern) = data("shards-roundtrip");
    let text = TextOptions { max_words: 30, style: alignfuse::config::CaptionStyle::Albef };
    let set = TrainSet::load(std::slice::from_ref(&paths.train), None, text, true).unwrap();
    let shards = Arc::new(ShardSet::open(&[pattern], None).unwrap());
    assert_eq!((shards.paths.len(), shards.num_samples), (4, 64), "counted from the headers");
    let by_bytes: HashMap<Vec<u8>, usize> =
        set.entries.iter().enumerate().map(|(i, e)| (std::fs::read(&e.image).unwrap(), i)).collect();
    let src = Source { set: shards, text, on_bad: OnBadImage::Fail, seed: 7, capacity: 5 };
    let mut stream = Stream::new(src, 0, (0, 1), None).unwrap();
    let mut seen = vec![None; set.len()];
    for _ in 0..64 {
        let s = stream.draw().unwrap().sample;
        let i = by_bytes[&s.image];
        assert_eq!(s.captions, set.entries[i].captions);
        assert!(seen[i].replace(s.image_id).is_none(), "pair {i} drawn twice in one pass");
    }
    for (i, a) in set.entries.iter().enumerate() {
        for (j, b) in set.entries.iter().enumerate() {
            assert_eq!(a.image_id == b.image_id, seen[i] == seen[j], "pairs {i} and {j}");
        }
    }
}

/// The same pairs train from annotation files and from shards; the run logs to TensorBoard too.
#[test]
fn trains_from_shards_and_from_annotations() {
    let (paths, pattern) = data("shards-train");
    let json = micro_config(&[&format!("data.train_ann=[{:?}]", paths.train.display().to_string())]);
    let from_json = run(json, &scratch("shards-train-json"), false, 8);
    let out = scratch("shards-train-tar");
    let from_shards = run(shard_config(&paths, &pattern, &[]), &out, false, 8);
    assert_eq!((from_json.len(), from_shards.len()), (8, 8), "64 pairs in batches of 8: 8 steps per epoch");
    for s in from_json.iter().chain(&from_shards) {
        assert!(s.loss.is_finite() && s.losses.len() == 3, "{s:?}");
    }
    let events: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1);
    assert!(std::fs::metadata(&events[0]).unwrap().len() > 8 * 200, "8 steps of scalars and a validation");
}

/// N steps + resume + N steps == 2N steps, bit for bit, resuming mid-epoch with two workers, a shuffle
/// buffer, and epochs longer than the shards (a second pass); another worker count is refused.
#[test]
fn resume_mid_epoch_from_shards_is_exact() {
    let (paths, pattern) = data("shards-resume");
    let cfg = shard_config(&paths, &pattern, &["data.shuffle_buffer=6", "data.train_num_samples=96"]);
    let straight = run(cfg.clone(), &scratch("shards-resume-straight"), false, 16);
    let split_dir = scratch("shards-resume-split");
    assert_eq!(run(cfg.clone(), &split_dir, false, 5).len(), 5);
    let mut other = cfg.clone();
    other.data.num_workers = 1;
    let opts = TrainOptions {
        out: split_dir.clone(),
        resume: Some("latest".into()),
        max_steps: Some(16),
        label: None,
        overwrite: false,
    };
    let err = format!("{:#}", train(other, &opts).unwrap_err());
    assert!(err.contains("data.num_workers = 2"), "{err}");
    let split = run(cfg, &split_dir, true, 16);
    assert_eq!((straight.len(), split.len()), (16, 16), "12 steps per epoch, into the second epoch");
    for (a, b) in straight.iter().zip(&split) {
        assert!(same(a, b), "step {} differs:\n straight {a:?}\n resumed  {b:?}", a.step);
    }
}

/// A sample to write: its key and its members (extension, bytes).
type Members = (String, Vec<(&'static str, Vec<u8>)>);

/// A tar holding `samples`.
fn write_tar(path: &Path, samples: &[Members]) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (key, members) in samples {
        for (ext, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, format!("{key}.{ext}"), data.as_slice()).unwrap();
        }
    }
    tar.finish().unwrap();
}

/// A sample without a caption, an undecodable image and a truncated shard: fatal with the shard and
/// key by default, reported once each and left out with `on_bad_image = "skip"`.
#[test]
fn bad_samples_are_named_and_skipped_or_fatal() {
    let (paths, _) = data("shards-bad");
    let dir = scratch("shards-bad-tars");
    std::fs::create_dir_all(&dir).unwrap();
    let png = std::fs::read(paths.dir.join("images/train/000000.png")).unwrap();
    let good = |k: usize| (format!("{k:03}"), vec![("png", png.clone()), ("txt", b"a small red circle".to_vec())]);
    let mut first: Vec<Members> = (0..10).map(good).collect();
    first.insert(3, ("nocaption".into(), vec![("png", png.clone())]));
    first.insert(6, ("broken".into(), vec![("jpg", b"not an image".to_vec()), ("txt", b"a circle".to_vec())]));
    write_tar(&dir.join("a.tar"), &first);
    write_tar(&dir.join("b.tar"), &(10..16).map(good).collect::<Vec<_>>());
    let full = std::fs::read(dir.join("b.tar")).unwrap();
    std::fs::write(dir.join("b.tar"), &full[..full.len() / 2]).unwrap();

    let loader = |on_bad: OnBadImage| {
        let mut cfg = micro_config(&["data.num_workers=1", "data.shuffle_buffer=1", "train.batch_size=4"]);
        cfg.data.on_bad_image = on_bad;
        let set = ShardSet::open(&[format!("{}/{{a,b}}.tar", dir.display())], Some(16)).unwrap();
        let tok = Arc::new(alignfuse::data::tokenizer::TextTokenizer::from_file(&paths.vocab).unwrap());
        TrainLoader::new(TrainData::Shards(Arc::new(set)), tok, &cfg, Device::Cpu, alignfuse::dist::Place::SINGLE)
            .unwrap()
    };
    let fail = loader(OnBadImage::Fail);
    let err = fail.epoch(0, 0, None).unwrap().find_map(|b| b.err()).expect("an error");
    let msg = format!("{err:#}");
    let named =
        msg.contains("a.tar: sample nocaption") || msg.contains("a.tar: sample broken") || msg.contains("b.tar");
    assert!(named && msg.contains("on_bad_image"), "{msg}");

    let skip = loader(OnBadImage::Skip);
    let batches: Vec<_> = skip.epoch(0, 0, None).unwrap().collect::<anyhow::Result<_>>().unwrap();
    assert_eq!(batches.len(), 4);
    let skipped: Vec<&String> = batches.iter().flat_map(|b| &b.skipped).collect();
    let has = |what: &str| skipped.iter().filter(|s| s.contains(what)).count();
    assert_eq!(has("a.tar: sample nocaption: no caption"), 1, "{skipped:?}");
    assert_eq!(has("a.tar: sample broken: "), 1, "{skipped:?}");
    assert_eq!(has("b.tar: unreadable after byte"), 1, "{skipped:?}");
    assert!(batches.iter().all(|b| b.image_ids.len() == 4), "batches stay full");
}
