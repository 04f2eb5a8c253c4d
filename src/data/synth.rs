//! The built-in dataset: coloured shapes with compositional captions, generated in-process so that the
//! default run needs no download.
//!
//! Each 64x64 image holds 1-3 shapes (circle, square, triangle, star, diamond, cross) in six colours and
//! two sizes on a light, mildly noisy background, drawn with 4x4 supersampling. Captions name every
//! object and the spatial relations between them ("a small red circle left of a large blue square").
//! Images come in *families* that share a layout and differ only in binding: two objects' colours or
//! shapes exchanged, or the layout mirrored (which flips the relation). Such captions contain the same
//! words, so telling them apart needs the fusion encoder to bind attributes to objects; a bag of
//! words (and largely ITC alone) cannot. A horizontal flip augmentation would swap "left of" and
//! "right of": keep `data.hflip = false` on this data.

use super::tokenizer::SPECIAL_TOKENS;
use ::image::RgbImage;
use anyhow::{Context, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Width and height of every generated image.
pub const IMAGE_SIZE: u32 = 64;

/// Words in the longest caption the grammar produces (a three-object paraphrase). With `[CLS]` and
/// `[SEP]`, `data.max_tokens` must be at least this + 2 for no caption to be cut.
pub const MAX_CAPTION_WORDS: usize = 24;

/// Where [`generate`] wrote the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthPaths {
    pub dir: PathBuf,
    /// Training annotations: `{"image", "caption": [paraphrases], "image_id"}`.
    pub train: PathBuf,
    /// Retrieval-format validation annotations: `{"image", "caption": [paraphrases]}`.
    pub val: PathBuf,
    /// Retrieval-format test annotations.
    pub test: PathBuf,
    /// WordPiece vocabulary covering every word of the captions (special tokens first).
    pub vocab: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Black,
}

const COLORS: [Color; 6] = [Color::Red, Color::Green, Color::Blue, Color::Yellow, Color::Purple, Color::Black];

impl Color {
    fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Black => "black",
        }
    }

    fn rgb(self) -> [f32; 3] {
        match self {
            Color::Red => [215.0, 40.0, 40.0],
            Color::Green => [40.0, 165.0, 60.0],
            Color::Blue => [40.0, 80.0, 215.0],
            Color::Yellow => [235.0, 195.0, 20.0],
            Color::Purple => [135.0, 55.0, 175.0],
            Color::Black => [30.0, 30.0, 30.0],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Diamond,
    Cross,
}

const SHAPES: [Shape; 6] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Diamond, Shape::Cross];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }

    /// Whether the offset (dx, dy) from the centre lies inside the shape of radius r (y points down).
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= 0.82 * r && dy.abs() <= 0.82 * r,
            Shape::Diamond => dx.abs() + dy.abs() <= r,
            Shape::Cross => (dx.abs() <= 0.3 * r && dy.abs() <= r) || (dy.abs() <= 0.3 * r && dx.abs() <= r),
            Shape::Triangle => {
                let pts: Vec<[f32; 2]> = [-90f32, 30.0, 150.0].iter().map(|a| polar(*a, r)).collect();
                inside_polygon(&pts, dx, dy)
            }
            Shape::Star => {
                let pts: Vec<[f32; 2]> =
                    (0..10).map(|i| polar(-90.0 + 36.0 * i as f32, if i % 2 == 0 { r } else { 0.45 * r })).collect();
                inside_polygon(&pts, dx, dy)
            }
        }
    }
}

fn polar(deg: f32, r: f32) -> [f32; 2] {
    let (s, c) = deg.to_radians().sin_cos();
    [r * c, r * s]
}

/// Even-odd rule point-in-polygon test.
fn inside_polygon(pts: &[[f32; 2]], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let ([xi, yi], [xj, yj]) = (pts[i], pts[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Size {
    Small,
    Large,
}

impl Size {
    fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    fn radius(self) -> f32 {
        match self {
            Size::Small => 6.5,
            Size::Large => 11.0,
        }
    }
}

/// Where the first object of a pair lies relative to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

const RELATIONS: [Relation; 4] = [Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

impl Relation {
    fn short(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    fn long(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    fn inverse(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }

    fn horizontal(self) -> bool {
        matches!(self, Relation::LeftOf | Relation::RightOf)
    }

    /// Whether `a` stands in this relation to `b`: clearly apart along the relation's axis (no overlap)
    /// and at most half as far apart across it, so that the caption is unambiguous.
    fn holds(self, a: &Object, b: &Object) -> bool {
        let gap = a.size.radius() + b.size.radius() + 2.0;
        let (dx, dy) = (a.x - b.x, a.y - b.y);
        let (along, across) = match self {
            Relation::LeftOf => (-dx, dy),
            Relation::RightOf => (dx, dy),
            Relation::Above => (-dy, dx),
            Relation::Below => (dy, dx),
        };
        along >= gap && across.abs() <= 0.5 * along
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Object {
    shape: Shape,
    color: Color,
    size: Size,
    x: f32,
    y: f32,
}

impl Object {
    fn phrase(&self) -> String {
        format!("a {} {} {}", self.size.name(), self.color.name(), self.shape.name())
    }

    fn reference(&self) -> String {
        format!("the {} {}", self.color.name(), self.shape.name())
    }
}

/// Objects and the relations the captions state: `(a, relation, b)` = object a is `relation` object b.
/// With three objects both relations have object 1 as their anchor.
#[derive(Debug, Clone, PartialEq)]
struct Scene {
    objects: Vec<Object>,
    relations: Vec<(usize, Relation, usize)>,
}

impl Scene {
    /// Paraphrases; the first is the canonical description.
    fn captions(&self) -> Vec<String> {
        let o = &self.objects;
        match self.relations[..] {
            [] => {
                let (a, bare) =
                    (o[0].phrase(), format!("{} {} {}", o[0].size.name(), o[0].color.name(), o[0].shape.name()));
                vec![
                    a.clone(),
                    format!("there is {a}"),
                    format!("a picture of {a}"),
                    format!("{a} on a plain background"),
                    format!("one {bare}"),
                ]
            }
            [(a, r, b)] => {
                let (pa, pb) = (o[a].phrase(), o[b].phrase());
                vec![
                    format!("{pa} {} {pb}", r.short()),
                    format!("{pb} {} {pa}", r.inverse().short()),
                    format!("there is {pa} {} {pb}", r.long()),
                    format!("{pa} is {} {pb}", r.short()),
                    format!("a picture of {pb} with {pa} {} it", r.long()),
                ]
            }
            [(a, r1, b), (c, r2, _)] => {
                let (pa, pb, pc) = (o[a].phrase(), o[b].phrase(), o[c].phrase());
                let rb = o[b].reference();
                vec![
                    format!("{pa} {} {pb} and {pc} {} {rb}", r1.short(), r2.short()),
                    format!("{pc} {} {pb} and {pa} {} {rb}", r2.short(), r1.short()),
                    format!("{pb} with {pa} {} it and {pc} {} it", r1.long(), r2.long()),
                    format!("there is {pa} {} {pb} and {pc} {} {rb}", r1.long(), r2.short()),
                ]
            }
            _ => unreachable!("scenes hold at most two relations"),
        }
    }

    fn valid(&self) -> bool {
        let s = IMAGE_SIZE as f32;
        let in_bounds = self.objects.iter().all(|o| {
            let r = o.size.radius() + 1.0;
            o.x >= r && o.x <= s - r && o.y >= r && o.y <= s - r
        });
        let apart = self.objects.iter().enumerate().all(|(i, a)| {
            self.objects[i + 1..].iter().all(|b| {
                let d = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
                d >= a.size.radius() + b.size.radius() + 2.0
            })
        });
        in_bounds && apart && self.relations.iter().all(|&(a, r, b)| r.holds(&self.objects[a], &self.objects[b]))
    }

    /// The same scene mirrored along the first relation's axis: every relation on that axis flips.
    fn mirrored(&self) -> Scene {
        let horizontal = self.relations[0].1.horizontal();
        let s = IMAGE_SIZE as f32;
        let objects = self
            .objects
            .iter()
            .map(|o| if horizontal { Object { x: s - o.x, ..*o } } else { Object { y: s - o.y, ..*o } })
            .collect();
        let relations = self
            .relations
            .iter()
            .map(|&(a, r, b)| (a, if r.horizontal() == horizontal { r.inverse() } else { r }, b))
            .collect();
        Scene { objects, relations }
    }

    /// The same layout with one attribute exchanged between objects `i` and `j`.
    fn swapped(&self, i: usize, j: usize, colors: bool) -> Scene {
        let mut s = self.clone();
        if colors {
            let c = s.objects[i].color;
            s.objects[i].color = s.objects[j].color;
            s.objects[j].color = c;
        } else {
            let c = s.objects[i].shape;
            s.objects[i].shape = s.objects[j].shape;
            s.objects[j].shape = c;
        }
        s
    }
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A random scene of 1 (20%), 2 (50%) or 3 (30%) objects with distinct colours and distinct shapes,
/// so that every noun phrase names one object.
fn random_scene(rng: &mut ChaCha8Rng) -> Scene {
    let roll: f64 = rng.random();
    let k = if roll < 0.2 {
        1
    } else if roll < 0.7 {
        2
    } else {
        3
    };
    loop {
        let mut colors = COLORS.to_vec();
        let mut shapes = SHAPES.to_vec();
        let mut objects = Vec::with_capacity(k);
        for _ in 0..k {
            let color = colors.swap_remove(rng.random_range(0..colors.len()));
            let shape = shapes.swap_remove(rng.random_range(0..shapes.len()));
            let size = if rng.random::<bool>() { Size::Large } else { Size::Small };
            objects.push(Object { shape, color, size, x: 0.0, y: 0.0 });
        }
        let relations = match k {
            1 => vec![],
            2 => vec![(0, pick(rng, &RELATIONS), 1)],
            _ => vec![(0, pick(rng, &RELATIONS), 1), (2, pick(rng, &RELATIONS), 1)],
        };
        let mut scene = Scene { objects, relations };
        for _ in 0..200 {
            for o in &mut scene.objects {
                let r = o.size.radius() + 1.0;
                o.x = rng.random_range(r..IMAGE_SIZE as f32 - r);
                o.y = rng.random_range(r..IMAGE_SIZE as f32 - r);
            }
            if scene.valid() {
                return scene;
            }
        }
    }
}

/// A scene and up to two binding variants of it (colour swap, shape swap, mirrored relation).
fn family(rng: &mut ChaCha8Rng) -> Vec<Scene> {
    let base = random_scene(rng);
    let n = base.objects.len();
    if n == 1 {
        return vec![base];
    }
    let (i, j) = if n == 2 || rng.random::<bool>() { (0, 1) } else { (1, 2) };
    let mut variants = vec![base.swapped(i, j, true), base.swapped(i, j, false), base.mirrored()];
    let keep = rng.random_range(1..=2);
    let mut scenes = vec![base];
    while scenes.len() <= keep {
        scenes.push(variants.swap_remove(rng.random_range(0..variants.len())));
    }
    scenes
}

/// Renders a scene: light background with Gaussian noise (sigma 4), shapes with colour jitter,
/// antialiased by 4x4 supersampling.
fn render(scene: &Scene, rng: &mut ChaCha8Rng) -> RgbImage {
    let size = IMAGE_SIZE as usize;
    let tint: [f32; 3] = std::array::from_fn(|_| rng.random_range(215.0..245.0));
    let noise = Normal::new(0.0f32, 4.0).expect("valid sigma");
    let mut px: Vec<[f32; 3]> = (0..size * size).map(|_| tint.map(|t| t + noise.sample(rng))).collect();
    for o in &scene.objects {
        let color = o.color.rgb().map(|c| (c + rng.random_range(-12.0..12.0)).clamp(0.0, 255.0));
        let r = o.size.radius();
        let (x0, x1) = ((o.x - r - 1.0).floor().max(0.0) as usize, ((o.x + r + 1.0).ceil() as usize).min(size));
        let (y0, y1) = ((o.y - r - 1.0).floor().max(0.0) as usize, ((o.y + r + 1.0).ceil() as usize).min(size));
        for y in y0..y1 {
            for x in x0..x1 {
                let mut hits = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let dx = x as f32 + (sx as f32 + 0.5) / 4.0 - o.x;
                        let dy = y as f32 + (sy as f32 + 0.5) / 4.0 - o.y;
                        hits += usize::from(o.shape.contains(dx, dy, r));
                    }
                }
                let cover = hits as f32 / 16.0;
                let p = &mut px[y * size + x];
                for c in 0..3 {
                    p[c] = p[c] * (1.0 - cover) + color[c] * cover;
                }
            }
        }
    }
    let bytes = px.iter().flat_map(|p| p.map(|v| v.round().clamp(0.0, 255.0) as u8)).collect();
    RgbImage::from_raw(IMAGE_SIZE, IMAGE_SIZE, bytes).expect("buffer has w*h*3 bytes")
}

/// `n` scenes of one split, in whole families (the last one cut to fit). In evaluation splits a scene
/// whose canonical caption already occurs is redrawn (up to 50 times), so that ground truth is rarely
/// ambiguous.
fn split_scenes(rng: &mut ChaCha8Rng, n: usize, unique: bool) -> Vec<Scene> {
    let mut scenes = Vec::with_capacity(n);
    let mut used: HashSet<String> = HashSet::new();
    while scenes.len() < n {
        let mut fam = family(rng);
        for _ in 0..50 {
            if !unique || fam.iter().all(|s| !used.contains(&s.captions()[0])) {
                break;
            }
            fam = family(rng);
        }
        for s in fam.into_iter().take(n - scenes.len()) {
            used.insert(s.captions()[0].clone());
            scenes.push(s);
        }
    }
    scenes
}

/// Each scene's image id from its `captions` (paraphrases, canonical first): the position of the first
/// scene with the same canonical caption. Two such images differ only in where the objects sit and in
/// noise, so each one's captions describe the other: one id keeps them out of each other's ITM negatives
/// (and makes them ITC positives with `objectives.itc_multi_positive`), as ALBEF's annotations do for one
/// photo's captions (nearly all one-object scenes: there are only 72).
fn scene_ids(captions: &[Vec<String>]) -> Vec<usize> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    captions.iter().enumerate().map(|(i, c)| *first.entry(&c[0]).or_insert(i)).collect()
}

/// Every word the captions can contain, in a fixed order.
fn grammar_words() -> Vec<&'static str> {
    let mut words = vec![
        "a",
        "the",
        "there",
        "is",
        "it",
        "and",
        "with",
        "of",
        "to",
        "left",
        "right",
        "above",
        "below",
        "picture",
        "one",
        "on",
        "plain",
        "background",
        "small",
        "large",
    ];
    words.extend(COLORS.iter().map(|c| c.name()));
    words.extend(SHAPES.iter().map(|s| s.name()));
    words
}

impl SynthPaths {
    /// Where [`generate`] writes in `dir`.
    pub fn of(dir: &Path) -> Self {
        let f = |name: &str| dir.join(name);
        SynthPaths {
            dir: dir.to_path_buf(),
            train: f("train.json"),
            val: f("val.json"),
            test: f("test.json"),
            vocab: f("vocab.txt"),
        }
    }
}

/// Generates the dataset under `out_dir`: `n_train` training images and max(n_train / 10, 50) images
/// each for validation and test, as PNGs under `images/{train,val,test}/`, the annotation files
/// `train.json`, `val.json`, `test.json` (image paths relative to `out_dir`) and `vocab.txt`.
/// The same seed gives byte-identical files.
pub fn generate(out_dir: &Path, n_train: usize, seed: u64) -> Result<SynthPaths> {
    let n_eval = (n_train / 10).max(50);
    let paths = SynthPaths::of(out_dir);
    for (split, n, file) in
        [("train", n_train, &paths.train), ("val", n_eval, &paths.val), ("test", n_eval, &paths.test)]
    {
        let image_dir = out_dir.join("images").join(split);
        std::fs::create_dir_all(&image_dir).with_context(|| format!("cannot create {}", image_dir.display()))?;
        let mut rng = crate::rng::stream(seed, "synth", split, 0);
        let scenes = split_scenes(&mut rng, n, split != "train");
        let captions: Vec<Vec<String>> = scenes.iter().map(Scene::captions).collect();
        let image_ids = scene_ids(&captions);
        let mut entries = Vec::with_capacity(n);
        for (i, (scene, caption)) in scenes.iter().zip(captions).enumerate() {
            let rel = format!("images/{split}/{i:06}.png");
            let img = render(scene, &mut rng);
            img.save(out_dir.join(&rel)).with_context(|| format!("cannot write {}", out_dir.join(&rel).display()))?;
            entries.push(if split == "train" {
                json!({"image": rel, "caption": caption, "image_id": image_ids[i]})
            } else {
                json!({"image": rel, "caption": caption})
            });
        }
        let text = serde_json::to_string_pretty(&entries)?;
        crate::write_atomic(file, |tmp| Ok(std::fs::write(tmp, text)?))?;
    }
    let vocab: Vec<&str> = SPECIAL_TOKENS.iter().copied().chain(grammar_words()).collect();
    // Written last: a folder with vocab.txt is complete (`data::resolve` reuses it).
    crate::write_atomic(&paths.vocab, |tmp| Ok(std::fs::write(tmp, vocab.join("\n") + "\n")?))?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CaptionStyle;
    use crate::data::annotations::{RetrievalSet, TextOptions, TrainEntry, TrainSet};
    use crate::data::image::load_rgb;
    use crate::data::tokenizer::TextTokenizer;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("alignfuse-synth-{name}-{}", std::process::id()))
    }

    fn read_all(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = vec![];
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn deterministic_in_seed() {
        let (a, b, c) = (tmp("a"), tmp("b"), tmp("c"));
        generate(&a, 30, 5).unwrap();
        generate(&b, 30, 5).unwrap();
        generate(&c, 30, 6).unwrap();
        let (fa, fb, fc) = (read_all(&a), read_all(&b), read_all(&c));
        assert_eq!(fa.len(), 30 + 50 + 50 + 4);
        assert!(fa == fb, "same seed, same bytes");
        assert!(fa != fc, "another seed, another dataset");
        for d in [a, b, c] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn files_load_and_vocab_covers_every_caption() {
        let dir = tmp("load");
        let paths = generate(&dir, 60, 1).unwrap();
        let text = TextOptions { max_words: 30, style: CaptionStyle::Albef };
        let train = TrainSet::load(std::slice::from_ref(&paths.train), None, text, true).unwrap();
        assert_eq!(train.len(), 60);
        let same_scene = |a: &TrainEntry, b: &TrainEntry| a.captions[0] == b.captions[0];
        for (a, b) in train.entries.iter().flat_map(|a| train.entries.iter().map(move |b| (a, b))) {
            assert_eq!(a.image_id == b.image_id, same_scene(a, b), "{:?} / {:?}", a.captions[0], b.captions[0]);
        }
        let val = RetrievalSet::load(&paths.val, None, text).unwrap();
        let test = RetrievalSet::load(&paths.test, None, text).unwrap();
        assert_eq!((val.images.len(), test.images.len()), (50, 50));
        assert!(val.img2txt.iter().all(|t| t.len() >= 4));
        let vocab = std::fs::read_to_string(&paths.vocab).unwrap();
        assert!(vocab.lines().count() < 128);
        let tok = TextTokenizer::from_file(&paths.vocab).unwrap();
        for caption in train.entries.iter().flat_map(|e| &e.captions).chain(&val.texts).chain(&test.texts) {
            let ids = tok.encode(caption, 64).unwrap();
            assert!(!ids.contains(&tok.special_id("[UNK]")), "{caption:?} -> {ids:?}");
            assert_eq!(&tok.decode(&ids).unwrap(), caption, "captions survive cleaning and tokenising");
        }
        let img = load_rgb(&val.images[0]).unwrap();
        assert_eq!(img.dimensions(), (IMAGE_SIZE, IMAGE_SIZE));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_scene_one_image_id() {
        let mut rng = crate::rng::stream(2, "synth-test", "", 0);
        let scenes = split_scenes(&mut rng, 1000, false);
        let captions: Vec<Vec<String>> = scenes.iter().map(Scene::captions).collect();
        let ids = scene_ids(&captions);
        let shared = (0..1000).filter(|&i| ids[i] != i).count();
        assert!(shared > 20, "{shared} of 1000 scenes repeat an earlier one");
        for i in 0..1000 {
            assert!(ids[i] <= i && captions[ids[i]] == captions[i]);
            assert_eq!(ids[i] == i, (0..i).all(|j| captions[j][0] != captions[i][0]));
        }
    }

    #[test]
    fn captions_match_what_is_drawn() {
        let mut rng = crate::rng::stream(3, "synth-test", "", 0);
        for _ in 0..300 {
            for scene in family(&mut rng) {
                assert!(scene.valid(), "{scene:?}");
                let img = render(&scene, &mut rng);
                let captions = scene.captions();
                assert!(captions.iter().all(|c| c.split(' ').count() <= MAX_CAPTION_WORDS), "{captions:?}");
                for o in &scene.objects {
                    let p = img.get_pixel(o.x as u32, o.y as u32).0.map(f32::from);
                    let want = o.color.rgb();
                    assert!(p.iter().zip(want).all(|(a, b)| (a - b).abs() <= 20.0), "centre of {o:?} is {p:?}");
                    for c in &captions {
                        assert!(c.contains(&format!("{} {}", o.color.name(), o.shape.name())), "{c:?} misses {o:?}");
                    }
                }
                for (k, &(a, r, b)) in scene.relations.iter().enumerate() {
                    let (oa, ob) = (&scene.objects[a], &scene.objects[b]);
                    assert!(
                        captions[k].starts_with(&format!("{} {} {}", oa.phrase(), r.short(), ob.phrase())),
                        "{captions:?}"
                    );
                    assert!(r.holds(oa, ob));
                }
            }
        }
    }

    #[test]
    fn families_differ_only_in_binding() {
        let mut rng = crate::rng::stream(4, "synth-test", "", 0);
        let mut binding_pairs = 0;
        for _ in 0..100 {
            let fam = family(&mut rng);
            for v in &fam[1..] {
                // Paraphrase 2 names every object exactly once (no "the <colour> <shape>" back-reference).
                let (a, b) = (fam[0].captions()[2].clone(), v.captions()[2].clone());
                assert_ne!(a, b);
                let bag = |s: &str| {
                    let mut w: Vec<String> = s.split(' ').map(str::to_string).collect();
                    w.sort();
                    w
                };
                let same_words = bag(&a) == bag(&b);
                let relation_flip = fam[0].relations.iter().zip(&v.relations).any(|(x, y)| x.1 != y.1);
                assert!(same_words || relation_flip, "{a:?} vs {b:?}");
                binding_pairs += usize::from(same_words);
            }
        }
        assert!(binding_pairs > 20, "{binding_pairs} colour/shape-swap pairs");
        // Shapes are recognisable: each one's centre is inside and its far corner is not.
        for s in SHAPES {
            assert!(s.contains(0.0, 0.0, 10.0) && !s.contains(9.9, 9.9, 10.0), "{s:?}");
        }
    }
}
