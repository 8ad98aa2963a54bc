//! Rendering API answers: aligned text for people, JSON for scripts.
//!
//! The functions return strings instead of printing so that tests can check
//! the exact output. JSON uses the proto field names, so a script reads the
//! same names as the API documentation.

use charon_proto::v1::{Location, ProxyHost};
use serde_json::{json, Value};

/// `host list` in table mode: one row per host.
pub fn hosts_table(hosts: &[ProxyHost]) -> String {
    if hosts.is_empty() {
        return "no hosts\n".to_string();
    }
    let header = [
        "ID",
        "NAME",
        "DOMAINS",
        "UPSTREAMS",
        "ENABLED",
        "WS",
        "VERSION",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(hosts.iter().map(|h| {
        vec![
            h.id.clone(),
            h.name.clone(),
            h.domains.join(","),
            h.upstreams.join(","),
            yes_no(h.enabled),
            yes_no(h.websocket),
            h.version.to_string(),
        ]
    }));
    align(&rows)
}

/// `host show` in table mode: one `key: value` line per field; each location
/// gets its own line.
pub fn host_details(h: &ProxyHost) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("id", h.id.clone()),
        ("name", h.name.clone()),
        ("domains", h.domains.join(", ")),
        ("upstreams", h.upstreams.join(", ")),
        ("enabled", yes_no(h.enabled)),
        ("websocket", yes_no(h.websocket)),
        ("preserve host", yes_no(h.preserve_host)),
        ("forwarded headers", yes_no(h.forwarded_headers)),
        (
            "ws idle timeout",
            or_zero(h.ws_idle_timeout_secs, "s", "never"),
        ),
        (
            "ws ping interval",
            or_zero(h.ws_ping_interval_secs, "s", "off"),
        ),
        (
            "upstream timeout",
            or_zero(h.upstream_timeout_ms, "ms", "node default"),
        ),
    ];
    if h.locations.is_empty() {
        rows.push(("locations", "none".to_string()));
    }
    for (i, loc) in h.locations.iter().enumerate() {
        rows.push((if i == 0 { "locations" } else { "" }, location(loc)));
    }
    rows.push(("created", unix_ms(h.created_at_ms)));
    rows.push(("updated", unix_ms(h.updated_at_ms)));
    rows.push(("version", h.version.to_string()));

    let width = rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| {
            let key = if key.is_empty() {
                String::new()
            } else {
                format!("{key}:")
            };
            format!("{key:<width$}  {value}\n")
        })
        .collect()
}

/// One host as a JSON object with every field of `ProxyHost`.
pub fn host_json(h: &ProxyHost) -> Value {
    json!({
        "id": h.id,
        "name": h.name,
        "domains": h.domains,
        "upstreams": h.upstreams,
        "enabled": h.enabled,
        "websocket": h.websocket,
        "preserve_host": h.preserve_host,
        "forwarded_headers": h.forwarded_headers,
        "locations": h.locations.iter().map(|l| json!({
            "path_prefix": l.path_prefix,
            "upstreams": l.upstreams,
        })).collect::<Vec<_>>(),
        "ws_idle_timeout_secs": h.ws_idle_timeout_secs,
        "ws_ping_interval_secs": h.ws_ping_interval_secs,
        "upstream_timeout_ms": h.upstream_timeout_ms,
        "created_at_ms": h.created_at_ms,
        "updated_at_ms": h.updated_at_ms,
        "version": h.version,
    })
}

pub fn hosts_json(hosts: &[ProxyHost]) -> Value {
    Value::Array(hosts.iter().map(host_json).collect())
}

/// Pads every column but the last to its widest cell, two spaces apart.
fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A duration field where 0 has a meaning of its own rather than "no time".
fn or_zero(value: u32, unit: &str, zero: &str) -> String {
    if value == 0 {
        zero.to_string()
    } else {
        format!("{value}{unit}")
    }
}

fn location(loc: &Location) -> String {
    format!("{} -> {}", loc.path_prefix, loc.upstreams.join(", "))
}

/// Unix milliseconds as UTC RFC 3339, without pulling in a date crate for
/// one conversion (days-to-civil from Howard Hinnant's date algorithms).
fn unix_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProxyHost {
        ProxyHost {
            id: "h1".into(),
            name: "app".into(),
            domains: vec!["app.example".into(), "www.app.example".into()],
            upstreams: vec!["http://10.0.0.5:8080".into()],
            enabled: true,
            websocket: true,
            preserve_host: true,
            forwarded_headers: false,
            locations: vec![
                Location {
                    path_prefix: "/api".into(),
                    upstreams: vec!["http://10.0.0.6:1".into(), "http://10.0.0.7:1".into()],
                },
                Location {
                    path_prefix: "/ws".into(),
                    upstreams: vec!["http://10.0.0.8:1".into()],
                },
            ],
            ws_idle_timeout_secs: 0,
            ws_ping_interval_secs: 30,
            upstream_timeout_ms: 0,
            created_at_ms: 1_714_564_800_000,
            updated_at_ms: 1_714_564_861_999,
            version: 3,
        }
    }

    #[test]
    fn list_columns_are_aligned() {
        let mut other = sample();
        other.id = "a-much-longer-id".into();
        other.name = "x".into();
        other.domains = vec!["x.example".into()];
        other.enabled = false;
        other.version = 12;
        let table = hosts_table(&[sample(), other]);
        let want = "\
ID                NAME  DOMAINS                      UPSTREAMS             ENABLED  WS   VERSION
h1                app   app.example,www.app.example  http://10.0.0.5:8080  yes      yes  3
a-much-longer-id  x     x.example                    http://10.0.0.5:8080  no       yes  12
";
        assert_eq!(table, want);
    }

    #[test]
    fn an_empty_list_says_so() {
        assert_eq!(hosts_table(&[]), "no hosts\n");
    }

    #[test]
    fn details_show_every_field_and_each_location() {
        let text = host_details(&sample());
        let want = "\
id:                 h1
name:               app
domains:            app.example, www.app.example
upstreams:          http://10.0.0.5:8080
enabled:            yes
websocket:          yes
preserve host:      yes
forwarded headers:  no
ws idle timeout:    never
ws ping interval:   30s
upstream timeout:   node default
locations:          /api -> http://10.0.0.6:1, http://10.0.0.7:1
                    /ws -> http://10.0.0.8:1
created:            2024-05-01T12:00:00Z
updated:            2024-05-01T12:01:01Z
version:            3
";
        assert_eq!(text, want);
    }

    #[test]
    fn json_uses_proto_field_names() {
        let v = host_json(&sample());
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "id",
            "name",
            "domains",
            "upstreams",
            "enabled",
            "websocket",
            "preserve_host",
            "forwarded_headers",
            "locations",
            "ws_idle_timeout_secs",
            "ws_ping_interval_secs",
            "upstream_timeout_ms",
            "created_at_ms",
            "updated_at_ms",
            "version",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["locations"][0]["path_prefix"], "/api");
        assert_eq!(v["locations"][0]["upstreams"][1], "http://10.0.0.7:1");
        assert_eq!(v["version"], 3);
        assert_eq!(v["forwarded_headers"], false);
        assert!(hosts_json(&[sample()]).is_array());
    }

    #[test]
    fn timestamps() {
        assert_eq!(unix_ms(0), "-");
        assert_eq!(unix_ms(1), "1970-01-01T00:00:00Z");
        assert_eq!(unix_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(unix_ms(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
