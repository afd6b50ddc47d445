//! Loss curves (train and eval vs. optimizer step) as SVG and PNG, with plotters.
//!
//! Text is rendered with the DejaVu Sans Mono font embedded in the binary (assets/, Bitstream Vera
//! licence), so no system fonts or fontconfig are needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::StepRecord;
use crate::suite::BehaviourPoint;

#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is a valid TTF; a failure here would only lose the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Writes `svg` and `png` loss curves from the metrics. Steps with a null loss are left out;
/// `initial_eval` (the eval loss before training) is drawn at step 0.
pub fn plot_losses(
    records: &[StepRecord],
    initial_eval: Option<f64>,
    title: &str,
    svg: &Path,
    png: &Path,
) -> Result<(), PlotError> {
    register_font();
    {
        let root = SVGBackend::new(svg, (900, 520)).into_drawing_area();
        draw(&root, records, initial_eval, title).map_err(|m| PlotError {
            path: svg.display().to_string(),
            message: m,
        })?;
        root.present().map_err(|e| PlotError {
            path: svg.display().to_string(),
            message: e.to_string(),
        })?;
    }
    {
        let root = BitMapBackend::new(png, (900, 520)).into_drawing_area();
        draw(&root, records, initial_eval, title).map_err(|m| PlotError {
            path: png.display().to_string(),
            message: m,
        })?;
        root.present().map_err(|e| PlotError {
            path: png.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    records: &[StepRecord],
    initial_eval: Option<f64>,
    title: &str,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.loss.filter(|l| l.is_finite()).map(|l| (r.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = initial_eval
        .filter(|l| l.is_finite())
        .map(|l| (0.0, l))
        .into_iter()
        .chain(records.iter().filter_map(|r| {
            r.eval_loss
                .filter(|l| l.is_finite())
                .map(|l| (r.step as f64, l))
        }))
        .collect();
    let all = train.iter().chain(eval.iter());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x1.max(1.0), (y0 - pad)..(y1 + pad))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (CE per trained token)")
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
        .map_err(e)?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
            .map_err(e)?
            .label("eval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}

/// Writes `svg` and `png` behaviour curves: the suite's overall pass rate (thick) and each category's
/// (thin), in [0, 1], against the optimizer step (step 0 = the base model). Drawn beside the loss
/// curves in report.md.
pub fn plot_behaviour(
    points: &[BehaviourPoint],
    title: &str,
    svg: &Path,
    png: &Path,
) -> Result<(), PlotError> {
    register_font();
    let err = |p: &Path, m: String| PlotError {
        path: p.display().to_string(),
        message: m,
    };
    {
        let root = SVGBackend::new(svg, (900, 520)).into_drawing_area();
        draw_behaviour(&root, points, title).map_err(|m| err(svg, m))?;
        root.present().map_err(|e| err(svg, e.to_string()))?;
    }
    {
        let root = BitMapBackend::new(png, (900, 520)).into_drawing_area();
        draw_behaviour(&root, points, title).map_err(|m| err(png, m))?;
        root.present().map_err(|e| err(png, e.to_string()))?;
    }
    Ok(())
}

fn draw_behaviour<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[BehaviourPoint],
    title: &str,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let x1 = points.iter().map(|p| p.step as f64).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x1, -0.02f64..1.02)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step (0 = base)")
        .y_desc("pass rate")
        .draw()
        .map_err(e)?;
    let mut names: Vec<&String> = points.iter().flat_map(|p| p.categories.keys()).collect();
    names.sort();
    names.dedup();
    // (label, points, stroke width)
    type Series = (String, Vec<(f64, f64)>, u32);
    let mut series: Vec<Series> = vec![(
        "overall".into(),
        points.iter().map(|p| (p.step as f64, p.overall)).collect(),
        3,
    )];
    for n in names {
        let pts = points
            .iter()
            .filter_map(|p| p.categories.get(n).map(|&r| (p.step as f64, r)))
            .collect();
        series.push((n.clone(), pts, 1));
    }
    for (i, (name, pts, width)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = color.stroke_width(width);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<StepRecord> = (1..=20)
            .map(|s| StepRecord {
                step: s,
                epoch: s as f64 / 20.0,
                loss: if s == 7 {
                    None
                } else {
                    Some(3.0 / (s as f64).sqrt())
                },
                eval_loss: (s % 5 == 0).then(|| 2.5 / (s as f64).sqrt()),
                lr: 1e-3,
                grad_norm: Some(1.0),
                tokens: 8,
                tokens_per_s: 10.0,
                elapsed_s: s as f64,
                skipped: s == 7,
                bad_samples: vec![],
            })
            .collect();
        let (svg, png) = (dir.path().join("loss.svg"), dir.path().join("loss.png"));
        plot_losses(&recs, Some(3.5), "demo", &svg, &png).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(
            s.starts_with("<svg") && s.contains("polyline") && s.contains("eval"),
            "{}",
            &s[..200.min(s.len())]
        );
        let p = std::fs::read(&png).unwrap();
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        // Empty metrics still give a (blank) chart rather than an error.
        plot_losses(&[], None, "empty", &svg, &png).unwrap();
    }

    #[test]
    fn writes_behaviour_curves() {
        let dir = tempfile::tempdir().unwrap();
        let pts: Vec<BehaviourPoint> = [0u64, 5, 10]
            .iter()
            .map(|&s| BehaviourPoint {
                step: s,
                overall: s as f64 / 20.0,
                categories: [
                    ("no_lo_se".to_string(), s as f64 / 10.0),
                    ("json".to_string(), 0.5),
                ]
                .into_iter()
                .collect(),
            })
            .collect();
        let (svg, png) = (dir.path().join("b.svg"), dir.path().join("b.png"));
        plot_behaviour(&pts, "behaviour", &svg, &png).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.contains("polyline") && s.contains("no_lo_se") && s.contains("overall"));
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
        plot_behaviour(&[], "empty", &svg, &png).unwrap();
    }
}
