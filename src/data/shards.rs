//! Training pairs streamed from webdataset / img2dataset tar shards (`data.train_shards`).
//!
//! A sample is the run of consecutive tar members sharing a key (`000000042.jpg`, `000000042.txt`,
//! `000000042.json`): the image from `jpg|jpeg|png|webp`, the caption from `txt` (or the json's
//! `caption`; a list there gives one caption per epoch, as in annotation files), the image id from the
//! json's `image_id` or else the key.
//!
//! Order, as open_clip's webdataset pipeline: each epoch permutes the shards from the seed; worker `w` of
//! `W` streams shards `w, w+W, ...` of that order (again, reshuffled, once they run out before the epoch
//! does) through a shuffle buffer of `data.shuffle_buffer` samples and builds batches `w, w+W, ...`.
//! Every draw is keyed by (seed, epoch, worker, draw number), so the batches depend on the seed and the
//! number of workers only. A worker's [`WorkerPosition`] (shard, byte offset, draws, and where each
//! buffered sample lies) is all it needs to continue, so a checkpoint stores the positions and a resumed
//! run seeks to them: N steps + resume + N steps equals 2N steps bit for bit.

use super::annotations::{pre_caption, read_entries, resolve, TextOptions};
use crate::config::OnBadImage;
use crate::dist::{Dist, Place};
use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The image member extensions a sample may carry, in order of preference.
const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// `DIR/{00000..00331}.tar` -> `DIR/00000.tar` ... `DIR/00331.tar` (zero padding kept), and `{a,b}`
/// alternatives, as bash and webdataset expand them; several braces multiply out left to right.
pub fn expand(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        ensure!(!pattern.contains('}'), "shard pattern {pattern:?} has a `}}` without a `{{`");
        return Ok(vec![pattern.to_string()]);
    };
    let close =
        open + pattern[open..].find('}').with_context(|| format!("shard pattern {pattern:?}: unclosed `{{`"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let choices: Vec<String> = match body.split_once("..") {
        Some((a, b)) => {
            let parse =
                |s: &str| s.parse::<u64>().with_context(|| format!("shard pattern {pattern:?}: {s:?} is not a number"));
            let (lo, hi) = (parse(a)?, parse(b)?);
            ensure!(lo <= hi, "shard pattern {pattern:?}: the range {{{a}..{b}}} is empty");
            let width = if a.starts_with('0') { a.len() } else { 0 };
            (lo..=hi).map(|i| format!("{i:0width$}")).collect()
        }
        None => body.split(',').map(str::to_string).collect(),
    };
    let rest = expand(tail)?;
    Ok(choices.iter().flat_map(|c| rest.iter().map(move |r| format!("{head}{c}{r}"))).collect())
}

/// The shard files of a run and the number of samples an epoch draws.
#[derive(Debug, Clone)]
pub struct ShardSet {
    pub paths: Vec<PathBuf>,
    /// Samples per epoch: `data.train_num_samples`, or all samples of the shards, counted at start.
    pub num_samples: usize,
}

impl ShardSet {
    /// Expands `patterns` and checks every shard exists; without `num_samples`, counts the samples
    /// (reading only tar headers).
    pub fn open(patterns: &[String], num_samples: Option<usize>) -> Result<Self> {
        let mut paths = vec![];
        for p in patterns {
            paths.extend(expand(p)?.into_iter().map(PathBuf::from));
        }
        ensure!(!paths.is_empty(), "data.train_shards names no shard");
        for p in &paths {
            ensure!(p.is_file(), "data.train_shards: shard {} does not exist", p.display());
        }
        let num_samples = match num_samples {
            Some(n) => n,
            None => {
                eprintln!("counting the samples of {} shards (set data.train_num_samples to skip this)", paths.len());
                paths.iter().map(|p| count_samples(p)).sum::<Result<usize>>()?
            }
        };
        Ok(ShardSet { paths, num_samples })
    }

    fn name(&self, shard: usize) -> String {
        self.paths[shard].display().to_string()
    }
}

/// The number of keys in a shard, from its headers alone.
fn count_samples(path: &Path) -> Result<usize> {
    let file = File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let (mut n, mut last) = (0, None);
    let entries = archive.entries_with_seek().with_context(|| format!("cannot read shard {}", path.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("shard {} is damaged after {n} samples", path.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some((key, _)) = split_key(&entry.path()?.to_string_lossy()) else { continue };
        if last.as_deref() != Some(key.as_str()) {
            n += 1;
            last = Some(key);
        }
    }
    Ok(n)
}

/// webdataset's split of a member name: the key is the path up to the first dot of the file name, the
/// extension (lower-cased) the rest. Names without a dot belong to no sample.
fn split_key(path: &str) -> Option<(String, String)> {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = name_start + path[name_start..].find('.')?;
    Some((path[..dot].to_string(), path[dot + 1..].to_ascii_lowercase()))
}

/// Where a sample lies: its shard (index into [`ShardSet::paths`]) and the byte offset of its first
/// member's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locator {
    pub shard: usize,
    pub offset: u64,
}

/// One sample, read and checked; the image is still encoded.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: String,
    pub image: Vec<u8>,
    /// Cleaned captions.
    pub captions: Vec<String>,
    pub image_id: u64,
    pub at: Locator,
}

/// The members of one key as read from the tar: (extension, bytes).
struct Members {
    key: String,
    members: Vec<(String, Vec<u8>)>,
}

/// Reads the sample whose record starts at byte `offset`, and the offset of the next one; `None` at the
/// end of the archive. A member cut short (a truncated file) is an error.
fn read_members(file: &mut BufReader<File>, offset: u64) -> std::io::Result<Option<(Members, u64)>> {
    // Relative, so that the next sample's header, read ahead by the previous call, stays buffered.
    let here = file.stream_position()?;
    file.seek_relative(offset as i64 - here as i64)?;
    let mut archive = tar::Archive::new(&mut *file);
    let (mut sample, mut end): (Option<Members>, u64) = (None, 0);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let split = split_key(&name).filter(|_| entry.header().entry_type().is_file());
        if let (Some(s), Some((key, _))) = (&sample, &split) {
            if &s.key != key {
                break;
            }
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data)?;
        if data.len() as u64 != entry.size() {
            let msg =
                format!("member {name} holds {} of its {} bytes: the shard is truncated", data.len(), entry.size());
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, msg));
        }
        // The next record starts after this member's data, padded to tar's 512-byte blocks; extension
        // headers (long names, pax) belong to the record that follows them.
        end = entry.raw_file_position() + entry.size().div_ceil(512) * 512;
        if let Some((key, ext)) = split {
            sample.get_or_insert_with(|| Members { key, members: vec![] }).members.push((ext, data));
        }
    }
    Ok(sample.map(|s| (s, offset + end)))
}

/// Stable 63-bit id of a string: image ids from keys must not depend on the process or collide with
/// the queue's empty-slot marker (negative).
fn id_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| crate::rng::splitmix(h ^ b as u64)) >> 1
}

impl Members {
    /// The sample, or why it cannot be one.
    fn parse(self, at: Locator, text: TextOptions) -> std::result::Result<Sample, String> {
        let Members { key, mut members } = self;
        let image = IMAGE_EXTS
            .iter()
            .find_map(|ext| members.iter().position(|(e, _)| e == ext))
            .map(|i| members.swap_remove(i).1)
            .ok_or("no image member (jpg, jpeg, png or webp)")?;
        let json: Option<Value> = match members.iter().find(|(e, _)| e == "json") {
            Some((_, bytes)) => Some(serde_json::from_slice(bytes).map_err(|e| format!("its .json is not JSON: {e}"))?),
            None => None,
        };
        let field = |name: &str| json.as_ref().and_then(|j| j.get(name));
        let txt = members.iter().find(|(e, _)| e == "txt").map(|(_, b)| String::from_utf8_lossy(b).into_owned());
        let raw: Vec<String> = match (field("caption"), txt) {
            (Some(Value::Array(list)), _) if !list.is_empty() => list
                .iter()
                .map(|c| c.as_str().map(str::to_string).ok_or("a .json caption list entry is not a string"))
                .collect::<std::result::Result<_, _>>()?,
            (_, Some(t)) => vec![t],
            (Some(Value::String(s)), None) => vec![s.clone()],
            _ => return Err("no caption (a .txt member or a \"caption\" in the .json)".into()),
        };
        let captions: Vec<String> = raw.iter().map(|c| pre_caption(c, text.max_words, text.style)).collect();
        if let Some(c) = captions.iter().position(|c| c.trim().is_empty()) {
            return Err(format!("caption {:?} is empty after cleaning", raw[c]));
        }
        let image_id = match field("image_id") {
            Some(Value::String(s)) => id_of(&format!("id:{s}")),
            Some(Value::Number(n)) => id_of(&format!("id:{n}")),
            _ => id_of(&format!("key:{key}")),
        };
        Ok(Sample { key, image, captions, image_id, at })
    }
}

/// Where one loader worker stands in an epoch's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPosition {
    /// Completed passes over the worker's shards this epoch.
    pub pass: usize,
    /// The shard being read: its place in this pass's order, and the byte offset of its next sample.
    pub shard: usize,
    pub offset: u64,
    /// Samples drawn from the buffer so far this epoch (keys every random draw).
    pub draws: u64,
    /// Where the buffered samples lie, in buffer order.
    pub buffer: Vec<Locator>,
}

/// The positions of all workers within the current epoch (`None`: the worker has built no batch yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub workers: Vec<Option<WorkerPosition>>,
}

impl StreamPosition {
    /// Every rank's workers in rank order (what a checkpoint keeps), from each rank's own `local`.
    pub fn gather(local: Option<&StreamPosition>, dist: &Dist, device: &Device) -> Result<Option<StreamPosition>> {
        if dist.solo() {
            return Ok(local.cloned());
        }
        let all = dist.all_gather_bytes(&serde_json::to_vec(&local)?, device)?;
        let mut workers = vec![];
        for bytes in all {
            match serde_json::from_slice::<Option<StreamPosition>>(&bytes)? {
                Some(p) => workers.extend(p.workers),
                None => return Ok(None),
            }
        }
        Ok(Some(StreamPosition { workers }))
    }

    /// The part of a checkpoint's position that rank `place.rank` streams, `workers` per rank.
    pub fn of_rank(self, place: Place, workers: usize) -> Result<StreamPosition> {
        ensure!(
            self.workers.len() == workers * place.world,
            "the checkpoint's shard stream was read by {} loader workers in all, and each streams its own \
             shards: resume with data.num_workers = {} on each of the {} ranks",
            self.workers.len(),
            self.workers.len() / place.world,
            place.world
        );
        Ok(StreamPosition { workers: self.workers[place.rank * workers..(place.rank + 1) * workers].to_vec() })
    }
}

/// A sample drawn from the stream with its draw number.
pub struct Drawn {
    pub draw: u64,
    pub sample: Sample,
}

/// What the streams of all workers share in a run.
#[derive(Clone)]
pub struct Source {
    pub set: Arc<ShardSet>,
    pub text: TextOptions,
    pub on_bad: OnBadImage,
    pub seed: u64,
    /// `data.shuffle_buffer`.
    pub capacity: usize,
}

/// One worker's stream of samples in one epoch.
pub struct Stream {
    src: Source,
    /// `epoch/worker`: the key of this stream's random draws.
    key: String,
    /// This worker's shards in epoch order.
    own: Vec<usize>,
    /// The current pass's order of `own`.
    order: Vec<usize>,
    pos: WorkerPosition,
    buffer: Vec<Sample>,
    open: Option<(usize, BufReader<File>)>,
    /// Samples read in the current pass, and whether this stream started it (not a resumed position):
    /// a pass started and read through without a sample means no shard holds one.
    read_this_pass: usize,
    pass_started_here: bool,
    /// Bad samples met since the last call to [`Stream::take_skipped`], described.
    skipped: Vec<String>,
}

impl Stream {
    /// Worker `worker` of `workers` in `epoch`, from its start or from `at`.
    pub fn new(
        src: Source, epoch: usize, (worker, workers): (usize, usize), at: Option<&WorkerPosition>,
    ) -> Result<Self> {
        let mut all: Vec<usize> = (0..src.set.paths.len()).collect();
        all.shuffle(&mut crate::rng::stream(src.seed, "shards", "", epoch as u64));
        let own: Vec<usize> = all.into_iter().skip(worker).step_by(workers).collect();
        let start = WorkerPosition { pass: 0, shard: 0, offset: 0, draws: 0, buffer: vec![] };
        let mut stream = Stream {
            key: format!("{epoch}/{worker}"),
            order: own.clone(),
            own,
            src,
            pos: at.cloned().unwrap_or(start),
            buffer: vec![],
            open: None,
            read_this_pass: 0,
            pass_started_here: at.is_none(),
            skipped: vec![],
        };
        stream.order = stream.pass_order(stream.pos.pass);
        for &at in &stream.pos.buffer.clone() {
            let shard = stream.src.set.name(at.shard);
            let gone = || format!("{shard}: no sample at byte {} to resume from", at.offset);
            let (members, _) = stream.read_at(at)?.with_context(gone)?;
            let sample = members
                .parse(at, stream.src.text)
                .map_err(|why| anyhow::anyhow!("{}: {why}: has the shard changed?", gone()))?;
            stream.buffer.push(sample);
        }
        Ok(stream)
    }

    /// Pass 0 reads the worker's shards in epoch order; later passes (when an epoch draws more samples
    /// than the shards hold) reshuffle them.
    fn pass_order(&self, pass: usize) -> Vec<usize> {
        let mut order = self.own.clone();
        if pass > 0 {
            order.shuffle(&mut crate::rng::stream(self.src.seed, "shard-pass", &self.key, pass as u64));
        }
        order
    }

    /// Where the worker stands now.
    pub fn position(&self) -> WorkerPosition {
        WorkerPosition { buffer: self.buffer.iter().map(|s| s.at).collect(), ..self.pos.clone() }
    }

    /// The bad samples met since the last call, described with shard and key.
    pub fn take_skipped(&mut self) -> Vec<String> {
        std::mem::take(&mut self.skipped)
    }

    /// The random stream of draw `draw` for `purpose` (augmentation, caption choice).
    pub fn rng(&self, purpose: &str, draw: u64) -> rand_chacha::ChaCha8Rng {
        crate::rng::stream(self.src.seed, purpose, &self.key, draw)
    }

    /// The next sample: the buffer is filled to capacity from the current pass, then one buffered sample
    /// drawn at random. The buffer drains before the next pass starts, so each pass draws every sample of
    /// the worker's shards exactly once.
    pub fn draw(&mut self) -> Result<Drawn> {
        while self.buffer.len() < self.src.capacity.max(1) {
            match self.read_next()? {
                Some(sample) => self.buffer.push(sample),
                None if self.buffer.is_empty() => self.next_pass()?,
                None => break,
            }
        }
        let draw = self.pos.draws;
        let i = match self.buffer.len() {
            1 => 0,
            n => self.rng("shuffle", draw).random_range(0..n),
        };
        self.pos.draws += 1;
        Ok(Drawn { draw, sample: self.buffer.swap_remove(i) })
    }

    /// Puts `sample` in the place of the first buffered sample showing another image, and returns that
    /// one (a batch that would show one image only takes it instead); `None` when all show `sample`'s.
    pub fn exchange(&mut self, sample: Sample) -> Option<Sample> {
        let i = self.buffer.iter().position(|s| s.image_id != sample.image_id)?;
        Some(std::mem::replace(&mut self.buffer[i], sample))
    }

    /// `what` went wrong with the data: an error under `on_bad_image = "fail"`, otherwise noted with
    /// what is left out.
    pub fn bad(&mut self, what: String, left_out: &str) -> Result<()> {
        if self.src.on_bad == OnBadImage::Fail {
            bail!("{what} (set data.on_bad_image = \"skip\" to leave {left_out} out)");
        }
        self.skipped.push(format!("{what}; {left_out} left out"));
        Ok(())
    }

    fn next_pass(&mut self) -> Result<()> {
        ensure!(
            self.read_this_pass > 0 || !self.pass_started_here,
            "none of the shards {} holds a readable sample",
            self.own.iter().map(|&s| self.src.set.name(s)).collect::<Vec<_>>().join(", ")
        );
        self.pos = WorkerPosition { pass: self.pos.pass + 1, shard: 0, offset: 0, ..self.pos.clone() };
        self.order = self.pass_order(self.pos.pass);
        self.read_this_pass = 0;
        self.pass_started_here = true;
        Ok(())
    }

    /// The next good sample of this pass in shard order, passing over bad ones; `None` at its end.
    fn read_next(&mut self) -> Result<Option<Sample>> {
        while self.pos.shard < self.order.len() {
            let at = Locator { shard: self.order[self.pos.shard], offset: self.pos.offset };
            match self.read_at(at) {
                Ok(Some((members, next))) => {
                    self.pos.offset = next;
                    let key = members.key.clone();
                    match members.parse(at, self.src.text) {
                        Ok(sample) => {
                            self.read_this_pass += 1;
                            return Ok(Some(sample));
                        }
                        Err(why) => {
                            self.bad(format!("{}: sample {key}: {why}", self.src.set.name(at.shard)), "the sample")?
                        }
                    }
                }
                Ok(None) => self.next_shard(),
                Err(e) => {
                    let shard = self.src.set.name(at.shard);
                    self.bad(format!("{shard}: unreadable after byte {}: {e:#}", at.offset), "the rest of the shard")?;
                    self.next_shard();
                }
            }
        }
        Ok(None)
    }

    fn next_shard(&mut self) {
        self.pos.shard += 1;
        self.pos.offset = 0;
    }

    /// The members at `at` and where the next sample starts.
    fn read_at(&mut self, at: Locator) -> Result<Option<(Members, u64)>> {
        if self.open.as_ref().is_none_or(|(s, _)| *s != at.shard) {
            let path = &self.src.set.paths[at.shard];
            let file = File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
            self.open = Some((at.shard, BufReader::with_capacity(1 << 18, file)));
        }
        let (_, file) = self.open.as_mut().expect("opened above");
        Ok(read_members(file, at.offset)?)
    }
}

/// What [`write()`] wrote.
pub struct Written {
    pub shards: Vec<PathBuf>,
    pub samples: usize,
}

/// Writes the pairs of the annotation files `anns` as tar shards `OUT/00000.tar`, ... of `per_shard`
/// samples each in the img2dataset layout: `{key}.{jpg|png|webp}`, `{key}.txt` (the first caption as
/// written), `{key}.json` (`caption`: all of them, `image_id`: the entry's, else its image path, so
/// pairs of one image keep one id), and `{shard}_stats.json`. Existing shards are never overwritten.
pub fn write(anns: &[PathBuf], image_root: Option<&Path>, out: &Path, per_shard: usize) -> Result<Written> {
    ensure!(per_shard > 0, "--per-shard must be positive");
    let mut samples = vec![];
    for ann in anns {
        for (i, e) in read_entries(ann)?.into_iter().enumerate() {
            let image = resolve(ann, image_root, &e.image);
            let ext = image.extension().and_then(|x| x.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
            let ext = if ext == "jpeg" { "jpg".to_string() } else { ext };
            ensure!(
                IMAGE_EXTS.contains(&ext.as_str()),
                "{}: entry {i}: image {} is not a .jpg, .jpeg, .png or .webp file, which is what shards hold",
                ann.display(),
                image.display()
            );
            let id = e.image_id.clone().unwrap_or_else(|| e.image.clone());
            samples.push((image, ext, e.captions, id));
        }
    }
    ensure!(
        !samples.is_empty(),
        "no pairs in {}",
        anns.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut shards = vec![];
    for (s, chunk) in samples.chunks(per_shard).enumerate() {
        let path = out.join(format!("{s:05}.tar"));
        ensure!(!path.exists(), "{} exists: write the shards into an empty folder", path.display());
        crate::write_atomic(&path, |tmp| {
            let mut tar = tar::Builder::new(std::io::BufWriter::new(File::create(tmp)?));
            for (k, (image, ext, captions, id)) in chunk.iter().enumerate() {
                let key = format!("{:09}", s * per_shard + k);
                let bytes = std::fs::read(image).with_context(|| format!("cannot read image {}", image.display()))?;
                let json = serde_json::json!({ "caption": captions, "image_id": id });
                for (name, data) in [
                    (format!("{key}.{ext}"), bytes),
                    (format!("{key}.txt"), captions[0].clone().into_bytes()),
                    (format!("{key}.json"), serde_json::to_vec(&json)?),
                ] {
                    let mut header = tar::Header::new_gnu();
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    tar.append_data(&mut header, name, data.as_slice())?;
                }
            }
            tar.into_inner()?.flush()?;
            Ok(())
        })?;
        let stats = serde_json::json!({ "count": chunk.len(), "successes": chunk.len(), "failed_to_download": 0 });
        std::fs::write(out.join(format!("{s:05}_stats.json")), serde_json::to_string_pretty(&stats)?)?;
        shards.push(path);
    }
    Ok(Written { shards, samples: samples.len() })
}

/// `bench data --shards`: the configured training images (the synthetic set when none) decoded and
/// train-transformed from loose files and from tar shards of the same pairs, on `data.num_workers`
/// threads, one pass each, best of three alternating runs.
#[derive(Debug, Serialize)]
pub struct ShardBench {
    pub loose: super::image::BenchReport,
    pub shards: super::image::BenchReport,
    /// Shard images/s over loose-file images/s.
    pub ratio: f64,
}

impl std::fmt::Display for ShardBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "loose files: {}", self.loose)?;
        writeln!(f, "tar shards:  {}", self.shards)?;
        write!(f, "shards / loose files: {:.2}x", self.ratio)
    }
}

/// With `cold`, the OS page cache is dropped before every timed run (Linux, as root), so both read from
/// the disk as a first epoch over data larger than memory does.
pub fn bench(mut cfg: crate::config::Config, work_dir: &Path, cold: bool) -> Result<ShardBench> {
    ensure!(cfg.data.train_shards.is_empty(), "bench data --shards writes its own shards from data.train_ann");
    super::resolve(&mut cfg, work_dir)?;
    let set = super::train_set(&cfg)?;
    let threads = cfg.data.num_workers.max(1);
    let dir = work_dir.join("bench-shards");
    let _ = std::fs::remove_dir_all(&dir);
    let written = write(&cfg.data.train_ann, cfg.data.image_root.as_deref(), &dir, set.len().div_ceil(4 * threads))?;
    let shards = Arc::new(ShardSet { paths: written.shards, num_samples: set.len() });
    let transform = super::image::TrainTransform::from_config(&cfg.data, cfg.model.vision.image_res);
    let paths: Vec<PathBuf> = set.entries.iter().map(|e| e.image.clone()).collect();
    let text = super::text_options(&cfg);
    let from_shards = || {
        super::image::timed(threads, 1, |t, round| {
            let src = Source { set: Arc::clone(&shards), text, on_bad: OnBadImage::Fail, seed: 0, capacity: 1 };
            let mut stream = Stream::new(src, round, (t, threads), None)?;
            let mut out = vec![0f32; 3 * transform.res * transform.res];
            let n = paths.len() / threads + if t == 0 { paths.len() % threads } else { 0 };
            for _ in 0..n {
                let drawn = stream.draw()?;
                let img = super::image::decode_rgb(&drawn.sample.image)?;
                transform.apply(&img, &mut stream.rng("augment", drawn.draw), &mut out)?;
            }
            Ok(n)
        })
    };
    // Alternating, best of three each: the page cache and the machine's state treat both alike.
    let (mut loose, mut from_tar) = (vec![], vec![]);
    let drop_caches = || -> Result<()> {
        if cold {
            std::process::Command::new("sync").status().context("cannot run sync")?;
            std::fs::write("/proc/sys/vm/drop_caches", "3")
                .context("--cold drops the page cache through /proc/sys/vm/drop_caches, which needs root on Linux")?;
        }
        Ok(())
    };
    for _ in 0..3 {
        drop_caches()?;
        loose.push(super::image::bench_transforms(&paths, &transform, threads, 1)?);
        drop_caches()?;
        from_tar.push(from_shards()?);
    }
    let best = |v: Vec<super::image::BenchReport>| {
        v.into_iter().max_by(|a, b| a.images_per_sec.total_cmp(&b.images_per_sec)).expect("three runs")
    };
    let (loose, shards) = (best(loose), best(from_tar));
    std::fs::remove_dir_all(&dir)?;
    Ok(ShardBench { ratio: shards.images_per_sec / loose.images_per_sec, loose, shards })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_bash() {
        assert_eq!(
            expand("d/{00008..00011}.tar").unwrap(),
            ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
        );
        assert_eq!(expand("{a,b}/{1..2}.tar").unwrap(), ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]);
        assert_eq!(expand("plain.tar").unwrap(), ["plain.tar"]);
        for bad in ["d/{3..1}.tar", "d/{0..x}.tar", "d/{0..2.tar", "d/0}.tar"] {
            assert!(expand(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("a.b/000012.seg.png"), Some(("a.b/000012".into(), "seg.png".into())));
        assert_eq!(split_key("000012.JPG"), Some(("000012".into(), "jpg".into())));
        assert_eq!(split_key("README"), None);
    }

    #[test]
    fn image_ids_are_non_negative_and_stable() {
        let id = id_of("key:000000001");
        assert!(id <= i64::MAX as u64);
        assert_eq!(id, id_of("key:000000001"));
        assert_ne!(id, id_of("key:000000002"));
    }
}
