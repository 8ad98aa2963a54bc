//! Figures over rounds: medians, ranges, ratios taken within a round, and
//! how they are written in the report's cells.

use super::{Sample, Test};

/// The measurements of one test, by target name and round.
pub struct Table<'a> {
    pub samples: &'a [Sample],
    pub test: Test,
}

impl Table<'_> {
    pub fn value(&self, target: &str, round: usize, metric: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.test == self.test && s.target == target && s.round == round && s.ok())
            .and_then(|s| s.values.get(metric).copied())
            .filter(|v| v.is_finite())
    }

    /// The rounds any sample of the run was taken in.
    pub fn rounds(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.samples.iter().map(|s| s.round).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// One value per round where `target` was measured.
    pub fn values(&self, target: &str, metric: &str) -> Vec<f64> {
        self.rounds()
            .into_iter()
            .filter_map(|r| self.value(target, r, metric))
            .collect()
    }

    /// Units of work per proxy CPU-second, per round: the per-core figure
    /// (the inverse of µs of proxy CPU per unit).
    pub fn per_core(&self, target: &str) -> Vec<f64> {
        self.values(target, "cpu_us")
            .into_iter()
            .filter(|v| *v > 0.0)
            .map(|v| 1e6 / v)
            .collect()
    }

    /// Per-round ratio `target / reference` (or `reference / target` when
    /// `invert`, for costs where lower is better and we want "× as
    /// efficient").
    pub fn ratios(&self, target: &str, reference: &str, metric: &str, invert: bool) -> Vec<f64> {
        ratios_between(
            self.samples,
            (self.test, target),
            (self.test, reference),
            metric,
            invert,
        )
    }

    /// Per-core ratio to `reference`, per round.
    pub fn per_core_ratios(&self, target: &str, reference: &str) -> Vec<f64> {
        self.ratios(target, reference, "cpu_us", true)
    }

    /// Whether `target` has any sample of this test (even a failed one).
    pub fn tried(&self, target: &str) -> bool {
        self.samples
            .iter()
            .any(|s| s.test == self.test && s.target == target)
    }

    /// Why `target` has no figure: every sample skipped (n/a) with this
    /// reason.
    pub fn skipped(&self, target: &str) -> Option<&str> {
        let mut mine = self
            .samples
            .iter()
            .filter(|s| s.test == self.test && s.target == target)
            .peekable();
        mine.peek()?;
        let mut reason = None;
        for s in mine {
            reason = Some(s.skipped.as_deref()?);
        }
        reason
    }
}

/// Per-round ratio of one (test, target)'s `metric` to another's: the
/// same target over two protocols, or two targets in one test.
pub fn ratios_between(
    samples: &[Sample],
    a: (Test, &str),
    reference: (Test, &str),
    metric: &str,
    invert: bool,
) -> Vec<f64> {
    let ta = Table { samples, test: a.0 };
    let tb = Table {
        samples,
        test: reference.0,
    };
    ta.rounds()
        .into_iter()
        .filter_map(|r| {
            let (x, y) = (ta.value(a.1, r, metric)?, tb.value(reference.1, r, metric)?);
            let (num, den) = if invert { (y, x) } else { (x, y) };
            (den > 0.0).then(|| num / den)
        })
        .collect()
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn min_max(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    (min, max)
}

/// 12345.6 → "12,346" (with `decimals` after the point).
pub fn num(v: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if v < 0.0 {
        format!("−{out}")
    } else {
        out
    }
}

/// The median alone.
pub fn cell(v: &[f64], decimals: usize) -> String {
    median(v).map_or("—".into(), |m| num(m, decimals))
}

/// "12,346 (11,900–12,800)": the median and the range over rounds.
pub fn range_cell(v: &[f64], decimals: usize) -> String {
    let Some(m) = median(v) else {
        return "—".into();
    };
    if v.len() < 2 {
        return num(m, decimals);
    }
    let (min, max) = min_max(v);
    format!(
        "{} ({}–{})",
        num(m, decimals),
        num(min, decimals),
        num(max, decimals)
    )
}

/// "1.23×" or "1.23× (1.10–1.31)" with the range over rounds.
pub fn ratio_cell(r: &[f64]) -> String {
    let Some(m) = median(r) else {
        return "—".into();
    };
    if r.len() < 2 {
        return format!("{m:.2}×");
    }
    let (min, max) = min_max(r);
    format!("{m:.2}× ({min:.2}–{max:.2})")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::targets::Kind;
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(1234567.0, 0), "1,234,567");
        assert_eq!(num(999.0, 0), "999");
        assert_eq!(num(1234.5678, 2), "1,234.57");
        assert_eq!(num(0.5, 2), "0.50");
    }

    #[test]
    fn medians_and_cells() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(ratio_cell(&[1.0, 1.2, 1.1]), "1.10× (1.00–1.20)");
        assert_eq!(ratio_cell(&[0.5]), "0.50×");
        assert_eq!(
            range_cell(&[1000.0, 3000.0, 2000.0], 0),
            "2,000 (1,000–3,000)"
        );
        assert_eq!(range_cell(&[], 0), "—");
    }

    fn sample(target: &str, round: usize, cpu_us: f64, skipped: bool) -> Sample {
        Sample {
            test: Test::Ws,
            target: target.into(),
            kind: Kind::Charon,
            round,
            values: BTreeMap::from([("cpu_us", cpu_us)]),
            error: None,
            skipped: skipped.then(|| "not offered".to_string()),
        }
    }

    #[test]
    fn per_core_ratios_are_taken_within_a_round() {
        // Round 1 is twice as slow for both: the ratio stays 2.
        let s = vec![
            sample("charon", 0, 10.0, false),
            sample("nginx", 0, 20.0, false),
            sample("charon", 1, 20.0, false),
            sample("nginx", 1, 40.0, false),
        ];
        let t = Table {
            samples: &s,
            test: Test::Ws,
        };
        assert_eq!(t.per_core("charon"), vec![100_000.0, 50_000.0]);
        assert_eq!(t.per_core_ratios("charon", "nginx"), vec![2.0, 2.0]);
    }

    #[test]
    fn skipped_samples_give_no_figure_and_a_reason() {
        let s = vec![
            sample("charon", 0, 10.0, true),
            sample("direct", 0, 5.0, false),
        ];
        let t = Table {
            samples: &s,
            test: Test::Ws,
        };
        assert!(t.values("charon", "cpu_us").is_empty());
        assert_eq!(t.skipped("charon"), Some("not offered"));
        assert_eq!(t.skipped("direct"), None);
        assert_eq!(t.skipped("nginx"), None);
    }
}
