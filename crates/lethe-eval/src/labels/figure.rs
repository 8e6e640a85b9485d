//! The label benchmark's figure, `labels.svg` (SVG with `plotters`: text is
//! rendered by the viewer, so no font has to be installed where the
//! evaluation runs): per propagator, the share of answers more permissive
//! than conservative, exactly at the ground-truth minimal label, at the
//! provenance label, and answered exactly.

use std::path::Path;

use plotters::prelude::*;

use super::Report;
use crate::{Error, Result};

const METRICS: [(&str, &str); 4] = [
    (
        "more_permissive_than_conservative",
        "more permissive than conservative",
    ),
    ("minimal_label_exact_match", "minimal label exact"),
    ("provenance_label_exact_match", "provenance label exact"),
    ("exact_match", "answer exact match"),
];

const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(127, 127, 127),
];

fn fig_err(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("drawing labels.svg: {e}"))
}

/// Draws the grouped bars into `path`.
pub(crate) fn draw(report: &Report, path: &Path) -> Result<()> {
    let names: Vec<&String> = report.propagators.keys().collect();
    let groups = names.len().max(1) as f64;
    let root = SVGBackend::new(path, (820, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(fig_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Label quality per propagator ({} questions, k = {})",
                report.items.len() / names.len().max(1),
                report.config.spec.k
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..groups, 0.0..1.05)
        .map_err(fig_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len())
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            names.get(i).map(|n| n.to_string()).unwrap_or_default()
        })
        .y_desc("share of questions")
        .draw()
        .map_err(fig_err)?;
    let width = 0.8 / METRICS.len() as f64;
    for (m, (key, label)) in METRICS.iter().enumerate() {
        let colour = PALETTE[m % PALETTE.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = names
            .iter()
            .enumerate()
            .map(|(g, name)| {
                let v = report.propagators[*name]
                    .get(*key)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0);
                let x0 = g as f64 + 0.1 + m as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], colour.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(fig_err)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(fig_err)?;
    root.present().map_err(fig_err)?;
    Ok(())
}
