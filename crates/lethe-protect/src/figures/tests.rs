//! The examples grid's layout and colours.

use super::*;

#[test]
fn a_full_budget_heat_map_stands_out_from_the_canvas() {
    let shape = ImageShape {
        channels: 1,
        height: 4,
        width: 4,
    };
    let eps = 8.0 / 255.0;
    let clean = [0.5f32; 16];
    // Every pixel moved by the full budget; a second method leaves all.
    let full: Vec<f32> = clean.iter().map(|v| v + eps).collect();
    let rows = vec![(&clean[..], vec![&full[..], &clean[..]])];
    let grid = examples_grid(&rows, shape, eps).unwrap();
    // Tiles enlarged to 96 px; five columns: original, then image and map
    // for each method.
    let tile = 96;
    assert_eq!(grid.dimensions(), (5 * (tile + GAP) + GAP, tile + 2 * GAP));
    let at = |col: u32, x: u32, y: u32| *grid.get_pixel(GAP + col * (tile + GAP) + x, GAP + y);
    assert_eq!(at(2, 0, 0), WHITE);
    assert_eq!(at(2, tile - 1, tile - 1), WHITE);
    assert_eq!(at(4, 5, 5), Rgb([0, 0, 0]));
    // The canvas around and between the tiles is neither.
    for (x, y) in [
        (0, 0),
        (GAP + tile, GAP),
        (grid.width() - 1, grid.height() - 1),
    ] {
        assert_eq!(*grid.get_pixel(x, y), CANVAS);
    }
    assert!(examples_grid(&[], shape, eps).is_err());
}

#[test]
fn series_styles_never_repeat_within_27_series() {
    let styles: Vec<Style> = (0..27).map(Style::nth).collect();
    for (i, a) in styles.iter().enumerate() {
        for b in &styles[i + 1..] {
            assert!(
                (a.color_name, a.marker) != (b.color_name, b.marker),
                "two series captioned alike: {} {}",
                a.color_name,
                a.marker.plural()
            );
        }
    }
    for w in styles.windows(2) {
        assert!(
            w[0].color != w[1].color && w[0].marker != w[1].marker,
            "neighbours look alike"
        );
    }
}

#[test]
fn the_svg_legend_shows_each_series_marker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chart.svg");
    let pts = vec![(1.0, 0.2), (2.0, 0.5), (3.0, 0.9)];
    // Same colour, different markers: only the markers tell them apart.
    let series = [Marker::Circle, Marker::Cross].map(|marker| NamedSeries {
        name: format!("run-{}", marker.plural()),
        style: Style {
            marker,
            ..Style::nth(0)
        },
        points: pts.clone(),
    });
    let text = ChartText {
        title: "t",
        x_desc: "x",
        y_desc: "y",
    };
    line_chart_svg(&path, text, &series, (1.0, 3.0), None).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    // Three point markers and one legend marker for the circle series.
    assert_eq!(svg.matches("<circle").count(), pts.len() + 1, "{svg}");
    assert!(svg.contains("run-circles") && svg.contains("run-crosses"));
}

#[test]
fn the_png_chart_draws_each_series_marker() {
    let red = Rgb([200, 0, 0]);
    let one = |marker| {
        let s = NamedSeries {
            name: String::new(),
            style: Style {
                color: red,
                color_name: "red",
                marker,
            },
            points: vec![(0.5, 0.5)],
        };
        line_chart(&[s], (0.0, 1.0), None)
    };
    let (circle, cross) = (one(Marker::Circle), one(Marker::Cross));
    // Find the point's centre: the middle of the red pixels.
    let reds: Vec<(u32, u32)> = circle
        .enumerate_pixels()
        .filter(|p| *p.2 == red)
        .map(|p| (p.0, p.1))
        .collect();
    let n = reds.len() as u32;
    let (cx, cy) = (
        reds.iter().map(|p| p.0).sum::<u32>() / n,
        reds.iter().map(|p| p.1).sum::<u32>() / n,
    );
    // Right of the centre: inside the disc, between the cross's arms; on a
    // diagonal: both.
    assert_eq!(*circle.get_pixel(cx + 3, cy), red);
    assert_ne!(*cross.get_pixel(cx + 3, cy), red);
    assert_eq!(*cross.get_pixel(cx + 3, cy + 3), red);
    assert_eq!(*cross.get_pixel(cx, cy), red);
}
