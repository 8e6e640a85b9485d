//! The report's figures, drawn as SVG with `plotters` (text is rendered by
//! the viewer, so no font has to be installed where the evaluation runs):
//!
//! * `recovery_by_k.svg`: recovery (mean over seeds, bars ± std) against k,
//!   one line per method;
//! * `confidence_buckets.svg`: target accuracy per clean-confidence bucket,
//!   one line per model (clean, corrupted, each method).

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;
use crate::{Error, Result};

const PALETTE: [RGBColor; 10] = [
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

fn fig_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Figure {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Draws both figures into `dir`.
pub(crate) fn draw(report: &Report, dir: &Path) -> Result<()> {
    recovery_by_k(report, &dir.join("recovery_by_k.svg"))?;
    confidence_buckets(report, &dir.join("confidence_buckets.svg"))
}

fn recovery_by_k(report: &Report, path: &Path) -> Result<()> {
    let ks = &report.config.ks;
    let methods: Vec<&str> = report
        .config
        .methods
        .iter()
        .map(|m| m.label.as_str())
        .collect();
    let mut lo = -0.2f64;
    let mut hi = 1.2f64;
    for a in &report.aggregates {
        if let Some(s) = a.metrics.get("recovery") {
            if s.mean.is_finite() {
                lo = lo.min(s.mean - s.std);
                hi = hi.max(s.mean + s.std);
            }
        }
    }
    let kmin = *ks.first().unwrap_or(&0) as f64;
    let kmax = (*ks.last().unwrap_or(&0) as f64).max(kmin + 1.0);
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fig_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Recovery per method vs k (mean ± std over seeds)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((kmin - 0.3)..(kmax + 0.3), (lo - 0.05)..(hi + 0.05))
        .map_err(|e| fig_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("k (true facts about other entities per document)")
        .y_desc("recovery")
        .draw()
        .map_err(|e| fig_err(path, e))?;
    for (i, m) in methods.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64, f64)> = ks
            .iter()
            .filter_map(|&k| {
                report
                    .aggregate(k, m)
                    .and_then(|a| a.metrics.get("recovery"))
                    .filter(|s| s.mean.is_finite())
                    .map(|s| (k as f64, s.mean, s.std))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|e| fig_err(path, e))?
            .label(*m)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                pts.iter().map(|p| {
                    ErrorBar::new_vertical(p.0, p.1 - p.2, p.1, p.1 + p.2, color.filled(), 6)
                }),
            )
            .map_err(|e| fig_err(path, e))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(kmin - 0.3, 1.0), (kmax + 0.3, 1.0)],
            BLACK.mix(0.3),
        ))
        .map_err(|e| fig_err(path, e))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fig_err(path, e))?;
    root.present().map_err(|e| fig_err(path, e))
}

fn confidence_buckets(report: &Report, path: &Path) -> Result<()> {
    let mut labels: Vec<String> = Vec::new();
    for b in &report.buckets {
        if !labels.contains(&b.bucket) {
            labels.push(b.bucket.clone());
        }
    }
    let all = crate::metrics::bucket_labels(&report.config.confidence_edges);
    labels.sort_by_key(|l| all.iter().position(|a| a == l).unwrap_or(usize::MAX));
    let mut models: Vec<String> = vec!["clean".into(), "corrupted".into()];
    models.extend(report.config.methods.iter().map(|m| m.label.clone()));
    let n = labels.len().max(1) as f64;
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fig_err(path, e))?;
    let caption = format!(
        "Target accuracy by clean-model confidence (buckets: {})",
        labels.join(" | ")
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.3..(n - 0.7), 0.0..1.05)
        .map_err(|e| fig_err(path, e))?;
    let label_of = labels.clone();
    chart
        .configure_mesh()
        .x_labels(labels.len().max(1))
        .x_label_formatter(&move |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                label_of.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("clean-model probability of the gold answer")
        .y_desc("target accuracy")
        .draw()
        .map_err(|e| fig_err(path, e))?;
    for (i, m) in models.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = labels
            .iter()
            .enumerate()
            .filter_map(|(j, l)| {
                report
                    .buckets
                    .iter()
                    .find(|b| &b.model == m && &b.bucket == l)
                    .map(|b| (j as f64, b.accuracy))
            })
            .collect();
        let width = if i < 2 { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
            .map_err(|e| fig_err(path, e))?
            .label(m.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| fig_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fig_err(path, e))?;
    root.present().map_err(|e| fig_err(path, e))
}
