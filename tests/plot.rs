//! PNG charts: the file is a real PNG of the expected size, curves and text are drawn (pixels that are
//! not background where they must be), bad input is a typed error, and a failed write leaves no file.

mod common;

use std::path::Path;

use batchnorm::plot::{line_chart, line_charts, Chart};
use common::ScratchDir;

fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "plotters writes RGB");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Fraction of pixels in rows `r0..r1` (all columns) that are not white.
fn ink(img: &(u32, u32, Vec<u8>), r0: u32, r1: u32) -> f64 {
    let (w, _, px) = img;
    let row = 3 * *w as usize;
    let slice = &px[r0 as usize * row..r1 as usize * row];
    let dark = slice
        .chunks(3)
        .filter(|p| p.iter().any(|&v| v < 200))
        .count();
    dark as f64 / (slice.len() / 3) as f64
}

/// Pixels that are strongly coloured (grid, axes and text are grey or black).
fn coloured(img: &(u32, u32, Vec<u8>)) -> usize {
    img.2
        .chunks(3)
        .filter(|p| {
            let (lo, hi) = (p.iter().min().unwrap(), p.iter().max().unwrap());
            hi - lo > 80
        })
        .count()
}

#[test]
fn chart_is_a_png_with_curves_and_text() {
    let dir = ScratchDir::new("plot");
    let path = dir.join("loss.png");
    let chart = Chart::new("Training loss", "step", "loss")
        .with(
            "train",
            (0..200)
                .map(|i| (i as f64, 2.0 / (1.0 + i as f64)))
                .collect(),
        )
        .with("test", vec![(0.0, 2.0), (100.0, f64::NAN), (199.0, 0.1)])
        .log_y();
    line_chart(&path, &chart).unwrap();
    let img = decode(&path);
    assert_eq!((img.0, img.1), (640, 420));
    // The title band (top 30 rows) holds text; the plot body holds axes, grid and curves.
    assert!(
        ink(&img, 0, 30) > 0.005,
        "no title drawn: {}",
        ink(&img, 0, 30)
    );
    assert!(
        ink(&img, 60, 360) > 0.02,
        "no curves drawn: {}",
        ink(&img, 60, 360)
    );

    // The first two palette colours (a red and a green) are the curves; the empty chart has none.
    let empty = dir.join("empty.png");
    line_chart(&empty, &Chart::new("nothing yet", "step", "accuracy")).unwrap();
    let blank = decode(&empty);
    assert!(
        coloured(&img) > 500,
        "curves drawn in colour: {}",
        coloured(&img)
    );
    assert_eq!(coloured(&blank), 0, "no curves, no colour");

    let grid = dir.join("grid.png");
    line_charts(&grid, &[chart.clone(), chart.clone(), chart], 2).unwrap();
    let g = decode(&grid);
    assert_eq!((g.0, g.1), (1280, 840));
    // No temporary files are left beside the outputs.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn bad_figures_are_errors() {
    let dir = std::env::temp_dir();
    let err = line_charts(&dir.join("x.png"), &[], 1).unwrap_err();
    assert!(err.to_string().contains("at least one chart"), "{err}");
    let missing = dir.join("no-such-dir-bn-plot/x.png");
    let err = line_chart(&missing, &Chart::new("t", "x", "y")).unwrap_err();
    assert!(err.to_string().contains("no-such-dir-bn-plot"), "{err}");
}

#[test]
fn tick_labels_are_short() {
    use batchnorm::plot::tick_label;
    for (v, want) in [
        (5000.0, "5000"),
        (0.30000000000000004, "0.3"),
        (0.25, "0.25"),
        (1.0, "1"),
        (-2.5, "-2.5"),
        (0.123456, "0.123"),
        (1.5e-5, "1.50e-5"),
        (0.0, "0"),
    ] {
        assert_eq!(tick_label(v), want, "{v}");
    }
}

/// A log axis is labelled across its whole range: 1, 2 and 5 per decade, below the first power of ten too
/// (a loss from 2.3 down to 0.03 had no label under 0.1), only the decades on a wide range, 1..9 per
/// decade on a narrow one.
#[test]
fn log_axis_ticks_cover_the_range() {
    use batchnorm::plot::log_ticks;
    assert_eq!(log_ticks(0.03, 2.3), vec![0.05, 0.1, 0.2, 0.5, 1.0, 2.0]);
    assert_eq!(
        log_ticks(1e-6, 1e3),
        (-6..=3).map(|e| 10f64.powi(e)).collect::<Vec<_>>()
    );
    assert_eq!(log_ticks(0.25, 0.45), vec![0.3, 0.4]);
    assert_eq!(
        log_ticks(0.19, 1.1),
        vec![0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    );
    assert_eq!(log_ticks(0.12, 0.13), vec![0.12, 0.13]);
    assert!(log_ticks(0.0, 1.0).is_empty() && log_ticks(1.0, f64::INFINITY).is_empty());
    for (lo, hi) in [(0.031, 2.29), (1e-4, 7.0), (3.0, 4000.0)] {
        let t = log_ticks(lo, hi);
        assert!((4..=12).contains(&t.len()), "{lo}..{hi}: {t:?}");
        assert!(t.windows(2).all(|w| w[0] < w[1]) && t[0] >= lo && *t.last().unwrap() <= hi);
    }
}
