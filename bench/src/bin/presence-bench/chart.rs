//! `report --svg DIR`: charts of saved `--json` reports (plotters, SVG
//! backend only: no font files or system libraries are needed, the SVG
//! viewer lays out the text).
//!
//! * `density.svg`: process memory against agents held, and memory per
//!   connection above the 0-agent baseline, for every target of every
//!   `density` report.
//! * `handshakes.svg`: full handshakes per second (wall clock and per
//!   server CPU second) of every target, one group per `ramp`, `steady` or
//!   `density` report.
//! * `storm.svg`: one panel per `storm` report with a recovery curve: agents
//!   back (bench) and the daemon's sessions, agents online and in grace
//!   against seconds since the storm started.
//!
//! The data-to-series functions are separate from the drawing and tested.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Report, StormResult};

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("drawing {chart}: {message}")]
    Draw {
        chart: &'static str,
        message: String,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One saved report and the name it goes by in legends (its file stem).
#[derive(Debug, Clone)]
pub struct Input {
    pub label: String,
    pub report: Report,
}

/// A named line; `None` is a gap (e.g. the daemon did not answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, Option<f64>)>,
}

impl Series {
    /// The runs of points without a gap.
    pub fn segments(&self) -> Vec<Vec<(f64, f64)>> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        for &(x, y) in &self.points {
            match y {
                Some(y) => cur.push((x, y)),
                None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
                None => {}
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    fn values(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.points.iter().filter_map(|&(x, y)| y.map(|y| (x, y)))
    }
}

/// `density.svg`: memory (MiB) against agents, and bytes per connection
/// above the 0-agent point against agents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DensityData {
    pub memory_mib: Vec<Series>,
    pub per_conn_bytes: Vec<Series>,
}

/// One bar group of `handshakes.svg` (one report): per target, handshakes/s
/// of wall time and per server CPU second.
#[derive(Debug, Clone, PartialEq)]
pub struct BarGroup {
    pub label: String,
    pub bars: Vec<Bar>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub target: String,
    pub wall_per_s: f64,
    pub per_server_cpu_s: Option<f64>,
}

/// One panel of `storm.svg`.
#[derive(Debug, Clone, PartialEq)]
pub struct StormPanel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Series names of the storm panels.
pub const BACK: &str = "agents back (bench)";
pub const SESSIONS: &str = "sessions (daemon)";
pub const ONLINE: &str = "agents online (daemon)";
pub const GRACE: &str = "agents in grace (daemon)";

const MIB: f64 = 1024.0 * 1024.0;

/// One measure of a density point (RSS or heap), in bytes.
type PointValue = dyn Fn(&crate::report::DensityPoint) -> Option<f64>;

/// A suffix that tells reports apart when more than one has the scenario.
fn suffix(inputs: &[&Input], i: &Input) -> String {
    if inputs.len() > 1 {
        format!(" [{}]", i.label)
    } else {
        String::new()
    }
}

pub fn density_data(inputs: &[Input]) -> DensityData {
    let reports: Vec<&Input> = inputs
        .iter()
        .filter(|i| i.report.targets.iter().any(|t| t.density.is_some()))
        .collect();
    let mut out = DensityData::default();
    for input in &reports {
        let sfx = suffix(&reports, input);
        for t in &input.report.targets {
            let Some(d) = &t.density else { continue };
            let base = d.points.iter().find(|p| p.agents == 0);
            let rss = |p: &crate::report::DensityPoint| Some(p.rss_bytes as f64);
            let heap = |p: &crate::report::DensityPoint| p.heap_bytes.map(|h| h as f64);
            let mut kinds: Vec<(&str, &PointValue)> = vec![("RSS", &rss)];
            if d.points.iter().any(|p| p.heap_bytes.is_some()) {
                kinds.push(("heap", &heap));
            }
            for (kind, get) in kinds {
                let name = format!("{} {kind}{sfx}", t.target);
                out.memory_mib.push(Series {
                    name: name.clone(),
                    points: d
                        .points
                        .iter()
                        .map(|p| (p.agents as f64, get(p).map(|v| v / MIB)))
                        .collect(),
                });
                // Per connection: growth over the baseline ÷ agents. Not
                // positive (allocated up front, or noise at small counts)
                // cannot go on the log axis and is left out.
                let Some(b) = base.and_then(get) else {
                    continue;
                };
                let points: Vec<(f64, Option<f64>)> = d
                    .points
                    .iter()
                    .filter(|p| p.agents > 0)
                    .filter_map(|p| {
                        let per = (get(p)? - b) / p.agents as f64;
                        (per > 0.0).then_some((p.agents as f64, Some(per)))
                    })
                    .collect();
                if !points.is_empty() {
                    out.per_conn_bytes.push(Series { name, points });
                }
            }
        }
    }
    out
}

pub fn handshake_data(inputs: &[Input]) -> Vec<BarGroup> {
    let mut out = Vec::new();
    for input in inputs {
        let r = &input.report;
        if !matches!(r.scenario.as_str(), "ramp" | "steady" | "density") {
            continue;
        }
        let bars: Vec<Bar> = r
            .targets
            .iter()
            .filter_map(|t| {
                let c = t.connect.as_ref().filter(|c| c.ok > 0)?;
                Some(Bar {
                    target: t.target.clone(),
                    wall_per_s: c.rate_per_s,
                    per_server_cpu_s: c.per_server_cpu_s,
                })
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let agents = match r.agents.as_slice() {
            [one] => format!("{one} agents"),
            many => format!("up to {} agents", many.iter().max().copied().unwrap_or(0)),
        };
        out.push(BarGroup {
            label: format!("{} {agents} [{}]", r.scenario, input.label),
            bars,
        });
    }
    out
}

fn storm_title(s: &StormResult, label: &str) -> String {
    let mut mode = s.mode.clone();
    if s.drop_share < 1.0 {
        mode.push_str(&format!(" {:.0}%", s.drop_share * 100.0));
    }
    if s.resumption {
        mode.push_str(", resumption");
    }
    let done = match s.t100_ms {
        Some(ms) => format!("all back at {:.1} s", ms as f64 / 1000.0),
        None => format!("{} not back", s.not_back),
    };
    format!(
        "storm {mode}: {} of {} agents dropped, {done}, offline events {} [{label}]",
        s.dropped, s.agents, s.offline_events
    )
}

pub fn storm_data(inputs: &[Input]) -> Vec<StormPanel> {
    let mut out = Vec::new();
    for input in inputs {
        for t in &input.report.targets {
            let Some(s) = t.storm.as_ref().filter(|s| !s.recovery.is_empty()) else {
                continue;
            };
            let line =
                |name: &str, get: &dyn Fn(&crate::report::RecoverySample) -> Option<u64>| Series {
                    name: name.into(),
                    points: s
                        .recovery
                        .iter()
                        .map(|r| (r.t_s, get(r).map(|v| v as f64)))
                        .collect(),
                };
            out.push(StormPanel {
                title: storm_title(s, &input.label),
                series: vec![
                    line(BACK, &|r| Some(r.back)),
                    line(SESSIONS, &|r| r.sessions),
                    line(ONLINE, &|r| r.agents_online),
                    line(GRACE, &|r| r.agents_in_grace),
                ],
            });
        }
    }
    out
}

/// Colour of a series: by target for the density and handshake charts,
/// by index otherwise.
fn colour(name: &str, index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
    ];
    // The storm panels' lines, and the heap next to its target's RSS.
    match name {
        BACK => return PALETTE[0],
        SESSIONS => return PALETTE[4],
        ONLINE => return PALETTE[1],
        GRACE => return PALETTE[2],
        _ if name.starts_with("presenced heap") => return RGBColor(120, 180, 225),
        _ => {}
    }
    let i = if name.starts_with("presenced") {
        0
    } else if name.starts_with("nats-server") {
        1
    } else if name.starts_with("mosquitto") {
        2
    } else {
        3 + index % 3
    };
    PALETTE[i]
}

fn draw_err<E: std::fmt::Debug>(chart: &'static str) -> impl Fn(E) -> ChartError {
    move |e| ChartError::Draw {
        chart,
        message: format!("{e:?}"),
    }
}

/// Range of the values, padded; `floor_zero` starts it at 0.
fn span(values: impl Iterator<Item = f64>, floor_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if floor_zero {
        lo = lo.min(0.0);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi + (hi - lo) * 0.05)
}

/// An axis label: whole numbers without a fraction, small steps with one.
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn human_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.0} MiB", b / MIB)
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn lines_panel(
    area: &Area<'_>,
    chart: &'static str,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    legend_at: Legend,
) -> Result<(), ChartError> {
    let (x0, x1) = span(series.iter().flat_map(|s| s.values().map(|p| p.0)), true);
    let (y0, y1) = span(series.iter().flat_map(|s| s.values().map(|p| p.1)), true);
    let right = match legend_at {
        Legend::Inside(_) => 12,
        Legend::Outside => 230,
    };
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .margin_right(right)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err(chart))?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err(chart))?;
    draw_lines(&mut c, chart, series)?;
    match legend_at {
        Legend::Inside(p) => legend(&mut c, chart, p),
        // Right of the plot, in the margin kept for it, drawn on the area
        // (plotters' own legend is cut off outside the plot).
        Legend::Outside => {
            let (ax, ay) = area.get_base_pixel();
            let (px, py) = c.plotting_area().get_base_pixel();
            let (w, _) = c.plotting_area().dim_in_pixel();
            let x = px - ax + i32::try_from(w).unwrap_or(0) + 16;
            for (i, s) in series.iter().enumerate() {
                let y = py - ay + 8 + 20 * i32::try_from(i).unwrap_or(0);
                let style = ShapeStyle::from(colour(&s.name, i)).stroke_width(2);
                area.draw(&PathElement::new(vec![(x, y), (x + 22, y)], style))
                    .map_err(draw_err(chart))?;
                area.draw(&Text::new(
                    s.name.clone(),
                    (x + 28, y),
                    ("sans-serif", 13)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(draw_err(chart))?;
            }
            Ok(())
        }
    }
}

/// Where a line chart's legend goes.
enum Legend {
    Inside(SeriesLabelPosition),
    /// In a margin right of the plot, so it covers no line.
    Outside,
}

fn draw_lines<'a, X, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    chart: &'static str,
    series: &[Series],
) -> Result<(), ChartError>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for (i, s) in series.iter().enumerate() {
        let col = colour(&s.name, i);
        let dashed = s.name.contains(" heap") || s.name.contains("(daemon)");
        let style = ShapeStyle::from(col).stroke_width(2);
        for (k, seg) in s.segments().into_iter().enumerate() {
            let marks = seg.len() <= 20;
            let anno = if dashed {
                c.draw_series(DashedLineSeries::new(seg.clone(), 6, 4, style))
                    .map_err(draw_err(chart))?
            } else {
                c.draw_series(LineSeries::new(seg.clone(), style))
                    .map_err(draw_err(chart))?
            };
            if k == 0 {
                anno.label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            if marks {
                c.draw_series(seg.iter().map(|&p| Circle::new(p, 3, col.filled())))
                    .map_err(draw_err(chart))?;
            }
        }
    }
    Ok(())
}

fn legend<'a, X, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    chart: &'static str,
    pos: SeriesLabelPosition,
) -> Result<(), ChartError>
where
    X: plotters::coord::ranged1d::Ranged,
    Y: plotters::coord::ranged1d::Ranged,
{
    c.configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err(chart))
}

fn svg_to_file(
    path: &Path,
    size: (u32, u32),
    chart: &'static str,
    draw: impl FnOnce(&Area<'_>) -> Result<(), ChartError>,
) -> Result<(), ChartError> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(chart))?;
        draw(&root)?;
        root.present().map_err(draw_err(chart))?;
    }
    std::fs::write(path, text).map_err(|source| ChartError::Write {
        path: path.to_owned(),
        source,
    })
}

pub fn draw_density(path: &Path, d: &DensityData) -> Result<(), ChartError> {
    const CHART: &str = "density";
    svg_to_file(path, (1300, 520), CHART, |root| {
        let (left, right) = root.split_horizontally(650);
        lines_panel(
            &left,
            CHART,
            "process memory vs agents held",
            "agents",
            "MiB",
            &d.memory_mib,
            Legend::Inside(SeriesLabelPosition::UpperLeft),
        )?;
        let per = &d.per_conn_bytes;
        let (x0, x1) = span(per.iter().flat_map(|s| s.values().map(|p| p.0)), true);
        let (lo, hi) = per
            .iter()
            .flat_map(|s| s.values().map(|p| p.1))
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let (lo, hi) = if lo.is_finite() && hi > 0.0 {
            (lo / 2.0, hi * 2.0)
        } else {
            (1.0, 1024.0)
        };
        let mut c = ChartBuilder::on(&right)
            .caption(
                "memory per connection (above 0 agents, log scale)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, (lo..hi).log_scale())
            .map_err(draw_err(CHART))?;
        c.configure_mesh()
            .x_desc("agents")
            .y_desc("bytes per connection")
            .x_label_formatter(&|v| number(*v))
            .y_label_formatter(&|v| human_bytes(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_err(CHART))?;
        draw_lines(&mut c, CHART, per)?;
        legend(&mut c, CHART, SeriesLabelPosition::LowerLeft)
    })
}

pub fn draw_handshakes(path: &Path, groups: &[BarGroup]) -> Result<(), ChartError> {
    const CHART: &str = "handshakes";
    let width = (420 + 260 * groups.len() as u32).clamp(900, 2400);
    svg_to_file(path, (width, 560), CHART, |root| {
        let (top, bottom) = root.split_vertically(40);
        top.draw(&Text::new(
            "full TLS 1.3 handshakes (to WELCOME / CONNACK / PONG)",
            (width as i32 / 2, 12),
            ("sans-serif", 20)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(draw_err(CHART))?;
        let (left, right) = bottom.split_horizontally(width / 2);
        bars_panel(
            &left,
            "per second of wall time (bench shares the cores)",
            groups,
            |b| Some(b.wall_per_s),
        )?;
        bars_panel(&right, "per second of server CPU time", groups, |b| {
            b.per_server_cpu_s
        })
    })
}

fn bars_panel(
    area: &Area<'_>,
    title: &str,
    groups: &[BarGroup],
    value: impl Fn(&Bar) -> Option<f64>,
) -> Result<(), ChartError> {
    const CHART: &str = "handshakes";
    let (_, hi) = span(
        groups.iter().flat_map(|g| g.bars.iter().filter_map(&value)),
        true,
    );
    let hi = hi * 1.1;
    let n = groups.len().max(1) as f64;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, 0.0..hi)
        .map_err(draw_err(CHART))?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("handshakes per second")
        .y_label_formatter(&|v| number(*v))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err(CHART))?;
    // Every target once in the legend, in the order first seen.
    let mut targets: Vec<String> = Vec::new();
    for g in groups {
        for b in &g.bars {
            if !targets.contains(&b.target) {
                targets.push(b.target.clone());
            }
        }
    }
    for (ti, target) in targets.iter().enumerate() {
        let col = colour(target, ti);
        let mut rects = Vec::new();
        let mut labels = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            let k = g.bars.len().max(1) as f64;
            let w = 0.8 / k;
            let Some((bi, b)) = g.bars.iter().enumerate().find(|(_, b)| &b.target == target) else {
                continue;
            };
            let Some(v) = value(b) else { continue };
            let x = gi as f64 + 0.1 + bi as f64 * w;
            rects.push(Rectangle::new(
                [(x + w * 0.05, 0.0), (x + w * 0.95, v)],
                col.filled(),
            ));
            labels.push(Text::new(
                format!("{v:.0}"),
                (x + w / 2.0, v),
                ("sans-serif", 12)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            ));
        }
        c.draw_series(rects)
            .map_err(draw_err(CHART))?
            .label(target.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], col.filled()));
        c.draw_series(labels).map_err(draw_err(CHART))?;
    }
    // Group names under the axis, centred under each group (the chart's
    // coordinates are the backend's; the area's are relative to its corner).
    let (bx, by) = area.get_base_pixel();
    for (gi, g) in groups.iter().enumerate() {
        let (px, py) = c.backend_coord(&(gi as f64 + 0.5, 0.0));
        let (px, py) = (px - bx, py - by);
        area.draw(&Text::new(
            g.label.clone(),
            (px, py + 10),
            ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(draw_err(CHART))?;
    }
    legend(&mut c, CHART, SeriesLabelPosition::UpperRight)
}

pub fn draw_storm(path: &Path, panels: &[StormPanel]) -> Result<(), ChartError> {
    const CHART: &str = "storm";
    let h = 380;
    svg_to_file(
        path,
        (1100, h * panels.len().max(1) as u32),
        CHART,
        |root| {
            let areas = root.split_evenly((panels.len().max(1), 1));
            for (p, area) in panels.iter().zip(areas.iter()) {
                lines_panel(
                    area,
                    CHART,
                    &p.title,
                    "seconds since the storm started",
                    "agents / sessions",
                    &p.series,
                    Legend::Outside,
                )?;
            }
            Ok(())
        },
    )
}

/// Which files were written and which charts had no data.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<(PathBuf, Vec<String>)>,
    pub skipped: Vec<String>,
}

/// Write the charts the inputs have data for into `dir` (created if missing).
pub fn write_all(dir: &Path, inputs: &[Input]) -> Result<Written, ChartError> {
    std::fs::create_dir_all(dir).map_err(|source| ChartError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut w = Written::default();
    let d = density_data(inputs);
    if d.memory_mib.is_empty() {
        w.skipped
            .push("density.svg: no density report among the inputs".into());
    } else {
        let p = dir.join("density.svg");
        draw_density(&p, &d)?;
        w.files
            .push((p, d.memory_mib.iter().map(|s| s.name.clone()).collect()));
    }
    let h = handshake_data(inputs);
    if h.is_empty() {
        w.skipped.push(
            "handshakes.svg: no ramp, steady or density report with connects among the inputs"
                .into(),
        );
    } else {
        let p = dir.join("handshakes.svg");
        draw_handshakes(&p, &h)?;
        let mut names: Vec<String> = Vec::new();
        for b in h.iter().flat_map(|g| &g.bars) {
            if !names.contains(&b.target) {
                names.push(b.target.clone());
            }
        }
        w.files.push((p, names));
    }
    let s = storm_data(inputs);
    if s.is_empty() {
        w.skipped.push(
            "storm.svg: no storm report with a recovery curve among the inputs (a bench from before `recovery` was added has none)"
                .into(),
        );
    } else {
        let p = dir.join("storm.svg");
        draw_storm(&p, &s)?;
        w.files
            .push((p, s.iter().map(|p| p.title.clone()).collect()));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ConnectResult, DensityPoint, DensityResult, RecoverySample, TargetResult};

    fn report(scenario: &str, agents: Vec<u64>, targets: Vec<TargetResult>) -> Report {
        Report {
            scenario: scenario.into(),
            bench_version: "0.1.0".into(),
            started_unix: 0,
            agents,
            workers: 2,
            source_ips: 59,
            targets,
            notes: Vec::new(),
        }
    }

    fn point(agents: u64, rss: u64, heap: Option<u64>) -> DensityPoint {
        DensityPoint {
            agents,
            rss_bytes: rss,
            heap_bytes: heap,
            ..Default::default()
        }
    }

    fn density_target(name: &str, points: Vec<DensityPoint>) -> TargetResult {
        TargetResult {
            target: name.into(),
            density: Some(DensityResult {
                points,
                ..Default::default()
            }),
            connect: Some(ConnectResult {
                ok: 10,
                rate_per_s: 4000.0,
                per_server_cpu_s: Some(6000.0),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn input(label: &str, report: Report) -> Input {
        Input {
            label: label.into(),
            report,
        }
    }

    #[test]
    fn density_series_per_target_and_per_connection() {
        let r = report(
            "density",
            vec![1000, 2000],
            vec![
                density_target(
                    "presenced",
                    vec![
                        point(0, 10 << 20, Some(60 << 20)),
                        point(1000, (10 << 20) + 500_000, Some((60 << 20) - 1000)),
                        point(2000, (10 << 20) + 1_000_000, Some((60 << 20) + 800_000)),
                    ],
                ),
                density_target(
                    "nats-server",
                    vec![point(0, 0, None), point(1000, 35_000_000, None)],
                ),
            ],
        );
        let d = density_data(&[input("density", r)]);
        let names: Vec<&str> = d.memory_mib.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["presenced RSS", "presenced heap", "nats-server RSS"]
        );
        assert_eq!(d.memory_mib[0].points[0], (0.0, Some(10.0)));
        assert_eq!(d.memory_mib[2].points.len(), 2);
        // Per connection: growth above the 0 point ÷ agents; the heap's
        // negative growth at 1000 is left out.
        type Points = Vec<(f64, Option<f64>)>;
        let per: Vec<(&str, Points)> = d
            .per_conn_bytes
            .iter()
            .map(|s| (s.name.as_str(), s.points.clone()))
            .collect();
        assert_eq!(
            per,
            [
                (
                    "presenced RSS",
                    vec![(1000.0, Some(500.0)), (2000.0, Some(500.0))]
                ),
                ("presenced heap", vec![(2000.0, Some(400.0))]),
                ("nats-server RSS", vec![(1000.0, Some(35_000.0))]),
            ]
        );
        // Two density reports: the file names tell them apart.
        let r2 = report(
            "density",
            vec![10],
            vec![density_target("mosquitto", vec![point(10, 1, None)])],
        );
        let d = density_data(&[
            input(
                "a",
                report(
                    "density",
                    vec![10],
                    vec![density_target("presenced", vec![point(10, 1, None)])],
                ),
            ),
            input("b", r2),
        ]);
        let names: Vec<&str> = d.memory_mib.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["presenced RSS [a]", "mosquitto RSS [b]"]);
        // No 0-agent point: no per-connection line.
        assert!(d.per_conn_bytes.is_empty());
    }

    #[test]
    fn handshake_groups_skip_storms_and_empty_connects() {
        let ramp = report(
            "ramp",
            vec![5000],
            vec![
                density_target("presenced", vec![]),
                TargetResult {
                    target: "mosquitto".into(),
                    connect: Some(ConnectResult {
                        ok: 5000,
                        rate_per_s: 3000.0,
                        per_server_cpu_s: None,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                TargetResult {
                    target: "nats-server".into(),
                    connect: Some(ConnectResult::default()),
                    ..Default::default()
                },
            ],
        );
        let storm = report(
            "storm",
            vec![100],
            vec![density_target("presenced", vec![])],
        );
        let dens = report(
            "density",
            vec![1000, 5000],
            vec![density_target("presenced", vec![])],
        );
        let g = handshake_data(&[input("ramp", ramp), input("storm", storm), input("d", dens)]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].label, "ramp 5000 agents [ramp]");
        assert_eq!(g[1].label, "density up to 5000 agents [d]");
        assert_eq!(
            g[0].bars,
            [
                Bar {
                    target: "presenced".into(),
                    wall_per_s: 4000.0,
                    per_server_cpu_s: Some(6000.0)
                },
                Bar {
                    target: "mosquitto".into(),
                    wall_per_s: 3000.0,
                    per_server_cpu_s: None
                },
            ]
        );
    }

    #[test]
    fn storm_panel_has_the_curve_with_gaps_while_the_daemon_is_down() {
        let sample = |t_s: f64, back: u64, sessions: Option<u64>| RecoverySample {
            t_s,
            back,
            sessions,
            agents_online: sessions.map(|_| 100),
            agents_in_grace: sessions.map(|s| 100 - s.min(100)),
        };
        let s = StormResult {
            mode: "kill-daemon".into(),
            agents: 100,
            dropped: 100,
            drop_share: 1.0,
            back: 100,
            t100_ms: Some(1500),
            recovery: vec![
                sample(0.0, 0, Some(100)),
                sample(0.1, 0, None),
                sample(0.2, 10, Some(10)),
                sample(1.5, 100, Some(100)),
            ],
            ..Default::default()
        };
        let no_curve = StormResult::default();
        let r = report(
            "storm",
            vec![100],
            vec![TargetResult {
                target: "presenced".into(),
                storm: Some(s),
                ..Default::default()
            }],
        );
        let old = report(
            "storm",
            vec![100],
            vec![TargetResult {
                target: "presenced".into(),
                storm: Some(no_curve),
                ..Default::default()
            }],
        );
        let p = storm_data(&[input("kill", r), input("old", old)]);
        assert_eq!(p.len(), 1, "a storm without a curve has no panel");
        assert_eq!(
            p[0].title,
            "storm kill-daemon: 100 of 100 agents dropped, all back at 1.5 s, offline events 0 [kill]"
        );
        let names: Vec<&str> = p[0].series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [BACK, SESSIONS, ONLINE, GRACE]);
        assert_eq!(
            p[0].series[0].points,
            [
                (0.0, Some(0.0)),
                (0.1, Some(0.0)),
                (0.2, Some(10.0)),
                (1.5, Some(100.0))
            ]
        );
        // The sessions line breaks where the daemon did not answer.
        assert_eq!(
            p[0].series[1].segments(),
            [vec![(0.0, 100.0)], vec![(0.2, 10.0), (1.5, 100.0)]]
        );
    }

    #[test]
    fn span_pads_and_handles_empty() {
        assert_eq!(span(std::iter::empty(), true), (0.0, 1.0));
        assert_eq!(span([5.0, 5.0].into_iter(), false), (5.0, 6.05));
        assert_eq!(span([2.0, 12.0].into_iter(), true), (0.0, 12.6));
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(35_000.0), "34 KiB");
        assert_eq!(number(1200.0), "1200");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(12.5), "12.5");
    }
}
