//! The ablation's PNG plots: (a) every run's training loss against the step, (b) validation r_mean after
//! every epoch, re-ranked and ITC-only side by side. Drawn with plotters into an RGB buffer and encoded
//! with `image`; text uses the DejaVu Sans embedded from assets/, so no system font is needed.

use super::run::RunResult;
use anyhow::{ensure, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Colours of variants 0, 1, ... (the "tab10" palette, distinguishable for most colour vision).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line: the runs of a variant share its colour; only the first of them carries the legend label.
struct Curve {
    variant: usize,
    label: Option<String>,
    points: Vec<(f64, f64)>,
}

/// One curve per run from `points`, coloured by the run's position in `variants`.
fn curves(variants: &[String], runs: &[RunResult], points: impl Fn(&RunResult) -> Vec<(f64, f64)>) -> Vec<Curve> {
    let mut labelled = vec![false; variants.len()];
    runs.iter()
        .filter_map(|r| {
            let variant = variants.iter().position(|v| *v == r.variant)?;
            let first = !std::mem::replace(&mut labelled[variant], true);
            Some(Curve { variant, label: first.then(|| r.variant.clone()), points: points(r) })
        })
        .collect()
}

/// (a): total training loss per step, as a trailing moving average (window: 1/25 of the longest run) so
/// that per-batch noise does not hide the differences between variants.
pub fn loss(path: &Path, variants: &[String], runs: &[RunResult]) -> Result<usize> {
    let window = (runs.iter().map(|r| r.loss.len()).max().unwrap_or(0) / 25).max(1);
    let curves = curves(variants, runs, |r| moving_average(&r.loss, window));
    let title = if window > 1 {
        format!("training loss (total), moving average over {window} steps")
    } else {
        "training loss (total)".to_string()
    };
    render(path, (960, 560), &curves, |area| panel(area, &title, ("optimiser step", "loss"), &curves, Kind::Loss))?;
    Ok(window)
}

/// (b): validation r_mean after each epoch (1-based), after ITM re-ranking (left) and by ITC alone (right).
pub fn val_r_mean(path: &Path, variants: &[String], runs: &[RunResult]) -> Result<()> {
    let epochs = |pick: fn(&super::run::EvalMetrics) -> f64| {
        curves(variants, runs, move |r| r.val.iter().map(|e| (e.epoch as f64 + 1.0, pick(&e.metrics))).collect())
    };
    let rerank = epochs(|m| m.rerank.r_mean);
    let itc = epochs(|m| m.itc.r_mean);
    let chance = runs.iter().find_map(|r| r.val.first()).map(|e| e.metrics.chance_r_mean());
    let kind = Kind::Recall { chance };
    let suffix = if chance.is_some() { " (dashed: chance)" } else { "" };
    render(path, (1280, 560), &rerank, |area| {
        let halves = area.split_evenly((1, 2));
        panel(
            &halves[0],
            &format!("validation r_mean, ITM re-ranked{suffix}"),
            ("epoch", "r_mean (%)"),
            &rerank,
            kind,
        )?;
        panel(&halves[1], &format!("validation r_mean, ITC only{suffix}"), ("epoch", "r_mean (%)"), &itc, kind)
    })
}

/// Mean of each point's trailing `window` values.
fn moving_average(points: &[(usize, f64)], window: usize) -> Vec<(f64, f64)> {
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let span = &points[(i + 1).saturating_sub(window)..=i];
            (x as f64, span.iter().map(|p| p.1).sum::<f64>() / span.len() as f64)
        })
        .collect()
}

/// Draws into an RGB buffer of `size`, the charts left and the legend of `curves` in a strip on the right
/// (inside a chart it would hide points), and writes it to `path` as PNG.
fn render(
    path: &Path, (w, h): (u32, u32), curves: &[Curve],
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    static FONT_OK: OnceLock<bool> = OnceLock::new();
    let font_ok = *FONT_OK.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    ensure!(font_ok, "the font embedded from assets/fonts/DejaVuSans.ttf could not be parsed");
    let labels: Vec<(&str, RGBColor)> =
        curves.iter().filter_map(|c| Some((c.label.as_deref()?, COLORS[c.variant % COLORS.len()]))).collect();
    // About 9 px per character of DejaVu Sans at 15 px, plus the line sample.
    let legend_w = labels.iter().map(|(l, _)| l.chars().count() as u32 * 9 + 60).max().unwrap_or(0);
    let mut buf = vec![0u8; (w + legend_w) as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w + legend_w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let (charts, legend) = root.split_horizontally(w);
        draw(&charts)?;
        for (i, (label, color)) in labels.iter().enumerate() {
            let y = 60 + 26 * i as i32;
            legend.draw(&PathElement::new(vec![(4, y), (32, y)], color.stroke_width(3)))?;
            legend.draw(&Text::new(label.to_string(), (40, y - 9), ("sans-serif", 15).into_font()))?;
        }
        root.present()?;
    }
    crate::write_atomic(path, |tmp| {
        Ok(image::save_buffer_with_format(
            tmp,
            &buf,
            w + legend_w,
            h,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )?)
    })
}

/// What a chart shows, which decides its axes.
#[derive(Clone, Copy)]
enum Kind {
    /// Loss against the step: both axes fitted to the data.
    Loss,
    /// Recall (%) after each epoch: point markers, one label per epoch, y from 0 so that differences near
    /// chance level do not look large, and the chance level as a dashed line.
    Recall { chance: Option<f64> },
}

/// One chart: axes for `kind`, a line per curve.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>, title: &str, (x_desc, y_desc): (&str, &str), curves: &[Curve], kind: Kind,
) -> Result<()> {
    let points = || curves.iter().flat_map(|c| c.points.iter().copied());
    let range = |v: Vec<f64>, pad: f64| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        if !lo.is_finite() {
            return 0.0..1.0;
        }
        let margin = if hi > lo { (hi - lo) * pad } else { 0.5 };
        lo - margin..hi + margin
    };
    let (recall, chance) = match kind {
        Kind::Loss => (false, None),
        Kind::Recall { chance } => (true, chance),
    };
    let x = range(points().map(|p| p.0).collect(), if recall { 0.05 } else { 0.0 });
    let mut y = range(points().map(|p| p.1).chain(chance).filter(|v| v.is_finite()).collect(), 0.08);
    if recall {
        y.start = 0.0;
    }
    let x_span = (x.start, x.end);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_desc).y_desc(y_desc).label_style(("sans-serif", 15)).axis_desc_style(("sans-serif", 16));
    // Steps and epochs are whole numbers: no labels in between.
    mesh.x_label_formatter(&|v| if v.fract() == 0.0 { format!("{v:.0}") } else { String::new() });
    if recall {
        let epochs = curves.iter().map(|c| c.points.len()).max().unwrap_or(1);
        mesh.x_labels(epochs.min(12));
    }
    mesh.draw()?;
    if let Some(c) = chance {
        chart.draw_series(DashedLineSeries::new(
            [(x_span.0, c), (x_span.1, c)],
            8,
            6,
            BLACK.mix(0.5).stroke_width(2),
        ))?;
    }
    for c in curves {
        let color = COLORS[c.variant % COLORS.len()];
        chart.draw_series(LineSeries::new(c.points.iter().copied(), color.stroke_width(2)).point_size(if recall {
            4
        } else {
            0
        }))?;
    }
    Ok(())
}
