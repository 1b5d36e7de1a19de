//! Prometheus text exposition (format 0.0.4) rendered from the `stats` object.

use std::fmt::Write;

use serde_json::Value;

/// Render the `stats` JSON as Prometheus text.
pub fn render(stats: &Value) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, v: &Value| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
            v.as_u64().unwrap_or(0)
        );
    };
    gauge(
        &mut out,
        "presenced_connections",
        "Open agent TCP connections.",
        &stats["connections"],
    );
    gauge(
        &mut out,
        "presenced_agents_online",
        "Agents reported online (connected or in grace).",
        &stats["agents_online"],
    );
    out
}
