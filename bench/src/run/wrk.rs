//! Reading wrk's report (`wrk --latency`).

#[derive(Debug, Default, Clone, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub errors: u64,
}

/// `635.00us`, `2.10ms`, `1.02s`, `3.00m` → milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

pub fn parse(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut have_rps, mut have_p50, mut have_p99) = (false, false, false);
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse()?;
            have_rps = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = duration_ms(v.trim()).ok_or_else(|| anyhow::anyhow!("bad p50 {v:?}"))?;
            have_p50 = true;
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = duration_ms(v.trim()).ok_or_else(|| anyhow::anyhow!("bad p99 {v:?}"))?;
            have_p99 = true;
        } else if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next().unwrap_or("0").parse()?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>()?;
        }
    }
    if !(have_rps && have_p50 && have_p99) || r.requests == 0 {
        anyhow::bail!("wrk printed no usable result:\n{out}");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:8080/small
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  312.45us   9.98ms   88.12%
    Req/Sec    62.84k     3.11k   68.90k    71.00%
  Latency Distribution
     50%  635.00us
     75%    1.10ms
     90%    1.40ms
     99%    2.10ms
  625312 requests in 10.00s, 120.36MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  62530.95
Transfer/sec:     12.04MB
";

    #[test]
    fn parses_throughput_latency_and_errors() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 625_312);
        assert!((r.rps - 62530.95).abs() < 1e-6);
        assert!((r.p50_ms - 0.635).abs() < 1e-9);
        assert!((r.p99_ms - 2.10).abs() < 1e-9);
        assert_eq!(r.errors, 7);
    }

    #[test]
    fn refuses_output_without_numbers() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }
}
