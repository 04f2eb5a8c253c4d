//! Batches for training and evaluation, decoded and augmented on worker threads ahead of the step.
//!
//! From annotation files, every batch is a pure function of (seed, epoch, batch index): the epoch
//! order is a seeded permutation, each sample's augmentation and caption choice are seeded by (seed,
//! epoch, sample), and workers only decide *when* a batch is ready, never *what* is in it. So the same
//! seed gives identical batches for any number of workers, and training can resume at any batch of an
//! epoch. From tar shards (`shards`), worker `w` streams its own shards and builds batches `w, w+W, ...`:
//! batches depend on the seed and the number of workers, and resuming seeks each worker back to the
//! [`WorkerPosition`] its last batch carried.

use super::annotations::{TextOptions, TrainSet};
use super::image::{decode_rgb, load_rgb, test_transform, TrainTransform};
use super::shards::{Drawn, ShardSet, Source, Stream, StreamPosition, WorkerPosition};
use super::tokenizer::{to_tensors, Encoded, TextTokenizer};
use crate::config::{Config, Normalize, OnBadImage};
use crate::dist::Place;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// One training batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `f32 [B, 3, res, res]`, CLIP-normalised.
    pub images: Tensor,
    /// `u32 [B, L]`: `[CLS] ... [SEP]` then `[PAD]`, L = longest caption in the batch.
    pub input_ids: Tensor,
    /// `f32 [B, L]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `input_ids` on the host, row-major (MLM masks from them without reading the device).
    pub token_ids: Vec<u32>,
    /// Image id of each pair (equal ids = same image).
    pub image_ids: Vec<u64>,
    /// Equal values mark pairs whose cleaned captions are identical (the first such pair's position).
    pub caption_groups: Vec<usize>,
    /// Which sample each pair is: its index in the [`TrainSet`], or (shards) its draw number in its
    /// worker's stream.
    pub indices: Vec<usize>,
    /// Position of this batch in its epoch (what a checkpoint stores to resume).
    pub batch_index: usize,
    /// Shards: the worker that built this batch and its position after it (what a checkpoint stores).
    pub stream: Option<(usize, WorkerPosition)>,
    /// Bad samples met while building this batch and left out (`on_bad_image = "skip"`), described with
    /// their file (and key), each reported once per epoch.
    pub skipped: Vec<String>,
}

/// What a worker hands back: the batch before it becomes tensors on the training device.
struct RawBatch {
    images: Vec<f32>,
    text: Encoded,
    image_ids: Vec<u64>,
    caption_groups: Vec<usize>,
    indices: Vec<usize>,
    batch_index: usize,
    stream: Option<(usize, WorkerPosition)>,
    skipped: Vec<String>,
}

/// Where training pairs come from: annotation files or tar shards.
pub enum TrainData {
    Pairs(Arc<TrainSet>),
    Shards(Arc<ShardSet>),
}

/// What building any batch needs, whatever the source.
struct Builder {
    tokenizer: Arc<TextTokenizer>,
    transform: TrainTransform,
    batch_size: usize,
    max_tokens: usize,
    seed: u64,
    on_bad_image: OnBadImage,
    /// ITM needs two images in every batch (see [`separate_images`]).
    two_images_per_batch: bool,
    text: TextOptions,
    shuffle_buffer: usize,
    /// Data parallel: this rank builds its share of every global batch of `batch_size * world` pairs.
    place: Place,
}

/// The training data loader: shuffled each epoch, `drop_last`, prefetched by `num_workers` threads.
pub struct TrainLoader {
    data: TrainData,
    builder: Arc<Builder>,
    num_workers: usize,
    prefetch: usize,
    device: Device,
}

impl TrainLoader {
    /// A loader over `data` with the batch size, resolution, seed and `[data]` settings of `cfg`.
    pub fn new(
        data: TrainData, tokenizer: Arc<TextTokenizer>, cfg: &Config, device: Device, place: Place,
    ) -> Result<Self> {
        let batch_size = cfg.train.batch_size;
        let global = batch_size * place.world;
        ensure!(batch_size >= 1, "batch size must be at least 1");
        let two_images_per_batch = cfg.objectives.itm;
        let num_workers = cfg.data.num_workers.max(1);
        match &data {
            TrainData::Pairs(set) => {
                if two_images_per_batch {
                    check_two_images_per_batch(set, batch_size, &cfg.data.train_ann)?;
                }
                ensure!(
                    set.len() >= global,
                    "the training set has {} pairs, fewer than one batch of {global} ({batch_size} on each of {} \
                     ranks; batches are full: drop_last)",
                    set.len(),
                    place.world
                );
            }
            TrainData::Shards(set) => {
                let streams = num_workers * place.world;
                ensure!(
                    set.paths.len() >= streams,
                    "data.train_shards names {} shards but {num_workers} loader workers on each of {} ranks each \
                     stream their own: lower data.num_workers, use fewer ranks, or write more shards",
                    set.paths.len(),
                    place.world
                );
                ensure!(
                    set.num_samples >= global,
                    "an epoch of {} samples (data.train_num_samples) is less than one batch of {global}",
                    set.num_samples
                );
            }
        }
        let builder = Builder {
            transform: TrainTransform::from_config(&cfg.data, cfg.model.vision.image_res),
            tokenizer,
            batch_size,
            max_tokens: cfg.data.max_tokens,
            seed: cfg.seed,
            on_bad_image: cfg.data.on_bad_image,
            two_images_per_batch,
            text: super::text_options(cfg),
            shuffle_buffer: cfg.data.shuffle_buffer,
            place,
        };
        Ok(TrainLoader { data, builder: Arc::new(builder), num_workers, prefetch: cfg.data.prefetch.max(1), device })
    }

    /// Full global batches per epoch (this rank builds its share of each); the last
    /// `len % (batch_size * ranks)` pairs of each epoch are dropped.
    pub fn batches_per_epoch(&self) -> usize {
        let samples = match &self.data {
            TrainData::Pairs(set) => set.len(),
            TrainData::Shards(set) => set.num_samples,
        };
        samples / (self.builder.batch_size * self.builder.place.world)
    }

    /// The batches of `epoch` from `start_batch` on (0 for a fresh epoch, the checkpoint's next batch to
    /// resume, with the checkpoint's stream position for shards), in order. Items are errors for bad
    /// data under `on_bad_image = "fail"`. The iterator owns what it needs, so the loader stays free
    /// while an epoch runs.
    pub fn epoch(
        &self, epoch: usize, start_batch: usize, at: Option<&StreamPosition>,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch>>>> {
        let total = self.batches_per_epoch();
        ensure!(start_batch <= total, "cannot start epoch {epoch} at batch {start_batch}: it has {total} batches");
        let builder = Arc::clone(&self.builder);
        let raw: Box<dyn Iterator<Item = Result<RawBatch>>> = match &self.data {
            TrainData::Pairs(set) => {
                let mut order = epoch_order(builder.seed, epoch, set.len());
                if builder.two_images_per_batch {
                    separate_images(&mut order, |i| set.entries[i].image_id, builder.batch_size);
                }
                let (set, order) = (Arc::clone(set), Arc::new(order));
                let depth = self.num_workers * self.prefetch;
                Box::new(Prefetch::new(start_batch..total, self.num_workers, depth, move |b| {
                    builder.pairs_batch(&set, &order, epoch, b)
                })?)
            }
            TrainData::Shards(set) => {
                let workers = self.num_workers;
                let at = match at {
                    Some(p) => {
                        ensure!(
                            p.workers.len() == workers,
                            "the checkpoint's shard stream was read by {} loader workers, and each streams its own \
                             shards: resume with data.num_workers = {0}",
                            p.workers.len()
                        );
                        p.workers.clone()
                    }
                    None => vec![None; workers],
                };
                let set = Arc::clone(set);
                Box::new(ShardBatches::new(start_batch..total, at, self.prefetch, move |w, at, batches, tx| {
                    builder.shard_worker(&set, epoch, (w, workers), at, batches, tx)
                })?)
            }
        };
        let (res, device) = (self.builder.transform.res, self.device.clone());
        Ok(Box::new(raw.map(move |raw| {
            let raw = raw?;
            let b = raw.indices.len();
            let (input_ids, attention_mask) = to_tensors(&raw.text, &device)?;
            Ok(Batch {
                images: Tensor::from_vec(raw.images, (b, 3, res, res), &device)?,
                input_ids,
                attention_mask,
                token_ids: raw.text.ids,
                image_ids: raw.image_ids,
                caption_groups: raw.caption_groups,
                indices: raw.indices,
                batch_index: raw.batch_index,
                stream: raw.stream,
                skipped: raw.skipped,
            })
        })))
    }
}

/// The permutation of `0..n` that epoch `epoch` visits samples in.
fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut crate::rng::stream(seed, "order", "", epoch as u64));
    order
}

/// Refuses, before any training, a set in which some image has so many pairs that batches of
/// `batch_size` cannot all show two images (ITM draws its negatives from other images of the batch):
/// the pairs of the other images must fill at least one slot of every full batch.
fn check_two_images_per_batch(set: &TrainSet, batch_size: usize, files: &[std::path::PathBuf]) -> Result<()> {
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for e in &set.entries {
        *counts.entry(e.image_id).or_default() += 1;
    }
    let Some((&id, &most)) = counts.iter().max_by_key(|(&id, &n)| (n, std::cmp::Reverse(id))) else { return Ok(()) };
    let batches = set.len() / batch_size;
    if set.len() - most < batches {
        let image =
            set.entries.iter().find(|e| e.image_id == id).map(|e| e.image.display().to_string()).unwrap_or_default();
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        bail!(
            "{}: image {image} has {most} of the {} training pairs, so some batch of {batch_size} would show only it \
             and ITM would have no negative: add pairs of other images, lower train.batch_size, or turn \
             objectives.itm off",
            files.join(", "),
            set.len()
        );
    }
    Ok(())
}

/// Makes every full batch of `order` (batches of `bs`, in order) show at least two images: a batch of one
/// image swaps one of its pairs with the first later pair (wrapping) of another image whose batch keeps
/// two images without it, or that lies in the tail drop_last leaves out. Deterministic, and a no-op for
/// orders without such batches; [`check_two_images_per_batch`] guarantees a partner exists.
fn separate_images(order: &mut [usize], image_id: impl Fn(usize) -> u64, bs: usize) {
    let full = order.len() / bs * bs;
    for start in (0..full).step_by(bs) {
        let id = image_id(order[start]);
        if order[start..start + bs].iter().any(|&i| image_id(i) != id) {
            continue;
        }
        let keeps_two = |p: usize, order: &[usize]| {
            p >= full || {
                let batch = p / bs * bs;
                (batch..batch + bs).any(|q| q != p && image_id(order[q]) != id)
            }
        };
        let partner = (1..order.len())
            .map(|d| (start + bs - 1 + d) % order.len())
            .find(|&p| !(start..start + bs).contains(&p) && image_id(order[p]) != id && keeps_two(p, order));
        if let Some(p) = partner {
            order.swap(start, p);
        }
    }
}

impl Builder {
    /// This rank's part of batch `b` of the epoch from annotation files: with R ranks, rank r takes the
    /// pairs at positions `(b*R + r)*B ..` (B of them) of `order`, so one rank at a batch of R*B pairs
    /// sees the same pairs in the same order.
    /// An unreadable image (with `skip`) is replaced by the next readable pairs after that slice,
    /// wrapping around, so the batch stays full and no other batch changes (resuming by batch index
    /// stays exact); a pair used as a replacement also appears in its own batch.
    fn pairs_batch(&self, set: &TrainSet, order: &[usize], epoch: usize, b: usize) -> Result<RawBatch> {
        let (n, bs, place) = (order.len(), self.batch_size, self.place);
        let chunk = b * place.world + place.rank;
        let own = chunk * bs..(chunk + 1) * bs;
        let mut images = vec![0f32; bs * self.plane()];
        let (mut indices, mut image_ids, mut captions, mut skipped) = (vec![], vec![], vec![], vec![]);
        for pos in (own.start..own.start + n).map(|p| p % n) {
            if indices.len() == bs {
                break;
            }
            let idx = order[pos];
            let entry = &set.entries[idx];
            let img = match load_rgb(&entry.image) {
                Ok(img) => img,
                Err(e) if self.on_bad_image == OnBadImage::Fail => {
                    return Err(e.context(format!("training pair {idx} (epoch {epoch}, batch {b}); set data.on_bad_image = \"skip\" to drop such pairs")));
                }
                Err(_) => {
                    if own.contains(&pos) {
                        skipped.push(format!("unreadable image {}", entry.image.display()));
                    }
                    continue;
                }
            };
            let mut rng = crate::rng::stream(self.seed, "augment", &epoch.to_string(), idx as u64);
            self.augment(&img, &mut rng, &mut images, indices.len(), &entry.image.display().to_string())?;
            indices.push(idx);
            image_ids.push(entry.image_id);
            captions.push(set.caption(idx, self.seed, epoch).to_string());
        }
        if indices.len() < bs {
            bail!("only {} of the {n} training images are readable, fewer than one batch of {bs}", indices.len());
        }
        self.finish(images, captions, image_ids, indices, b, skipped)
    }

    fn plane(&self) -> usize {
        3 * self.transform.res * self.transform.res
    }

    /// Train-transforms `img` into slot `slot` of `images`.
    fn augment(
        &self, img: &::image::RgbImage, rng: &mut impl Rng, images: &mut [f32], slot: usize, what: &str,
    ) -> Result<()> {
        let plane = self.plane();
        self.transform
            .apply(img, rng, &mut images[slot * plane..(slot + 1) * plane])
            .with_context(|| format!("transforming {what}"))
    }

    /// Tokenises the captions and marks identical ones.
    fn finish(
        &self, images: Vec<f32>, captions: Vec<String>, image_ids: Vec<u64>, indices: Vec<usize>, b: usize,
        skipped: Vec<String>,
    ) -> Result<RawBatch> {
        let text = self.tokenizer.encode_batch(&captions, self.max_tokens)?;
        let caption_groups = captions.iter().map(|c| captions.iter().position(|d| d == c).unwrap_or(0)).collect();
        Ok(RawBatch { images, text, image_ids, caption_groups, indices, batch_index: b, stream: None, skipped })
    }

    /// Worker `w`'s part of a shard epoch: its stream from `at` (or the epoch's start), batches
    /// `batches` (every W-th) sent in order until one fails or the receiver is gone. Every rank's workers
    /// stream disjoint shards: worker w of rank r is stream r * W + w of all ranks' workers.
    fn shard_worker(
        &self, set: &Arc<ShardSet>, epoch: usize, (w, workers): (usize, usize), at: Option<WorkerPosition>,
        batches: Vec<usize>, tx: mpsc::SyncSender<Result<RawBatch>>,
    ) {
        let src = Source {
            set: Arc::clone(set),
            text: self.text,
            on_bad: self.on_bad_image,
            seed: self.seed,
            capacity: self.shuffle_buffer,
        };
        let place = self.place;
        let stream = Stream::new(src, epoch, (place.rank * workers + w, workers * place.world), at.as_ref());
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for b in batches {
            let batch = self.shard_batch(&mut stream, set, b).map(|mut raw| {
                raw.stream = Some((w, stream.position()));
                raw
            });
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    }

    /// Batch `b` from `stream`: B draws from its shuffle buffer. An undecodable image is reported and
    /// replaced by the next draw; a batch about to show one image only takes its last pair from
    /// another image in the buffer.
    fn shard_batch(&self, stream: &mut Stream, set: &ShardSet, b: usize) -> Result<RawBatch> {
        let bs = self.batch_size;
        let mut images = vec![0f32; bs * self.plane()];
        let (mut indices, mut image_ids, mut captions) = (vec![], vec![], vec![]);
        while indices.len() < bs {
            let Drawn { draw, mut sample } = stream.draw()?;
            if self.two_images_per_batch && indices.len() + 1 == bs && image_ids.iter().all(|&i| i == sample.image_id) {
                sample = stream.exchange(sample.clone()).with_context(|| {
                    format!(
                        "{}: batch {b} would show only the image of sample {}, and so does every sample in the \
                         shuffle buffer: ITM needs two images per batch (raise data.shuffle_buffer or turn \
                         objectives.itm off)",
                        set.paths[sample.at.shard].display(),
                        sample.key
                    )
                })?;
            }
            let what = format!("{}: sample {}", set.paths[sample.at.shard].display(), sample.key);
            let img = match decode_rgb(&sample.image) {
                Ok(img) => img,
                Err(e) => {
                    stream.bad(format!("{what}: {e:#}"), "the sample")?;
                    continue;
                }
            };
            self.augment(&img, &mut stream.rng("augment", draw), &mut images, indices.len(), &what)?;
            let pick = match sample.captions.len() {
                1 => 0,
                n => stream.rng("caption", draw).random_range(0..n),
            };
            captions.push(sample.captions.swap_remove(pick));
            indices.push(draw as usize);
            image_ids.push(sample.image_id);
        }
        self.finish(images, captions, image_ids, indices, b, stream.take_skipped())
    }
}

/// The batches of a shard epoch: worker `w` builds batches `w, w+W, ...` (of the range) into its own
/// bounded channel, and they are handed out in order, round robin. Dropping it stops the workers.
struct ShardBatches {
    channels: Vec<mpsc::Receiver<Result<RawBatch>>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    end: usize,
}

impl ShardBatches {
    fn new(
        range: Range<usize>, at: Vec<Option<WorkerPosition>>, prefetch: usize,
        f: impl Fn(usize, Option<WorkerPosition>, Vec<usize>, mpsc::SyncSender<Result<RawBatch>>) + Send + Sync + 'static,
    ) -> Result<Self> {
        let f = Arc::new(f);
        let count = at.len();
        let (mut channels, mut workers) = (vec![], vec![]);
        for (w, at) in at.into_iter().enumerate() {
            let batches: Vec<usize> = range.clone().filter(|b| b % count == w).collect();
            let (tx, rx) = mpsc::sync_channel(prefetch);
            let f = Arc::clone(&f);
            let handle = std::thread::Builder::new()
                .name(format!("alignfuse-shards-{w}"))
                .spawn(move || f(w, at, batches, tx))
                .context("cannot start a data worker thread")?;
            channels.push(rx);
            workers.push(handle);
        }
        Ok(ShardBatches { channels, workers, next: range.start, end: range.end })
    }
}

impl Iterator for ShardBatches {
    type Item = Result<RawBatch>;

    fn next(&mut self) -> Option<Result<RawBatch>> {
        if self.next >= self.end {
            return None;
        }
        let w = self.next % self.channels.len();
        self.next += 1;
        Some(self.channels[w].recv().unwrap_or_else(|_| {
            self.next = self.end;
            Err(anyhow!("data worker {w} stopped (it panicked)"))
        }))
    }
}

impl Drop for ShardBatches {
    fn drop(&mut self) {
        self.channels.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A batch of evaluation images, test-transformed.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `f32 [b, 3, res, res]`.
    pub images: Tensor,
    /// Which images of the set these are (in order; the last batch may be shorter).
    pub range: Range<usize>,
}

/// The images of a retrieval set (`RetrievalSet::images`) in order, `batch_size` at a time with the
/// test transform, prefetched by `num_workers` threads. An unreadable image is an error: evaluation
/// never drops images, since that would change the metric.
pub fn eval_image_batches(
    images: &[PathBuf], res: usize, norm: Normalize, batch_size: usize, num_workers: usize, device: Device,
) -> Result<impl Iterator<Item = Result<ImageBatch>>> {
    ensure!(batch_size >= 1, "evaluation batch size must be at least 1");
    let paths: Arc<Vec<PathBuf>> = Arc::new(images.to_vec());
    let n = paths.len();
    let workers = num_workers.max(1);
    let pool = Prefetch::new(0..n.div_ceil(batch_size), workers, 2 * workers, move |b| {
        let range = b * batch_size..((b + 1) * batch_size).min(n);
        let plane = 3 * res * res;
        let mut data = vec![0f32; range.len() * plane];
        for (slot, path) in paths[range.clone()].iter().enumerate() {
            test_transform(&load_rgb(path)?, res, norm, &mut data[slot * plane..(slot + 1) * plane])?;
        }
        Ok((range, data))
    })?;
    Ok(pool.map(move |item| {
        let (range, data) = item?;
        Ok(ImageBatch { images: Tensor::from_vec(data, (range.len(), 3, res, res), &device)?, range })
    }))
}

/// An ordered parallel map over `jobs` with at most `depth` results in flight: workers take job
/// indices from a shared queue, results are handed out in index order. Dropping it stops the workers
/// after their current job.
struct Prefetch<T> {
    jobs: Option<mpsc::Sender<usize>>,
    results: mpsc::Receiver<(usize, Result<T>)>,
    workers: Vec<JoinHandle<()>>,
    ready: HashMap<usize, Result<T>>,
    next_dispatch: usize,
    next_yield: usize,
    end: usize,
}

impl<T: Send + 'static> Prefetch<T> {
    fn new(
        jobs: Range<usize>, workers: usize, depth: usize, f: impl Fn(usize) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let f = Arc::new(f);
        let (job_tx, job_rx) = mpsc::channel::<usize>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (result_tx, results) = mpsc::channel();
        let workers = (0..workers)
            .map(|w| {
                let (f, job_rx, result_tx) = (Arc::clone(&f), Arc::clone(&job_rx), result_tx.clone());
                std::thread::Builder::new()
                    .name(format!("alignfuse-data-{w}"))
                    .spawn(move || loop {
                        let Ok(Ok(i)) = job_rx.lock().map(|rx| rx.recv()) else { break };
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i)))
                            .unwrap_or_else(|_| Err(anyhow!("data worker panicked while preparing item {i}")));
                        if result_tx.send((i, result)).is_err() {
                            break;
                        }
                    })
                    .context("cannot start a data worker thread")
            })
            .collect::<Result<_>>()?;
        let mut pool = Prefetch {
            jobs: Some(job_tx),
            results,
            workers,
            ready: HashMap::new(),
            next_dispatch: jobs.start,
            next_yield: jobs.start,
            end: jobs.end,
        };
        for _ in 0..depth.max(1) {
            pool.dispatch();
        }
        Ok(pool)
    }

    fn dispatch(&mut self) {
        if self.next_dispatch < self.end {
            if let Some(jobs) = &self.jobs {
                // A send fails only once every worker has exited; `next` then reports it.
                let _ = jobs.send(self.next_dispatch);
            }
            self.next_dispatch += 1;
        }
    }
}

impl<T: Send + 'static> Iterator for Prefetch<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.next_yield >= self.end {
            return None;
        }
        loop {
            if let Some(result) = self.ready.remove(&self.next_yield) {
                self.next_yield += 1;
                self.dispatch();
                return Some(result);
            }
            match self.results.recv() {
                Ok((i, result)) => {
                    self.ready.insert(i, result);
                }
                Err(_) => {
                    self.next_yield = self.end;
                    return Some(Err(anyhow!("all data worker threads have stopped")));
                }
            }
        }
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        self.jobs.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CaptionStyle;
    use crate::data::annotations::{RetrievalSet, TextOptions, TrainEntry};

    const TEXT: TextOptions = TextOptions { max_words: 30, style: CaptionStyle::Albef };

    /// `n` tiny images with captions "image k" (k spelled out) plus a vocabulary covering them.
    struct Fixture {
        dir: PathBuf,
        tokenizer: Arc<TextTokenizer>,
    }

    const WORDS: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];

    impl Fixture {
        fn new(name: &str, n: usize, bad: &[usize]) -> (Fixture, Arc<TrainSet>) {
            let dir = std::env::temp_dir().join(format!("alignfuse-loader-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut ann = vec![];
            for k in 0..n {
                let file = format!("{k}.png");
                if bad.contains(&k) {
                    std::fs::write(dir.join(&file), b"corrupt").unwrap();
                } else {
                    ::image::RgbImage::from_fn(10, 7, |x, y| {
                        ::image::Rgb([(k * 20) as u8, (x * 9) as u8, (y * 30) as u8])
                    })
                    .save(dir.join(&file))
                    .unwrap();
                }
                ann.push(serde_json::json!({"image": file, "caption": [format!("image {}", WORDS[k % 10]), "another caption"]}));
            }
            std::fs::write(dir.join("train.json"), serde_json::to_string(&ann).unwrap()).unwrap();
            let vocab: Vec<&str> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "image", "another", "caption"]
                .into_iter()
                .chain(WORDS)
                .collect();
            std::fs::write(dir.join("vocab.txt"), vocab.join("\n")).unwrap();
            let tokenizer = Arc::new(TextTokenizer::from_file(&dir.join("vocab.txt")).unwrap());
            let set = Arc::new(TrainSet::load(&[dir.join("train.json")], None, TEXT, false).unwrap());
            (Fixture { dir, tokenizer }, set)
        }

        fn loader(&self, set: &Arc<TrainSet>, workers: usize, batch: usize, on_bad: OnBadImage) -> TrainLoader {
            let mut cfg = Config::default();
            cfg.model.vision.image_res = 8;
            cfg.train.batch_size = batch;
            cfg.data.num_workers = workers;
            cfg.data.prefetch = 2;
            cfg.data.on_bad_image = on_bad;
            TrainLoader::new(
                TrainData::Pairs(Arc::clone(set)),
                Arc::clone(&self.tokenizer),
                &cfg,
                Device::Cpu,
                Place::SINGLE,
            )
            .unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A batch as plain values, for comparisons: images, ids, mask, indices, image ids.
    type Flat = (Vec<f32>, Vec<u32>, Vec<f32>, Vec<usize>, Vec<u64>);

    fn flat(b: &Batch) -> Flat {
        (
            b.images.flatten_all().unwrap().to_vec1().unwrap(),
            b.input_ids.flatten_all().unwrap().to_vec1().unwrap(),
            b.attention_mask.flatten_all().unwrap().to_vec1().unwrap(),
            b.indices.clone(),
            b.image_ids.clone(),
        )
    }

    fn epoch(loader: &TrainLoader, e: usize, start: usize) -> Vec<Batch> {
        loader.epoch(e, start, None).unwrap().collect::<Result<Vec<_>>>().unwrap()
    }

    #[test]
    fn identical_batches_for_any_worker_count_and_resume() {
        let (fx, set) = Fixture::new("det", 11, &[]);
        let one = epoch(&fx.loader(&set, 1, 3, OnBadImage::Fail), 2, 0);
        let three = epoch(&fx.loader(&set, 3, 3, OnBadImage::Fail), 2, 0);
        assert_eq!(one.len(), 3, "11 pairs in batches of 3, last 2 dropped");
        assert_eq!(one.iter().map(flat).collect::<Vec<_>>(), three.iter().map(flat).collect::<Vec<_>>());
        let b = &one[0];
        assert_eq!(b.images.dims(), [3, 3, 8, 8]);
        assert_eq!(b.input_ids.dims()[0], 3);
        assert_eq!(b.input_ids.dtype(), candle_core::DType::U32);
        let resumed = epoch(&fx.loader(&set, 2, 3, OnBadImage::Fail), 2, 1);
        assert_eq!(resumed.iter().map(flat).collect::<Vec<_>>(), one[1..].iter().map(flat).collect::<Vec<_>>());
        assert_eq!(resumed[0].batch_index, 1);
        let mut seen: Vec<usize> = one.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9, "no pair twice in an epoch");
        let other = epoch(&fx.loader(&set, 2, 3, OnBadImage::Fail), 3, 0);
        assert_ne!(one[0].indices, other[0].indices, "another epoch, another order");
        assert!(fx.loader(&set, 1, 3, OnBadImage::Fail).epoch(0, 4, None).is_err());
        assert_eq!(fx.loader(&set, 1, 3, OnBadImage::Fail).epoch(0, 3, None).unwrap().count(), 0);
    }

    /// Pairs share a caption group exactly when their token ids are identical (same cleaned caption).
    #[test]
    fn caption_groups_mark_identical_captions() {
        let (fx, set) = Fixture::new("groups", 12, &[]);
        for b in epoch(&fx.loader(&set, 1, 6, OnBadImage::Fail), 0, 0) {
            let rows: Vec<Vec<u32>> = b.input_ids.to_vec2().unwrap();
            assert!(b.caption_groups.iter().any(|&g| b.caption_groups.iter().filter(|&&h| h == g).count() > 1));
            for i in 0..rows.len() {
                for j in 0..rows.len() {
                    assert_eq!(b.caption_groups[i] == b.caption_groups[j], rows[i] == rows[j], "{i} {j}");
                }
            }
        }
    }

    /// Every full batch shows two images when the data allow it; otherwise the set is refused up front.
    #[test]
    fn batches_of_one_image_are_separated_or_refused() {
        let ids = [0u64, 0, 0, 0, 0, 0, 1, 2, 3, 0];
        let mut order: Vec<usize> = (0..10).collect();
        separate_images(&mut order, |i| ids[i], 3);
        for batch in order[..9].chunks(3) {
            assert!(batch.iter().any(|&i| ids[i] != ids[batch[0]]), "{order:?}");
        }
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "a permutation still");
        let mut fine: Vec<usize> = vec![6, 0, 1, 7, 2, 3, 8, 4, 5, 9];
        let before = fine.clone();
        separate_images(&mut fine, |i| ids[i], 3);
        assert_eq!(fine, before, "no change where every batch already shows two images");

        let entry =
            |image_id| TrainEntry { image: format!("{image_id}.png").into(), captions: vec!["c".into()], image_id };
        let set = TrainSet { entries: ids.iter().map(|&i| entry(i)).collect(), num_images: 4 };
        check_two_images_per_batch(&set, 3, &[]).unwrap();
        let err = check_two_images_per_batch(&set, 2, &["train.json".into()]).unwrap_err().to_string();
        assert!(err.contains("train.json") && err.contains("0.png has 7 of the 10"), "{err}");
    }

    #[test]
    fn bad_image_fails_with_its_path() {
        let (fx, set) = Fixture::new("fail", 6, &[4]);
        let loader = fx.loader(&set, 2, 6, OnBadImage::Fail);
        let err = loader.epoch(0, 0, None).unwrap().next().unwrap().unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("4.png") && msg.contains("on_bad_image"), "{msg}");
    }

    #[test]
    fn bad_images_are_skipped_reported_once_and_replaced() {
        let (fx, set) = Fixture::new("skip", 12, &[1, 5, 7]);
        let loader = fx.loader(&set, 2, 4, OnBadImage::Skip);
        for e in 0..3 {
            let batches = epoch(&loader, e, 0);
            assert_eq!(batches.len(), 3);
            let mut reported: Vec<String> = vec![];
            for b in &batches {
                assert_eq!(b.indices.len(), 4, "batches stay full");
                assert!(b.indices.iter().all(|i| ![1, 5, 7].contains(i)));
                let mut unique = b.indices.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(unique.len(), 4, "no pair twice in a batch");
                reported.extend(b.skipped.iter().cloned());
            }
            reported.sort();
            let want: Vec<String> = [1, 5, 7]
                .iter()
                .map(|k| format!("unreadable image {}", fx.dir.join(format!("{k}.png")).display()))
                .collect();
            assert_eq!(reported, want, "epoch {e}: each bad image reported exactly once");
        }
        let (fx, set) = Fixture::new("allbad", 3, &[0, 1]);
        let err = fx.loader(&set, 1, 2, OnBadImage::Skip).epoch(0, 0, None).unwrap().next().unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("only 1 of the 3"), "{err:#}");
    }

    #[test]
    fn eval_batches_in_order_without_dropping() {
        let (fx, _) = Fixture::new("eval", 5, &[]);
        let ann: Vec<_> =
            (0..5).map(|k| serde_json::json!({"image": format!("{k}.png"), "caption": ["image", "caption"]})).collect();
        std::fs::write(fx.dir.join("test.json"), serde_json::to_string(&ann).unwrap()).unwrap();
        let set = RetrievalSet::load(&fx.dir.join("test.json"), None, TEXT).unwrap();
        let batches: Vec<ImageBatch> = eval_image_batches(&set.images, 6, Normalize::Clip, 2, 3, Device::Cpu)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(batches.iter().map(|b| b.range.clone()).collect::<Vec<_>>(), [0..2, 2..4, 4..5]);
        assert_eq!(batches[2].images.dims(), [1, 3, 6, 6]);
        let img = load_rgb(&set.images[3]).unwrap();
        let mut want = vec![0f32; 3 * 36];
        test_transform(&img, 6, Normalize::Clip, &mut want).unwrap();
        let got: Vec<f32> = batches[1].images.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);
        std::fs::write(&set.images[2], b"broken").unwrap();
        let results: Vec<Result<ImageBatch>> =
            eval_image_batches(&set.images, 6, Normalize::Clip, 2, 2, Device::Cpu).unwrap().collect();
        let err = results[1].as_ref().unwrap_err();
        assert!(format!("{err:#}").contains("2.png"), "{err:#}");
    }
}
