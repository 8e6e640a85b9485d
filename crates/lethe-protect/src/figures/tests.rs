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
