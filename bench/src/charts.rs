//! SVG charts of one workload, every backend on the same axes: the
//! end-to-end latency CDF, deliveries per second and p99 per second.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Report, WorkloadReport};
use crate::BenchError;

/// A chart that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {chart}: {message}")]
pub struct ChartError {
    chart: String,
    message: String,
}

const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Draws every workload's charts into `dir` (created if missing).
pub fn draw_all(report: &Report, dir: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
        path: dir.to_owned(),
        source,
    })?;
    // The jitter workload has its table and no latency series: no charts.
    let charted =
        |w: &&WorkloadReport| !matches!(w.workload.pattern, crate::load::Pattern::Jitter { .. });
    for w in report.workloads.iter().filter(charted) {
        draw(w, dir).map_err(|e| BenchError::Write {
            path: dir.to_owned(),
            source: std::io::Error::other(e),
        })?;
    }
    Ok(())
}

/// Draws `{name}-latency-cdf.svg`, `{name}-throughput.svg` and
/// `{name}-p99.svg` into `dir`.
pub fn draw(w: &WorkloadReport, dir: &Path) -> Result<(), ChartError> {
    let name = &w.workload.name;
    let runs: Vec<(&str, &crate::load::LoadReport)> = w
        .results
        .iter()
        .filter_map(|r| Some((r.backend.as_str(), r.run.as_ref()?)))
        .collect();
    let cdf = runs
        .iter()
        .map(|(b, r)| Line {
            name: (*b).to_owned(),
            // Percentile on y; latency on a log x axis.
            points: r
                .e2e_cdf
                .iter()
                .map(|[q, ms]| (ms.max(0.01), q * 100.0))
                .collect(),
        })
        .collect::<Vec<_>>();
    plot(
        &dir.join(format!("{name}-latency-cdf.svg")),
        &format!("{name}: end-to-end latency CDF"),
        "latency (ms, log scale)",
        "percentile",
        &cdf,
        true,
    )?;
    let series = |pick: fn(&crate::load::SeriesPoint) -> f64| {
        runs.iter()
            .map(|(b, r)| Line {
                name: (*b).to_owned(),
                points: r.series.iter().map(|p| (p.t, pick(p))).collect(),
            })
            .collect::<Vec<_>>()
    };
    plot(
        &dir.join(format!("{name}-throughput.svg")),
        &format!("{name}: deliveries per second"),
        "seconds since sending started",
        "deliveries/s",
        &series(|p| p.delivered as f64),
        false,
    )?;
    plot(
        &dir.join(format!("{name}-p99.svg")),
        &format!("{name}: p99 end-to-end latency per second"),
        "seconds since sending started",
        "p99 (ms)",
        &series(|p| p.p99_ms),
        false,
    )
}

fn plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    log_x: bool,
) -> Result<(), ChartError> {
    let err = |e: &dyn std::fmt::Display| ChartError {
        chart: path.display().to_string(),
        message: e.to_string(),
    };
    let all = lines.iter().flat_map(|l| l.points.iter());
    let (mut x_max, mut y_max, mut x_min) = (0.0f64, 0.0f64, f64::INFINITY);
    for (x, y) in all {
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
        x_min = x_min.min(*x);
    }
    let x_max = if x_max > 0.0 { x_max * 1.05 } else { 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.05 } else { 1.0 };
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    // The log-x chart is the latency CDF: its curves rise to the upper right.
    let legend = if log_x {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    };
    if log_x {
        let x_min = if x_min.is_finite() {
            (x_min * 0.9).max(0.01)
        } else {
            0.01
        };
        let chart = builder
            .build_cartesian_2d((x_min..x_max.max(x_min * 2.0)).log_scale(), 0.0..100.0)
            .map_err(|e| err(&e))?;
        draw_lines(chart, x_desc, y_desc, lines, legend)
    } else {
        let chart = builder
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        draw_lines(chart, x_desc, y_desc, lines, legend)
    }
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type DrawResult =
    Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw_lines<'a, X>(
    mut chart: ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    legend: SeriesLabelPosition,
) -> DrawResult
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (i, l) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                l.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(l.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
}
