//! PNG figures for the audit report, drawn directly with the `image` crate
//! (no font or system library needed; captions live in the Markdown).
//!
//! * [`examples_grid`]: one row per image; columns: the original, then per
//!   method the protected image and a heat map of `|delta| / eps` (black =
//!   unchanged, red -> yellow -> white = up to the full budget). Tiles are
//!   enlarged with nearest-neighbour so that single pixels stay visible,
//!   and sit on a mid-gray canvas so that neither a black tile nor an
//!   all-white one (a noise at the full budget on every pixel) merges
//!   into the background.
//! * [`line_chart`]: lines with each series' marker on a `[x0, x1] x [0, 1]`
//!   grid (horizontal grid lines every 0.1, dashed line at chance level).
//! * [`line_chart_svg`]: the same chart as SVG drawn with `plotters`, with
//!   a title, axis values and labels and a legend (text is rendered by the
//!   viewer, so no font is needed where the audit runs); series that
//!   coincide stay told apart by their markers ([`Style::nth`]), which
//!   the legend shows too.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::dataset::ImageShape;
use crate::{Error, Result};

const GAP: u32 = 4;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
/// The canvas between the tiles of [`examples_grid`]: neither end of the
/// heat map's or an image's range.
const CANVAS: Rgb<u8> = Rgb([128, 128, 128]);

/// The "hot" colour map on `[0, 1]`.
pub fn hot(t: f32) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    let c = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    Rgb([c(3.0 * t), c(3.0 * t - 1.0), c(3.0 * t - 2.0)])
}

fn pixel(img: &[f32], s: ImageShape, y: usize, x: usize) -> Rgb<u8> {
    let hw = s.pixels();
    let q = |c: usize| (img[c * hw + y * s.width + x].clamp(0.0, 1.0) * 255.0).round() as u8;
    if s.channels == 1 {
        let v = q(0);
        Rgb([v, v, v])
    } else {
        Rgb([q(0), q(1), q(2)])
    }
}

/// One row per `(clean image, [protected image per method])`; see the
/// module docs. All images share `shape`.
pub fn examples_grid(
    rows: &[(&[f32], Vec<&[f32]>)],
    shape: ImageShape,
    eps: f32,
) -> Result<RgbImage> {
    let methods = rows.first().map(|r| r.1.len()).unwrap_or(0);
    if rows.is_empty() || rows.iter().any(|r| r.1.len() != methods) {
        return Err(Error::Config(
            "examples grid needs equal, non-empty rows".into(),
        ));
    }
    let scale = (96 / shape.height.max(shape.width)).max(1) as u32;
    let (tw, th) = (shape.width as u32 * scale, shape.height as u32 * scale);
    let cols = 1 + 2 * methods as u32;
    let mut out = RgbImage::from_pixel(
        cols * (tw + GAP) + GAP,
        rows.len() as u32 * (th + GAP) + GAP,
        CANVAS,
    );
    let hw = shape.pixels();
    for (r, (clean, prots)) in rows.iter().enumerate() {
        let oy = GAP + r as u32 * (th + GAP);
        let mut tiles: Vec<Tile<'_>> = vec![Box::new(|y, x| pixel(clean, shape, y, x))];
        for p in prots {
            tiles.push(Box::new(move |y, x| pixel(p, shape, y, x)));
            tiles.push(Box::new(move |y, x| {
                let d = (0..shape.channels)
                    .map(|c| {
                        (p[c * hw + y * shape.width + x] - clean[c * hw + y * shape.width + x])
                            .abs()
                    })
                    .fold(0f32, f32::max);
                hot(d / eps)
            }));
        }
        for (c, tile) in tiles.iter().enumerate() {
            let ox = GAP + c as u32 * (tw + GAP);
            for y in 0..th {
                for x in 0..tw {
                    let v = tile((y / scale) as usize, (x / scale) as usize);
                    out.put_pixel(ox + x, oy + y, v);
                }
            }
        }
    }
    Ok(out)
}

/// A tile renderer of [`examples_grid`]: colour at `(y, x)`.
type Tile<'a> = Box<dyn Fn(usize, usize) -> Rgb<u8> + 'a>;

/// A chart of `series` (colour, points `(x, y)` with `y` in `[0, 1]`;
/// names are for [`line_chart_svg`]'s legend, this chart has no text).
pub fn line_chart(series: &[NamedSeries], x_range: (f64, f64), chance: Option<f64>) -> RgbImage {
    let (w, h) = (560u32, 360u32);
    let (l, r, t, b) = (30i64, 15i64, 15i64, 30i64);
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    let (x0, x1) = x_range;
    let span = if x1 > x0 { x1 - x0 } else { 1.0 };
    let px = |x: f64| l + ((x - x0) / span * (w as i64 - l - r) as f64).round() as i64;
    let py = |y: f64| t + ((1.0 - y.clamp(0.0, 1.0)) * (h as i64 - t - b) as f64).round() as i64;
    for k in 0..=10 {
        let y = py(k as f64 / 10.0);
        let c = if k % 5 == 0 { 170 } else { 225 };
        line(
            &mut img,
            (l, y),
            (w as i64 - r, y),
            Rgb([c, c, c]),
            1,
            false,
        );
    }
    line(
        &mut img,
        (l, t),
        (l, h as i64 - b),
        Rgb([0, 0, 0]),
        1,
        false,
    );
    line(
        &mut img,
        (l, h as i64 - b),
        (w as i64 - r, h as i64 - b),
        Rgb([0, 0, 0]),
        1,
        false,
    );
    if let Some(c) = chance {
        line(
            &mut img,
            (l, py(c)),
            (w as i64 - r, py(c)),
            Rgb([120, 120, 120]),
            1,
            true,
        );
    }
    for NamedSeries {
        style: Style { color, marker, .. },
        points: pts,
        ..
    } in series
    {
        for win in pts.windows(2) {
            line(
                &mut img,
                (px(win[0].0), py(win[0].1)),
                (px(win[1].0), py(win[1].1)),
                *color,
                2,
                false,
            );
        }
        for &(x, y) in pts {
            let (cx, cy) = (px(x), py(y));
            for dy in -4i64..=4 {
                for dx in -4i64..=4 {
                    // The SVG's markers: a disc, a triangle (apex up), a
                    // cross of two diagonals.
                    let on = match marker {
                        Marker::Circle => dx * dx + dy * dy <= 10,
                        Marker::Triangle => dy >= -4 && 2 * dx.abs() <= dy + 4,
                        Marker::Cross => (dx.abs() - dy.abs()).abs() <= 1,
                    };
                    if on {
                        put(&mut img, cx + dx, cy + dy, *color);
                    }
                }
            }
        }
    }
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham line of `width` pixels (optionally dashed).
fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>, width: i64, dashed: bool) {
    let (mut x, mut y) = a;
    let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
    let (sx, sy) = (
        if a.0 < b.0 { 1 } else { -1 },
        if a.1 < b.1 { 1 } else { -1 },
    );
    let mut err = dx + dy;
    let mut n = 0;
    loop {
        if !dashed || (n / 6) % 2 == 0 {
            for o in 0..width {
                put(img, x, y + o, c);
                put(img, x + o, y, c);
            }
        }
        n += 1;
        if x == b.0 && y == b.1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Saves a figure as PNG.
pub fn save(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(e, format!("creating {}", parent.display())))?;
    }
    img.save(path)
        .map_err(|e| Error::Unsupported(format!("writing {}: {e}", path.display())))
}

/// Distinct colours for chart series, with their names for captions.
const PALETTE: [(Rgb<u8>, &str); 9] = [
    (Rgb([31, 119, 180]), "blue"),
    (Rgb([214, 39, 40]), "red"),
    (Rgb([44, 160, 44]), "green"),
    (Rgb([255, 127, 14]), "orange"),
    (Rgb([148, 103, 189]), "purple"),
    (Rgb([23, 190, 207]), "cyan"),
    (Rgb([140, 86, 75]), "brown"),
    (Rgb([227, 119, 194]), "pink"),
    (Rgb([188, 189, 34]), "olive"),
];

/// The marker drawn on a series' points and beside its legend entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// A filled circle.
    Circle,
    /// A filled triangle, apex up.
    Triangle,
    /// A diagonal cross.
    Cross,
}

impl Marker {
    /// The marker's name in the plural, for captions ("blue circles").
    pub fn plural(self) -> &'static str {
        match self {
            Marker::Circle => "circles",
            Marker::Triangle => "triangles",
            Marker::Cross => "crosses",
        }
    }
}

/// How a series looks: a colour (with its name for captions) and a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Line and marker colour.
    pub color: Rgb<u8>,
    /// The colour's name in captions.
    pub color_name: &'static str,
    /// Marker on the points and in the legend.
    pub marker: Marker,
}

impl Style {
    /// Black circles: a reference line (the clean accuracy) apart from the
    /// [`Style::nth`] series.
    pub const REFERENCE: Style = Style {
        color: Rgb([0, 0, 0]),
        color_name: "black",
        marker: Marker::Circle,
    };

    /// The look of the `k`-th series of a chart. Neighbouring series differ
    /// in colour and marker, and the pair repeats only after 27 series, so
    /// a caption or legend never names two series alike.
    pub fn nth(k: usize) -> Style {
        let c = k % PALETTE.len();
        // Each pass through the palette shifts the markers by one: with a
        // palette of a multiple of 3 colours, neighbours (across a pass too)
        // differ in marker, and a colour meets each marker once in 3 passes.
        let marker = match (c + k / PALETTE.len()) % 3 {
            0 => Marker::Circle,
            1 => Marker::Triangle,
            _ => Marker::Cross,
        };
        let (color, color_name) = PALETTE[c];
        Style {
            color,
            color_name,
            marker,
        }
    }
}

#[cfg(test)]
mod tests;

/// Writes the chart of `series` twice under `dir/figures/`: `STEM.png`
/// ([`line_chart`], no text) and `STEM.svg` ([`line_chart_svg`], with
/// `text` and a legend). Returns the two paths relative to `dir`.
pub fn save_line_charts(
    dir: &Path,
    stem: &str,
    text: ChartText<'_>,
    series: &[NamedSeries],
    x_range: (f64, f64),
    chance: Option<f64>,
) -> Result<[String; 2]> {
    let (png, svg) = (format!("figures/{stem}.png"), format!("figures/{stem}.svg"));
    save(&line_chart(series, x_range, chance), &dir.join(&png))?;
    line_chart_svg(&dir.join(&svg), text, series, x_range, chance)?;
    Ok([png, svg])
}

/// One named line of a [`line_chart`] or [`line_chart_svg`].
#[derive(Debug, Clone, PartialEq)]
pub struct NamedSeries {
    /// Legend text.
    pub name: String,
    /// Colour and marker.
    pub style: Style,
    /// `(x, y)` points, `y` in `[0, 1]`.
    pub points: Vec<(f64, f64)>,
}

impl NamedSeries {
    /// The series as a caption names it: "red triangles: salm".
    pub fn caption(&self) -> String {
        format!(
            "{} {}: {}",
            self.style.color_name,
            self.style.marker.plural(),
            self.name
        )
    }
}

/// What an SVG chart says besides its lines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartText<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// Label of the x axis.
    pub x_desc: &'a str,
    /// Label of the y axis.
    pub y_desc: &'a str,
}

/// Writes `series` as an SVG line chart on `[x0, x1] x [0, 1]` with a
/// dashed line at `chance` (labelled in the legend).
pub fn line_chart_svg(
    path: &Path,
    text: ChartText<'_>,
    series: &[NamedSeries],
    x_range: (f64, f64),
    chance: Option<f64>,
) -> Result<()> {
    use plotters::prelude::*;
    let err =
        |e: &dyn std::fmt::Display| Error::Unsupported(format!("drawing {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(e, format!("creating {}", parent.display())))?;
    }
    let (x0, x1) = if x_range.1 > x_range.0 {
        x_range
    } else {
        (x_range.0, x_range.0 + 1.0)
    };
    // The legend sits right of the plot, where it hides no line (inside,
    // any corner covers some runs' curves).
    let root = SVGBackend::new(path, (990, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (plot, legend) = root.split_horizontally(760);
    let mut chart = ChartBuilder::on(&plot)
        .caption(text.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(x0..x1, 0.0..1.0)
        .map_err(|e| err(&e))?;
    // Whole numbers (epochs, eps in 1/255) print without decimals.
    let x_label = |x: &f64| {
        if (x - x.round()).abs() < 1e-9 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(text.x_desc)
        .y_desc(text.y_desc)
        .x_labels(((x1 - x0).round() as usize + 1).clamp(2, 16))
        .x_label_formatter(&x_label)
        .y_labels(11)
        .draw()
        .map_err(|e| err(&e))?;
    // Legend rows (chance first): a line sample with the series' marker,
    // then its name.
    let row = |k: usize| (6, 40 + 18 * k as i32);
    let font = ("sans-serif", 13).into_font();
    let label = |text: String, (x, y): (i32, i32)| {
        legend
            .draw(&Text::new(text, (x + 30, y - 7), font.clone()))
            .map_err(|e| err(&e))
    };
    if let Some(c) = chance {
        let style = RGBColor(110, 110, 110).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(vec![(x0, c), (x1, c)], 6, 4, style))
            .map_err(|e| err(&e))?;
        let (x, y) = row(0);
        for dash in [x, x + 8, x + 16] {
            legend
                .draw(&PathElement::new(vec![(dash, y), (dash + 5, y)], style))
                .map_err(|e| err(&e))?;
        }
        label(format!("chance ({:.1}%)", 100.0 * c), (x, y))?;
    }
    let first = usize::from(chance.is_some());
    for (i, s) in series.iter().enumerate() {
        let [r, g, b] = s.style.color.0;
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        let (x, y) = row(first + i);
        legend
            .draw(&PathElement::new(
                vec![(x, y), (x + 22, y)],
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        label(s.name.clone(), (x, y))?;
        // The marker on every point and on the legend's line sample, so
        // that series sharing a colour stay told apart in both places.
        let points = s.points.iter().copied();
        let (style, at) = (color.stroke_width(2), (x + 11, y));
        match s.style.marker {
            Marker::Circle => chart
                .draw_series(points.map(|p| Circle::new(p, 4, color.filled())))
                .map(|_| ())
                .and_then(|()| legend.draw(&Circle::new(at, 4, color.filled()))),
            Marker::Triangle => chart
                .draw_series(points.map(|p| TriangleMarker::new(p, 6, style)))
                .map(|_| ())
                .and_then(|()| legend.draw(&TriangleMarker::new(at, 6, style))),
            Marker::Cross => chart
                .draw_series(points.map(|p| Cross::new(p, 5, style)))
                .map(|_| ())
                .and_then(|()| legend.draw(&Cross::new(at, 5, style))),
        }
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
