//! PNG line charts for training runs and experiments.
//!
//! Plotters draws into a bitmap with an embedded font (DejaVu Sans, `src/plot/DejaVuSans.ttf`, license in
//! `src/plot/DejaVuSans-LICENSE.txt`), so a plot needs neither system fonts nor fontconfig: CI and a bare
//! Debian machine draw the same picture. A figure is one or more panels in a grid, each with a title, axis
//! labels and a legend, so a reader understands it without the code.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

const FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const PANEL_W: u32 = 640;
const PANEL_H: u32 = 420;

/// One curve of a chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// `(x, y)` points in drawing order; non-finite points are skipped (a diverged run's NaNs end its line).
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from a label and points.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
        }
    }
}

/// One panel: title, axis labels and curves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chart {
    /// Panel title.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// The curves.
    pub series: Vec<Series>,
    /// Logarithmic y axis (points with `y <= 0` are skipped).
    pub log_y: bool,
}

impl Chart {
    /// A chart with a title and axis labels and no curves yet.
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Self {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            ..Default::default()
        }
    }

    /// Adds a curve.
    pub fn with(mut self, label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        self.series.push(Series::new(label, points));
        self
    }

    /// Same chart with a logarithmic y axis.
    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    fn drawable(&self) -> Vec<Vec<(f64, f64)>> {
        self.series
            .iter()
            .map(|s| {
                s.points
                    .iter()
                    .copied()
                    .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || y > 0.0))
                    .collect()
            })
            .collect()
    }
}

/// The legend entry of a series on a log axis: a series with points but none drawable (zero throughout,
/// as the ICS of a first layer, which has no layer before it, or otherwise without a positive finite y)
/// says so rather than showing a colour with no line.
fn log_legend_label(label: &str, ys: &[f64], drawn: usize) -> String {
    if drawn > 0 || ys.is_empty() {
        label.to_string()
    } else if ys.iter().all(|&y| y == 0.0) {
        format!("{label} (0 throughout: off the log axis)")
    } else {
        format!("{label} (no positive finite value: off the log axis)")
    }
}

/// Writes one chart to a PNG file (atomically: a temporary file, then a rename).
///
/// # Errors
/// [`Error::File`] when the file cannot be written or the chart cannot be drawn.
pub fn line_chart(path: &Path, chart: &Chart) -> Result<()> {
    line_charts(path, std::slice::from_ref(chart), 1)
}

/// Writes several charts as panels of one PNG, `columns` per row.
///
/// # Errors
/// [`Error::BadConfig`] for no charts or zero columns; [`Error::File`] when the file cannot be written or
/// a chart cannot be drawn.
pub fn line_charts(path: &Path, charts: &[Chart], columns: usize) -> Result<()> {
    if charts.is_empty() || columns == 0 {
        return Err(Error::config(
            "a figure needs at least one chart and one column",
        ));
    }
    register_font();
    let columns = columns.min(charts.len());
    let rows = charts.len().div_ceil(columns);
    let size = (PANEL_W * columns as u32, PANEL_H * rows as u32);
    // BitMapBackend picks the encoder from the extension, so the temporary name keeps `.png`.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}.png",
        name.to_string_lossy(),
        std::process::id()
    ));
    let drawn = draw(&tmp, size, charts, columns, rows);
    let result = drawn
        .map_err(|e| Error::file(path, format!("drawing the plot failed: {e}")))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font compiled into the binary; a failure here would mean a
        // corrupt build, and text would then silently be missing, so it is worth a loud message.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            eprintln!(
                "warning: the embedded plot font could not be loaded; plot text will be missing"
            );
        }
    });
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(
    path: &Path,
    size: (u32, u32),
    charts: &[Chart],
    columns: usize,
    rows: usize,
) -> DrawResult {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((rows, columns));
    for (chart, panel) in charts.iter().zip(panels.iter()) {
        draw_panel(panel, chart)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    chart: &Chart,
) -> DrawResult {
    let lines = chart.drawable();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in lines.iter().flatten() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        // No drawable point: still draw the labelled, empty axes so the reader sees what is missing.
        (x0, x1, y0, y1) = (0.0, 1.0, if chart.log_y { 0.1 } else { 0.0 }, 1.0);
    }
    if x1 - x0 <= 0.0 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    if chart.log_y {
        if y1 / y0 < 1.01 {
            (y0, y1) = (y0 / 1.5, y1 * 1.5);
        }
    } else {
        let pad = if y1 > y0 {
            0.04 * (y1 - y0)
        } else {
            y0.abs().max(1.0) * 0.1
        };
        (y0, y1) = (y0 - pad, y1 + pad);
    }

    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&chart.title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64);
    let font = (FAMILY, 14);
    let corner = legend_corner(&lines, (x0, x1), (y0, y1), chart.log_y);
    if chart.log_y {
        let ticks = log_ticks(y0, y1);
        let mut ctx =
            builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale().with_key_points(ticks))?;
        // A log axis gets a light line at every key point: they would fill whole decades with grey.
        ctx.configure_mesh()
            .x_desc(chart.x_label.as_str())
            .y_desc(chart.y_label.as_str())
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&|v| tick_label(*v))
            .light_line_style(TRANSPARENT)
            .label_style(font)
            .axis_desc_style(font)
            .draw()?;
        for (i, (series, points)) in chart.series.iter().zip(lines).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let ys: Vec<f64> = series.points.iter().map(|p| p.1).collect();
            let label = log_legend_label(&series.label, &ys, points.len());
            ctx.draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        if !chart.series.is_empty() {
            legend(&mut ctx, corner)?;
        }
    } else {
        let mut ctx = builder.build_cartesian_2d(x0..x1, y0..y1)?;
        ctx.configure_mesh()
            .x_desc(chart.x_label.as_str())
            .y_desc(chart.y_label.as_str())
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&|v| tick_label(*v))
            .label_style(font)
            .axis_desc_style(font)
            .draw()?;
        for (i, (series, points)) in chart.series.iter().zip(lines).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            ctx.draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(series.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        if !chart.series.is_empty() {
            legend(&mut ctx, corner)?;
        }
    }
    Ok(())
}

/// The labelled values of a log axis over [lo, hi]: 1, 2 and 5 times each power of ten inside it, only the
/// powers of ten when that makes more than 12, every 1..9 times a power of ten when it makes fewer than
/// 4, and the ends when even that makes fewer than 2. (plotters' own start at the first power of ten inside the range: a loss falling from 2.3 to
/// 0.03 got no label below 0.1.)
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return Vec::new();
    }
    let within = |mantissas: &[f64]| -> Vec<f64> {
        let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        let mut ticks = Vec::new();
        for e in first..=last {
            for &m in mantissas {
                // From the text, so that 0.3 is 0.3 and not 3 * 0.1.
                let v: f64 = format!("{m}e{e}").parse().unwrap_or(f64::NAN);
                if v >= lo * (1.0 - 1e-12) && v <= hi * (1.0 + 1e-12) {
                    ticks.push(v);
                }
            }
        }
        ticks
    };
    let ticks = within(&[1.0, 2.0, 5.0]);
    if ticks.len() > 12 {
        return within(&[1.0]);
    }
    if ticks.len() >= 4 {
        return ticks;
    }
    let ticks = within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    if ticks.len() >= 2 {
        ticks
    } else {
        // Narrower than one step of 1..9: the ends themselves.
        vec![lo, hi]
    }
}

/// A short tick label: plain notation rounded to 3 significant digits below 1000 (`0.25`, `0.000123`)
/// and to whole numbers from 1000 up to 999 999 (`5000`), trailing zeros dropped; scientific notation with
/// 3 significant digits outside [1e-4, 1e6) (`1.50e-5`); never the `0.30000000000000004` a key point of a
/// log axis can be.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    if !(-4..6).contains(&magnitude) {
        return format!("{v:.2e}");
    }
    let decimals = (2 - magnitude).max(0) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// The legend goes in the right-hand corner the curves leave free: training curves end high (accuracy)
/// or low (loss), so look at where the points of the right third of the panel sit.
fn legend_corner(
    lines: &[Vec<(f64, f64)>],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    log_y: bool,
) -> SeriesLabelPosition {
    let scale = |y: f64| {
        if log_y {
            y.max(f64::MIN_POSITIVE).ln()
        } else {
            y
        }
    };
    let (lo, hi) = (scale(y0), scale(y1));
    let right: Vec<f64> = lines
        .iter()
        .flatten()
        .filter(|p| p.0 >= x0 + (x1 - x0) * 2.0 / 3.0)
        .map(|p| (scale(p.1) - lo) / (hi - lo).max(f64::MIN_POSITIVE))
        .collect();
    let upper = right.iter().filter(|&&v| v > 0.5).count();
    if upper * 2 > right.len() {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

fn legend<'a, DB, CT>(ctx: &mut ChartContext<'a, DB, CT>, corner: SeriesLabelPosition) -> DrawResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate,
{
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FAMILY, 14))
        .position(corner)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_legend_names_series_off_the_axis() {
        assert_eq!(log_legend_label("a", &[1.0, 0.0], 1), "a");
        assert_eq!(
            log_legend_label("BN layer 0", &[0.0; 5], 0),
            "BN layer 0 (0 throughout: off the log axis)"
        );
        assert_eq!(
            log_legend_label("b", &[-1.0, f64::NAN, 0.0], 0),
            "b (no positive finite value: off the log axis)"
        );
        assert_eq!(log_legend_label("empty", &[], 0), "empty");
    }
}
