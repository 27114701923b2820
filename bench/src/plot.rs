//! `pfs-bench plot results.json -o out.svg|out.png`: pictures of a run's JSON document
//! (schema in `docs/bench-json.md`). Four panels: write bandwidth over message size per
//! backend with reference lines (local memcpy, iperf3 in the same run, the NIC's line
//! rate), round-trip latency over message size, latency CDFs, and bandwidth over the
//! number of connections. Panels without data in the document say so.
//!
//! Text is laid out with ab_glyph from a TrueType file read at run time (DejaVu Sans,
//! Debian's fonts-dejavu-core, or `PFS_FONT`), so rendering needs no fontconfig.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use serde_json::Value;

use crate::AnyResult;
use crate::units::fmt_size;

/// Where fonts are looked for, in order, after `PFS_FONT`.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// A line of points `(x, y)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A horizontal reference line.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLine {
    pub label: String,
    pub gbytes_per_s: f64,
}

/// What the document holds, ready to draw.
#[derive(Debug, Default)]
pub struct Data {
    pub title: String,
    /// GB/s over message size (bytes), per backend and test.
    pub bandwidth: Vec<Series>,
    /// Round-trip p50 and p99 (µs) over message size, per backend.
    pub latency_by_size: Vec<Series>,
    /// `(latency µs, fraction of samples at or below it)`.
    pub cdfs: Vec<Series>,
    /// GB/s over connection count.
    pub connections: Vec<Series>,
    pub references: Vec<RefLine>,
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// Read a pfs-bench JSON document into series; errors name what is wrong with it.
pub fn extract(doc: &Value) -> AnyResult<Data> {
    match doc.get("schema").and_then(Value::as_u64) {
        Some(s) if s == u64::from(crate::report::SCHEMA) => {}
        Some(s) => {
            return Err(format!(
                "the document has schema {s}; this pfs-bench reads schema {}: plot it with the \
                 pfs-bench that wrote it",
                crate::report::SCHEMA
            )
            .into());
        }
        None => {
            return Err(
                "not a pfs-bench result document (no \"schema\" field): write one with \
                 `pfs-bench sweep --json FILE` (or run/compare/client --json)"
                    .into(),
            );
        }
    }
    let results = doc
        .get("results")
        .and_then(Value::as_array)
        .ok_or("the document has no \"results\" array")?;
    let swept = results
        .iter()
        .any(|m| m.get("sweep").and_then(Value::as_str) == Some("size"));
    let mut bw: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut lat: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut conns: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut cdfs: BTreeMap<String, (f64, Vec<(f64, f64)>)> = BTreeMap::new();
    for m in results {
        let backend = m.get("backend").and_then(Value::as_str).unwrap_or("?");
        let test = m.get("test").and_then(Value::as_str).unwrap_or("?");
        let sweep = m.get("sweep").and_then(Value::as_str);
        let (Some(size), Some(gb)) = (m.get("size").and_then(f), m.get("gbytes_per_s").and_then(f))
        else {
            continue;
        };
        let n = m.get("connections").and_then(f).unwrap_or(1.0);
        let latency = m.get("latency").filter(|l| !l.is_null());
        match (latency, sweep) {
            (None, Some("connections")) => {
                conns
                    .entry(format!("{backend} {test} {}", fmt_size(size as u64)))
                    .or_default()
                    .push((n, gb));
            }
            (None, _) if test != "atomic" && n == 1.0 && (!swept || sweep == Some("size")) => {
                bw.entry(format!("{backend} {test}"))
                    .or_default()
                    .push((size, gb));
            }
            (Some(l), _) => {
                if !swept || sweep == Some("size") {
                    for (q, key) in [("p50_us", "p50"), ("p99_us", "p99")] {
                        if let Some(v) = l.get(q).and_then(f) {
                            lat.entry(format!("{backend} {test} {key}"))
                                .or_default()
                                .push((size, v));
                        }
                    }
                }
                // One CDF per backend and test: its smallest message.
                let points: Vec<(f64, f64)> = l
                    .get("cdf")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| {
                                let p = p.as_array()?;
                                Some((f(p.get(1)?)?, f(p.first()?)?))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if !points.is_empty() {
                    let key = format!("{backend} {test}");
                    let e = cdfs.entry(key).or_insert((f64::INFINITY, Vec::new()));
                    if size < e.0 {
                        *e = (size, points);
                    }
                }
            }
            _ => {}
        }
    }
    let series = |m: BTreeMap<String, Vec<(f64, f64)>>| -> Vec<Series> {
        m.into_iter()
            .map(|(label, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { label, points }
            })
            .collect()
    };
    let mut references = Vec::new();
    if let Some(g) = doc.pointer("/memcpy/gbytes_per_s").and_then(f) {
        references.push(RefLine {
            label: "local memcpy, 1 thread".into(),
            gbytes_per_s: g,
        });
    }
    for r in doc
        .get("references")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(name), Some(b)) = (
            r.get("name").and_then(Value::as_str),
            r.get("bytes_per_s").and_then(f),
        ) {
            references.push(RefLine {
                label: name.to_string(),
                gbytes_per_s: b / 1e9,
            });
        }
    }
    for rung in doc
        .pointer("/reality/ladder")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = rung.get("name").and_then(Value::as_str).unwrap_or("");
        if let Some(b) = rung
            .get("bytes_per_s")
            .and_then(f)
            .filter(|_| name.starts_with("line rate"))
        {
            references.push(RefLine {
                label: name.to_string(),
                gbytes_per_s: b / 1e9,
            });
        }
    }
    let path = doc
        .pointer("/reality/best/path")
        .and_then(Value::as_str)
        .unwrap_or("");
    let host = doc.get("host");
    let title = format!(
        "pfs-bench {}: {}{}",
        doc.get("version").and_then(Value::as_str).unwrap_or("?"),
        if path.is_empty() { "results" } else { path },
        host.and_then(|h| h.get("cpus"))
            .and_then(Value::as_u64)
            .map_or(String::new(), |c| format!(", {c} CPUs")),
    );
    let data = Data {
        title,
        bandwidth: series(bw),
        latency_by_size: series(lat),
        cdfs: cdfs
            .into_iter()
            .map(|(k, (size, points))| Series {
                label: format!("{k} {}", fmt_size(size as u64)),
                points,
            })
            .collect(),
        connections: series(conns),
        references,
    };
    if data.bandwidth.is_empty()
        && data.latency_by_size.is_empty()
        && data.cdfs.is_empty()
        && data.connections.is_empty()
    {
        return Err("the document holds no bandwidth or latency results to plot".into());
    }
    Ok(data)
}

/// Find and register a font for all text (once per process).
fn register_font() -> AnyResult {
    let mut tried: Vec<String> = Vec::new();
    let from_env = std::env::var("PFS_FONT").ok();
    for p in from_env
        .iter()
        .map(String::as_str)
        .chain(FONT_PATHS.iter().copied())
    {
        match std::fs::read(p) {
            Ok(bytes) => {
                // Registered fonts live for the whole process (plotters keeps a
                // 'static reference); this runs once per plot command.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a TrueType/OpenType font").into());
            }
            Err(e) => tried.push(format!("{p} ({e})")),
        }
    }
    Err(format!(
        "no font to draw text with: install one (apt-get install fonts-dejavu-core; `cargo \
         xtask deps` does) or set PFS_FONT to a .ttf file; tried {}",
        tried.join(", ")
    )
    .into())
}

/// Render `input` (a pfs-bench JSON document) to `output` (.svg or .png).
pub fn plot(input: &str, output: &str) -> AnyResult {
    let ext = Path::new(output)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let size = (1600, 1200);
    match ext.as_deref() {
        Some("svg") | Some("png") => {}
        _ => {
            return Err(
                format!("cannot tell the image format of {output}: name it .svg or .png").into(),
            );
        }
    }
    let text = std::fs::read_to_string(input).map_err(|e| format!("cannot read {input}: {e}"))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{input} is not JSON ({e}): give a file written by --json"))?;
    let data = extract(&doc).map_err(|e| format!("{input}: {e}"))?;
    register_font()?;
    if ext.as_deref() == Some("svg") {
        let root = SVGBackend::new(output, size).into_drawing_area();
        draw(&root, &data)?;
        root.present()
            .map_err(|e| format!("cannot write {output}: {e}"))?;
    } else {
        let root = BitMapBackend::new(output, size).into_drawing_area();
        draw(&root, &data)?;
        root.present()
            .map_err(|e| format!("cannot write {output}: {e}"))?;
    }
    println!("wrote {output}");
    Ok(())
}

type Area<'a, DB> = DrawingArea<DB, Shift>;

fn draw<DB: DrawingBackend>(root: &Area<'_, DB>, d: &Data) -> AnyResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let body = root.titled(&d.title, ("sans-serif", 26))?;
    let panels = body.split_evenly((2, 2));
    bandwidth_panel(&panels[0], d)?;
    latency_size_panel(&panels[1], d)?;
    cdf_panel(&panels[2], d)?;
    connections_panel(&panels[3], d)?;
    Ok(())
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn empty<DB: DrawingBackend>(area: &Area<'_, DB>, title: &str) -> AnyResult
where
    DB::ErrorType: 'static,
{
    let a = area.titled(title, ("sans-serif", 20))?;
    let (w, h) = a.dim_in_pixel();
    a.draw(&Text::new(
        "no such results in this document",
        (w as i32 / 2 - 150, h as i32 / 2),
        ("sans-serif", 16).into_font().color(&BLACK.mix(0.6)),
    ))?;
    Ok(())
}

/// `(min, max)` of the values, widened for a log axis.
fn log_bounds(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = vals
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    (hi > 0.0).then_some((lo / 1.5, hi * 1.5))
}

fn size_label(v: &f64) -> String {
    fmt_size(v.round() as u64).replace(".0 ", " ")
}

fn plain_label(v: &f64) -> String {
    format!("{v}")
}

type Chart<'a, DB, X, Y> = ChartContext<'a, DB, Cartesian2d<X, Y>>;

/// A panel's chart with its caption, grid and axis descriptions.
#[allow(clippy::too_many_arguments)]
fn chart<'a, DB, X, Y>(
    area: &'a Area<'_, DB>,
    title: &str,
    x: X,
    y: Y,
    x_desc: &str,
    y_desc: &str,
    x_fmt: &dyn Fn(&f64) -> String,
    y_fmt: &dyn Fn(&f64) -> String,
) -> AnyResult<Chart<'a, DB, X::CoordDescType, Y::CoordDescType>>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(x_fmt)
        .y_label_formatter(y_fmt)
        .y_labels(8)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    Ok(c)
}

/// One labelled line; dashed for reference lines and tails, dots on measured points.
fn line<'a, DB, X, Y>(
    c: &mut Chart<'a, DB, X, Y>,
    label: &str,
    points: Vec<(f64, f64)>,
    style: ShapeStyle,
    dashed: bool,
    dots: bool,
) -> AnyResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 20, y)], style);
    if dashed {
        c.draw_series(DashedLineSeries::new(points.clone(), 8, 6, style))?
            .label(label)
            .legend(legend);
    } else {
        c.draw_series(LineSeries::new(points.clone(), style))?
            .label(label)
            .legend(legend);
    }
    if dots {
        c.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, style.filled())),
        )?;
    }
    Ok(())
}

/// Horizontal reference lines across `[x0, x1]`.
fn references<'a, DB, X, Y>(
    c: &mut Chart<'a, DB, X, Y>,
    refs: &[&RefLine],
    x0: f64,
    x1: f64,
) -> AnyResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for r in refs {
        // Each reference keeps its color in every panel.
        let col = match r.label.as_str() {
            l if l.contains("memcpy") => color(4),
            l if l.starts_with("line rate") => color(6),
            _ => color(5),
        };
        let y = r.gbytes_per_s;
        let label = format!("{} ({:.2} GB/s)", r.label, y);
        line(
            c,
            &label,
            vec![(x0, y), (x1, y)],
            col.stroke_width(2),
            true,
            false,
        )?;
    }
    Ok(())
}

fn legend<'a, DB, X, Y>(c: &mut Chart<'a, DB, X, Y>, at: SeriesLabelPosition) -> AnyResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    c.configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

type LogChart<'a, DB> = Chart<'a, DB, LogCoord<f64>, LogCoord<f64>>;

/// A log-log chart of `series` over message size, its y range also covering `extra_y`;
/// `None` when there is nothing to draw.
fn size_chart<'a, DB>(
    area: &'a Area<'_, DB>,
    title: &str,
    series: &[Series],
    extra_y: &[f64],
    y_desc: &str,
) -> AnyResult<Option<(LogChart<'a, DB>, f64, f64)>>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
{
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (Some((x0, x1)), Some((y0, y1))) = (
        log_bounds(pts().map(|p| p.0)),
        log_bounds(pts().map(|p| p.1).chain(extra_y.iter().copied())),
    ) else {
        return Ok(None);
    };
    let c = chart(
        area,
        title,
        (x0..x1).log_scale().base(2.0),
        (y0..y1).log_scale(),
        "message size",
        y_desc,
        &size_label,
        &plain_label,
    )?;
    Ok(Some((c, x0, x1)))
}

fn bandwidth_panel<DB: DrawingBackend>(area: &Area<'_, DB>, d: &Data) -> AnyResult
where
    DB::ErrorType: 'static,
{
    let title = "write bandwidth over message size (1 connection)";
    let refs: Vec<&RefLine> = d.references.iter().collect();
    let ys: Vec<f64> = refs.iter().map(|r| r.gbytes_per_s).collect();
    let Some((mut c, x0, x1)) = size_chart(area, title, &d.bandwidth, &ys, "GB/s")? else {
        return empty(area, title);
    };
    for (i, s) in d.bandwidth.iter().enumerate() {
        let style = color(i).stroke_width(2);
        line(&mut c, &s.label, s.points.clone(), style, false, true)?;
    }
    references(&mut c, &refs, x0, x1)?;
    legend(&mut c, SeriesLabelPosition::LowerRight)
}

fn latency_size_panel<DB: DrawingBackend>(area: &Area<'_, DB>, d: &Data) -> AnyResult
where
    DB::ErrorType: 'static,
{
    let title = "write round trip over message size (busy-poll, 1 in flight)";
    if d.latency_by_size.iter().all(|s| s.points.len() < 2) {
        return empty(area, title);
    }
    let Some((mut c, _, _)) = size_chart(area, title, &d.latency_by_size, &[], "µs")? else {
        return empty(area, title);
    };
    for (i, s) in d.latency_by_size.iter().enumerate() {
        // p50 and p99 of one test share a color; p99 is dashed.
        let style = color(i / 2).stroke_width(2);
        let dashed = s.label.ends_with("p99");
        line(&mut c, &s.label, s.points.clone(), style, dashed, false)?;
    }
    legend(&mut c, SeriesLabelPosition::UpperLeft)
}

/// A quantile on the "nines" scale: 0.9 → 1, 0.99 → 2, …; the maximum (1) at
/// [`MAX_NINES`].
fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        MAX_NINES
    } else {
        (-(1.0 - q).log10()).min(MAX_NINES - 0.5)
    }
}

const MAX_NINES: f64 = 5.0;

fn nines_label(y: &f64) -> String {
    match y.round() as i64 {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        3 => "99.9%".into(),
        4 => "99.99%".into(),
        _ => "max".into(),
    }
}

fn cdf_panel<DB: DrawingBackend>(area: &Area<'_, DB>, d: &Data) -> AnyResult
where
    DB::ErrorType: 'static,
{
    let title = "round-trip latency CDF, tail stretched (smallest message of each test)";
    let Some((x0, x1)) = log_bounds(d.cdfs.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
    else {
        return empty(area, title);
    };
    let mut c = chart(
        area,
        title,
        (x0..x1).log_scale(),
        (0f64..MAX_NINES + 0.001).step(1.0),
        "µs",
        "samples at or below",
        &plain_label,
        &nines_label,
    )?;
    for (i, s) in d.cdfs.iter().enumerate() {
        let pts = s.points.iter().map(|&(us, q)| (us, nines(q))).collect();
        line(
            &mut c,
            &s.label,
            pts,
            color(i).stroke_width(2),
            false,
            false,
        )?;
    }
    legend(&mut c, SeriesLabelPosition::UpperLeft)
}

fn connections_panel<DB: DrawingBackend>(area: &Area<'_, DB>, d: &Data) -> AnyResult
where
    DB::ErrorType: 'static,
{
    let title = "write bandwidth over connections";
    let pts = || d.connections.iter().flat_map(|s| s.points.iter());
    // memcpy would flatten the scale; the network references stay.
    let refs: Vec<&RefLine> = d
        .references
        .iter()
        .filter(|r| !r.label.contains("memcpy"))
        .collect();
    let x1 = pts().map(|p| p.0).fold(0.0f64, f64::max) * 1.2;
    let y1 = pts()
        .map(|p| p.1)
        .chain(refs.iter().map(|r| r.gbytes_per_s))
        .fold(0.0f64, f64::max);
    if d.connections.is_empty() || x1 <= 0.0 || y1 <= 0.0 {
        return empty(area, title);
    }
    let mut c = chart(
        area,
        title,
        (1f64..x1).log_scale().base(2.0),
        0f64..y1 * 1.4,
        "connections (each with its own region and writes in flight)",
        "GB/s",
        &|v| format!("{}", v.round()),
        &plain_label,
    )?;
    for (i, s) in d.connections.iter().enumerate() {
        line(
            &mut c,
            &s.label,
            s.points.clone(),
            color(i).stroke_width(2),
            false,
            true,
        )?;
    }
    references(&mut c, &refs, 1.0, x1)?;
    legend(&mut c, SeriesLabelPosition::UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::json!({
            "schema": 1,
            "version": "0.1.0",
            "host": {"cpus": 2},
            "results": [
                {"backend": "tcp", "test": "write", "size": 4096, "gbytes_per_s": 1.0,
                 "connections": 1, "sweep": "size", "latency": null},
                {"backend": "tcp", "test": "write", "size": 2, "gbytes_per_s": 0.001,
                 "connections": 1, "sweep": "size", "latency": null},
                {"backend": "tcp", "test": "latency", "size": 2, "gbytes_per_s": 0.0,
                 "connections": 1, "sweep": "size",
                 "latency": {"p50_us": 8.0, "p99_us": 12.0,
                             "cdf": [[0.0, 7.0], [0.5, 8.0], [1.0, 30.0]]}},
                {"backend": "tcp", "test": "latency", "size": 64, "gbytes_per_s": 0.0,
                 "connections": 1, "sweep": "size",
                 "latency": {"p50_us": 9.0, "p99_us": 13.0, "cdf": [[0.0, 8.0], [1.0, 40.0]]}},
                {"backend": "tcp", "test": "write", "size": 65536, "gbytes_per_s": 1.5,
                 "connections": 8, "sweep": "connections", "latency": null},
                {"backend": "tcp", "test": "atomic", "size": 8, "gbytes_per_s": 0.01,
                 "connections": 1, "latency": null}
            ],
            "memcpy": {"gbytes_per_s": 10.0},
            "references": [{"name": "iperf3, 1 TCP stream", "bytes_per_s": 2.0e9}],
            "reality": {"best": {"path": "loopback"}, "ladder": [
                {"name": "line rate of eth0", "bytes_per_s": 1.25e9},
                {"name": "local memcpy, 1 thread", "bytes_per_s": 1.0e10}]}
        })
    }

    #[test]
    fn extracts_series_sorted_by_size() {
        let d = extract(&doc()).unwrap();
        assert_eq!(
            d.bandwidth.len(),
            1,
            "atomics and connection points stay out"
        );
        assert_eq!(d.bandwidth[0].label, "tcp write");
        assert_eq!(d.bandwidth[0].points, vec![(2.0, 0.001), (4096.0, 1.0)]);
        assert_eq!(d.connections[0].points, vec![(8.0, 1.5)]);
        assert_eq!(d.latency_by_size.len(), 2);
        assert_eq!(d.latency_by_size[0].points, vec![(2.0, 8.0), (64.0, 9.0)]);
        // The CDF is the smallest message's, as (µs, fraction).
        assert_eq!(d.cdfs.len(), 1);
        assert_eq!(d.cdfs[0].label, "tcp latency 2 B");
        assert_eq!(d.cdfs[0].points[2], (30.0, 1.0));
        let refs: Vec<&str> = d.references.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            refs,
            vec![
                "local memcpy, 1 thread",
                "iperf3, 1 TCP stream",
                "line rate of eth0"
            ]
        );
        assert!(d.title.contains("loopback"));
    }

    #[test]
    fn nines_stretch_the_tail() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(nines(1.0), MAX_NINES);
        assert!(
            nines(0.999_999_9) < MAX_NINES,
            "only the maximum sits on the top line"
        );
        assert_eq!(nines_label(&3.0), "99.9%");
    }

    #[test]
    fn refuses_what_is_not_a_result_document() {
        let e = extract(&serde_json::json!({"a": 1}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"schema\""), "{e}");
        let e = extract(&serde_json::json!({"schema": 99, "results": []}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("schema 99"), "{e}");
        let e = extract(&serde_json::json!({"schema": 1, "results": []}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no bandwidth or latency"), "{e}");
    }
}
